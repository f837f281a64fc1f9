//! Customer authentication (B30): `Authorization: Bearer <JWT>`, HS256 with
//! `AUTH_JWT_SECRET`, `exp` required, `sub` = the customer id.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use common::CustomerId;
use common::http::ApiError;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Claims of a customer token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The customer id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// Verifies customer tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier")
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token is refused before its `nbf` as after its `exp` (RFC 7519).
        validation.validate_nbf = true;
        validation.leeway = 5;
        Self {
            key: Arc::new(DecodingKey::from_secret(secret.as_bytes())),
            validation: Arc::new(validation),
        }
    }

    /// The customer a bearer token authenticates.
    pub fn verify(&self, token: &str) -> Result<CustomerId, ApiError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                tracing::debug!(error = %e, "rejected customer token");
                ApiError::unauthorized("a valid, unexpired customer token is required")
            })?;
        CustomerId::parse(data.claims.sub)
            .map_err(|_| ApiError::unauthorized("the token's subject is not a customer id"))
    }
}

/// Issues a token for `customer` valid for `ttl_secs` (for `make run`'s demo
/// and tests; production tokens come from the bank's identity provider).
pub fn issue_token(
    secret: &str,
    customer: &str,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + ttl_secs;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: customer.to_owned(),
            exp,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// The authenticated customer of a request.
#[derive(Debug, Clone)]
pub struct Customer(pub CustomerId);

impl<S> FromRequestParts<S> for Customer
where
    S: Send + Sync,
    TokenVerifier: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = <TokenVerifier as axum::extract::FromRef<S>>::from_ref(state);
        let token = common::http::bearer_token(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized("a bearer token is required"))?;
        verifier.verify(token).map(Customer)
    }
}

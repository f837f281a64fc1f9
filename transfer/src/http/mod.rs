//! The transfer service's HTTP API (API.md, transfer table): the only module
//! that knows HTTP. Every `/v1` route needs a customer token (B30) and acts
//! only on the caller's own accounts.

mod accounts;
mod transfers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRef;
use axum::routing::get;
use common::http::{ApiError, ErrorBody, Readiness};
use common::{AccountId, CustomerId};
use sea_orm::DatabaseConnection;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::TokenVerifier;
use crate::core_client::{CoreClient, CoreError};
use crate::transfers::service::TransferService;

/// What handlers share, behind one `Arc`: axum clones the state for every
/// request, and that should cost one reference count.
pub type AppState = Arc<AppShared>;

/// The parts handlers share.
pub struct AppShared {
    /// Channel database.
    pub db: DatabaseConnection,
    /// The core.
    pub core: CoreClient,
    /// The transfer use case.
    pub transfers: TransferService,
    /// Customer tokens.
    pub verifier: TokenVerifier,
    /// Account owner by account id, cached briefly.
    pub owners: moka::future::Cache<String, Arc<str>>,
}

impl FromRef<AppState> for TokenVerifier {
    fn from_ref(s: &AppState) -> Self {
        s.verifier.clone()
    }
}

impl AppShared {
    /// Checks that `account` belongs to `customer` (403 otherwise, also for
    /// accounts that do not exist, so existence does not leak).
    pub async fn check_owner(
        &self,
        customer: &CustomerId,
        account: &AccountId,
    ) -> Result<(), ApiError> {
        let owner = match self.owners.get(account.as_str()).await {
            Some(o) => o,
            None => match self.core.account(account).await {
                Ok(a) => {
                    let owner: Arc<str> = Arc::from(a.customer_id.as_str());
                    self.owners.insert(account.to_string(), owner.clone()).await;
                    owner
                }
                Err(CoreError::Refused { status: 404, .. }) => return Err(forbidden()),
                Err(e) => return Err(core_unavailable(&e)),
            },
        };
        if owner.as_ref() == customer.as_str() {
            Ok(())
        } else {
            Err(forbidden())
        }
    }
}

fn forbidden() -> ApiError {
    ApiError::forbidden("this account is not yours")
}

/// 503 for a core that cannot be reached.
pub(crate) fn core_unavailable(e: &CoreError) -> ApiError {
    tracing::warn!(error = %e, "core unavailable");
    ApiError::unavailable("the core bank is unavailable; retry later")
}

/// Parses a path id, answering 400 `invalid_id`.
pub(crate) fn parse_id<T: std::str::FromStr<Err = common::ids::IdError>>(
    s: &str,
) -> Result<T, ApiError> {
    s.parse()
        .map_err(|e: common::ids::IdError| ApiError::bad_request("invalid_id", e.to_string()))
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "customer_jwt",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "transfer", description = "The customer channel: transfers, history and interest. Every /v1 route requires a customer JWT (HS256, `sub` = customer id, `exp` required)."),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    security(("customer_jwt" = []))
)]
struct ApiDoc;

/// The whole HTTP application.
pub fn router(state: AppState, readiness: Readiness, request_timeout: Duration) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(transfers::create))
        .routes(routes!(transfers::get))
        .routes(routes!(accounts::history))
        .routes(routes!(accounts::sync))
        .routes(routes!(accounts::interest))
        .routes(routes!(accounts::receive_interest))
        .split_for_parts();
    let doc = Arc::new(doc);
    let api = api.with_state(state).route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    );
    common::http::with_edge(api, readiness, request_timeout)
}

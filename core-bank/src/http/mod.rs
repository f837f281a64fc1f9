//! The core's HTTP API (API.md, core-bank table): the only module that knows
//! HTTP and JSON. Every `/v1` route requires the service credential.

mod accounts;
mod admin;
mod interest;
mod movements;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::http::{ApiError, ErrorBody, Readiness};
use sea_orm::DatabaseConnection;
use subtle::ConstantTimeEq;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::clock::Clock;
use crate::interest::InterestService;
use crate::ledger::Ledger;

/// What handlers share, behind one `Arc`: axum clones the state for every
/// request, and that should cost one reference count.
pub type AppState = Arc<AppShared>;

/// The parts handlers share.
pub struct AppShared {
    /// Core database.
    pub db: DatabaseConnection,
    /// Business clock.
    pub clock: Clock,
    /// The ledger executor.
    pub ledger: Ledger,
    /// Interest queries.
    pub interest: InterestService,
    /// Request TTL (B5).
    pub request_ttl: Duration,
    /// The service credentials.
    pub tokens: ServiceTokens,
    /// One `POST /v1/admin/interest/verify` at a time per process: each
    /// reads up to 10,000 accounts' periods, and several at once would take
    /// the pool from payouts and transfers.
    pub verifying: tokio::sync::Semaphore,
}

/// The credentials `/v1` accepts.
#[derive(Clone)]
pub struct ServiceTokens {
    /// `CORE_API_TOKEN`: every route.
    pub full: Arc<str>,
    /// `CORE_READ_API_TOKEN`: `GET` (and `HEAD`) only.
    pub read_only: Option<Arc<str>>,
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "service_token",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "core-bank", description = "Core bank: the ledger of record. Every /v1 route requires `Authorization: Bearer $CORE_API_TOKEN`."),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    security(("service_token" = []))
)]
struct ApiDoc;

/// The `/v1` routes and their OpenAPI document.
fn api(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(accounts::create_customer))
        .routes(routes!(accounts::patch_customer))
        .routes(routes!(accounts::create_account, accounts::list_accounts))
        .routes(routes!(accounts::get_account, accounts::patch_account))
        .routes(routes!(movements::deposit))
        .routes(routes!(movements::transfer))
        .routes(routes!(movements::get_transfer))
        .routes(routes!(movements::fence))
        .routes(routes!(movements::entries))
        .routes(routes!(interest::expected))
        .routes(routes!(interest::payout))
        .routes(routes!(interest::get_payout))
        .routes(routes!(interest::get_rollout, interest::put_rollout))
        .routes(routes!(interest::verify))
        .routes(routes!(admin::get_clock, admin::set_clock))
        .split_for_parts();
    let tokens = state.tokens.clone();
    let router = router
        .route_layer(axum::middleware::from_fn_with_state(
            tokens,
            require_service_token,
        ))
        .with_state(state);
    (router, doc)
}

/// The whole HTTP application: API, OpenAPI document, operational endpoints.
pub fn router(state: AppState, readiness: Readiness, request_timeout: Duration) -> Router {
    let (api, doc) = api(state);
    let doc = Arc::new(doc);
    let api = api.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    );
    common::http::with_edge(api, readiness, request_timeout)
}

/// Checks `Authorization: Bearer <token>` in constant time: the full
/// credential passes everywhere, the read-only one on `GET` and `HEAD`.
async fn require_service_token(
    State(tokens): State<ServiceTokens>,
    req: Request,
    next: Next,
) -> Response {
    let presented = common::http::bearer_token(req.headers()).unwrap_or("");
    let is = |token: &str| -> bool { presented.as_bytes().ct_eq(token.as_bytes()).into() };
    if is(&tokens.full) {
        return next.run(req).await;
    }
    if tokens.read_only.as_deref().is_some_and(is) {
        if matches!(*req.method(), Method::GET | Method::HEAD) {
            return next.run(req).await;
        }
        return ApiError::forbidden("this credential may only read (GET)").into_response();
    }
    ApiError::unauthorized("a valid service token is required (Authorization: Bearer ...)")
        .into_response()
}

/// Parses a path id, answering 400 `invalid_id`.
pub(crate) fn parse_id<T: std::str::FromStr<Err = common::ids::IdError>>(
    s: &str,
) -> Result<T, ApiError> {
    s.parse()
        .map_err(|e: common::ids::IdError| ApiError::bad_request("invalid_id", e.to_string()))
}

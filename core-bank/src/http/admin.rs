//! The business clock.

use axum::extract::State;
use chrono::NaiveDate;
use common::http::{ApiError, ErrorBody, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use crate::clock::ClockError;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ClockView {
    /// The business date (`YYYY-MM-DD`).
    today: NaiveDate,
}

/// The business date in force.
#[utoipa::path(get, path = "/v1/admin/clock", responses((status = 200, body = ClockView)))]
pub(super) async fn get_clock(State(s): State<AppState>) -> axum::Json<ClockView> {
    axum::Json(ClockView {
        today: s.clock.today(),
    })
}

/// Moves the business date forward (only with `BANK_TEST_CLOCK=1`; 404 otherwise).
#[utoipa::path(post, path = "/v1/admin/clock", request_body = ClockView,
    responses((status = 200, body = ClockView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn set_clock(
    State(s): State<AppState>,
    body: Result<Json<ClockView>, ApiError>,
) -> Result<axum::Json<ClockView>, ApiError> {
    // The route does not exist without the test clock, whatever the body.
    if !s.clock.is_settable() {
        return Err(ApiError::not_found("not_found", "no such route"));
    }
    let Json(body) = body?;
    match s.clock.set(&s.db, body.today).await {
        Ok(today) => Ok(axum::Json(ClockView { today })),
        Err(e @ ClockError::Backwards { .. }) => {
            Err(ApiError::unprocessable("clock_backwards", e.to_string()))
        }
        Err(e @ ClockError::TooFar { .. }) => {
            Err(ApiError::bad_request("invalid_request", e.to_string()))
        }
        Err(ClockError::Disabled) => Err(ApiError::not_found("not_found", "no such route")),
        Err(ClockError::Db(db)) => Err(ApiError::database(&db)),
    }
}

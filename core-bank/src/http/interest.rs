//! Interest: expected interest, payouts, rollout and verification.

use axum::extract::State;
use common::http::{ApiError, ErrorBody, Json, Path};
use common::{AccountId, PayoutId};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{AppState, parse_id};
use crate::interest::Accrual;
use crate::interest::payout::{self, Payout, PayoutError};
use crate::interest::rollout::RolloutSetting;
use crate::interest::service::{InterestError, VerifyReport};

/// Most accounts one HTTP verification compares; the CLI has no limit.
const MAX_HTTP_VERIFY: u64 = 10_000;

impl From<InterestError> for ApiError {
    fn from(e: InterestError) -> Self {
        match e {
            InterestError::AccountNotFound => {
                ApiError::not_found("account_not_found", "no such account")
            }
            InterestError::Db(db) => ApiError::database(&db),
        }
    }
}

impl From<PayoutError> for ApiError {
    fn from(e: PayoutError) -> Self {
        let msg = e.to_string();
        match e {
            PayoutError::AccountNotFound => ApiError::not_found("account_not_found", msg),
            PayoutError::CustomerProtected(_) => ApiError::unprocessable("customer_protected", msg),
            PayoutError::AccountNotActive => ApiError::unprocessable("account_not_active", msg),
            PayoutError::DepositStopped => ApiError::unprocessable("deposit_stopped", msg),
            PayoutError::NothingToPay => ApiError::unprocessable("nothing_to_pay", msg),
            PayoutError::BalanceLimitExceeded => {
                ApiError::unprocessable("balance_limit_exceeded", msg)
            }
            PayoutError::AlreadyPaidToday | PayoutError::PaidMeanwhile => {
                ApiError::conflict("already_paid_today", msg)
            }
            PayoutError::IdempotencyConflict(_) => ApiError::conflict("idempotency_conflict", msg),
            PayoutError::DateChanged => ApiError::unavailable(msg),
            PayoutError::Db(db) => ApiError::database(&db),
        }
    }
}

/// Interest accrued over the completed days not yet paid out.
#[utoipa::path(get, path = "/v1/accounts/{id}/interest", params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = Accrual), (status = 404, body = ErrorBody)))]
pub(super) async fn expected(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Accrual>, ApiError> {
    let id: AccountId = parse_id(&id)?;
    Ok(axum::Json(s.interest.expected(&id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PayoutBody {
    #[schema(value_type = String)]
    payout_id: PayoutId,
}

/// Pays out the accrued interest (once per business date, idempotent by `payout_id`).
#[utoipa::path(post, path = "/v1/accounts/{id}/interest/payouts", request_body = PayoutBody,
    params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = Payout), (status = 404, body = ErrorBody),
        (status = 409, description = "already_paid_today, idempotency_conflict", body = ErrorBody),
        (status = 422, description = "customer_protected, account_not_active, deposit_stopped, nothing_to_pay, balance_limit_exceeded", body = ErrorBody)))]
pub(super) async fn payout(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PayoutBody>,
) -> Result<axum::Json<Payout>, ApiError> {
    let id: AccountId = parse_id(&id)?;
    let p = payout::pay(&s.db, &s.clock, &s.interest, &id, &body.payout_id).await?;
    Ok(axum::Json(p))
}

/// One payout of the account, as `POST .../interest/payouts` answered it;
/// a read only (the projector checks tax events against it).
#[utoipa::path(get, path = "/v1/accounts/{id}/interest/payouts/{payout_id}",
    params(("id" = String, Path, description = "account id"), ("payout_id" = String, Path, description = "payout id")),
    responses((status = 200, body = Payout),
        (status = 404, description = "payout_not_found: the core made no such payout to this account", body = ErrorBody)))]
pub(super) async fn get_payout(
    State(s): State<AppState>,
    Path((id, payout_id)): Path<(String, String)>,
) -> Result<axum::Json<Payout>, ApiError> {
    let id: AccountId = parse_id(&id)?;
    let payout_id: PayoutId = parse_id(&payout_id)?;
    match payout::find(&s.db, &id, &payout_id).await {
        Ok(Some(p)) => Ok(axum::Json(p)),
        Ok(None) => Err(ApiError::not_found(
            "payout_not_found",
            format!("no payout {payout_id} to account {id}"),
        )),
        Err(e) => Err(ApiError::database(&e)),
    }
}

/// The rollout setting in force.
#[utoipa::path(get, path = "/v1/admin/interest/rollout", responses((status = 200, body = RolloutSetting)))]
pub(super) async fn get_rollout(
    State(s): State<AppState>,
) -> Result<axum::Json<RolloutSetting>, ApiError> {
    s.interest
        .rollout()
        .refresh(&s.db)
        .await
        .map_err(|e| ApiError::database(&e))?;
    Ok(axum::Json(s.interest.rollout().get()))
}

/// Changes the rollout; every replica follows within a second.
#[utoipa::path(put, path = "/v1/admin/interest/rollout", request_body = RolloutSetting,
    responses((status = 200, body = RolloutSetting), (status = 400, body = ErrorBody)))]
pub(super) async fn put_rollout(
    State(s): State<AppState>,
    Json(body): Json<RolloutSetting>,
) -> Result<axum::Json<RolloutSetting>, ApiError> {
    if body.new_path_percent > 100 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "new_path_percent must be between 0 and 100",
        ));
    }
    let stored = s
        .interest
        .rollout()
        .store(&s.db, body)
        .await
        .map_err(|e| ApiError::database(&e))?;
    Ok(axum::Json(stored))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyBody {
    /// Compare this many random accounts (1..=10000); without it, every
    /// account when there are at most 10000, and a random 10000 otherwise.
    sample: Option<u64>,
}

/// Compares the legacy and new paths over accounts and lists mismatches. The
/// body is optional: none (or `{}`, or `null`) compares all accounts, up to
/// 10,000. One verification runs at a time per process; another request
/// meanwhile is answered 409 `verification_running`.
#[utoipa::path(post, path = "/v1/admin/interest/verify", request_body = Option<VerifyBody>,
    responses((status = 200, body = VerifyReport), (status = 400, body = ErrorBody),
        (status = 409, description = "`verification_running`: another verification runs in this process", body = ErrorBody)))]
pub(super) async fn verify(
    State(s): State<AppState>,
    body: Option<Json<Option<VerifyBody>>>,
) -> Result<axum::Json<VerifyReport>, ApiError> {
    let requested = body.and_then(|Json(b)| b).and_then(|b| b.sample);
    if requested.is_some_and(|n| n == 0 || n > MAX_HTTP_VERIFY) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "sample must be between 1 and 10000",
        ));
    }
    let sample = Some(requested.unwrap_or(MAX_HTTP_VERIFY));
    let Ok(_running) = s.verifying.try_acquire() else {
        return Err(ApiError::conflict(
            "verification_running",
            "a verification is running in this process; ask again when it has finished",
        ));
    };
    let report = s
        .interest
        .verify(sample, |_, _| {})
        .await
        .map_err(|e| ApiError::database(&e))?;
    Ok(axum::Json(report))
}

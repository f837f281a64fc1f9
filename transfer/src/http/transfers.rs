//! `POST /v1/transfers` and `GET /v1/transfers/{id}`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::events::TransferStatus;
use common::http::{ApiError, ErrorBody, Json, Path};
use common::{AccountId, Amount, TransferId};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{AppState, parse_id};
use crate::auth::Customer;
use crate::transfers::service::{NewTransfer, SubmitError};
use crate::transfers::{TransferRequest, find};

/// Longest memo, in characters.
const MAX_MEMO_CHARS: usize = 140;
/// Longest idempotency key.
const MAX_KEY_LEN: usize = 100;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TransferBody {
    #[schema(value_type = String)]
    from_account: AccountId,
    #[schema(value_type = String)]
    to_account: AccountId,
    /// Whole won as a string.
    #[schema(value_type = String, example = "15000")]
    amount: Amount,
    /// At most 140 characters.
    memo: Option<String>,
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::InProgress(id) => ApiError::conflict(
                "transfer_in_progress",
                "a transfer from this account is still pending; wait for its result",
            )
            .with_detail("transfer_id", id.to_string()),
            SubmitError::Contended => ApiError::unavailable(
                "transfers from this account kept starting and finishing during the request; retry",
            ),
            SubmitError::IdempotencyConflict(field) => {
                ApiError::conflict("idempotency_conflict", e.to_string())
                    .with_detail("field", field)
            }
            SubmitError::NotStored => ApiError::unavailable(
                "the transfer could not be stored in time and was not made; retry",
            ),
            SubmitError::Db(db) => ApiError::database(&db),
        }
    }
}

/// The HTTP answer for a transfer in its current status.
fn answer(t: TransferRequest) -> Response {
    match t.status {
        TransferStatus::Succeeded => (StatusCode::OK, axum::Json(t)).into_response(),
        TransferStatus::Pending => (StatusCode::ACCEPTED, axum::Json(t)).into_response(),
        TransferStatus::Failed => {
            let code = t.reason.clone().unwrap_or_else(|| "refused".to_owned());
            ApiError::unprocessable(code, "the core bank refused the transfer")
                .with_detail("transfer_id", t.transfer_id.to_string())
                .into_response()
        }
    }
}

/// Idempotency key header: 1..=100 characters of `[A-Za-z0-9_.:-]`.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty()
                && k.len() <= MAX_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 100 characters of A-Z a-z 0-9 _ . : -",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// Sends money from one of the caller's accounts.
#[utoipa::path(post, path = "/v1/transfers", request_body = TransferBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "same key, same caller: the same transfer")),
    responses(
        (status = 200, description = "succeeded", body = TransferRequest),
        (status = 202, description = "pending: the core did not answer in time; poll GET /v1/transfers/{id}", body = TransferRequest),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "transfer_in_progress (with transfer_id) or idempotency_conflict", body = ErrorBody),
        (status = 422, description = "refused by the core, with its code", body = ErrorBody),
        (status = 503, description = "unavailable: the transfer was not made (it could not be stored in time, or the account's transfers kept changing); retry", body = ErrorBody)))]
pub(super) async fn create(
    State(s): State<AppState>,
    axum::Extension(common::http::AnswerDeadline(deadline)): axum::Extension<
        common::http::AnswerDeadline,
    >,
    Customer(customer): Customer,
    headers: HeaderMap,
    Json(body): Json<TransferBody>,
) -> Result<Response, ApiError> {
    // Counted from the request's start, as the request timeout is: the
    // owner check below may wait on the core too.
    let answer_by = deadline
        .checked_sub(crate::config::REQUEST_TIMEOUT_MARGIN)
        .unwrap_or(deadline);
    let key = idempotency_key(&headers)?;
    let memo = body.memo.filter(|m| !m.is_empty());
    if memo
        .as_ref()
        .is_some_and(|m| m.chars().count() > MAX_MEMO_CHARS || m.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "memo must be at most 140 printable characters",
        ));
    }
    let new = NewTransfer {
        from_account: body.from_account,
        to_account: body.to_account,
        amount: body.amount,
        memo,
    };
    // A repeated request is answered from the channel's record, before the
    // owner check that may need the core.
    if let Some(k) = &key
        && let Some(t) = s.transfers.replay(&customer, k, &new).await?
    {
        return Ok(answer(t));
    }
    s.check_owner(&customer, &new.from_account).await?;
    let t = s.transfers.submit(&customer, new, key, answer_by).await?;
    Ok(answer(t))
}

/// One of the caller's transfers.
#[utoipa::path(get, path = "/v1/transfers/{id}", params(("id" = String, Path, description = "transfer id")),
    responses((status = 200, body = TransferRequest), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(s): State<AppState>,
    Customer(customer): Customer,
    Path(id): Path<String>,
) -> Result<axum::Json<TransferRequest>, ApiError> {
    let id: TransferId = parse_id(&id)?;
    match find(&s.db, &id).await.map_err(|e| ApiError::database(&e))? {
        Some(t) if t.customer_id == customer => Ok(axum::Json(t)),
        _ => Err(ApiError::not_found(
            "transfer_not_found",
            "no such transfer of yours",
        )),
    }
}

//! Money movements: transfers, deposits, the fence, and the entries API.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::events::LedgerEntry;
use common::http::{ApiError, ErrorBody, Json, Path, Query};
use common::{AccountId, Amount, DepositId, TransferId, Won};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{AppState, parse_id};
use crate::ledger::{
    DepositCmd, DepositRecord, LedgerError, Status, TransferCmd, TransferRecord, queries,
};

/// Longest memo, in characters.
const MAX_MEMO_CHARS: usize = 140;
/// Longest sender bank or name, in characters.
const MAX_SENDER_CHARS: usize = 100;
/// Most entries per page of the entries API.
const MAX_ENTRIES_PAGE: u64 = 1000;

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::IdempotencyConflict { field, .. } => {
                ApiError::conflict("idempotency_conflict", e.to_string())
                    .with_detail("field", field)
            }
            LedgerError::Overloaded => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the ledger queue is full; retry later",
            ),
            LedgerError::AccountBusy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "account_busy",
                "an account of the request is held by another operation; retry later",
            ),
            LedgerError::ShuttingDown => {
                ApiError::unavailable("the core is shutting down; retry later")
            }
            LedgerError::Db(db) => ApiError::database(&db),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TransferBody {
    #[schema(value_type = String)]
    transfer_id: TransferId,
    #[schema(value_type = String)]
    from_account: AccountId,
    #[schema(value_type = String)]
    to_account: AccountId,
    /// Whole won as a string, 1 to 10^15.
    #[schema(value_type = String, example = "15000")]
    amount: Amount,
    /// When the caller created the request (RFC 3339).
    requested_at: DateTime<Utc>,
    /// At most 140 characters.
    memo: Option<String>,
}

/// A transfer as the core recorded it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransferView {
    /// Id.
    pub transfer_id: String,
    /// `succeeded` or `failed`.
    pub status: String,
    /// Refusal code when failed (`never_received` for a fence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_account: Option<String>,
    /// Target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_account: Option<String>,
    /// Amount.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub amount: Option<Amount>,
    /// As requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
    /// Memo.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// Sequence number of the debit entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<i64>,
    /// Sequence number of the credit entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_seq: Option<i64>,
    /// When decided.
    pub completed_at: DateTime<Utc>,
}

impl From<&TransferRecord> for TransferView {
    fn from(r: &TransferRecord) -> Self {
        let req = r.request.as_ref();
        Self {
            transfer_id: r.transfer_id.to_string(),
            status: r.status.as_str().to_owned(),
            reason: r.reason.clone(),
            from_account: req.map(|q| q.from_account.to_string()),
            to_account: req.map(|q| q.to_account.to_string()),
            amount: req.map(|q| q.amount),
            requested_at: req.map(|q| q.requested_at),
            memo: req.and_then(|q| q.memo.clone()),
            from_seq: r.from_seq,
            to_seq: r.to_seq,
            completed_at: r.completed_at,
        }
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("{field} must be at most {max} printable characters"),
        ));
    }
    Ok(())
}

/// Executes a transfer between two accounts of this bank, or returns the
/// recorded answer for a known `transfer_id`.
#[utoipa::path(post, path = "/v1/transfers", request_body = TransferBody,
    responses(
        (status = 200, description = "executed (or a replay of an executed transfer)", body = TransferView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "idempotency_conflict", body = ErrorBody),
        (status = 422, description = "refused: insufficient_funds, account_not_found, account_not_active, withdrawal_stopped, deposit_stopped, same_account, request_expired, transfer_fenced, balance_limit_exceeded", body = ErrorBody),
        (status = 503, description = "overloaded, account_busy (nothing executed; retry later), or the database failed", body = ErrorBody)))]
pub(super) async fn transfer(
    State(s): State<AppState>,
    Json(body): Json<TransferBody>,
) -> Result<axum::Json<TransferView>, ApiError> {
    let memo = body.memo.filter(|m| !m.is_empty());
    if let Some(m) = &memo {
        check_text("memo", m, MAX_MEMO_CHARS)?;
    }
    let skew = chrono::Duration::from_std(s.request_ttl).unwrap_or(chrono::Duration::seconds(60));
    if body.requested_at > s.clock.now() + skew {
        return Err(ApiError::bad_request(
            "invalid_request",
            "requested_at is further in the future than the request TTL",
        ));
    }
    if chrono::Timelike::nanosecond(&body.requested_at) >= 1_000_000_000 {
        // A leap second (`23:59:60`): stored as the next second, so a retry
        // of the same request would no longer match its record.
        return Err(ApiError::bad_request(
            "invalid_request",
            "requested_at is a leap second; send 23:59:59.999999",
        ));
    }
    if body.requested_at < DateTime::UNIX_EPOCH {
        // Not a request of this system's time; refused before anything is
        // recorded (such instants are outside what the stores keep exactly).
        return Err(ApiError::bad_request(
            "invalid_request",
            "requested_at is before 1970-01-01T00:00:00Z",
        ));
    }
    let rec = s
        .ledger
        .transfer(TransferCmd {
            transfer_id: body.transfer_id,
            from_account: body.from_account,
            to_account: body.to_account,
            amount: body.amount,
            memo,
            // Stored with microsecond precision; compare replays at that precision.
            requested_at: crate::clock::truncate_micros(body.requested_at),
        })
        .await?;
    transfer_answer(&rec)
}

fn transfer_answer(rec: &TransferRecord) -> Result<axum::Json<TransferView>, ApiError> {
    if rec.fenced {
        return Err(ApiError::unprocessable(
            "transfer_fenced",
            "this transfer id was declared never received and can no longer execute",
        )
        .with_detail("transfer_id", rec.transfer_id.to_string()));
    }
    match rec.status {
        Status::Succeeded => Ok(axum::Json(rec.into())),
        Status::Failed => {
            let code = rec.reason.clone().unwrap_or_else(|| "refused".to_owned());
            let message = refusal_message(&code);
            Err(ApiError::unprocessable(code, message)
                .with_detail("transfer_id", rec.transfer_id.to_string()))
        }
    }
}

fn refusal_message(code: &str) -> &'static str {
    use crate::ledger::Refusal::*;
    [
        InsufficientFunds,
        AccountNotFound,
        AccountNotActive,
        WithdrawalStopped,
        DepositStopped,
        SameAccount,
        RequestExpired,
        TransferFenced,
        BalanceLimitExceeded,
    ]
    .into_iter()
    .find(|r| r.code() == code)
    .map_or("the request was refused", |r| r.message())
}

/// The recorded decision for a transfer id.
#[utoipa::path(get, path = "/v1/transfers/{id}", params(("id" = String, Path, description = "transfer id")),
    responses((status = 200, body = TransferView), (status = 404, description = "transfer_not_found", body = ErrorBody)))]
pub(super) async fn get_transfer(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<TransferView>, ApiError> {
    let id: TransferId = parse_id(&id)?;
    match queries::get_transfer(&s.db, &id).await {
        Ok(Some(rec)) => Ok(axum::Json((&rec).into())),
        Ok(None) => Err(ApiError::not_found(
            "transfer_not_found",
            "the core never received this transfer",
        )),
        Err(e) => Err(ApiError::database(&e)),
    }
}

/// Reconciliation: the transfer's status if the core has it; otherwise
/// records a fence so that the id can never execute, and answers failed
/// with `never_received`.
#[utoipa::path(post, path = "/v1/transfers/{id}/fence", params(("id" = String, Path, description = "transfer id")),
    responses((status = 200, body = TransferView)))]
pub(super) async fn fence(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<TransferView>, ApiError> {
    let id: TransferId = parse_id(&id)?;
    let rec = common::db::retry_transient(5, || queries::fence(&s.db, &id, s.clock.now()))
        .await
        .map_err(|e| ApiError::database(&e))?;
    if rec.fenced {
        tracing::info!(transfer_id = %id, "transfer fenced: never received");
    }
    Ok(axum::Json((&rec).into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DepositBody {
    #[schema(value_type = String)]
    deposit_id: DepositId,
    #[schema(value_type = String)]
    to_account: AccountId,
    #[schema(value_type = String, example = "100000")]
    amount: Amount,
    /// 1 to 100 characters.
    sender_bank: String,
    /// 1 to 100 characters.
    sender_name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct DepositView {
    deposit_id: String,
    status: String,
    seq: i64,
    #[schema(value_type = String)]
    balance: Won,
}

/// Credits a deposit arriving from another bank, idempotently by `deposit_id`.
#[utoipa::path(post, path = "/v1/deposits", request_body = DepositBody,
    responses((status = 200, body = DepositView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "account_not_found, account_not_active, deposit_stopped, balance_limit_exceeded", body = ErrorBody),
        (status = 503, description = "overloaded, account_busy (nothing executed; retry later), or the database failed", body = ErrorBody)))]
pub(super) async fn deposit(
    State(s): State<AppState>,
    Json(body): Json<DepositBody>,
) -> Result<axum::Json<DepositView>, ApiError> {
    for (field, value) in [
        ("sender_bank", &body.sender_bank),
        ("sender_name", &body.sender_name),
    ] {
        if value.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("{field} must not be empty"),
            ));
        }
        check_text(field, value, MAX_SENDER_CHARS)?;
    }
    let rec = s
        .ledger
        .deposit(DepositCmd {
            deposit_id: body.deposit_id,
            to_account: body.to_account,
            amount: body.amount,
            sender_bank: body.sender_bank,
            sender_name: body.sender_name,
        })
        .await?;
    deposit_answer(&rec)
}

fn deposit_answer(rec: &DepositRecord) -> Result<axum::Json<DepositView>, ApiError> {
    match (rec.status, rec.seq, rec.balance_after) {
        (Status::Succeeded, Some(seq), Some(balance)) => Ok(axum::Json(DepositView {
            deposit_id: rec.request.deposit_id.to_string(),
            status: "succeeded".to_owned(),
            seq,
            balance,
        })),
        _ => {
            let code = rec.reason.clone().unwrap_or_else(|| "refused".to_owned());
            let message = refusal_message(&code);
            Err(ApiError::unprocessable(code, message)
                .with_detail("deposit_id", rec.request.deposit_id.to_string()))
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct EntriesQuery {
    /// Entries with a greater sequence number (default 0).
    after_seq: Option<i64>,
    /// 1..=1000, default 100.
    limit: Option<u64>,
}

/// A page of entries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EntriesPage {
    /// Ascending by `seq`.
    #[schema(value_type = Vec<Object>)]
    pub entries: Vec<LedgerEntry>,
    /// The account's latest sequence number.
    pub last_seq: i64,
}

/// Entries of an account after a sequence number, ascending: for the
/// channel's sync and the projector's gap fill.
#[utoipa::path(get, path = "/v1/accounts/{id}/entries", params(("id" = String, Path, description = "account id"), EntriesQuery),
    responses((status = 200, body = EntriesPage), (status = 404, body = ErrorBody)))]
pub(super) async fn entries(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EntriesQuery>,
) -> Result<axum::Json<EntriesPage>, ApiError> {
    let id: AccountId = parse_id(&id)?;
    let after = q.after_seq.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "after_seq must be 0 or more",
        ));
    }
    let limit = common::http::page_limit(q.limit, 100, MAX_ENTRIES_PAGE)?;
    // Entries first, then the account: `last_seq` is then at least the
    // greatest seq returned.
    let entries = queries::entries_after(&s.db, &id, after, limit)
        .await
        .map_err(|e| ApiError::database(&e))?;
    let account = crate::accounts::get_account(&s.db, &id).await?;
    Ok(axum::Json(EntriesPage {
        entries,
        last_seq: account.last_seq,
    }))
}

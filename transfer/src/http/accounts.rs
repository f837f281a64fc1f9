//! Account routes: history (B17-B19) and interest.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::events::LedgerEntry;
use common::http::{ApiError, ErrorBody, Path, Query};
use common::{AccountId, PayoutId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{AppState, core_unavailable, parse_id};
use crate::auth::Customer;
use crate::core_client::CoreError;
use crate::history::page::{decode_cursor, page};
use crate::history::sync::{SyncError, sync_account};
use crate::history::writer::synced_through;
use crate::transfers::{TransferRequest, confirmed_beyond, pending_touching};

const DEFAULT_PAGE: u64 = 20;
const MAX_PAGE: u64 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    /// 1..=100, default 20.
    limit: Option<u64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct HistoryPage {
    account_id: String,
    /// Newest first.
    #[schema(value_type = Vec<Object>)]
    entries: Vec<LedgerEntry>,
    /// Transfers from or to the account that the entries do not show yet:
    /// those whose result is not known, and, while the history cannot be
    /// synced from the core, those the core confirmed whose entry has not
    /// arrived (with their status). On the first page only (no cursor).
    pending: Vec<TransferRequest>,
    /// Cursor of the next (older) page; null on the last page.
    next_cursor: Option<String>,
    /// The history holds every entry up to this sequence number.
    synced_through_seq: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SyncAnswer {
    account_id: String,
    synced_through_seq: i64,
    applied: u64,
}

impl From<SyncError> for ApiError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Core(c) => core_unavailable(&c),
            SyncError::Db(db) => ApiError::database(&db),
        }
    }
}

/// Settles the account's pending transfers from the core, then syncs its
/// entries. In this order a transfer the settling found executed has its
/// entry fetched by the sync; the other way round, a transfer executed
/// between the two showed neither as pending nor as an entry.
async fn sync_and_settle(s: &AppState, account: &AccountId) -> Result<(i64, u64), ApiError> {
    let pending = pending_touching(&s.db, account)
        .await
        .map_err(|e| ApiError::database(&e))?;
    let settling = futures::StreamExt::for_each_concurrent(
        futures::stream::iter(pending),
        SETTLE_CONCURRENCY,
        |p| async move {
            if let Err(e) = s.transfers.settle_now(&p).await {
                tracing::debug!(transfer_id = %p.transfer_id, error = %e, "settling a pending transfer during sync");
            }
        },
    );
    if tokio::time::timeout(SETTLE_BUDGET, settling).await.is_err() {
        // A slow core: what did not settle is shown as pending (the
        // resolvers and the reconciler go on with it).
        tracing::warn!(account = %account, budget_ms = SETTLE_BUDGET.as_millis() as u64, "settling pending transfers before the history took too long");
    }
    let report = sync_account(&s.db, &s.core, account).await?;
    Ok((report.synced_through_seq, report.applied))
}

/// Pending transfers of the account asked about at once while syncing, and
/// the longest the asking may take: an account can have up to 100 pending
/// transfers, and one at a time against a slow core (5 s each) would hold
/// the history past the HTTP timeout.
const SETTLE_CONCURRENCY: usize = 8;
const SETTLE_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// Most syncs one history request makes while transfers keep being
/// confirmed (by the resolver or reconciler) beyond what it synced.
const MAX_SYNCS_PER_PAGE: usize = 3;

/// The account's transactions, newest first, with keyset pagination. When
/// the channel knows of activity the history does not show yet (a pending
/// transfer, or a confirmed one whose entry is not projected), the account is
/// synced from the core first.
#[utoipa::path(get, path = "/v1/accounts/{id}/history", params(("id" = String, Path, description = "account id"), HistoryQuery),
    responses((status = 200, body = HistoryPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn history(
    State(s): State<AppState>,
    Customer(customer): Customer,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, ApiError>,
) -> Result<axum::Json<HistoryPage>, ApiError> {
    let account: AccountId = parse_id(&id)?;
    // Whose account it is comes before anything about the request: another
    // customer learns nothing from how a bad query, cursor or limit is
    // answered.
    s.check_owner(&customer, &account).await?;
    let Query(q) = query?;
    let limit = common::http::page_limit(q.limit, DEFAULT_PAGE, MAX_PAGE)?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| decode_cursor(&account, c))
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_cursor", e.to_string()))?;

    // A pending transfer, or a confirmed one beyond the synced seq, means the
    // history may not show everything the customer was told: sync first. A
    // transfer confirmed by another task while this one synced is caught by
    // looking again (bounded).
    let (synced, mut pending, behind) = if before.is_some() {
        // A page further down (infinite scroll appends it): what is in
        // flight belongs at the top, on the first page, and is not listed
        // (or synced for) again.
        let synced = synced_through(&s.db, &account)
            .await
            .map_err(|e| ApiError::database(&e))?;
        (synced, Vec::new(), Vec::new())
    } else {
        let mut syncs = 0;
        loop {
            let synced = synced_through(&s.db, &account)
                .await
                .map_err(|e| ApiError::database(&e))?;
            let pending = pending_touching(&s.db, &account)
                .await
                .map_err(|e| ApiError::database(&e))?;
            let behind = confirmed_beyond(&s.db, &account, synced)
                .await
                .map_err(|e| ApiError::database(&e))?;
            let needs_sync = !behind.is_empty() || (syncs == 0 && !pending.is_empty());
            if !needs_sync || syncs == MAX_SYNCS_PER_PAGE {
                break (synced, pending, behind);
            }
            syncs += 1;
            if let Err(e) = sync_and_settle(&s, &account).await {
                // Serve what the channel has (read once more); the pending list
                // still shows what is in flight.
                tracing::warn!(account = %account, error = %e, "history sync before answering failed");
                syncs = MAX_SYNCS_PER_PAGE;
            }
        }
    };
    if !behind.is_empty() {
        // The core could not be read (or kept confirming transfers): a
        // customer told "sent" must still find the transfer, so those whose
        // entry has not arrived are listed with the pending ones (B18).
        tracing::warn!(account = %account, synced, confirmed = behind.len(), "history answered behind the ledger; confirmed transfers listed with the pending ones");
        pending.extend(behind);
    }
    let (entries, next_cursor) = page(&s.db, &account, before, limit)
        .await
        .map_err(|e| ApiError::database(&e))?;
    // A transfer resolved and projected between the two reads is shown
    // once, as its entry.
    pending.retain(|p| {
        !entries
            .iter()
            .any(|e| e.transfer_id.as_ref() == Some(&p.transfer_id))
    });
    Ok(axum::Json(HistoryPage {
        account_id: account.to_string(),
        entries,
        pending,
        next_cursor,
        synced_through_seq: synced,
    }))
}

/// Syncs the account's history from the core now (the "sync" button).
#[utoipa::path(post, path = "/v1/accounts/{id}/history/sync", params(("id" = String, Path, description = "account id")),
    responses((status = 200, body = SyncAnswer), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn sync(
    State(s): State<AppState>,
    Customer(customer): Customer,
    Path(id): Path<String>,
) -> Result<axum::Json<SyncAnswer>, ApiError> {
    let account: AccountId = parse_id(&id)?;
    s.check_owner(&customer, &account).await?;
    let (synced, applied) = sync_and_settle(&s, &account).await?;
    Ok(axum::Json(SyncAnswer {
        account_id: account.to_string(),
        synced_through_seq: synced,
        applied,
    }))
}

/// The core's statuses a customer is shown as they are: the account is
/// unknown, the payout conflicts, or the core refused it.
const CUSTOMER_STATUSES: [u16; 3] = [404, 409, 422];

/// Passes a core answer through unchanged (status and body) when it is the
/// core's answer about the customer's request. Anything else -- the core
/// refusing the channel itself (401, 403: a wrong `CORE_API_TOKEN`), or a
/// status or body from something between the two (a gateway's 429) -- is
/// the channel's problem, not the customer's: 503 in the error shape.
fn pass_through(result: Result<serde_json::Value, CoreError>) -> Response {
    match result {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(CoreError::Refused { status, body, .. })
            if CUSTOMER_STATUSES.contains(&status) && body["error"]["code"].is_string() =>
        {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, axum::Json(body)).into_response()
        }
        Err(e) => core_unavailable(&e).into_response(),
    }
}

/// The core's expected interest for one of the caller's accounts.
#[utoipa::path(get, path = "/v1/accounts/{id}/interest", params(("id" = String, Path, description = "account id")),
    responses((status = 200, description = "the core's answer"), (status = 403, body = ErrorBody)))]
pub(super) async fn interest(
    State(s): State<AppState>,
    Customer(customer): Customer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let account: AccountId = parse_id(&id)?;
    s.check_owner(&customer, &account).await?;
    Ok(pass_through(s.core.interest(&account).await))
}

/// Receives the accrued interest now (once a day). With an `Idempotency-Key`
/// the payout id is derived from it, so a retried request pays once.
#[utoipa::path(post, path = "/v1/accounts/{id}/interest/receive", params(("id" = String, Path, description = "account id"),
        ("Idempotency-Key" = Option<String>, Header, description = "same key, same payout")),
    responses((status = 200, description = "the core's payout answer"), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn receive_interest(
    State(s): State<AppState>,
    Customer(customer): Customer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let account: AccountId = parse_id(&id)?;
    s.check_owner(&customer, &account).await?;
    let key = super::transfers::idempotency_key(&headers)?;
    let payout_id = match key {
        Some(k) => {
            let name = format!("{customer}:{account}:{k}");
            PayoutId::parse(format!(
                "pay_{}",
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple()
            ))
            .map_err(|e| ApiError::internal(&e))?
        }
        None => PayoutId::generate(),
    };
    Ok(pass_through(s.core.payout(&account, &payout_id).await))
}

//! Reads of the ledger, and the fence.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use common::events::{EntryKind, LedgerEntry};
use common::{AccountId, Amount, DepositId, PayoutId, TransferId, Won};
use rust_decimal::Decimal;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, QueryResult, Statement, TransactionTrait,
};

use super::{DepositCmd, DepositRecord, Status, TransferCmd, TransferRecord};

fn corrupt(what: &str, e: impl std::fmt::Display) -> DbErr {
    DbErr::Custom(format!("stored {what} is invalid: {e}"))
}

fn status(s: &str) -> Result<Status, DbErr> {
    match s {
        "succeeded" => Ok(Status::Succeeded),
        "failed" => Ok(Status::Failed),
        other => Err(corrupt("status", other)),
    }
}

const TRANSFER_COLUMNS: &str = "transfer_id, from_account, to_account, amount, memo, requested_at, \
     status, reason, from_seq, to_seq, fenced, completed_at";

fn transfer_from_row(r: &QueryResult) -> Result<TransferRecord, DbErr> {
    let id: String = r.try_get("", "transfer_id")?;
    let transfer_id = TransferId::parse(id).map_err(|e| corrupt("transfer id", e))?;
    let fenced: bool = r.try_get("", "fenced")?;
    let request = if fenced {
        None
    } else {
        let from: String = r.try_get("", "from_account")?;
        let to: String = r.try_get("", "to_account")?;
        let amount: Decimal = r.try_get("", "amount")?;
        Some(TransferCmd {
            transfer_id: transfer_id.clone(),
            from_account: AccountId::parse(from).map_err(|e| corrupt("account id", e))?,
            to_account: AccountId::parse(to).map_err(|e| corrupt("account id", e))?,
            amount: Amount::new(amount).map_err(|e| corrupt("amount", e))?,
            memo: r.try_get("", "memo")?,
            requested_at: r.try_get("", "requested_at")?,
        })
    };
    let st: String = r.try_get("", "status")?;
    Ok(TransferRecord {
        transfer_id,
        request,
        status: status(&st)?,
        reason: r.try_get("", "reason")?,
        from_seq: r.try_get("", "from_seq")?,
        to_seq: r.try_get("", "to_seq")?,
        fenced,
        completed_at: r.try_get("", "completed_at")?,
    })
}

/// Which of the accounts `ids` another transaction holds locked right now
/// (a lock the ledger's `SELECT ... FOR UPDATE` would wait for). Takes no
/// lock of its own beyond the moment of the look-up, and never waits for a
/// row lock (`SKIP LOCKED`; it may wait for a pool connection).
pub async fn held_accounts(
    db: &DatabaseConnection,
    ids: Vec<String>,
) -> Result<HashSet<String>, DbErr> {
    let txn = db.begin().await?;
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "WITH free AS (SELECT account_id FROM accounts WHERE account_id = ANY($1) \
                           FOR UPDATE SKIP LOCKED) \
             SELECT account_id FROM accounts \
             WHERE account_id = ANY($1) AND account_id NOT IN (SELECT account_id FROM free)",
            [ids.into()],
        ))
        .await?;
    txn.rollback().await?;
    rows.iter().map(|r| r.try_get("", "account_id")).collect()
}

/// The recorded transfers among `ids`, by id.
pub async fn load_transfers<C: ConnectionTrait>(
    conn: &C,
    ids: Vec<String>,
) -> Result<HashMap<String, TransferRecord>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = ANY($1)"),
            [ids.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| transfer_from_row(r).map(|t| (t.transfer_id.to_string(), t)))
        .collect()
}

/// The recorded transfer with this id.
pub async fn get_transfer<C: ConnectionTrait>(
    conn: &C,
    id: &TransferId,
) -> Result<Option<TransferRecord>, DbErr> {
    Ok(load_transfers(conn, vec![id.to_string()])
        .await?
        .remove(id.as_str()))
}

/// The fence (B12): if the core knows `id`, its record; otherwise records a
/// fence so that a request with this id arriving later is refused. The
/// insert conflicts with a concurrent ledger transaction inserting the same
/// id on the primary key, so exactly one of the two wins, and the answer
/// always reflects the winner.
pub async fn fence<C: ConnectionTrait>(
    conn: &C,
    id: &TransferId,
    now: DateTime<Utc>,
) -> Result<TransferRecord, DbErr> {
    let inserted = conn
        .query_one_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            format!(
                "INSERT INTO transfers (transfer_id, status, reason, fenced, completed_at) \
                 VALUES ($1, 'failed', 'never_received', true, $2) \
                 ON CONFLICT (transfer_id) DO NOTHING RETURNING {TRANSFER_COLUMNS}"
            ),
            [id.to_string().into(), now.into()],
        ))
        .await?;
    if let Some(row) = inserted {
        metrics::counter!("core_fences_total").increment(1);
        return transfer_from_row(&row);
    }
    get_transfer(conn, id)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("transfer {id} vanished during fencing")))
}

/// The recorded deposits among `ids`, by id.
pub async fn load_deposits<C: ConnectionTrait>(
    conn: &C,
    ids: Vec<String>,
) -> Result<HashMap<String, DepositRecord>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            "SELECT deposit_id, to_account, amount, sender_bank, sender_name, status, reason, seq, \
             balance_after, completed_at FROM deposits WHERE deposit_id = ANY($1)",
            [ids.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            let id: String = r.try_get("", "deposit_id")?;
            let to: String = r.try_get("", "to_account")?;
            let amount: Decimal = r.try_get("", "amount")?;
            let st: String = r.try_get("", "status")?;
            let balance: Option<Decimal> = r.try_get("", "balance_after")?;
            let rec = DepositRecord {
                request: DepositCmd {
                    deposit_id: DepositId::parse(id.clone())
                        .map_err(|e| corrupt("deposit id", e))?,
                    to_account: AccountId::parse(to).map_err(|e| corrupt("account id", e))?,
                    amount: Amount::new(amount).map_err(|e| corrupt("amount", e))?,
                    sender_bank: r.try_get("", "sender_bank")?,
                    sender_name: r.try_get("", "sender_name")?,
                },
                status: status(&st)?,
                reason: r.try_get("", "reason")?,
                seq: r.try_get("", "seq")?,
                balance_after: balance
                    .map(Won::new)
                    .transpose()
                    .map_err(|e| corrupt("balance", e))?,
                completed_at: r.try_get("", "completed_at")?,
            };
            Ok((id, rec))
        })
        .collect()
}

/// Turns a `ledger_entries` row into an entry.
pub fn entry_from_row(r: &QueryResult) -> Result<LedgerEntry, DbErr> {
    let account: String = r.try_get("", "account_id")?;
    let kind: String = r.try_get("", "kind")?;
    let amount: Decimal = r.try_get("", "amount")?;
    let balance: Decimal = r.try_get("", "balance_after")?;
    let transfer: Option<String> = r.try_get("", "transfer_id")?;
    let deposit: Option<String> = r.try_get("", "deposit_id")?;
    let payout: Option<String> = r.try_get("", "payout_id")?;
    Ok(LedgerEntry {
        account_id: AccountId::parse(account).map_err(|e| corrupt("account id", e))?,
        seq: r.try_get("", "seq")?,
        kind: EntryKind::parse(&kind).ok_or_else(|| corrupt("entry kind", &kind))?,
        amount: Won::new(amount).map_err(|e| corrupt("amount", e))?,
        balance_after: Won::new(balance).map_err(|e| corrupt("balance", e))?,
        occurred_at: r.try_get("", "occurred_at")?,
        business_date: r.try_get::<NaiveDate>("", "business_date")?,
        transfer_id: transfer
            .map(TransferId::parse)
            .transpose()
            .map_err(|e| corrupt("transfer id", e))?,
        deposit_id: deposit
            .map(DepositId::parse)
            .transpose()
            .map_err(|e| corrupt("deposit id", e))?,
        payout_id: payout
            .map(PayoutId::parse)
            .transpose()
            .map_err(|e| corrupt("payout id", e))?,
        counterparty: r.try_get("", "counterparty")?,
        memo: r.try_get("", "memo")?,
    })
}

/// Column list of `ledger_entries` in the order [`entry_from_row`] reads.
pub const ENTRY_COLUMNS: &str = "account_id, seq, kind, amount, balance_after, occurred_at, business_date, \
     transfer_id, deposit_id, payout_id, counterparty, memo";

/// Entries of an account with `seq > after_seq`, ascending, at most `limit`.
pub async fn entries_after<C: ConnectionTrait>(
    conn: &C,
    account: &AccountId,
    after_seq: i64,
    limit: u64,
) -> Result<Vec<LedgerEntry>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            format!(
                "SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE account_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3"
            ),
            [
                account.to_string().into(),
                after_seq.into(),
                (limit as i64).into(),
            ],
        ))
        .await?;
    rows.iter().map(entry_from_row).collect()
}

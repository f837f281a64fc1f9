//! The single history writer.
//!
//! Invariant: for every account, `history_entries` holds exactly the seqs
//! `1..=history_sync.synced_through_seq`, each with the core's values. It is
//! kept by applying entries only under the account's `history_sync` row lock
//! and only in sequence:
//!
//! - `seq <= synced`: a duplicate; nothing changes (B14);
//! - `seq == synced + 1`: applied, `synced` advances;
//! - `seq > synced + 1`: a gap; nothing is written past it (B15), and the
//!   caller is told which seqs are missing so it can fetch them.
//!
//! Any number of writers (projector instances, sync requests) may apply
//! concurrently: the row locks serialize them per account, taken in account
//! order so two writers never deadlock.

use std::collections::BTreeMap;

use common::AccountId;
use common::events::LedgerEntry;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait};

/// Seqs missing before the entries given for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The account.
    pub account_id: AccountId,
    /// The history holds every seq up to here.
    pub synced_through_seq: i64,
    /// The first seq that was given but could not be applied.
    pub first_blocked_seq: i64,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Entries written.
    pub applied: u64,
    /// Entries already present.
    pub duplicates: u64,
    /// Accounts whose remaining entries wait behind missing seqs.
    pub gaps: Vec<Gap>,
    /// `synced_through_seq` of every account touched, before applying.
    pub before: BTreeMap<String, i64>,
    /// `synced_through_seq` of every account touched, after applying.
    pub synced: BTreeMap<String, i64>,
}

/// Applies entries (any accounts, any order, duplicates allowed) in one
/// transaction, following the rules above.
pub async fn apply(db: &DatabaseConnection, entries: &[LedgerEntry]) -> Result<ApplyReport, DbErr> {
    let mut by_account: BTreeMap<String, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in entries {
        by_account
            .entry(e.account_id.to_string())
            .or_default()
            .push(e);
    }
    if by_account.is_empty() {
        return Ok(ApplyReport::default());
    }
    for list in by_account.values_mut() {
        list.sort_by_key(|e| e.seq);
        list.dedup_by_key(|e| e.seq);
    }
    let accounts: Vec<String> = by_account.keys().cloned().collect();
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    // One statement creates missing sync rows and locks every row (in account
    // order, like the ledger): `DO UPDATE` takes the row lock and returns the
    // current value, as `SELECT ... FOR UPDATE` would.
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO history_sync (account_id) SELECT unnest($1::text[]) ORDER BY 1 \
             ON CONFLICT (account_id) DO UPDATE SET account_id = EXCLUDED.account_id \
             RETURNING account_id, synced_through_seq",
            [accounts.into()],
        ))
        .await?;
    let mut synced: BTreeMap<String, i64> = BTreeMap::new();
    for r in rows {
        synced.insert(
            r.try_get("", "account_id")?,
            r.try_get("", "synced_through_seq")?,
        );
    }

    let mut report = ApplyReport {
        before: synced.clone(),
        ..ApplyReport::default()
    };
    let mut cols = Columns::default();
    for (account, list) in &by_account {
        let mut next = synced.get(account).copied().unwrap_or(0) + 1;
        for e in list {
            if e.seq < next {
                report.duplicates += 1;
            } else if e.seq == next {
                cols.push(e);
                next += 1;
                report.applied += 1;
            } else {
                report.gaps.push(Gap {
                    account_id: e.account_id.clone(),
                    synced_through_seq: next - 1,
                    first_blocked_seq: e.seq,
                });
                break;
            }
        }
        report.synced.insert(account.clone(), next - 1);
    }
    if report.applied > 0 {
        let (ids, seqs): (Vec<String>, Vec<i64>) = report
            .synced
            .iter()
            .filter(|(a, s)| synced.get(*a).copied().unwrap_or(0) < **s)
            .map(|(a, s)| (a.clone(), *s))
            .unzip();
        cols.write(&txn, ids, seqs).await?;
    }
    txn.commit().await?;
    Ok(report)
}

#[derive(Default)]
struct Columns {
    account: Vec<String>,
    seq: Vec<i64>,
    kind: Vec<String>,
    amount: Vec<rust_decimal::Decimal>,
    balance: Vec<rust_decimal::Decimal>,
    occurred: Vec<chrono::DateTime<chrono::Utc>>,
    date: Vec<chrono::NaiveDate>,
    transfer: Vec<String>,
    deposit: Vec<String>,
    payout: Vec<String>,
    counterparty: Vec<String>,
    memo: Vec<String>,
}

impl Columns {
    fn push(&mut self, e: &LedgerEntry) {
        self.account.push(e.account_id.to_string());
        self.seq.push(e.seq);
        self.kind.push(e.kind.as_str().to_owned());
        self.amount.push(e.amount.value());
        self.balance.push(e.balance_after.value());
        self.occurred.push(e.occurred_at);
        self.date.push(e.business_date);
        self.transfer.push(
            e.transfer_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        self.deposit.push(
            e.deposit_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        self.payout.push(
            e.payout_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        self.counterparty
            .push(e.counterparty.clone().unwrap_or_default());
        self.memo.push(e.memo.clone().unwrap_or_default());
    }

    async fn write<C: ConnectionTrait>(
        self,
        txn: &C,
        ids: Vec<String>,
        seqs: Vec<i64>,
    ) -> Result<(), DbErr> {
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            r#"
WITH ins AS (
  INSERT INTO history_entries (account_id, seq, kind, amount, balance_after, occurred_at, business_date,
                               transfer_id, deposit_id, payout_id, counterparty, memo)
  SELECT a, s, k, am, b, o, d, NULLIF(t, ''), NULLIF(dp, ''), NULLIF(p, ''), NULLIF(c, ''), NULLIF(m, '')
  FROM unnest($1::text[], $2::bigint[], $3::text[], $4::numeric[], $5::numeric[], $6::timestamptz[],
              $7::date[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
       AS x(a, s, k, am, b, o, d, t, dp, p, c, m)
)
UPDATE history_sync SET synced_through_seq = x.s, updated_at = now()
FROM unnest($13::text[], $14::bigint[]) AS x(a, s)
WHERE history_sync.account_id = x.a
"#,
            [
                self.account.into(),
                self.seq.into(),
                self.kind.into(),
                self.amount.into(),
                self.balance.into(),
                self.occurred.into(),
                self.date.into(),
                self.transfer.into(),
                self.deposit.into(),
                self.payout.into(),
                self.counterparty.into(),
                self.memo.into(),
                ids.into(),
                seqs.into(),
            ],
        ))
        .await?;
        Ok(())
    }
}

/// `synced_through_seq` of an account (0 when never synced).
pub async fn synced_through<C: ConnectionTrait>(
    conn: &C,
    account: &AccountId,
) -> Result<i64, DbErr> {
    Ok(conn
        .query_one_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            "SELECT synced_through_seq FROM history_sync WHERE account_id = $1",
            [account.to_string().into()],
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "synced_through_seq"))
        .transpose()?
        .unwrap_or(0))
}

/// Forgets an account's history (for `projector rebuild --reset`), under the
/// same lock the writer takes.
pub async fn reset(db: &DatabaseConnection, account: &AccountId) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    let backend = db.get_database_backend();
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "INSERT INTO history_sync (account_id) VALUES ($1) ON CONFLICT DO NOTHING",
        [account.to_string().into()],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "SELECT 1 FROM history_sync WHERE account_id = $1 FOR UPDATE",
        [account.to_string().into()],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "DELETE FROM history_entries WHERE account_id = $1",
        [account.to_string().into()],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "UPDATE history_sync SET synced_through_seq = 0, updated_at = now() WHERE account_id = $1",
        [account.to_string().into()],
    ))
    .await?;
    txn.commit().await
}

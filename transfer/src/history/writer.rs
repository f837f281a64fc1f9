//! The single history writer.
//!
//! Invariant: for every account, `history_entries` holds exactly the seqs
//! `1..=history_sync.synced_through_seq`, each with the core's values. It is
//! kept by applying entries only under the account's `history_sync` row lock
//! and only in sequence:
//!
//! - `seq <= synced`: a duplicate; nothing changes (B14). If its values
//!   (kind, amount, balance, the transfer, deposit or payout) differ from the
//!   entry held at that seq it is reported as a conflict;
//! - `seq == synced + 1`: applied, `synced` advances, if it continues the
//!   history: the balance before it plus its amount is its balance. An entry
//!   that does not is treated as a gap: it is not written, and the caller
//!   fetches the core's entry for that seq;
//! - `seq > synced + 1`: a gap; nothing is written past it (B15), and the
//!   caller is told which seqs are missing so it can fetch them.
//!
//! An event that is not the core's (a corrupt or forged message on the
//! broker) is refused when it does not continue the balances. One that does
//! continue them is written, and shows until the core's entry for that seq
//! arrives and conflicts with it, or a sync finds the history past the
//! core's last seq; the core is then asked and the history repaired (see
//! `projector::consume::ledger` and [`super::sync::sync_account`]).
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
    /// True when the entry at `synced_through_seq + 1` was given but does not
    /// continue the balances (a seq was not missing: its values are wrong).
    pub discontinuous: bool,
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
    /// Entries given as duplicates whose values differ from the history's
    /// entry at their seq (see [`same_values`]).
    pub conflicts: Vec<LedgerEntry>,
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
        // Identical copies once; different entries at one seq all stay, so
        // the ones that lose are reported as conflicts.
        list.dedup_by(|a, b| a == b);
    }
    let accounts: Vec<String> = by_account.keys().cloned().collect();
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    // One statement creates missing sync rows and locks every row (in account
    // order, like the ledger): `DO UPDATE` takes the row lock, as
    // `SELECT ... FOR UPDATE` would, and `WHERE false` keeps it from writing
    // a new version of the row (PostgreSQL locks every conflicting row the
    // action is taken for, updated or not). An existing row is written at
    // most once, at the end, if its history advanced.
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "INSERT INTO history_sync (account_id) SELECT unnest($1::text[]) ORDER BY 1 \
         ON CONFLICT (account_id) DO UPDATE SET account_id = EXCLUDED.account_id WHERE false",
        [accounts.clone().into()],
    ))
    .await?;
    // Then, in a statement of its own (so it sees what another writer
    // committed while this one waited for the locks), where each history
    // stands and the balance after its last entry.
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "SELECT s.account_id, s.synced_through_seq, h.balance_after AS balance \
             FROM history_sync s \
             LEFT JOIN history_entries h ON h.account_id = s.account_id AND h.seq = s.synced_through_seq \
             WHERE s.account_id = ANY($1::text[])",
            [accounts.into()],
        ))
        .await?;
    let mut synced: BTreeMap<String, i64> = BTreeMap::new();
    // The balance after the last entry held. Missing only if the history
    // lost that entry: then no entry can be shown to continue it.
    let mut balance: BTreeMap<String, rust_decimal::Decimal> = BTreeMap::new();
    for r in rows {
        let account: String = r.try_get("", "account_id")?;
        let seq: i64 = r.try_get("", "synced_through_seq")?;
        let held: Option<rust_decimal::Decimal> = r.try_get("", "balance")?;
        match (seq, held) {
            (0, _) => {
                balance.insert(account.clone(), rust_decimal::Decimal::ZERO);
            }
            (_, Some(b)) => {
                balance.insert(account.clone(), b);
            }
            (_, None) => {}
        }
        synced.insert(account, seq);
    }

    let mut report = ApplyReport {
        before: synced.clone(),
        ..ApplyReport::default()
    };
    let mut cols = Columns::default();
    // Duplicates of entries held before this call, checked in the database.
    let mut held = Columns::default();
    let mut held_entries: Vec<&LedgerEntry> = Vec::new();
    for (account, list) in &by_account {
        let held_through = synced.get(account).copied().unwrap_or(0);
        let mut next = held_through + 1;
        let mut before = balance.get(account).copied();
        let mut last_applied: Option<&LedgerEntry> = None;
        // Entries at `next` that do not continue the balances (another entry
        // at the same seq may).
        let mut refused: Vec<&LedgerEntry> = Vec::new();
        let mut beyond: Option<i64> = None;
        for e in list.iter().copied() {
            if e.seq < next {
                report.duplicates += 1;
                if e.seq <= held_through {
                    held.push(e);
                    held_entries.push(e);
                } else if last_applied.is_some_and(|a| a.seq == e.seq && !same_values(a, e)) {
                    // Another entry at a seq applied just now (sorted: it is
                    // the last one applied).
                    report.conflicts.push(e.clone());
                }
                continue;
            }
            if e.seq > next {
                beyond = Some(e.seq);
                break;
            }
            if before.is_some_and(|b| b + e.amount.value() == e.balance_after.value()) {
                report.conflicts.extend(refused.drain(..).cloned());
                cols.push(e);
                last_applied = Some(e);
                before = Some(e.balance_after.value());
                next += 1;
                report.applied += 1;
            } else {
                refused.push(e);
            }
        }
        if !refused.is_empty() || beyond.is_some() {
            report.gaps.push(Gap {
                account_id: AccountId::parse(account.as_str())
                    .map_err(|e| DbErr::Custom(format!("account id {account}: {e}")))?,
                synced_through_seq: next - 1,
                first_blocked_seq: if refused.is_empty() {
                    beyond.unwrap_or(next)
                } else {
                    next
                },
                discontinuous: !refused.is_empty(),
            });
        }
        report.synced.insert(account.clone(), next - 1);
    }
    if !held_entries.is_empty() {
        for i in held.differing(&txn).await? {
            if let Some(e) = held_entries.get(i) {
                report.conflicts.push((*e).clone());
            }
        }
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

/// Whether two entries at one seq say the same, as the history stores them:
/// every field, times to the microsecond, an empty text as none.
pub fn same_values(a: &LedgerEntry, b: &LedgerEntry) -> bool {
    let text = |t: &Option<String>| t.clone().unwrap_or_default();
    a.account_id == b.account_id
        && a.seq == b.seq
        && a.kind == b.kind
        && a.amount == b.amount
        && a.balance_after == b.balance_after
        && a.occurred_at.timestamp_micros() == b.occurred_at.timestamp_micros()
        && a.business_date == b.business_date
        && a.transfer_id == b.transfer_id
        && a.deposit_id == b.deposit_id
        && a.payout_id == b.payout_id
        && text(&a.counterparty) == text(&b.counterparty)
        && text(&a.memo) == text(&b.memo)
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
        // An empty text stands for none (`NULLIF` in the statements).
        fn text<T: ToString>(id: &Option<T>) -> String {
            id.as_ref().map(ToString::to_string).unwrap_or_default()
        }
        self.transfer.push(text(&e.transfer_id));
        self.deposit.push(text(&e.deposit_id));
        self.payout.push(text(&e.payout_id));
        self.counterparty
            .push(e.counterparty.clone().unwrap_or_default());
        self.memo.push(e.memo.clone().unwrap_or_default());
    }

    /// The twelve columns as statement parameters `$1..$12`, in the order of
    /// `history_entries`.
    fn into_values(self) -> Vec<sea_orm::Value> {
        vec![
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
        ]
    }

    /// The positions of these entries whose values differ from the
    /// history's entry at the same seq (see [`same_values`]).
    async fn differing<C: ConnectionTrait>(self, txn: &C) -> Result<Vec<usize>, DbErr> {
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                txn.get_database_backend(),
                r#"
SELECT x.i
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::numeric[], $5::numeric[], $6::timestamptz[],
            $7::date[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
       WITH ORDINALITY AS x(a, s, k, am, b, o, d, t, dp, p, c, m, i)
JOIN history_entries h ON h.account_id = x.a AND h.seq = x.s
WHERE (h.kind, h.amount, h.balance_after, h.occurred_at, h.business_date,
       COALESCE(h.transfer_id, ''), COALESCE(h.deposit_id, ''), COALESCE(h.payout_id, ''),
       COALESCE(h.counterparty, ''), COALESCE(h.memo, ''))
      IS DISTINCT FROM (x.k, x.am, x.b, x.o, x.d, x.t, x.dp, x.p, x.c, x.m)
"#,
                self.into_values(),
            ))
            .await?;
        rows.iter()
            .map(|r| {
                let i: i64 = r.try_get("", "i")?;
                Ok(usize::try_from(i - 1).unwrap_or(usize::MAX))
            })
            .collect()
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
            {
                let mut values = self.into_values();
                values.extend([ids.into(), seqs.into()]);
                values
            },
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

/// Forgets an account's entries from `seq` on, under the lock the writer
/// takes: the repair when the history turns out to hold an entry that is not
/// the core's (the caller then fetches the core's entries again). Decided
/// under the lock: nothing is cut if the history no longer holds `seq`, or
/// holds `unless` (the core's entry) there, as after another repair that
/// cut and fetched again meanwhile. Returns whether it cut.
pub async fn truncate_from(
    db: &DatabaseConnection,
    account: &AccountId,
    seq: i64,
    unless: Option<&LedgerEntry>,
) -> Result<bool, DbErr> {
    let txn = db.begin().await?;
    let backend = db.get_database_backend();
    let synced = txn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            "SELECT synced_through_seq FROM history_sync WHERE account_id = $1 FOR UPDATE",
            [account.to_string().into()],
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "synced_through_seq"))
        .transpose()?
        .unwrap_or(0);
    if synced < seq {
        return Ok(false);
    }
    if let Some(entry) = unless {
        let mut held = Columns::default();
        held.push(entry);
        if held.differing(&txn).await?.is_empty() {
            return Ok(false);
        }
    }
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "DELETE FROM history_entries WHERE account_id = $1 AND seq >= $2",
        [account.to_string().into(), seq.into()],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        "UPDATE history_sync SET synced_through_seq = LEAST(synced_through_seq, $2 - 1), updated_at = now() \
         WHERE account_id = $1",
        [account.to_string().into(), seq.into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(true)
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

//! Invariant checks shared by tests, the chaos campaign and benches.

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, Database, Statement};

use crate::client::Api;

/// One entry as it must match between core and channel: seq, kind,
/// amount, balance after, transfer id, and the rest (`occurred_at` in
/// microseconds, business date, deposit id, payout id, counterparty, memo)
/// joined by `|`.
pub type EntryKey = (i64, String, String, String, Option<String>, String);

/// A deposit entry of `account` at `seq`, now: what a test writes into a
/// history as an entry that is not the core's.
pub fn deposit_entry(
    account: &common::AccountId,
    seq: i64,
    amount: i64,
    balance_after: i64,
) -> common::events::LedgerEntry {
    let won = |v: i64| common::Won::new(v.into()).unwrap_or_else(|e| panic!("{v} won: {e}"));
    common::events::LedgerEntry {
        account_id: account.clone(),
        seq,
        kind: common::events::EntryKind::Deposit,
        amount: won(amount),
        balance_after: won(balance_after),
        occurred_at: chrono::Utc::now(),
        business_date: chrono::Utc::now().date_naive(),
        transfer_id: None,
        deposit_id: None,
        payout_id: None,
        counterparty: None,
        memo: None,
    }
}

/// An account's history in the channel database, ascending.
pub async fn channel_history(channel_db_url: &str, account: &str) -> anyhow::Result<Vec<EntryKey>> {
    let db = Database::connect(channel_db_url).await?;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT seq, kind, amount::text AS amount, balance_after::text AS balance, transfer_id, \
                    concat_ws('|', (extract(epoch FROM occurred_at) * 1000000)::bigint, business_date::text, \
                      coalesce(deposit_id, ''), coalesce(payout_id, ''), coalesce(counterparty, ''), \
                      coalesce(memo, '')) AS rest \
             FROM history_entries WHERE account_id = $1 ORDER BY seq",
            [account.into()],
        ))
        .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push((
            r.try_get("", "seq")?,
            r.try_get("", "kind")?,
            r.try_get("", "amount")?,
            r.try_get("", "balance")?,
            r.try_get("", "transfer_id")?,
            r.try_get("", "rest")?,
        ));
    }
    db.close().await?;
    Ok(out)
}

/// An account's ledger at the core, ascending.
pub async fn core_ledger(core: &Api, account: &str) -> Vec<EntryKey> {
    core.all_entries(account)
        .await
        .into_iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap_or(0),
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["amount"].as_str().unwrap_or("").to_owned(),
                e["balance_after"].as_str().unwrap_or("").to_owned(),
                e["transfer_id"].as_str().map(str::to_owned),
                rest(&e),
            )
        })
        .collect()
}

/// Compares the channel history with the core ledger for each account;
/// returns the accounts that differ, with a description.
pub async fn history_mismatches(
    core: &Api,
    channel_db_url: &str,
    accounts: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in accounts {
        let ledger = core_ledger(core, a).await;
        let history = channel_history(channel_db_url, a).await?;
        if ledger != history {
            let first = ledger.iter().zip(history.iter()).position(|(x, y)| x != y);
            out.insert(
                a.clone(),
                format!(
                    "core has {} entries, channel {}; first difference at index {first:?}",
                    ledger.len(),
                    history.len()
                ),
            );
        }
    }
    Ok(out)
}

/// The rest of a core entry, as [`channel_history`] joins it.
fn rest(e: &serde_json::Value) -> String {
    let text = |k: &str| e[k].as_str().unwrap_or("").to_owned();
    let occurred = chrono::DateTime::parse_from_rfc3339(e["occurred_at"].as_str().unwrap_or(""))
        .map(|t| t.timestamp_micros().to_string())
        .unwrap_or_else(|_| format!("unparsed {}", e["occurred_at"]));
    [
        occurred,
        text("business_date"),
        text("deposit_id"),
        text("payout_id"),
        text("counterparty"),
        text("memo"),
    ]
    .join("|")
}

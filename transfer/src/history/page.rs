//! Reading the history newest-first with keyset pagination (B17).
//!
//! A page is `WHERE account_id = $1 AND seq < $cursor ORDER BY seq DESC
//! LIMIT n`, served by the primary key `(account_id, seq)` as an index range
//! scan: page 1,000 costs what page 1 costs. The cursor is opaque to clients
//! (`base64url("h1:<account>:<seq>")`) and validated: it must name the same
//! account and a positive seq.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::AccountId;
use common::events::LedgerEntry;
use sea_orm::{ConnectionTrait, DbErr, Statement};

/// A cursor that does not belong to this account or does not parse.
#[derive(Debug, thiserror::Error)]
#[error("the cursor is not valid for this account's history")]
pub struct BadCursor;

/// Encodes the position just below `seq`.
pub fn encode_cursor(account: &AccountId, seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("h1:{account}:{seq}"))
}

/// Decodes a cursor for `account`.
pub fn decode_cursor(account: &AccountId, cursor: &str) -> Result<i64, BadCursor> {
    if cursor.len() > 200 {
        return Err(BadCursor);
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| BadCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| BadCursor)?;
    let rest = text.strip_prefix("h1:").ok_or(BadCursor)?;
    let (acc, seq) = rest.rsplit_once(':').ok_or(BadCursor)?;
    if acc != account.as_str() {
        return Err(BadCursor);
    }
    let seq: i64 = seq.parse().map_err(|_| BadCursor)?;
    if seq < 1 {
        return Err(BadCursor);
    }
    Ok(seq)
}

/// The SQL of one page (exposed so a test can check its plan).
pub const PAGE_SQL: &str = "SELECT account_id, seq, kind, amount, balance_after, occurred_at, business_date, \
     transfer_id, deposit_id, payout_id, counterparty, memo FROM history_entries \
     WHERE account_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";

/// Up to `limit` entries below `before_seq` (all when `None`), newest first,
/// and the cursor of the next page.
pub async fn page<C: ConnectionTrait>(
    conn: &C,
    account: &AccountId,
    before_seq: Option<i64>,
    limit: u64,
) -> Result<(Vec<LedgerEntry>, Option<String>), DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            PAGE_SQL,
            [
                account.to_string().into(),
                before_seq.unwrap_or(i64::MAX).into(),
                (limit as i64).into(),
            ],
        ))
        .await?;
    let entries = rows
        .iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = match entries.last() {
        Some(last) if entries.len() as u64 == limit && last.seq > 1 => {
            Some(encode_cursor(account, last.seq))
        }
        _ => None,
    };
    Ok((entries, next))
}

fn entry_from_row(r: &sea_orm::QueryResult) -> Result<LedgerEntry, DbErr> {
    let bad = |what: &str| DbErr::Custom(format!("stored history {what} is invalid"));
    let account: String = r.try_get("", "account_id")?;
    let kind: String = r.try_get("", "kind")?;
    let opt_id =
        |col: &str| -> Result<Option<String>, DbErr> { r.try_get::<Option<String>>("", col) };
    Ok(LedgerEntry {
        account_id: AccountId::parse(account).map_err(|_| bad("account"))?,
        seq: r.try_get("", "seq")?,
        kind: common::events::EntryKind::parse(&kind).ok_or_else(|| bad("kind"))?,
        amount: common::Won::new(r.try_get("", "amount")?).map_err(|_| bad("amount"))?,
        balance_after: common::Won::new(r.try_get("", "balance_after")?)
            .map_err(|_| bad("balance"))?,
        occurred_at: r.try_get("", "occurred_at")?,
        business_date: r.try_get("", "business_date")?,
        transfer_id: opt_id("transfer_id")?
            .map(common::TransferId::parse)
            .transpose()
            .map_err(|_| bad("transfer id"))?,
        deposit_id: opt_id("deposit_id")?
            .map(common::DepositId::parse)
            .transpose()
            .map_err(|_| bad("deposit id"))?,
        payout_id: opt_id("payout_id")?
            .map(common::PayoutId::parse)
            .transpose()
            .map_err(|_| bad("payout id"))?,
        counterparty: r.try_get("", "counterparty")?,
        memo: r.try_get("", "memo")?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_tampering() {
        let a = AccountId::parse("acc_a").unwrap();
        let b = AccountId::parse("acc_b").unwrap();
        let c = encode_cursor(&a, 42);
        assert_eq!(decode_cursor(&a, &c).unwrap(), 42);
        assert!(decode_cursor(&b, &c).is_err(), "another account's cursor");
        for bad in [
            "",
            "!!!",
            "aDE6YWNjX2E6MA",
            &URL_SAFE_NO_PAD.encode("h1:acc_a:-5"),
            &URL_SAFE_NO_PAD.encode("h2:acc_a:5"),
            &"A".repeat(500),
        ] {
            assert!(decode_cursor(&a, bad).is_err(), "{bad}");
        }
    }
}

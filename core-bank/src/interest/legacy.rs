//! The legacy interest path: replays the ledger day by day.
//!
//! This is how a traditional core computes interest: read every entry since
//! the last payout, walk the calendar one day at a time, and take each day's
//! closing balance from the entries of that day. It is slow for long periods
//! and busy accounts, and it is kept as the reference the new path is verified
//! against (B26, B27).

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sea_orm::{ConnectionTrait, DbErr, Statement};

use super::{AccountTerms, Accrual, InterestSettings, Path};

/// Interest accrued over the unpaid completed days before `today`.
pub async fn accrue<C: ConnectionTrait>(
    conn: &C,
    settings: &InterestSettings,
    terms: &AccountTerms,
    today: NaiveDate,
) -> Result<Accrual, DbErr> {
    let (from, through) = terms.period(today);
    let account = terms.account_id.to_string();
    // Balance carried into `from`: the last entry before it. Business dates
    // never go backwards along an account's seqs, so this reads back from the
    // newest entry only as far as the period goes.
    let opening = conn
        .query_one_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            "SELECT seq, balance_after FROM ledger_entries WHERE account_id = $1 AND business_date < $2 \
             ORDER BY seq DESC LIMIT 1",
            [account.clone().into(), from.into()],
        ))
        .await?;
    let (opening_seq, opening): (i64, Decimal) = match opening {
        Some(r) => (r.try_get("", "seq")?, r.try_get("", "balance_after")?),
        None => (0, Decimal::ZERO),
    };
    // The period's entries, from after the opening one: the key's range, not
    // every entry the account ever had (a busy account's history would be
    // read whole at every payout, under its row lock).
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            "SELECT business_date, balance_after FROM ledger_entries \
             WHERE account_id = $1 AND seq > $4 AND business_date BETWEEN $2 AND $3 ORDER BY seq",
            [
                account.into(),
                from.into(),
                through.into(),
                opening_seq.into(),
            ],
        ))
        .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for r in rows {
        entries.push((
            r.try_get::<NaiveDate>("", "business_date")?,
            r.try_get::<Decimal>("", "balance_after")?,
        ));
    }

    let mut balance = opening;
    let mut next = 0;
    let mut weight = Decimal::ZERO;
    let mut days = 0i64;
    let mut day = from;
    while day <= through {
        while next < entries.len() && entries[next].0 <= day {
            balance = entries[next].1;
            next += 1;
        }
        weight += settings.annual_weight(balance);
        days += 1;
        match day.succ_opt() {
            Some(d) => day = d,
            None => break,
        }
    }
    let (gross, tax, net) = settings.settle(weight);
    Ok(Accrual {
        account_id: terms.account_id.clone(),
        from,
        through,
        days,
        gross,
        tax,
        net,
        path: Path::Legacy,
        weight,
    })
}

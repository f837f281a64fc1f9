//! The new interest path: maintained daily closing balances.
//!
//! Every ledger write upserts the account's closing balance for the business
//! date (`daily_balances`), so a day without a row closed with the balance of
//! the latest earlier row. Accrual reads one row per day on which the balance
//! changed (plus the one carried in) and weighs each run of equal days at
//! once: its cost depends on the number of changes, not on entries or days.

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
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            "(SELECT business_date, closing_balance FROM daily_balances \
               WHERE account_id = $1 AND business_date < $2 ORDER BY business_date DESC LIMIT 1) \
             UNION ALL \
             (SELECT business_date, closing_balance FROM daily_balances \
               WHERE account_id = $1 AND business_date BETWEEN $2 AND $3 ORDER BY business_date)",
            [
                terms.account_id.to_string().into(),
                from.into(),
                through.into(),
            ],
        ))
        .await?;
    let mut changes = Vec::with_capacity(rows.len());
    for r in rows {
        changes.push((
            r.try_get::<NaiveDate>("", "business_date")?,
            r.try_get::<Decimal>("", "closing_balance")?,
        ));
    }
    changes.sort_by_key(|c| c.0);

    let mut weight = Decimal::ZERO;
    let days = if through >= from {
        (through - from).num_days() + 1
    } else {
        0
    };
    if days > 0 {
        // Runs: from each change (clamped to `from`) to the day before the next.
        let mut balance = Decimal::ZERO;
        let mut run_start = from;
        for (date, closing) in changes {
            if date <= from {
                balance = closing;
                continue;
            }
            let run_days = (date - run_start).num_days();
            weight += settings.annual_weight(balance) * Decimal::from(run_days);
            balance = closing;
            run_start = date;
        }
        let run_days = (through - run_start).num_days() + 1;
        weight += settings.annual_weight(balance) * Decimal::from(run_days);
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
        path: Path::New,
        weight,
    })
}

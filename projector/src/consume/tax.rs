//! Interest payouts into tax records (B23), idempotent by `payout_id`.

use async_nats::jetstream::Message;
use common::events::{INTEREST_PAID_SUBJECT, InterestPaidEvent};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};

use super::{Context, Failure, ack, fail};

/// Decodes and validates an interest event.
pub fn decode(subject: &str, payload: &[u8]) -> Result<InterestPaidEvent, String> {
    if subject != INTEREST_PAID_SUBJECT {
        return Err(format!("unexpected subject {subject}"));
    }
    let ev: InterestPaidEvent =
        serde_json::from_slice(payload).map_err(|e| format!("not an interest event: {e}"))?;
    if ev.gross.value() != ev.tax.value() + ev.net.value()
        || ev.tax.is_negative()
        || ev.net.is_negative()
    {
        return Err(format!(
            "inconsistent figures: gross {} tax {} net {}",
            ev.gross, ev.tax, ev.net
        ));
    }
    Ok(ev)
}

/// Records tax for the events (duplicates change nothing). Returns how many
/// records were new.
pub async fn record(db: &DatabaseConnection, events: &[InterestPaidEvent]) -> Result<u64, DbErr> {
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = events.iter().map(|e| e.payout_id.to_string()).collect();
    let accounts: Vec<String> = events.iter().map(|e| e.account_id.to_string()).collect();
    let gross: Vec<rust_decimal::Decimal> = events.iter().map(|e| e.gross.value()).collect();
    let tax: Vec<rust_decimal::Decimal> = events.iter().map(|e| e.tax.value()).collect();
    let net: Vec<rust_decimal::Decimal> = events.iter().map(|e| e.net.value()).collect();
    let from: Vec<chrono::NaiveDate> = events.iter().map(|e| e.from).collect();
    let through: Vec<chrono::NaiveDate> = events.iter().map(|e| e.through).collect();
    let paid: Vec<chrono::DateTime<chrono::Utc>> = events.iter().map(|e| e.paid_at).collect();
    let res = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "INSERT INTO tax_records (payout_id, account_id, gross, tax, net, from_date, through_date, paid_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::numeric[], $5::numeric[], \
                                  $6::date[], $7::date[], $8::timestamptz[]) \
             ON CONFLICT (payout_id) DO NOTHING",
            [
                ids.into(),
                accounts.into(),
                gross.into(),
                tax.into(),
                net.into(),
                from.into(),
                through.into(),
                paid.into(),
            ],
        ))
        .await?;
    Ok(res.rows_affected())
}

/// Handles a batch from the `INTEREST` consumer. Returns the messages left
/// unsettled because the channel database is unavailable (see
/// [`super::run`], which holds them). If PostgreSQL refuses the data of some
/// event, the batch is recorded again one event at a time, so only that one
/// is dead-lettered.
pub async fn handle(ctx: &Context, batch: Vec<Message>) -> Vec<Message> {
    let mut valid = Vec::with_capacity(batch.len());
    for m in batch {
        match decode(m.subject.as_str(), &m.payload) {
            Ok(e) => valid.push((m, e)),
            Err(reason) => fail(ctx, &m, Failure::Permanent(reason)).await,
        }
    }
    if valid.is_empty() {
        return Vec::new();
    }
    let events: Vec<InterestPaidEvent> = valid.iter().map(|(_, e)| e.clone()).collect();
    match record(&ctx.db, &events).await {
        Ok(new) => {
            metrics::counter!("projector_tax_records_total").increment(new);
            for (m, _) in &valid {
                ack(m).await;
            }
        }
        Err(e) if common::db::is_unavailable(&e) => {
            tracing::warn!(error = %e, held = valid.len(), "the channel database is unavailable; holding the tax records");
            return valid.into_iter().map(|(m, _)| m).collect();
        }
        Err(e) if common::db::is_rejected_data(&e) && valid.len() > 1 => {
            tracing::warn!(error = %e, events = valid.len(), "the channel database refused a tax record; recording them one at a time");
            let mut rest = valid.into_iter();
            while let Some((m, ev)) = rest.next() {
                match record(&ctx.db, std::slice::from_ref(&ev)).await {
                    Ok(new) => {
                        metrics::counter!("projector_tax_records_total").increment(new);
                        ack(&m).await;
                    }
                    Err(e) if common::db::is_unavailable(&e) => {
                        return std::iter::once(m).chain(rest.map(|(m, _)| m)).collect();
                    }
                    Err(e) => fail(ctx, &m, Failure::of_database(&e)).await,
                }
            }
        }
        Err(e) => {
            let failure = Failure::of_database(&e);
            for (m, _) in &valid {
                fail(ctx, m, failure.clone()).await;
            }
        }
    }
    Vec::new()
}

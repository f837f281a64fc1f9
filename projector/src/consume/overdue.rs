//! Messages whose handling never ends (F5, F7).
//!
//! The handlers settle every message they finish with, and dead-letter a
//! failing one at `PROJECTOR_MAX_DELIVERIES`; the server's own `max_deliver`
//! is unlimited. A message delivered more than twice the limit was therefore
//! delivered again and again without its handling ever ending (the process
//! died, or a batch task failed), maybe because of this message, maybe
//! because of another in hand at the time (a crash loop raises the count of
//! every message in hand). Each such message is handled alone, after its
//! batch ([`handle_alone`]), with a row in `overdue_attempts` (its delivery
//! count) while it is: a row of an earlier delivery still there at the next
//! one means that attempt never ended either, and the message is
//! dead-lettered instead of coming back forever.
//!
//! An attempt can also end without settling the message: the channel
//! database became unavailable during it, and the message was handed back
//! (held until the database answers, or naked at shutdown). The row cannot
//! be updated then, so the hand-back is recorded in the JetStream key-value
//! bucket `projector-handbacks` ([`HANDBACKS`]) instead; at the next
//! delivery a row whose attempt was handed back is taken over, not
//! lettered. Records older than a day expire, as rows do.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, kv};
use sea_orm::{ConnectionTrait, DbErr, Statement};

use super::{Context, Feed, Stored, dlq, ledger, tax};

/// The key-value bucket of overdue attempts handed back unsettled.
pub const HANDBACKS: &str = "projector-handbacks";

/// How long a hand-back record (and an attempt's row) is kept.
const KEPT_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// Splits `batch` into the messages handled as a batch and the overdue
/// ones: delivered more than twice `PROJECTOR_MAX_DELIVERIES` times.
pub fn split(ctx: &Context, batch: Vec<Message>) -> (Vec<Message>, Vec<Message>) {
    let limit = ctx.config.max_deliveries.max(1).saturating_mul(2);
    batch
        .into_iter()
        .partition(|m| m.info().map_or(true, |i| i.delivered <= limit))
}

/// A message's key in `overdue_attempts` ([`super::Stored`]).
struct Key(Stored);

impl Key {
    fn values(&self) -> [sea_orm::Value; 3] {
        [
            self.0.stream.clone().into(),
            i64::try_from(self.0.seq).unwrap_or(i64::MAX).into(),
            self.0.at_ns.into(),
        ]
    }

    /// Its key in [`HANDBACKS`] (stream names and numbers only: valid key
    /// characters).
    fn record(&self) -> String {
        format!("{}.{}.{}", self.0.stream, self.0.seq, self.0.at_ns)
    }
}

/// Handles an overdue message alone, with its row in `overdue_attempts`
/// (see the module's doc). The row goes once the message is settled; one
/// handed back (the channel database unavailable) keeps it, is recorded as
/// handed back, and is handled again within the same delivery without being
/// lettered.
pub async fn handle_alone(ctx: &Context, feed: Feed, m: Message) -> Vec<Message> {
    let Ok(info) = m.info() else {
        return handle_one(ctx, feed, m).await;
    };
    let delivered = info.delivered;
    let key = Key(Stored::of(&info));
    match attempt_alone(ctx, &key, delivered).await {
        Ok(AloneAttempt::This) => {}
        Ok(AloneAttempt::EarlierNeverEnded(earlier)) => {
            match take_over(ctx, &key, earlier, delivered).await {
                TakeOver::Taken => {}
                TakeOver::NeverEnded => {
                    let reason = format!(
                        "delivered {delivered} times without its handling ever ending, also when handled alone at delivery {earlier} (the projector died on it)"
                    );
                    dlq::dead_letter(ctx, &m, &reason, "exhausted").await;
                    forget_attempt(ctx, &key).await;
                    return Vec::new();
                }
                TakeOver::Undecided(reason) => {
                    // The row and the hand-back stay as they are: the next
                    // delivery decides again.
                    tracing::warn!(subject = %m.subject, delivered, earlier, %reason, "an overdue message's earlier attempt was handed back, but its row could not be taken over; retrying later");
                    if let Err(e) = m
                        .ack_with(AckKind::Nak(Some(ctx.config.retry_delay(delivered))))
                        .await
                    {
                        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
                    }
                    return Vec::new();
                }
            }
        }
        // Undecided: handled alone without knowing whether the row was
        // written (an answer lost after the insert committed); it is still
        // forgotten once the message is settled, and a hand-back recorded.
        Err(e) => {
            tracing::warn!(error = %e, "recording an overdue message's attempt failed; handling it alone without the record");
        }
    }
    let back = handle_one(ctx, feed, m).await;
    if back.is_empty() {
        forget_attempt(ctx, &key).await;
    } else {
        record_handback(ctx, &key, delivered).await;
    }
    back
}

/// One message as a batch of its own, out of the lanes' order: the writer's
/// sequence rule keeps the account's history in order whatever the order of
/// handling (an entry ahead of the history is filled from the core).
async fn handle_one(ctx: &Context, feed: Feed, m: Message) -> Vec<Message> {
    match feed {
        Feed::Ledger => ledger::handle(ctx, vec![m], ledger::Turns::free()).await,
        Feed::Interest => tax::handle(ctx, vec![m]).await,
    }
}

/// What `overdue_attempts` says about handling a message alone now.
enum AloneAttempt {
    /// This delivery's attempt (recorded now, or again after a hand-back).
    This,
    /// The attempt of an earlier delivery (that number) never ended, or
    /// ended handed back.
    EarlierNeverEnded(i64),
}

/// Records the attempt of `key` at delivery `delivered`, unless one of an
/// earlier delivery is recorded.
async fn attempt_alone(ctx: &Context, key: &Key, delivered: i64) -> Result<AloneAttempt, DbErr> {
    let [stream, seq, published] = key.values();
    let row = ctx
        .db
        .query_one_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "WITH stale AS (DELETE FROM overdue_attempts WHERE started_at < now() - make_interval(secs => $5)), \
                  attempt AS ( \
                    INSERT INTO overdue_attempts (stream, stream_seq, published_ns, delivered) \
                    VALUES ($1, $2, $3, $4) \
                    ON CONFLICT (stream, stream_seq, published_ns) \
                      DO UPDATE SET delivered = overdue_attempts.delivered \
                    RETURNING delivered) \
             SELECT delivered FROM attempt",
            [
                stream,
                seq,
                published,
                delivered.into(),
                KEPT_FOR.as_secs_f64().into(),
            ],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("no answer from recording an attempt".into()))?;
    let recorded: i64 = row.try_get("", "delivered")?;
    Ok(if recorded < delivered {
        AloneAttempt::EarlierNeverEnded(recorded)
    } else {
        AloneAttempt::This
    })
}

/// What became of an earlier attempt alone whose row is still there.
enum TakeOver {
    /// It was handed back (at that delivery or a later one): the row is now
    /// this delivery's attempt.
    Taken,
    /// No hand-back of it is recorded: the projector died on it.
    NeverEnded,
    /// It was handed back, but the row could not be taken over (the
    /// database failed, or another delivery of the message changed it).
    Undecided(String),
}

/// Whether the attempt recorded at delivery `earlier` ended handed back (a
/// record in [`HANDBACKS`] of that delivery or a later one: any hand-back
/// since means the projector did not die on it); if so, the row becomes
/// this delivery's attempt. The record stays (it expires): one left by an
/// attempt that was then handled again in the same delivery and died gives
/// the message one more attempt alone before it is lettered. A record that
/// cannot be read counts as none: the message is lettered, as it was before
/// hand-backs were recorded, and can be replayed.
async fn take_over(ctx: &Context, key: &Key, earlier: i64, delivered: i64) -> TakeOver {
    let handed_back = match handed_back_at(ctx, key).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, stream = %key.0.stream, stream_seq = key.0.seq, "reading whether an overdue message's earlier attempt was handed back failed; taking it as never ended");
            None
        }
    };
    if handed_back.is_none_or(|n| n < earlier) {
        return TakeOver::NeverEnded;
    }
    let [stream, seq, published] = key.values();
    let updated = ctx
        .db
        .execute_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "UPDATE overdue_attempts SET delivered = $4, started_at = now() \
             WHERE stream = $1 AND stream_seq = $2 AND published_ns = $3 AND delivered = $5",
            [stream, seq, published, delivered.into(), earlier.into()],
        ))
        .await;
    match updated {
        Ok(r) if r.rows_affected() == 1 => {
            tracing::info!(
                stream = %key.0.stream,
                stream_seq = key.0.seq,
                earlier,
                delivered,
                "an overdue message's earlier attempt was handed back, not died on; handled alone again"
            );
            TakeOver::Taken
        }
        Ok(_) => TakeOver::Undecided("another delivery of it changed its row meanwhile".into()),
        Err(e) => TakeOver::Undecided(format!("taking its row over: {e}")),
    }
}

/// The delivery at which the attempt of `key` was last handed back, if one
/// is recorded.
async fn handed_back_at(ctx: &Context, key: &Key) -> Result<Option<i64>, anyhow::Error> {
    let Some(store) = existing_handbacks(ctx).await? else {
        return Ok(None);
    };
    Ok(store
        .get(key.record())
        .await?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok()))
}

/// Records that the attempt of `key` at delivery `delivered` was handed
/// back unsettled. Without the record (NATS failing too), the message's next
/// delivery, if its row is still there, is lettered.
async fn record_handback(ctx: &Context, key: &Key, delivered: i64) {
    let recorded = async {
        let store = match existing_handbacks(ctx).await? {
            Some(store) => store,
            None => create_handbacks(ctx).await?,
        };
        store
            .put(key.record(), delivered.to_string().into())
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = recorded.await {
        tracing::warn!(error = %e, stream = %key.0.stream, stream_seq = key.0.seq, "recording an overdue message's hand-back failed; if this process stops before it is handled, its next delivery is lettered");
    }
}

/// The [`HANDBACKS`] bucket, or `None` if it does not exist (no hand-back
/// yet, or NATS's storage lost): only an error of the server is an error.
async fn existing_handbacks(ctx: &Context) -> Result<Option<kv::Store>, anyhow::Error> {
    match ctx.js.get_key_value(HANDBACKS).await {
        Ok(store) => Ok(Some(store)),
        Err(e) => {
            match common::jetstream::stream_if_exists(&ctx.js, &format!("KV_{HANDBACKS}")).await? {
                None => Ok(None),
                Some(_) => Err(e.into()),
            }
        }
    }
}

/// Creates the [`HANDBACKS`] bucket (replicas creating it at once send the
/// same settings, which the server accepts from each).
async fn create_handbacks(ctx: &Context) -> Result<kv::Store, anyhow::Error> {
    Ok(ctx
        .js
        .create_key_value(kv::Config {
            bucket: HANDBACKS.to_owned(),
            description: "projector: overdue messages' attempts handed back unsettled".to_owned(),
            history: 1,
            max_age: KEPT_FOR,
            // Bounded like every stream: a full bucket refuses a record,
            // which leaves the message as it was without one.
            max_bytes: 64 * 1024 * 1024,
            storage: jetstream::stream::StorageType::File,
            num_replicas: ctx.config.nats.stream_replicas.max(1),
            ..Default::default()
        })
        .await?)
}

/// Forgets the attempt of `key` (its message settled, or lettered).
async fn forget_attempt(ctx: &Context, key: &Key) {
    let [stream, seq, published] = key.values();
    if let Err(e) = ctx
        .db
        .execute_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "DELETE FROM overdue_attempts WHERE stream = $1 AND stream_seq = $2 AND published_ns = $3",
            [stream, seq, published],
        ))
        .await
    {
        tracing::warn!(error = %e, "forgetting an overdue message's attempt failed; its next delivery, if any, is lettered");
    }
}

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

use super::{Context, Feed, dlq, ledger, tax};

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

/// A message's key in `overdue_attempts`: its stream, its sequence there and
/// when it was stored (ns; a stream recreated after its storage was lost
/// reuses sequences).
struct Key {
    stream: String,
    seq: i64,
    published_ns: i64,
}

impl Key {
    fn of(info: &jetstream::message::Info<'_>) -> Self {
        Key {
            stream: info.stream.to_owned(),
            seq: i64::try_from(info.stream_sequence).unwrap_or(i64::MAX),
            published_ns: i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        }
    }

    fn values(&self) -> [sea_orm::Value; 3] {
        [
            self.stream.clone().into(),
            self.seq.into(),
            self.published_ns.into(),
        ]
    }

    /// Its key in [`HANDBACKS`] (stream names and numbers only: valid key
    /// characters).
    fn record(&self) -> String {
        format!("{}.{}.{}", self.stream, self.seq, self.published_ns)
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
    let key = Key::of(&info);
    let attempt = match attempt_alone(ctx, &key, delivered).await {
        Ok(attempt) => attempt,
        // Undecided: handled alone, without the record.
        Err(e) => {
            tracing::warn!(error = %e, "recording an overdue message's attempt failed; handling it alone without the record");
            return handle_one(ctx, feed, m).await;
        }
    };
    if let AloneAttempt::EarlierNeverEnded(earlier) = attempt {
        match take_over(ctx, &key, earlier, delivered).await {
            Ok(true) => {}
            Ok(false) => {
                let reason = format!(
                    "delivered {delivered} times without its handling ever ending, also when handled alone at delivery {earlier} (the projector died on it)"
                );
                dlq::dead_letter(ctx, &m, &reason, "exhausted").await;
                forget_attempt(ctx, &key).await;
                return Vec::new();
            }
            Err(e) => {
                // Whether the earlier attempt ended is unknown for now: the
                // message comes back later, its row unchanged.
                tracing::warn!(error = %e, subject = %m.subject, delivered, "reading whether an overdue message's earlier attempt was handed back failed; retrying later");
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
            "WITH stale AS (DELETE FROM overdue_attempts WHERE started_at < now() - interval '1 day'), \
                  attempt AS ( \
                    INSERT INTO overdue_attempts (stream, stream_seq, published_ns, delivered) \
                    VALUES ($1, $2, $3, $4) \
                    ON CONFLICT (stream, stream_seq, published_ns) \
                      DO UPDATE SET delivered = overdue_attempts.delivered \
                    RETURNING delivered) \
             SELECT delivered FROM attempt",
            [stream, seq, published, delivered.into()],
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

/// Whether the attempt recorded at delivery `earlier` ended handed back (a
/// record in [`HANDBACKS`]); if so, the row becomes this delivery's attempt
/// and the record goes. An attempt handed back and then handled again in
/// the same delivery leaves its record behind when it dies, so a message
/// the projector dies on after a hand-back gets one more attempt alone
/// before it is lettered.
async fn take_over(
    ctx: &Context,
    key: &Key,
    earlier: i64,
    delivered: i64,
) -> Result<bool, anyhow::Error> {
    let store = handbacks(ctx).await?;
    let handed_back = store
        .get(key.record())
        .await?
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
    if handed_back != Some(earlier) {
        return Ok(false);
    }
    let [stream, seq, published] = key.values();
    ctx.db
        .execute_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "UPDATE overdue_attempts SET delivered = $4, started_at = now() \
             WHERE stream = $1 AND stream_seq = $2 AND published_ns = $3",
            [stream, seq, published, delivered.into()],
        ))
        .await?;
    if let Err(e) = store.purge(key.record()).await {
        tracing::warn!(error = %e, "forgetting an overdue message's hand-back failed; it expires within a day");
    }
    tracing::info!(
        stream = %key.stream,
        stream_seq = key.seq,
        earlier,
        delivered,
        "an overdue message's earlier attempt was handed back, not died on; handled alone again"
    );
    Ok(true)
}

/// Records that the attempt of `key` at delivery `delivered` was handed
/// back unsettled. Without the record (NATS failing too), the message's next
/// delivery, if its row is still there, is lettered.
async fn record_handback(ctx: &Context, key: &Key, delivered: i64) {
    let recorded = match handbacks(ctx).await {
        Ok(store) => store
            .put(key.record(), delivered.to_string().into())
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        tracing::warn!(error = %e, stream = %key.stream, stream_seq = key.seq, "recording an overdue message's hand-back failed; if this process stops before it is handled, its next delivery is lettered");
    }
}

/// The [`HANDBACKS`] bucket, created if missing (the first hand-back, or
/// NATS's storage lost).
async fn handbacks(ctx: &Context) -> Result<kv::Store, anyhow::Error> {
    use jetstream::context::KeyValueErrorKind;
    match ctx.js.get_key_value(HANDBACKS).await {
        Ok(store) => Ok(store),
        Err(e) if e.kind() == KeyValueErrorKind::GetBucket => Ok(ctx
            .js
            .create_key_value(kv::Config {
                bucket: HANDBACKS.to_owned(),
                description: "projector: overdue messages' attempts handed back unsettled"
                    .to_owned(),
                history: 1,
                max_age: KEPT_FOR,
                // Bounded like every stream: a full bucket refuses a record,
                // which leaves the message as it was without one.
                max_bytes: 64 * 1024 * 1024,
                storage: jetstream::stream::StorageType::File,
                num_replicas: ctx.config.nats.stream_replicas.max(1),
                ..Default::default()
            })
            .await?),
        Err(e) => Err(e.into()),
    }
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

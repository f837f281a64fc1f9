//! The dead-letter stream (B16).
//!
//! A dead letter is the original message body published on
//! `bank.dlq.<original subject>` with headers naming where it came from and
//! why it failed (API.md). Its id is its sequence number in `DLQ`. Replaying
//! a letter applies it through the same path as a live message (so it is
//! applied exactly once), then deletes it from `DLQ`.

use async_nats::HeaderMap;
use async_nats::jetstream::{AckKind, Message};
use common::events::DLQ_SUBJECT_PREFIX;
use common::jetstream::{DLQ, DLQ_STREAM, INTEREST_STREAM, LEDGER_STREAM};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde::Serialize;

use super::{Context, ledger, tax};

/// Header: stream the message came from.
pub const H_STREAM: &str = "Bank-Dlq-Stream";
/// Header: its sequence in that stream.
pub const H_STREAM_SEQ: &str = "Bank-Dlq-Stream-Seq";
/// Header: the consumer that gave up on it.
pub const H_CONSUMER: &str = "Bank-Dlq-Consumer";
/// Header: deliveries made.
pub const H_DELIVERIES: &str = "Bank-Dlq-Deliveries";
/// Header: the last error.
pub const H_ERROR: &str = "Bank-Dlq-Error";

/// Longest error text kept in a header.
const MAX_ERROR_LEN: usize = 1000;

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Its sequence in `DLQ`; a JSON string, like every id of the API.
    #[serde(serialize_with = "as_string")]
    #[schema(value_type = String)]
    pub id: u64,
    /// The original subject.
    pub subject: String,
    /// Why it failed.
    pub error: String,
    /// Deliveries made before it was dead-lettered.
    pub deliveries: i64,
    /// Its sequence in the original stream.
    pub stream_seq: u64,
    /// The original stream.
    pub stream: String,
    /// The original body, as text.
    pub body: String,
}

/// Writes a number as a JSON string: ids are opaque strings in the API
/// (a client keeps them as given, whatever they look like).
pub fn as_string<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(n)
}

/// Writes an optional number as a JSON string or null (see [`as_string`]).
pub fn as_optional_string<S: serde::Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => as_string(n, s),
        None => s.serialize_none(),
    }
}

/// Publishes `m` to `DLQ` and terminates it on its stream. If the publish
/// fails the message is naked instead, so it is never lost.
pub async fn dead_letter(ctx: &Context, m: &Message, reason: &str, kind: &'static str) {
    let (stored, consumer, delivered) = match m.info() {
        Ok(i) => (super::Stored::of(&i), i.consumer.to_owned(), i.delivered),
        Err(_) => (
            super::Stored {
                stream: String::from("unknown"),
                seq: 0,
                at_ns: 0,
            },
            String::from("unknown"),
            0,
        ),
    };
    let super::Stored {
        stream,
        seq: stream_seq,
        at_ns: stored_at_ns,
    } = stored;
    let mut error: String = reason.chars().filter(|c| !c.is_control()).collect();
    error.truncate(MAX_ERROR_LEN);
    let mut headers = HeaderMap::new();
    // The message is its stream, its sequence and when the stream stored it:
    // a stream created again reuses sequence numbers. Without its metadata
    // (never the case for a consumer's message) there is no id to share:
    // such a letter is not deduplicated rather than taken for another's.
    let known = stream_seq > 0;
    if known {
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq:{stream}:{stream_seq}:{stored_at_ns}").as_str(),
        );
    }
    headers.insert(H_STREAM, stream.as_str());
    headers.insert(H_STREAM_SEQ, stream_seq.to_string().as_str());
    headers.insert(H_CONSUMER, consumer.as_str());
    headers.insert(H_DELIVERIES, delivered.to_string().as_str());
    headers.insert(H_ERROR, error.as_str());
    if let Some(tp) = super::traceparent(m) {
        headers.insert(common::telemetry::TRACEPARENT, tp.as_str());
    }
    let subject = format!("{DLQ_SUBJECT_PREFIX}{}", m.subject);
    // Lettered before (and the termination was lost)? Then only terminate.
    // Within the duplicate window `Nats-Msg-Id` would drop a second letter
    // anyway; this record also covers redeliveries after it.
    let before = if known {
        lettered_before(ctx, &stream, stream_seq, stored_at_ns).await
    } else {
        Ok(None)
    };
    match before {
        Ok(Some(dlq_seq)) => {
            if let Err(e) = m.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "terminating an already dead-lettered message failed; it will come back");
            }
            metrics::counter!("projector_dead_letters_repeated_total", "stream" => stream.clone())
                .increment(1);
            tracing::warn!(%stream, stream_seq, dlq_seq, delivered, "message redelivered after it was dead-lettered; terminated without a second letter");
            return;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, %stream, stream_seq, "could not check earlier dead letters; lettering (deduplicated within the window)");
        }
    }
    use async_nats::jetstream::context::PublishErrorKind;
    let published = match ctx
        .js
        .publish_with_headers(subject.clone(), headers, m.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|a| a.sequence),
        Err(e) => Err(e),
    };
    if let Err(e) = &published
        && e.kind() == PublishErrorKind::StreamNotFound
    {
        // The DLQ stream is gone (deleted, or lost with the server's
        // storage): created again, and the message, naked below, is
        // lettered when it comes back.
        let replicas = ctx.config.nats.stream_replicas;
        if let Err(e) = common::jetstream::ensure_streams(&ctx.js, &[DLQ], replicas).await {
            tracing::warn!(error = %common::error_chain(&e), "creating the dead-letter stream again failed");
        }
    }
    match published {
        Ok(dlq_seq) => {
            let recorded = if known {
                record_lettered(ctx, &stream, stream_seq, stored_at_ns, dlq_seq).await
            } else {
                Ok(())
            };
            if let Err(e) = recorded {
                tracing::warn!(error = %e, %stream, stream_seq, "could not record the dead letter; a much later redelivery may letter it again");
            }
            if let Err(e) = m.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "terminating a dead-lettered message failed; it may be dead-lettered again (deduplicated)");
            }
            metrics::counter!("projector_dead_letters_total", "stream" => stream.clone(), "kind" => kind).increment(1);
            tracing::error!(%subject, %stream, stream_seq, delivered, kind, error = %error, "message dead-lettered");
        }
        Err(e) => {
            // A full DLQ (it refuses new letters) or NATS unreachable.
            metrics::counter!("projector_dead_letter_publish_failures_total").increment(1);
            tracing::error!(error = %e, original = %m.subject, "could not publish a dead letter; retrying the message later");
            let _ = m
                .ack_with(AckKind::Nak(Some(ctx.config.retry_delay(delivered))))
                .await;
        }
    }
}

/// The `DLQ` sequence of an earlier letter of this source message, if any.
/// A record of the same sequence stored at another time was a message of an
/// earlier stream of that name; rows from before the time was kept (0) match.
async fn lettered_before(
    ctx: &Context,
    stream: &str,
    seq: u64,
    stored_at_ns: i64,
) -> Result<Option<u64>, DbErr> {
    let row = ctx
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT dlq_seq FROM dead_lettered WHERE stream = $1 AND stream_seq = $2 \
             AND stored_at_ns IN ($3, 0)",
            [stream.into(), to_i64(seq).into(), stored_at_ns.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<i64>("", "dlq_seq").map(|s| s.max(0) as u64))
        .transpose()
}

/// Records the letter; a record of the same sequence from an earlier stream
/// of that name is replaced.
async fn record_lettered(
    ctx: &Context,
    stream: &str,
    seq: u64,
    stored_at_ns: i64,
    dlq_seq: u64,
) -> Result<(), DbErr> {
    ctx.db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO dead_lettered (stream, stream_seq, stored_at_ns, dlq_seq) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream, stream_seq) DO UPDATE \
             SET stored_at_ns = EXCLUDED.stored_at_ns, dlq_seq = EXCLUDED.dlq_seq, dead_lettered_at = now() \
             WHERE dead_lettered.stored_at_ns NOT IN (EXCLUDED.stored_at_ns, 0)",
            [
                stream.into(),
                to_i64(seq).into(),
                stored_at_ns.into(),
                to_i64(dlq_seq).into(),
            ],
        ))
        .await
        .map(|_| ())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name).map(|v| v.to_string()).unwrap_or_default()
}

fn to_letter(m: &async_nats::jetstream::message::StreamMessage) -> DeadLetter {
    DeadLetter {
        id: m.sequence,
        subject: m
            .subject
            .as_str()
            .strip_prefix(DLQ_SUBJECT_PREFIX)
            .unwrap_or(m.subject.as_str())
            .to_owned(),
        error: header(&m.headers, H_ERROR),
        deliveries: header(&m.headers, H_DELIVERIES).parse().unwrap_or(0),
        stream_seq: header(&m.headers, H_STREAM_SEQ).parse().unwrap_or(0),
        stream: header(&m.headers, H_STREAM),
        body: String::from_utf8_lossy(&m.payload).into_owned(),
    }
}

/// A page of dead letters.
#[derive(Debug)]
pub struct Page {
    /// The letters, oldest first.
    pub letters: Vec<DeadLetter>,
    /// `after` for the next page; `None` on the last page.
    pub next_after: Option<u64>,
}

/// The dead-letter stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream could not be looked up.
    #[error("looking up the dead-letter stream")]
    Lookup(#[from] async_nats::jetstream::context::GetStreamError),
    /// A replayed letter could not be removed.
    #[error("removing dead letter {id}")]
    Delete {
        /// The letter.
        id: u64,
        /// What the server answered.
        source: async_nats::jetstream::stream::DeleteMessageError,
    },
    /// A letter could not be read.
    #[error("reading dead letter {seq}")]
    Read {
        /// The first sequence asked for.
        seq: u64,
        /// What the server answered.
        source: async_nats::jetstream::stream::RawMessageError,
    },
}

/// The `DLQ` stream, or `None` when it does not exist: deleted, or lost
/// with a server's storage. It holds no letters then; the next dead letter
/// creates it again, so reading it answers "none" rather than failing.
async fn dlq_stream(
    ctx: &Context,
) -> Result<Option<async_nats::jetstream::stream::Stream>, StreamError> {
    let stream = common::jetstream::stream_if_exists(&ctx.js, DLQ_STREAM).await?;
    if stream.is_none() {
        tracing::warn!(
            stream = DLQ_STREAM,
            "the dead-letter stream does not exist; no letters to show (the next dead letter creates it)"
        );
    }
    Ok(stream)
}

/// Dead letters with ids after `after`, at most `limit`.
pub async fn list(ctx: &Context, after: u64, limit: usize) -> Result<Page, StreamError> {
    let mut out = Vec::new();
    // Its state as the look-up just read it.
    let Some(stream) = dlq_stream(ctx).await? else {
        return Ok(Page {
            letters: out,
            next_after: None,
        });
    };
    if stream.cached_info().state.messages == 0 {
        return Ok(Page {
            letters: out,
            next_after: None,
        });
    }
    // Each request returns the next letter at or after `seq` (the server
    // skips replayed, deleted ones), so a page costs one request per letter
    // however many were replayed in between.
    let every_letter = format!("{DLQ_SUBJECT_PREFIX}>");
    let mut seq = after.saturating_add(1);
    while out.len() < limit {
        match stream
            .get_first_raw_message_by_subject(&every_letter, seq)
            .await
        {
            Ok(m) => {
                seq = m.sequence.saturating_add(1);
                out.push(to_letter(&m));
            }
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                break;
            }
            Err(source) => return Err(StreamError::Read { seq, source }),
        }
    }
    let next_after = match out.last() {
        Some(last) if out.len() == limit => Some(last.id),
        _ => None,
    };
    Ok(Page {
        letters: out,
        next_after,
    })
}

/// One dead letter.
pub async fn get(ctx: &Context, id: u64) -> Result<Option<DeadLetter>, StreamError> {
    let Some(stream) = dlq_stream(ctx).await? else {
        return Ok(None);
    };
    match stream.get_raw_message(id).await {
        Ok(m) => Ok(Some(to_letter(&m))),
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            Ok(None)
        }
        Err(source) => Err(StreamError::Read { seq: id, source }),
    }
}

/// Why a replay did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No such dead letter.
    #[error("no dead letter {0}")]
    NotFound(u64),
    /// Applying failed again; the letter stays.
    #[error("replay of dead letter {id} failed: {reason}")]
    Failed {
        /// The letter.
        id: u64,
        /// Why.
        reason: String,
    },
    /// JetStream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// The reason a replay gives when the channel database failed: the driver's
/// text goes to the log, not into the answer.
fn channel_database_failed(id: u64, e: &DbErr) -> String {
    tracing::warn!(id, error = %e, "replaying a dead letter: the channel database failed");
    "the channel database failed; see the projector's log".to_owned()
}

/// Applies a dead letter through the normal path and removes it.
pub async fn replay(ctx: &Context, id: u64) -> Result<DeadLetter, ReplayError> {
    let letter = get(ctx, id).await?.ok_or(ReplayError::NotFound(id))?;
    let failed = |reason: String| ReplayError::Failed { id, reason };
    match letter.stream.as_str() {
        LEDGER_STREAM => {
            let entry = ledger::decode(&letter.subject, letter.body.as_bytes()).map_err(failed)?;
            let outcome = ledger::apply_with_gap_fill(ctx, std::slice::from_ref(&entry))
                .await
                .map_err(|e| failed(channel_database_failed(id, &e)))?;
            if outcome.conflicts(&entry) {
                return Err(failed(format!(
                    "entry {} differs from the core's ledger at that seq",
                    entry.event_id()
                )));
            }
            if !outcome.holds(&entry) {
                let why = outcome
                    .blocked
                    .get(entry.account_id.as_str())
                    .cloned()
                    .unwrap_or_else(|| "entries before it are missing".into());
                return Err(failed(why));
            }
        }
        INTEREST_STREAM => {
            let ev = tax::decode(&letter.subject, letter.body.as_bytes()).map_err(failed)?;
            match tax::check(ctx, &ev).await {
                Ok(tax::Check::Confirmed) => {}
                Ok(tax::Check::NotTheCores(reason)) => return Err(failed(reason)),
                Err(e) => {
                    return Err(failed(format!(
                        "the core cannot confirm the payout: {}",
                        common::error_chain(&e)
                    )));
                }
            }
            tax::record(&ctx.db, &[ev])
                .await
                .map_err(|e| failed(channel_database_failed(id, &e)))?;
        }
        other => return Err(failed(format!("unknown source stream {other:?}"))),
    }
    let stream = ctx
        .js
        .get_stream(DLQ_STREAM)
        .await
        .map_err(StreamError::from)?;
    if let Err(source) = stream.delete_message(id).await {
        // Another replay of the same letter (the HTTP API and the command at
        // once) may have removed it first; both applied it, which the
        // history and the tax records take once.
        return match get(ctx, id).await {
            Ok(None) => {
                tracing::info!(id, "dead letter replayed; another replay removed it first");
                Ok(letter)
            }
            _ => Err(StreamError::Delete { id, source }.into()),
        };
    }
    metrics::counter!("projector_dead_letters_replayed_total").increment(1);
    tracing::info!(id, subject = %letter.subject, "dead letter replayed and removed");
    Ok(letter)
}

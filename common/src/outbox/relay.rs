//! The outbox relay: publishes committed outbox rows to JetStream.
//!
//! Rules it keeps:
//! - **Nothing is skipped.** Every pass selects *all* unpublished rows in id
//!   order (no high-water mark), so a row whose id was assigned before a
//!   row that committed earlier is still found on the next pass.
//! - **Per-subject order.** Within a pass rows are published in id order and
//!   acknowledged in that order; only the acknowledged prefix is marked. Rows
//!   of one subject written under a lock (all ledger rows of an account are)
//!   get increasing ids, so they are published in the order they were written.
//! - **Several replicas are safe.** A pass runs inside a transaction holding a
//!   transaction-scoped advisory lock, so at most one replica publishes at a
//!   time; the others find the lock taken and wait for the next wake-up.
//! - **Crash-safe.** A crash after publishing and before commit leaves the rows
//!   unpublished; the next pass publishes them again with the same
//!   `Nats-Msg-Id`, and JetStream drops the duplicates.
//! - **Bounded.** Batches are capped, NATS outages back off exponentially
//!   with jitter (100 ms to 5 s), published rows are pruned after a retention
//!   period.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use backon::{BackoffBuilder, ExponentialBuilder};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::NOTIFY_CHANNEL;
use crate::telemetry;

/// Advisory lock key that serializes relay passes within one database
/// ("outbox" in ASCII).
const RELAY_LOCK_KEY: i64 = 0x6f75_7462_6f78;

/// Opens a pass: takes the relay lock (`$1`: the key) and sets the pass's
/// transaction-local settings.
///
/// - The mark need not wait for its WAL flush: a mark lost in a crash only
///   re-publishes rows that JetStream's duplicate window drops (and consumers
///   are idempotent anyway), and it saves one fsync per pass beside the
///   writers' own.
/// - [`UNPUBLISHED_SQL`] must walk the partial index `outbox_unpublished` in
///   id order. Every marked row leaves a dead entry there until vacuum; an
///   index scan flags each one it meets as dead, so the next pass skips it
///   without reading the table, while a bitmap or sequential scan (which the
///   planner picks when its statistics were taken while rows waited) reads
///   every dead row's table page on every pass: 5 ms a pass instead of
///   0.1 ms after 26,000 marks, measured during `make bench`'s P2.
/// - The read and the mark keep their plans (generic plans, cached on the
///   connection; the pools otherwise force a custom plan per execution):
///   with the scans above turned off both plans are index scans whatever the
///   parameters, and planning them anew cost about as much as running them
///   (`pg_stat_statements` with `track_planning` during `make bench`'s P2 at
///   200/s: the read planned in 0.05 ms and run in 0.03-0.10 ms, the mark
///   0.05 ms and 0.05 ms; 1.2 s of planning over the run).
pub const PASS_START_SQL: &str = "SELECT pg_try_advisory_xact_lock($1) AS locked, \
     set_config('synchronous_commit', 'off', true) AS sync, \
     set_config('enable_seqscan', 'off', true) AS seqscan, \
     set_config('enable_bitmapscan', 'off', true) AS bitmapscan, \
     set_config('plan_cache_mode', 'force_generic_plan', true) AS generic";

/// The rows a pass publishes (`$1`: the batch size), oldest first.
pub const UNPUBLISHED_SQL: &str = "SELECT id, event_id, subject, payload, traceparent FROM outbox \
     WHERE published_at IS NULL ORDER BY id LIMIT $1";

/// Marks the rows `$1` (ids) published.
pub const MARK_SQL: &str = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1)";

/// Rows deleted per pruning statement.
const PRUNE_BATCH: i64 = 10_000;

/// Pruning statements per run (a run every 60 s).
const PRUNE_MAX_BATCHES: usize = 600;

/// Pause before retrying when another replica holds the relay lock.
const CONTENDED_RETRY: Duration = Duration::from_millis(20);

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Label for logs and metrics (`service`).
    pub service: &'static str,
    /// Most rows published per pass.
    pub batch_size: u32,
    /// Fallback poll interval when no notification arrives.
    pub poll_interval: Duration,
    /// How long published rows are kept.
    pub retention: Duration,
    /// The streams the rows' subjects go to, created again (as at start-up,
    /// see [`crate::jetstream::ensure_streams`]) when a publish finds none:
    /// without it the relay would retry until the process restarted.
    pub streams: &'static [crate::jetstream::StreamSpec],
    /// Replicas of a stream created again.
    pub stream_replicas: usize,
    /// Fault injection for tests: publish a pass, then fail before marking
    /// its rows, exactly as a crash at that point would. Never set in service
    /// configuration.
    #[doc(hidden)]
    pub abort_before_mark: bool,
}

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed.
    #[error("outbox database")]
    Db(#[from] DbErr),
    /// JetStream refused or did not acknowledge a publish.
    #[error("publishing {event_id} to {subject}: {reason}")]
    Publish {
        /// The row's event id.
        event_id: String,
        /// The row's subject.
        subject: String,
        /// What went wrong.
        reason: String,
        /// No stream takes the subject (it was deleted, or the server lost
        /// its JetStream storage).
        stream_missing: bool,
    },
    /// Injected by [`RelayConfig::abort_before_mark`].
    #[error("aborted before marking (fault injection)")]
    Aborted,
}

impl RelayError {
    fn publish(row: &Row, e: &jetstream::context::PublishError) -> Self {
        RelayError::Publish {
            event_id: row.event_id.clone(),
            subject: row.subject.clone(),
            reason: e.to_string(),
            stream_missing: e.kind() == jetstream::context::PublishErrorKind::StreamNotFound,
        }
    }
}

/// Wakes a relay after a commit that wrote outbox rows.
#[derive(Debug, Clone, Default)]
pub struct RelayWaker(Arc<Notify>);

impl RelayWaker {
    /// Wakes the relay (a wake-up while it is busy is kept for its next wait).
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// Publishes the outbox of one database.
#[derive(Clone)]
pub struct Relay {
    db: DatabaseConnection,
    js: jetstream::Context,
    cfg: RelayConfig,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("cfg", &self.cfg).finish()
    }
}

struct Row {
    id: i64,
    event_id: String,
    subject: String,
    payload: String,
    traceparent: Option<String>,
}

impl Relay {
    /// A relay over `db`'s outbox publishing to `js`.
    pub fn new(
        db: DatabaseConnection,
        js: jetstream::Context,
        cfg: RelayConfig,
        waker: RelayWaker,
    ) -> Self {
        Self {
            db,
            js,
            cfg,
            wake: waker.0,
        }
    }

    /// Wakes the relay now (for writers in the same process; others are woken
    /// by `LISTEN/NOTIFY`).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A handle that wakes this relay, for the code that writes the outbox.
    pub fn waker(&self) -> RelayWaker {
        RelayWaker(self.wake.clone())
    }

    /// Runs until `shutdown`: passes whenever woken (notification, poll
    /// interval), with backoff while publishing fails. The pass in progress
    /// when shutdown arrives is finished, so nothing is left half-marked.
    pub async fn run(self, shutdown: CancellationToken) {
        let listener = tokio::spawn(listen(self.db.clone(), self.wake.clone(), shutdown.clone()));
        let housekeeping = tokio::spawn(housekeeping(self.clone(), shutdown.clone()));
        let mut backoff = new_backoff();
        loop {
            match self.pass().await {
                // Another replica is mid-pass and may have read its rows
                // before ours committed: try again shortly rather than at the
                // next poll.
                Ok(None) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(CONTENDED_RETRY) => {}
                    }
                }
                Ok(Some(n)) if n >= self.cfg.batch_size as usize => {
                    backoff = new_backoff();
                    if shutdown.is_cancelled() {
                        break;
                    }
                    continue;
                }
                Ok(Some(_)) => {
                    backoff = new_backoff();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                    }
                }
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    metrics::counter!("outbox_relay_errors_total", "service" => self.cfg.service)
                        .increment(1);
                    tracing::warn!(service = self.cfg.service, error = %e, wait_ms = wait.as_millis() as u64, "outbox relay pass failed; backing off");
                    if matches!(
                        e,
                        RelayError::Publish {
                            stream_missing: true,
                            ..
                        }
                    ) {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = self.recreate_streams() => {}
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let _ = listener.await;
        let _ = housekeeping.await;
        tracing::info!(service = self.cfg.service, "outbox relay stopped");
    }

    /// Creates the relay's streams again after a publish found none; the
    /// rows stay unpublished until then, and a failure here is retried
    /// after the next failed pass.
    async fn recreate_streams(&self) {
        if self.cfg.streams.is_empty() {
            return;
        }
        tracing::warn!(
            service = self.cfg.service,
            "a stream the relay publishes to is missing; creating it again"
        );
        if let Err(e) =
            crate::jetstream::ensure_streams(&self.js, self.cfg.streams, self.cfg.stream_replicas)
                .await
        {
            tracing::warn!(service = self.cfg.service, error = %crate::error_chain(&e), "creating the relay's streams failed");
        }
    }

    /// One pass: under the relay lock, publish up to `batch_size` unpublished
    /// rows in id order, await their acknowledgements in order, and mark the
    /// acknowledged prefix. Returns how many rows were published (0 when
    /// another replica holds the lock).
    pub async fn publish_pass(&self) -> Result<usize, RelayError> {
        Ok(self.pass().await?.unwrap_or(0))
    }

    /// [`Self::publish_pass`], telling "another replica holds the lock"
    /// (`None`) apart from "nothing to publish" (`Some(0)`).
    async fn pass(&self) -> Result<Option<usize>, RelayError> {
        let backend = self.db.get_database_backend();
        let started = std::time::Instant::now();
        let txn = self.db.begin().await?;
        let locked = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                PASS_START_SQL,
                [RELAY_LOCK_KEY.into()],
            ))
            .await?
            .map(|r| r.try_get::<bool>("", "locked"))
            .transpose()?
            .unwrap_or(false);
        if !locked {
            txn.rollback().await?;
            return Ok(None);
        }
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                UNPUBLISHED_SQL,
                [i64::from(self.cfg.batch_size).into()],
            ))
            .await?
            .into_iter()
            .map(|r| {
                Ok(Row {
                    id: r.try_get("", "id")?,
                    event_id: r.try_get("", "event_id")?,
                    subject: r.try_get("", "subject")?,
                    payload: r.try_get("", "payload")?,
                    traceparent: r.try_get("", "traceparent")?,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        // Finding the rows should stay well under a millisecond; a read that
        // grows with the outbox means dead index entries pile up (vacuum).
        metrics::histogram!("outbox_relay_read_duration_seconds", "service" => self.cfg.service)
            .record(started.elapsed().as_secs_f64());
        if rows.is_empty() {
            txn.commit().await?;
            return Ok(Some(0));
        }

        let (acked, failure) = self.publish_in_order(&rows).await;
        if self.cfg.abort_before_mark {
            txn.rollback().await?;
            return Err(RelayError::Aborted);
        }
        if acked > 0 {
            let ids: Vec<i64> = rows[..acked].iter().map(|r| r.id).collect();
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                MARK_SQL,
                [ids.into()],
            ))
            .await?;
        }
        txn.commit().await?;
        metrics::counter!("outbox_published_total", "service" => self.cfg.service)
            .increment(acked as u64);
        match failure {
            Some(e) => Err(e),
            None => Ok(Some(acked)),
        }
    }

    /// Sends all rows (pipelined), then awaits the acknowledgements in order.
    /// Returns the length of the acknowledged prefix and the first failure.
    async fn publish_in_order(&self, rows: &[Row]) -> (usize, Option<RelayError>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
        for row in rows {
            let span = tracing::info_span!(
                "outbox.publish",
                otel.kind = "producer",
                otel.name = %format!("publish {}", row.subject),
                messaging.destination = %row.subject,
                messaging.message_id = %row.event_id,
            );
            telemetry::set_remote_parent(&span, row.traceparent.as_deref());
            let traceparent = telemetry::traceparent_of(&span)
                .or_else(|| row.traceparent.clone())
                .unwrap_or_else(telemetry::fresh_traceparent);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", row.event_id.as_str());
            headers.insert(telemetry::TRACEPARENT, traceparent.as_str());
            let sent = self
                .js
                .publish_with_headers(row.subject.clone(), headers, row.payload.clone().into())
                .instrument(span)
                .await;
            match sent {
                Ok(ack) => pending.push(ack),
                Err(e) => {
                    failure = Some(RelayError::publish(row, &e));
                    break;
                }
            }
        }
        let mut acked = 0;
        for (row, ack) in rows.iter().zip(pending) {
            match ack.await {
                Ok(_) => acked += 1,
                Err(e) => {
                    failure = Some(RelayError::publish(row, &e));
                    break;
                }
            }
        }
        (acked, failure)
    }

    /// Unpublished rows and the age in seconds of the oldest one.
    pub async fn backlog(&self) -> Result<(i64, f64), DbErr> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT count(*) AS n, \
                 COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8 AS age \
                 FROM outbox WHERE published_at IS NULL",
            ))
            .await?;
        match row {
            Some(r) => Ok((r.try_get("", "n")?, r.try_get("", "age")?)),
            None => Ok((0, 0.0)),
        }
    }

    /// Deletes rows published longer than the retention ago, in batches of
    /// [`PRUNE_BATCH`] (each its own short transaction), until none are left
    /// or [`PRUNE_MAX_BATCHES`] ran: so pruning keeps up with up to
    /// 100,000 published rows a second at one run a minute.
    pub async fn prune(&self) -> Result<u64, DbErr> {
        let mut pruned = 0;
        for _ in 0..PRUNE_MAX_BATCHES {
            let res = self
                .db
                .execute_raw(Statement::from_sql_and_values(
                    self.db.get_database_backend(),
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                     WHERE published_at < clock_timestamp() - make_interval(secs => $1) LIMIT $2)",
                    [
                        (self.cfg.retention.as_secs() as i64).into(),
                        PRUNE_BATCH.into(),
                    ],
                ))
                .await?;
            pruned += res.rows_affected();
            if res.rows_affected() < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(pruned)
    }
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Forwards `NOTIFY outbox_inserted` to the relay. If the listening connection
/// fails, the relay still polls; the listener reconnects after a pause.
async fn listen(db: DatabaseConnection, wake: Arc<Notify>, shutdown: CancellationToken) {
    let pool = db.get_postgres_connection_pool().clone();
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            loop {
                l.recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            res = listener => {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "outbox listener failed; polling until it reconnects");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Every 5 s: backlog gauges. Every 60 s: prune published rows.
async fn housekeeping(relay: Relay, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let service = relay.cfg.service;
        match relay.backlog().await {
            Ok((count, age)) => {
                metrics::gauge!("outbox_backlog", "service" => service).set(count as f64);
                metrics::gauge!("outbox_oldest_age_seconds", "service" => service).set(age);
            }
            Err(e) => tracing::warn!(service, error = %e, "reading outbox backlog"),
        }
        n += 1;
        if n.is_multiple_of(12) {
            // A long prune (a large backlog of published rows) does not hold
            // up shutdown: each batch is its own statement, and one already
            // sent when it is cut short deletes only expired rows anyway.
            let pruned = tokio::select! {
                _ = shutdown.cancelled() => return,
                pruned = relay.prune() => pruned,
            };
            match pruned {
                Ok(0) => {}
                Ok(pruned) => tracing::debug!(service, pruned, "pruned published outbox rows"),
                Err(e) => tracing::warn!(service, error = %e, "pruning outbox"),
            }
        }
    }
}

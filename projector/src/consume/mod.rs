//! Consuming JetStream (B14-B16, B23).
//!
//! One durable pull consumer per stream (`LEDGER` into the history,
//! `INTEREST` into tax records), explicit acks, bounded ack-pending on the
//! server and bounded batches here. A batch is the first message and
//! whatever is waiting or arrives within 5 ms of it (up to
//! `PROJECTOR_BATCH`). Ledger batches are
//! split by account into lanes applied concurrently, one database
//! transaction each, and two batches are in hand at once (the next is decoded
//! while this one is applied); per-account order within an instance follows
//! from an account always falling into the same lane, from a batch applying a
//! lane only after the batch before it is done with it
//! ([`ledger::LaneOrder`]), and from the writer's sequence rule. Interest batches are handled one at a time.
//!
//! Every message ends in exactly one of: **ack** (applied or a duplicate),
//! **nak with a delay** (a transient failure: exponential backoff with jitter
//! from the delivery count, because JetStream's consumer `BackOff` applies
//! only to ack timeouts), or **dead letter** (a permanent failure, or a
//! transient one at the maximum deliveries: published to `DLQ` with its body
//! and the reason, then terminated on the source). Nothing is dropped
//! silently: every dead letter is logged and counted. A message whose
//! handling never ends (the process crashes or a batch task fails on it,
//! every time) ends in none of them; once delivered more than twice the
//! limit it is handled alone, and dead-lettered if that never ends either
//! ([`overdue`]).
//!
//! An unavailable channel database (no connection, a server shutting down,
//! read-only: `common::db::is_unavailable`) is not a failure of the
//! message: the handlers return such messages unsettled (a ledger lane also
//! hands back the same lane of the next batch in hand), and the consumer,
//! once the batches in hand have ended, stops pulling, keeps them (telling
//! the server they are in progress),
//! probes the database with backoff and handles them again once it answers.
//! An outage therefore spends none of the held messages' delivery budget and
//! dead-letters nothing. Messages the server had already sent to the dropped
//! subscription come back after the ack wait, one delivery counted. Lock
//! timeouts, deadlocks and serialization failures stay ordinary transient
//! failures, retried within the budget.

pub mod audit;
pub mod dlq;
pub mod ledger;
pub mod overdue;
pub mod tax;

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message};
use common::shutdown::CancellationToken;
use futures::{FutureExt, StreamExt};
use sea_orm::DatabaseConnection;
use tracing::Instrument;

use crate::config::Config;
use transfer::core_client::CoreClient;

/// Longest wait for more messages once a batch has its first one.
const BATCH_LINGER: Duration = Duration::from_millis(5);

/// What went wrong with one message.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Retrying cannot help (unparseable or invalid).
    Permanent(String),
    /// Retrying later may help (database or core unavailable, missing entries).
    Transient(String),
}

impl Failure {
    /// How a database error (other than unavailability, which holds the
    /// message instead) settles a message: data PostgreSQL refuses is
    /// permanent; anything else may be cured by a later delivery.
    pub fn of_database(e: &sea_orm::DbErr) -> Self {
        let reason = format!("channel database: {e}");
        if common::db::is_rejected_data(e) {
            Failure::Permanent(reason)
        } else {
            Failure::Transient(reason)
        }
    }
}

/// What the handlers need.
#[derive(Clone)]
pub struct Context {
    /// Channel database.
    pub db: DatabaseConnection,
    /// The core, for gap fill.
    pub core: CoreClient,
    /// JetStream, for dead letters.
    pub js: jetstream::Context,
    /// Settings.
    pub config: Config,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Where a message is stored: its stream, its sequence there and when the
/// stream stored it (ns). A stream created again (its storage lost) reuses
/// sequences, so it takes the three to name one message (the dead-letter
/// records, `overdue_attempts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stream.
    pub stream: String,
    /// The message's sequence in it.
    pub seq: u64,
    /// When the stream stored it, in ns since the epoch.
    pub at_ns: i64,
}

impl Stored {
    /// Where the message of `info` is stored.
    pub fn of(info: &jetstream::message::Info<'_>) -> Self {
        Stored {
            stream: info.stream.to_owned(),
            seq: info.stream_sequence,
            at_ns: i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        }
    }
}

/// Which stream a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// `LEDGER` into the history.
    Ledger,
    /// `INTEREST` into tax records.
    Interest,
}

impl Feed {
    fn stream(self) -> &'static str {
        self.spec().name
    }

    fn spec(self) -> common::jetstream::StreamSpec {
        match self {
            Feed::Ledger => common::jetstream::LEDGER,
            Feed::Interest => common::jetstream::INTEREST,
        }
    }

    /// Messages per batch (and per pull request). An interest event costs
    /// a call to the core ([`tax::check`], [`tax::CHECKS_IN_FLIGHT`] at a
    /// time), and only the batches in hand send progress acks: what waits in
    /// the client's buffer behind them (up to one and a half pulls) must be
    /// reached within the ack wait. At [`INTEREST_BATCH_MAX`] that is about
    /// 900 checks, 113 rounds: a core answering within about 250 ms per
    /// check keeps it under the default 30 s.
    fn batch_max(self, config: &Config) -> usize {
        let configured = config.batch.max(1);
        match self {
            Feed::Ledger => configured,
            Feed::Interest => configured.min(INTEREST_BATCH_MAX),
        }
    }

    fn durable(self, config: &Config) -> String {
        match self {
            Feed::Ledger => config.ledger_consumer.clone(),
            Feed::Interest => config.interest_consumer.clone(),
        }
    }
}

/// Largest batch of the interest feed ([`Feed::batch_max`]).
const INTEREST_BATCH_MAX: usize = 256;

/// A feed's consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerSetupError {
    /// The feed's stream could not be looked up.
    #[error("stream {stream}")]
    Stream {
        /// The stream.
        stream: &'static str,
        /// What the server answered.
        source: async_nats::jetstream::context::GetStreamError,
    },
    /// The durable consumer could not be created or updated.
    #[error("consumer {name} on {stream}")]
    Consumer {
        /// The consumer.
        name: String,
        /// The stream.
        stream: &'static str,
        /// What the server answered.
        source: async_nats::jetstream::stream::ConsumerError,
    },
}

/// Creates (or updates) the durable consumer of a feed.
pub async fn consumer(ctx: &Context, feed: Feed) -> Result<PullConsumer, ConsumerSetupError> {
    let stream =
        ctx.js
            .get_stream(feed.stream())
            .await
            .map_err(|source| ConsumerSetupError::Stream {
                stream: feed.stream(),
                source,
            })?;
    let name = feed.durable(&ctx.config);
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("projector: {:?}", feed)),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(ctx.config.ack_wait_secs.max(1)),
            // Unlimited on the server: the projector dead-letters at
            // PROJECTOR_MAX_DELIVERIES itself, so nothing is given up silently.
            max_deliver: -1,
            max_ack_pending: ctx.config.max_ack_pending.max(1),
            ..Default::default()
        })
        .await
        .map_err(|source| ConsumerSetupError::Consumer {
            name,
            stream: feed.stream(),
            source,
        })
}

/// How long a subscription must have lived for its failure to start the
/// pauses before the next one over (a quiet feed receives no batch that
/// would).
const SUBSCRIPTION_SETTLED: Duration = Duration::from_secs(30);

/// The feed's durable consumer again, as at start-up, with its stream if the
/// server no longer has it: after pulling failed, the consumer may be gone
/// (deleted with its stream, or lost with the server's JetStream storage),
/// and pulling from it would fail until the process restarted. `None` when
/// the server cannot do it now; the caller tries again after its backoff.
async fn consumer_again(ctx: &Context, feed: Feed) -> Option<PullConsumer> {
    let specs = [feed.spec()];
    let replicas = ctx.config.nats.stream_replicas;
    if let Err(e) = common::jetstream::ensure_streams(&ctx.js, &specs, replicas).await {
        tracing::debug!(error = %common::error_chain(&e), ?feed, "cannot ensure the feed's stream yet");
        return None;
    }
    match consumer(ctx, feed).await {
        Ok(consumer) => Some(consumer),
        Err(e) => {
            tracing::debug!(error = %common::error_chain(&e), ?feed, "cannot create the feed's consumer yet");
            None
        }
    }
}

/// After a failed pull or subscription: waits `backoff` (doubling it, up to
/// 5 s), then takes the consumer again ([`consumer_again`]; `None` when the
/// server cannot do it yet). Breaks on shutdown.
async fn pause_then_retake(
    ctx: &Context,
    feed: Feed,
    backoff: &mut Duration,
    shutdown: &CancellationToken,
) -> ControlFlow<(), Option<PullConsumer>> {
    tokio::select! {
        _ = shutdown.cancelled() => return ControlFlow::Break(()),
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    tokio::select! {
        _ = shutdown.cancelled() => ControlFlow::Break(()),
        again = consumer_again(ctx, feed) => ControlFlow::Continue(again),
    }
}

/// Consumes a feed until `shutdown`. On shutdown it stops fetching, finishes
/// the batches in hand (acking or nacking every message), and returns. When
/// pulling fails it backs off and takes the consumer again
/// ([`consumer_again`]).
pub async fn run(
    ctx: Context,
    feed: Feed,
    mut consumer: PullConsumer,
    shutdown: CancellationToken,
) {
    let batch_max = feed.batch_max(&ctx.config);
    let mut backoff = Duration::from_millis(100);
    let mut batches = InHand::new(&ctx, feed);
    while !shutdown.is_cancelled() {
        let stream = consumer
            .stream()
            .max_messages_per_batch(batch_max)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let subscribed = tokio::time::Instant::now();
        let mut messages = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, ?feed, "cannot pull messages; retrying");
                match pause_then_retake(&ctx, feed, &mut backoff, &shutdown).await {
                    ControlFlow::Break(()) => return,
                    ControlFlow::Continue(again) => consumer = again.unwrap_or(consumer),
                }
                continue;
            }
        };
        let mut broken = false;
        let held = loop {
            if batches.full() {
                let held = batches.next_done().await;
                if !held.is_empty() {
                    break held;
                }
            }
            // The next message, unless a batch in hand ends first (and left
            // messages unsettled: the database is away).
            let first = tokio::select! {
                // Shutdown first: with a backlog a message is always ready.
                biased;
                _ = shutdown.cancelled() => Next::Shutdown,
                held = batches.next_done() => Next::Done(held),
                m = messages.next() => Next::Message(Box::new(m)),
            };
            let first = match first {
                Next::Shutdown => {
                    let held = HandedBack::default();
                    batches.drain_into(&held).await;
                    let held = held.into_inner();
                    if !held.is_empty() {
                        // Naks them at once: shutdown is under way.
                        hold_until_handled(&ctx, feed, held, &shutdown).await;
                    }
                    return;
                }
                Next::Done(held) if held.is_empty() => continue,
                Next::Done(held) => break held,
                Next::Message(m) => match *m {
                    None => break Vec::new(),
                    Some(m) => m,
                },
            };
            let mut batch = Vec::with_capacity(batch_max);
            match first {
                Ok(m) => batch.push(m),
                Err(e) => {
                    tracing::warn!(error = %e, ?feed, "message stream error; re-subscribing");
                    broken = true;
                }
            }
            // Fill the batch with what arrives within BATCH_LINGER: under a
            // backlog that is a full batch (one transaction for hundreds of
            // events); when idle it adds at most the linger to the latency.
            let linger = tokio::time::Instant::now() + BATCH_LINGER;
            while !broken && batch.len() < batch_max {
                let next = match messages.next().now_or_never() {
                    Some(m) => m,
                    None => match tokio::time::timeout_at(linger, messages.next()).await {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                };
                match next {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, ?feed, "message stream error; re-subscribing");
                        broken = true;
                    }
                    None => break,
                }
            }
            if !batch.is_empty() {
                backoff = Duration::from_millis(100);
                batches.start(batch);
            }
            if broken {
                break Vec::new();
            }
        };
        // Leaving this subscription: the batches in hand end first, while
        // what they hand back is kept in progress.
        let handed_back = HandedBack::default();
        handed_back.extend(held);
        handed_back
            .holding(&ctx, batches.drain_into(&handed_back))
            .await;
        let held = handed_back.into_inner();
        if !held.is_empty() {
            // Stop pulling while the database is away: what this instance
            // has not taken yet stays with the server for other instances
            // (or for this one, later).
            drop(messages);
            if !hold_until_handled(&ctx, feed, held, &shutdown).await {
                return;
            }
        }
        if broken {
            // The subscription failed (the server restarted, or the
            // consumer is gone): after a pause, the consumer again. A
            // subscription that had lived a while starts the pauses over.
            if subscribed.elapsed() >= SUBSCRIPTION_SETTLED {
                backoff = Duration::from_millis(100);
            }
            match pause_then_retake(&ctx, feed, &mut backoff, &shutdown).await {
                ControlFlow::Break(()) => return,
                ControlFlow::Continue(again) => consumer = again.unwrap_or(consumer),
            }
        }
    }
}

/// What the consumer waited for.
enum Next {
    Shutdown,
    Done(Vec<Message>),
    Message(Box<Option<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>>>),
}

/// The batches a consumer has in hand, each handled on a task of its own,
/// oldest first. The ledger feed keeps two (the next is decoded while this
/// one is applied; [`ledger::LaneOrder`] keeps each account's entries in
/// order), the interest feed one (its checks against the core are bounded
/// per batch).
struct InHand {
    ctx: Context,
    feed: Feed,
    most: usize,
    lanes: ledger::LaneOrder,
    tasks: std::collections::VecDeque<tokio::task::JoinHandle<Vec<Message>>>,
}

impl Drop for InHand {
    /// The consumer was stopped from outside: its batches stop with it (a
    /// batch's transaction is rolled back, and the server delivers its
    /// unsettled messages again after the ack wait), as when it handled
    /// them itself.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl InHand {
    fn new(ctx: &Context, feed: Feed) -> Self {
        Self {
            ctx: ctx.clone(),
            feed,
            most: match feed {
                Feed::Ledger => 2,
                Feed::Interest => 1,
            },
            lanes: ledger::LaneOrder::default(),
            tasks: std::collections::VecDeque::new(),
        }
    }

    fn full(&self) -> bool {
        self.tasks.len() >= self.most
    }

    /// Starts handling a batch.
    fn start(&mut self, batch: Vec<Message>) {
        metrics::histogram!("projector_batch_size", "feed" => feed_label(self.feed))
            .record(batch.len() as f64);
        let span = tracing::info_span!(
            "projector.batch",
            feed = feed_label(self.feed),
            size = batch.len()
        );
        let (ctx, feed) = (self.ctx.clone(), self.feed);
        let turns = match feed {
            Feed::Ledger => {
                if self.tasks.is_empty() {
                    // Every batch before has ended, and what any of them
                    // handed back was handled since (or, lost with a failed
                    // task, comes back after the ack wait): how they left
                    // the lanes no longer concerns this one.
                    self.lanes = ledger::LaneOrder::default();
                }
                self.lanes.take_turns()
            }
            Feed::Interest => ledger::Turns::free(),
        };
        self.tasks.push_back(tokio::spawn(
            async move { handle(&ctx, feed, batch, turns).await }.instrument(span),
        ));
    }

    /// The messages the oldest batch left unsettled, once it has ended
    /// (never, while no batch is in hand). Cancel-safe: dropped before the
    /// batch ends, the batch stays in hand.
    async fn next_done(&mut self) -> Vec<Message> {
        let Some(oldest) = self.tasks.front_mut() else {
            return std::future::pending().await;
        };
        let ended = oldest.await;
        self.tasks.pop_front();
        ended.unwrap_or_else(|e| {
            // Those of its messages it had not settled were not handed back:
            // the server delivers them again after the ack wait.
            tracing::error!(error = %e, feed = ?self.feed, "a batch's task failed");
            Vec::new()
        })
    }

    /// Waits for every batch in hand to end, adding what they left
    /// unsettled to `held` as each ends.
    async fn drain_into(&mut self, held: &HandedBack) {
        while !self.tasks.is_empty() {
            held.extend(self.next_done().await);
        }
    }
}

async fn handle(
    ctx: &Context,
    feed: Feed,
    batch: Vec<Message>,
    turns: ledger::Turns,
) -> Vec<Message> {
    let (batch, overdue) = overdue::split(ctx, batch);
    let mut left = match feed {
        Feed::Ledger => ledger::handle(ctx, batch, turns).await,
        Feed::Interest => tax::handle(ctx, batch).await,
    };
    // Then each overdue message alone, the others kept in progress
    // meanwhile.
    let mut overdue = std::collections::VecDeque::from(overdue);
    while let Some(m) = overdue.pop_front() {
        let waiting: Vec<&Message> = overdue.iter().collect();
        left.extend(holding_progress(ctx, &waiting, overdue::handle_alone(ctx, feed, m)).await);
    }
    left
}

/// Keeps the messages the channel database could not take while it is
/// unavailable: every probe interval (100 ms doubling to 5 s, and at most a
/// third of the ack wait) it tells the server they are in progress, pings the
/// database and, once it answers, handles them again. Returns false on
/// shutdown, after naking what it still holds.
async fn hold_until_handled(
    ctx: &Context,
    feed: Feed,
    mut held: Vec<Message>,
    shutdown: &CancellationToken,
) -> bool {
    let started = tokio::time::Instant::now();
    let ceiling =
        Duration::from_secs(5).min(Duration::from_secs(ctx.config.ack_wait_secs.max(1)) / 3);
    let mut delay = Duration::from_millis(100).min(ceiling);
    metrics::gauge!("projector_database_unavailable", "feed" => feed_label(feed)).set(1.0);
    metrics::counter!("projector_database_pauses_total", "feed" => feed_label(feed)).increment(1);
    tracing::warn!(
        ?feed,
        held = held.len(),
        "channel database unavailable: consuming paused, messages held"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                for m in &held {
                    if let Err(e) = m.ack_with(AckKind::Nak(Some(ctx.config.retry_delay(1)))).await {
                        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
                    }
                }
                return false;
            }
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(ceiling);
        in_progress(held.iter()).await;
        if let Err(e) = ctx.db.ping().await {
            tracing::debug!(error = %e, "channel database still unavailable");
            continue;
        }
        held = handle(ctx, feed, held, ledger::Turns::free()).await;
        if held.is_empty() {
            metrics::gauge!("projector_database_unavailable", "feed" => feed_label(feed)).set(0.0);
            tracing::info!(
                ?feed,
                paused_ms = started.elapsed().as_millis() as u64,
                "channel database answers again; consuming resumed"
            );
            return true;
        }
    }
}

fn feed_label(feed: Feed) -> &'static str {
    match feed {
        Feed::Ledger => "ledger",
        Feed::Interest => "interest",
    }
}

/// Settles a failed message: nak with backoff, or dead-letter it.
pub async fn fail(ctx: &Context, m: &Message, failure: Failure) {
    let delivered = m.info().map(|i| i.delivered).unwrap_or(1);
    match failure {
        Failure::Permanent(reason) => dlq::dead_letter(ctx, m, &reason, "permanent").await,
        Failure::Transient(reason) if delivered >= ctx.config.max_deliveries => {
            dlq::dead_letter(
                ctx,
                m,
                &format!("{reason} (after {delivered} deliveries)"),
                "exhausted",
            )
            .await
        }
        Failure::Transient(reason) => {
            let delay = ctx.config.retry_delay(delivered);
            metrics::counter!("projector_retries_total").increment(1);
            tracing::debug!(subject = %m.subject, delivered, delay_ms = delay.as_millis() as u64, %reason, "retrying later");
            if let Err(e) = m.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
            }
        }
    }
}

/// Runs `work` while telling the server every so often (a third of the ack
/// wait, at most every 10 s) that `messages` are still being worked on, so
/// long work (a gap fill, checks against a slow core) does not let them time
/// out: a redelivery would repeat the work and count as a delivery towards
/// `PROJECTOR_MAX_DELIVERIES`.
pub async fn holding_progress<T>(
    ctx: &Context,
    messages: &[&Message],
    work: impl Future<Output = T>,
) -> T {
    beside_progress(ctx, work, || in_progress(messages.iter().copied())).await
}

/// Runs `work` while `tell` runs every so often ([`progress_every`]), beside
/// it: a slow acknowledgement never stops the work.
async fn beside_progress<T, P: Future<Output = ()>>(
    ctx: &Context,
    work: impl Future<Output = T>,
    tell: impl Fn() -> P,
) -> T {
    let every = progress_every(ctx);
    let progress = async {
        loop {
            tokio::time::sleep(every).await;
            tell().await;
        }
    };
    tokio::select! {
        r = work => r,
        never = progress => never,
    }
}

/// Messages handed back unsettled, a set that grows while work goes on
/// (lanes of a batch, batches in hand, ending one by one); what
/// [`holding_progress`] is for a set known up front.
#[derive(Debug, Default)]
pub struct HandedBack(std::sync::Mutex<Vec<Message>>);

impl HandedBack {
    fn messages(&self) -> std::sync::MutexGuard<'_, Vec<Message>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds messages handed back.
    pub fn extend(&self, more: Vec<Message>) {
        self.messages().extend(more);
    }

    /// Everything handed back, oldest first.
    pub fn into_inner(self) -> Vec<Message> {
        self.0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `work` (which adds to this set) while telling the server every
    /// so often that what has been handed back so far is in progress. The
    /// acknowledgements run beside `work`, so a slow one never stops it.
    pub async fn holding<T>(&self, ctx: &Context, work: impl Future<Output = T>) -> T {
        beside_progress(ctx, work, || async {
            let waiting = self.messages().clone();
            in_progress(waiting.iter()).await;
        })
        .await
    }
}

/// How often work in progress is told to the server: a third of the ack
/// wait, at most every 10 s.
fn progress_every(ctx: &Context) -> Duration {
    Duration::from_secs(ctx.config.ack_wait_secs.max(1))
        .div_f64(3.0)
        .min(Duration::from_secs(10))
}

/// Tells the server the messages are still being worked on.
async fn in_progress(messages: impl Iterator<Item = &Message>) {
    for m in messages {
        if let Err(e) = m.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "progress ack failed; the message may be redelivered");
        }
    }
}

/// Acknowledges a handled message.
pub async fn ack(m: &Message) {
    if let Err(e) = m.ack().await {
        tracing::warn!(error = %e, subject = %m.subject, "ack failed; the message will be redelivered (and found a duplicate)");
    }
}

/// The remote trace context of a message, for a child span.
pub fn traceparent(m: &Message) -> Option<String> {
    m.headers
        .as_ref()
        .and_then(|h| h.get(common::telemetry::TRACEPARENT))
        .map(|v| v.to_string())
}

/// Reports consumer backlog gauges every 5 s.
pub async fn report_pending(consumers: Vec<(Feed, PullConsumer)>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut consumers = consumers;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (feed, c) in consumers.iter_mut() {
            match c.info().await {
                Ok(info) => {
                    metrics::gauge!("projector_consumer_pending", "feed" => feed_label(*feed))
                        .set(info.num_pending as f64);
                    metrics::gauge!("projector_consumer_ack_pending", "feed" => feed_label(*feed))
                        .set(info.num_ack_pending as f64);
                }
                Err(e) => tracing::debug!(error = %e, "consumer info"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Feed, INTEREST_BATCH_MAX};
    use crate::Config;

    /// Interest batches stay small whatever `PROJECTOR_BATCH` says: each of
    /// their events costs a call to the core within the ack wait.
    #[test]
    fn b23_interest_batches_are_capped_ledger_batches_follow_the_setting() {
        let mut config = Config::defaults();
        config.batch = 2000;
        assert_eq!(Feed::Ledger.batch_max(&config), 2000);
        assert_eq!(Feed::Interest.batch_max(&config), INTEREST_BATCH_MAX);
        config.batch = 100;
        assert_eq!(Feed::Interest.batch_max(&config), 100);
        config.batch = 0;
        assert_eq!(Feed::Ledger.batch_max(&config), 1);
    }
}

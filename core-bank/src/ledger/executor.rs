//! Batched execution of ledger commands.
//!
//! Requests enqueue a command with a reply channel. `workers` tasks each take
//! the first waiting command plus whatever else is already queued (up to
//! `batch_max`), run them together in one transaction ([`super::batch`]) and
//! answer each caller with its own result. There is no timer: a batch is what
//! accumulated while the previous transaction ran, so latency under light
//! load is one transaction, and under load throughput grows with batch size.
//!
//! Failure handling: a transaction that fails for a transient reason (lock
//! timeout, deadlock, serialization failure, a concurrent insert of the same
//! id, a lost connection) is retried as a whole, up to 10 times with jittered
//! backoff; if it still fails, every command of the batch gets the error (a
//! lock timeout on a worker is first split, below). Any other failure of a
//! batch of several commands that may be one command's (its data refused, a
//! stored row that does not read back) re-runs each command alone, so one bad
//! command cannot fail its neighbours; one of the database as a whole
//! (read-only after a failover, a statement timeout) is answered to every
//! command at once.
//!
//! A lock held for long by another transaction (an interest payout reading a
//! busy account's whole period, an operator's session) must hold up only the
//! commands that need that account. When a batch on a worker waits past
//! `lock_timeout`, the executor asks which of its accounts are held right now
//! ([`queries::held_accounts`], which never waits for a lock), runs the commands that do
//! not touch them at once, and sets the others aside: each held account's
//! commands (grouped by the first held account they touch) run as a batch of
//! their own, on a task of their own while one of `parked_max` places (the
//! core gives as many as `workers`) is free, so the worker goes on with the
//! queue. Such a batch may be split again the same way (its held accounts'
//! commands then wait two at a time, and so on at each further split, each
//! waiting transaction holding a pooled connection) and otherwise waits and retries as
//! above. One group per account keeps an account that only looked held
//! (locked for a moment by a concurrent batch when asked) from waiting in
//! the same transaction as a really held one; it can still wait behind it
//! when its commands also need an account of lower id than the held one
//! (rows are locked in id order, and a waiting transaction keeps the locks
//! it has). This holds for a batch of one command too: a lone
//! command on a held account does not stop its worker. Commands of one batch
//! were concurrent requests, so running some before others changes no
//! promise.
//!
//! Accounts found held are remembered ([`super::held`]): while a place is
//! free, a later batch's commands on one run apart at once, so the worker
//! does not wait a `lock_timeout` on it again. The memory refuses nothing:
//! with every place taken such commands stay in the worker's batch, as
//! without it, and an account is forgotten once a parked batch that locked
//! it commits.
//!
//! Once every place is taken, a worker's commands found on held accounts are
//! answered [`LedgerError::AccountBusy`] at once (nothing executed; 503, retry
//! later) rather than stopping the worker, and so every account's commands,
//! for as long as the lock is held. A lock that is not an account's (an
//! uncommitted insert of the same transfer id by another replica, which
//! commits in milliseconds) is waited for on the worker, with retries.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use sea_orm::DatabaseConnection;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::batch::{BatchError, BatchOutput, Command, Known, Outcome, run_batch};
use super::held::HeldAccounts;
use super::queries;
use super::{DepositCmd, DepositRecord, LedgerError, TransferCmd, TransferRecord};
use crate::clock::Clock;

/// Limits of the executor.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Most commands per transaction.
    pub batch_max: usize,
    /// Concurrent transactions.
    pub workers: usize,
    /// Batches that may wait on held accounts apart from the workers (see
    /// the module's docs); the core gives as many as there are workers.
    pub parked_max: usize,
    /// Queue capacity; beyond it requests are refused as overloaded.
    pub queue_max: usize,
    /// Request TTL (B5).
    pub request_ttl: Duration,
}

pub(super) struct Job {
    pub cmd: Command,
    pub traceparent: Option<String>,
    pub reply: oneshot::Sender<Result<Outcome, LedgerError>>,
}

/// Called after each committed batch with the accounts it changed.
pub type AfterCommit = Arc<dyn Fn(&[common::AccountId]) + Send + Sync>;

/// Handle to the ledger executor. Cloning is cheap. The workers stop when the
/// last handle is dropped, after finishing what is queued.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

struct Shared {
    db: DatabaseConnection,
    /// Places for batches waiting on an account another transaction holds
    /// (see [`park`]); `LedgerConfig::parked_max` of them.
    parked: Arc<Semaphore>,
    /// Accounts found held lately.
    held: HeldAccounts,
    /// Workers not stopped yet: the last one waits for the parked batches
    /// (one that stopped earlier would take the places the others' last
    /// batches still need).
    workers_running: std::sync::atomic::AtomicUsize,
    clock: Clock,
    cfg: LedgerConfig,
    after_commit: AfterCommit,
}

impl Ledger {
    /// Starts the workers; they run until every [`Ledger`] handle is dropped.
    pub fn start(
        db: DatabaseConnection,
        clock: Clock,
        cfg: LedgerConfig,
        after_commit: AfterCommit,
    ) -> (Self, JoinSet<()>) {
        let (tx, rx) = mpsc::channel(cfg.queue_max.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            db,
            parked: Arc::new(Semaphore::new(cfg.parked_max.max(1))),
            held: HeldAccounts::default(),
            workers_running: std::sync::atomic::AtomicUsize::new(cfg.workers.max(1)),
            clock,
            cfg,
            after_commit,
        });
        let mut workers = JoinSet::new();
        for _ in 0..shared.cfg.workers.max(1) {
            workers.spawn(worker(shared.clone(), rx.clone()));
        }
        (Self { tx }, workers)
    }

    /// How many commands wait in the queue now (not those being executed).
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    async fn submit(&self, cmd: Command) -> Result<Outcome, LedgerError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            cmd,
            traceparent: common::telemetry::current_traceparent(),
            reply,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LedgerError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => LedgerError::ShuttingDown,
        })?;
        answer.await.map_err(|_| LedgerError::ShuttingDown)?
    }

    /// Executes (or replays) a transfer.
    pub async fn transfer(&self, cmd: TransferCmd) -> Result<TransferRecord, LedgerError> {
        match self.submit(Command::Transfer(cmd)).await? {
            Outcome::Transfer(r) => Ok(r),
            Outcome::Deposit(_) => Err(LedgerError::ShuttingDown),
        }
    }

    /// Executes (or replays) a deposit.
    pub async fn deposit(&self, cmd: DepositCmd) -> Result<DepositRecord, LedgerError> {
        match self.submit(Command::Deposit(cmd)).await? {
            Outcome::Deposit(r) => Ok(r),
            Outcome::Transfer(_) => Err(LedgerError::ShuttingDown),
        }
    }
}

async fn worker(shared: Arc<Shared>, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let jobs = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                drop(rx);
                // The last worker stops once no parked batch is left either.
                let running = shared
                    .workers_running
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                if running == 1 {
                    let places = shared.cfg.parked_max.max(1) as u32;
                    let _all = shared.parked.acquire_many(places).await;
                }
                return;
            };
            let mut jobs = vec![first];
            while jobs.len() < shared.cfg.batch_max {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        let jobs = set_aside_known_held(&shared, jobs);
        if !jobs.is_empty() {
            execute(&shared, jobs, Isolate::Allowed, Runs::OnWorker).await;
        }
    }
}

/// Sets aside the commands on accounts found held lately, while one of the
/// places for waiting batches is free: they run as a parked batch of their
/// own ([`spawn_parked`]) and the rest returns to the worker, which so never
/// waits on such an account. Nothing is asked of the database and nothing is
/// refused here: an account no longer held just costs its commands a
/// transaction of their own (and is forgotten once it commits), and with
/// every place taken the batch runs whole, as without the memory. Without
/// remembered accounts among the batch's, this costs nothing.
fn set_aside_known_held(shared: &Arc<Shared>, jobs: Vec<Job>) -> Vec<Job> {
    let recalled = shared.held.recalled(
        jobs.iter()
            .flat_map(|j| j.cmd.accounts())
            .map(|a| a.as_str()),
    );
    if recalled.is_empty() {
        return jobs;
    }
    let recalled: HashSet<String> = recalled.into_iter().collect();
    // Not asked of the database here: a recorded command set aside with a
    // held account's is answered by its parked batch after that batch's
    // first lock wait, when isolating frees it.
    let (groups, mut others) = group_by_held(jobs, &recalled, &Known::default());
    for (account, group) in groups {
        match shared.parked.clone().try_acquire_owned() {
            Ok(place) => {
                tracing::info!(
                    held = %account,
                    waiting = group.len(),
                    "commands on an account found held lately run apart"
                );
                spawn_parked(shared, group, place);
            }
            Err(_) => others.extend(group),
        }
    }
    others
}

/// The commands that touch any of `held`, grouped by the first of those
/// accounts (in id order) each touches, and the commands that touch none or
/// are `recorded` already (a retry of an answered command, answered again
/// without any lock). A group per account: an account that only looked held
/// (locked for a moment by a concurrent batch) then waits with no other's
/// commands.
fn group_by_held(
    jobs: Vec<Job>,
    held: &HashSet<String>,
    recorded: &Known,
) -> (BTreeMap<String, Vec<Job>>, Vec<Job>) {
    let mut groups: BTreeMap<String, Vec<Job>> = BTreeMap::new();
    let mut free = Vec::new();
    for job in jobs {
        if recorded.has(&job.cmd) {
            free.push(job);
            continue;
        }
        let first_held = job
            .cmd
            .accounts()
            .map(|a| a.as_str())
            .filter(|a| held.contains(*a))
            .min()
            .map(str::to_owned);
        match first_held {
            Some(account) => groups.entry(account).or_default().push(job),
            None => free.push(job),
        }
    }
    (groups, free)
}

/// Held accounts' batches a parked batch that split again runs at once.
const PARKED_SIDE_BY_SIDE: usize = 2;

/// Whether a lock timeout of a batch may split it by held accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolate {
    Allowed,
    /// The batch is what an isolation could not split further: it waits and
    /// retries as a whole.
    Done,
}

/// A batch's future, boxed: executing a batch may execute parts of it
/// again (one by one, or split by held accounts), and a part may run on a
/// task of its own.
type Executing<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where a batch runs: on a worker, which others wait for, or parked on a
/// task of its own (see [`isolate_held_accounts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    OnWorker,
    Parked,
}

fn execute(shared: &Arc<Shared>, jobs: Vec<Job>, isolate: Isolate, runs: Runs) -> Executing<'_> {
    Box::pin(execute_batch(shared, jobs, isolate, runs))
}

async fn execute_batch(shared: &Arc<Shared>, jobs: Vec<Job>, isolate: Isolate, runs: Runs) {
    let started = Instant::now();
    let size = jobs.len();
    // A lone parked command has nothing to be separated from: it waits.
    let may_isolate = isolate == Isolate::Allowed && (size > 1 || runs == Runs::OnWorker);
    metrics::histogram!("ledger_batch_size").record(size as f64);
    let span = tracing::info_span!(
        "ledger.batch",
        otel.name = "ledger batch",
        batch.size = size
    );
    let result =
        tracing::Instrument::instrument(attempt_with_retries(shared, &jobs, may_isolate), span)
            .await;
    match result {
        Ok(BatchOutput {
            outcomes,
            touched,
            locked,
        }) => {
            metrics::histogram!("ledger_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            if runs == Runs::Parked {
                // These could be locked: none of them is held now.
                shared.held.forget(locked.iter().map(|a| a.as_str()));
            }
            (shared.after_commit)(&touched);
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
        }
        Err(e) if may_isolate && e.is_lock_timeout() => {
            isolate_held_accounts(shared, jobs, runs).await;
        }
        // Retries are spent on a transient failure (the database is down,
        // say), and a failure of the database as a whole (read-only after a
        // failover, a statement timeout) would meet each command again:
        // running each alone would only repeat them, one after the other,
        // while the callers wait. Any other failure may be one command's, so
        // each runs alone.
        Err(e) if size > 1 && e.may_be_one_commands() => {
            tracing::warn!(error = %e, size, "ledger batch failed; executing its commands one by one");
            for job in jobs {
                execute(shared, vec![job], Isolate::Allowed, runs).await;
            }
        }
        // A parked batch runs apart because its account is held; its
        // retries spent waiting for that lock, nothing was executed, and
        // the database is well: the account is busy.
        // Not a failed batch (`ledger_batch_failures_total`): the answer is
        // the one `park` gives when no place is free.
        Err(e) if runs == Runs::Parked && e.is_lock_timeout() => {
            tracing::warn!(
                size,
                "a held account stayed held through every retry; its commands are answered account_busy"
            );
            for job in jobs {
                metrics::counter!("core_ledger_commands_total", "result" => "account_busy")
                    .increment(1);
                let _ = job.reply.send(Err(LedgerError::AccountBusy));
            }
        }
        Err(e) => {
            metrics::counter!("ledger_batch_failures_total").increment(1);
            tracing::error!(error = %e, size, "ledger batch failed; its commands are answered with the error");
            let err = match e {
                BatchError::Db(db) => LedgerError::Db(db),
                BatchError::Race => LedgerError::Overloaded,
            };
            for job in jobs {
                let _ = job.reply.send(Err(match &err {
                    LedgerError::Db(db) => LedgerError::Db(db.clone()),
                    _ => LedgerError::Overloaded,
                }));
            }
        }
    }
}

/// Runs the batch after a lock timeout: the commands on accounts another
/// transaction holds now apart from the rest (see the module's docs).
async fn isolate_held_accounts(shared: &Arc<Shared>, jobs: Vec<Job>, runs: Runs) {
    let ids: BTreeSet<String> = jobs
        .iter()
        .flat_map(|j| j.cmd.accounts())
        .map(ToString::to_string)
        .collect();
    let held = match queries::held_accounts(&shared.db, ids.into_iter().collect()).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %common::error_chain(&e), "looking up held accounts; retrying the batch as a whole");
            HashSet::new()
        }
    };
    shared.held.remember(&held);
    // Read again: the batch's own read was in its transaction, rolled back.
    // If this read fails, they wait with the others and are answered once
    // the lock is free.
    let recorded = if held.is_empty() {
        Known::default()
    } else {
        Known::load(&shared.db, &jobs).await.unwrap_or_else(|e| {
            tracing::debug!(error = %common::error_chain(&e), "looking up recorded commands");
            Known::default()
        })
    };
    let (groups, free) = group_by_held(jobs, &held, &recorded);
    // Nothing to separate: the lock went away meanwhile, or it is not an
    // account's (the batch then waits and retries as a whole), or, on a
    // parked batch, every command waits for the same account.
    if groups.is_empty() || (free.is_empty() && groups.len() == 1 && runs == Runs::Parked) {
        let all = groups.into_values().flatten().chain(free).collect();
        execute(shared, all, Isolate::Done, runs).await;
        return;
    }
    metrics::counter!("ledger_lock_isolations_total").increment(1);
    tracing::warn!(
        held = ?held,
        waiting = groups.values().map(Vec::len).sum::<usize>(),
        running = free.len(),
        "ledger batch waited past the lock timeout; running the commands on held accounts apart"
    );
    match runs {
        Runs::OnWorker => {
            park(shared, groups, &held);
            if !free.is_empty() {
                execute(shared, free, Isolate::Allowed, runs).await;
            }
        }
        // A parked batch waits where it is: the free commands first, then
        // each held account's, [`PARKED_SIDE_BY_SIDE`] at a time (each holds
        // a pooled connection while it waits), so that one account's wait
        // (and its retries) holds up few others.
        Runs::Parked => {
            if !free.is_empty() {
                execute(shared, free, Isolate::Allowed, runs).await;
            }
            futures::stream::iter(
                groups
                    .into_values()
                    .map(|group| execute(shared, group, Isolate::Allowed, runs)),
            )
            .buffer_unordered(PARKED_SIDE_BY_SIDE)
            .collect::<()>()
            .await;
        }
    }
}

/// Runs a worker's commands on held accounts apart, as they may wait for
/// long: on a task of their own while one of the few places for that is
/// free, and the worker goes on with the queue. With every place taken they
/// are answered "account busy" at once (503, retry later; nothing was
/// executed): waiting here would stop the worker, and with it every
/// account's commands, for as long as the lock is held.
fn park(shared: &Arc<Shared>, groups: BTreeMap<String, Vec<Job>>, held: &HashSet<String>) {
    for (account, group) in groups {
        match shared.parked.clone().try_acquire_owned() {
            Ok(place) => spawn_parked(shared, group, place),
            Err(_) => {
                tracing::warn!(
                    held = ?held,
                    account = %account,
                    refused = group.len(),
                    "every place for commands waiting on held accounts is taken; answering them account busy"
                );
                for job in group {
                    metrics::counter!("core_ledger_commands_total", "result" => "account_busy")
                        .increment(1);
                    let _ = job.reply.send(Err(LedgerError::AccountBusy));
                }
            }
        }
    }
}

/// Runs `jobs` as a parked batch on a task of its own, holding `place`
/// until it is done. Never called with no jobs.
fn spawn_parked(shared: &Arc<Shared>, jobs: Vec<Job>, place: OwnedSemaphorePermit) {
    let shared = shared.clone();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            execute(&shared, jobs, Isolate::Allowed, Runs::Parked).await;
            drop(place);
        },
        tracing::Span::current(),
    ));
}

async fn attempt_with_retries(
    shared: &Shared,
    jobs: &[Job],
    may_isolate: bool,
) -> Result<BatchOutput, BatchError> {
    (|| run_batch(&shared.db, &shared.clock, &shared.cfg, jobs))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(2))
                .with_max_delay(Duration::from_millis(200))
                .with_max_times(10)
                .with_jitter(),
        )
        // A lock timeout of a batch that may be split is not retried here:
        // the caller splits it by held accounts.
        .when(|e| e.is_retryable() && !(may_isolate && e.is_lock_timeout()))
        .notify(|e, wait| {
            metrics::counter!("db_transaction_retries_total").increment(1);
            tracing::debug!(error = %e, wait_ms = wait.as_millis() as u64, "retrying ledger batch");
        })
        .await
}

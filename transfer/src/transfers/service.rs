//! Accepting a customer's transfer (B9-B11).
//!
//! 1. An `Idempotency-Key` the customer used before returns that transfer.
//! 2. The request is stored as `pending` with its `transfer_id` and
//!    `requested_at`, and `bank.transfer.requested` is enqueued, in one
//!    transaction. The partial unique index refuses a second pending
//!    transfer from the same account (`transfer_in_progress`, B10). Storing
//!    and executing run on a task of their own, so a customer who hangs up
//!    does not stop them. When the database's answer is lost (the commit
//!    may have happened), the same row is stored again, by the same id, to
//!    learn which: a row found stored is executed, or, when the request has
//!    meanwhile answered 503 (nothing stored by the answer's deadline), failed
//!    at once; only an outcome still unknown 10 s after the deadline is left
//!    to the fence.
//! 3. The core is called within `CORE_TIMEOUT_MS` (again, with backoff,
//!    while it is unavailable and the budget leaves room). Success or refusal resolves
//!    the transfer at once; a timeout or an unreachable core leaves it
//!    pending (the customer gets 202) and hands it to a resolver that polls
//!    the core's status, and, after the TTL, fences it (B11, B12). So does
//!    an answer the channel database fails to record: the customer is told
//!    the transfer is pending, never an error for money that moved.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use common::events::TransferStatus;
use common::time::now_micros;
use common::{AccountId, Amount, CustomerId, TransferId};
use sea_orm::{DatabaseConnection, DbErr};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::reconciler::Resolver;
use super::{
    InsertError, Resolution, TransferRequest, find, find_by_key, insert_pending, resolve, withdraw,
};
use crate::core_client::{CoreClient, CoreError};

/// Attempts at inserting a pending transfer while the account's previous one
/// keeps resolving between the conflict and the look-up (2, 4, 8, 16 ms apart).
const IN_PROGRESS_ATTEMPTS: u32 = 5;

/// Pauses between calls to a core that is unavailable (doubling, each
/// with up to as much again of jitter).
const UNAVAILABLE_RETRY_MIN: Duration = Duration::from_millis(50);
const UNAVAILABLE_RETRY_MAX: Duration = Duration::from_millis(400);
/// The least pause before calling a core that answered `overloaded` again.
const OVERLOADED_PAUSE: Duration = Duration::from_millis(500);
/// The least time a repeated call to the core gets to answer.
const UNAVAILABLE_RETRY_ROOM: Duration = Duration::from_millis(500);

/// How long after the answer's deadline a transfer whose store had an
/// unknown outcome is stored again to learn it (within the fence,
/// `REQUEST_TTL_SECS` + margin, which settles what this leaves, for a TTL
/// of the default's order; with a TTL shorter than the answer's deadline
/// plus this, the fence may settle such a transfer first: failed
/// `never_received` with its key kept, the core refusing the fenced id).
const STORE_SETTLE_BOUND: Duration = Duration::from_secs(10);

/// The least time left before the answer is due for storing a transfer
/// again after an attempt whose outcome is unknown.
const STORE_RETRY_ROOM: Duration = Duration::from_millis(500);

/// How long after the answer's deadline a transfer answered 503 may still
/// be withdrawn ([`STORE_SETTLE_BOUND`] and the last attempt's room): a
/// fence sooner than that may settle it first (see
/// [`crate::config::Config::warnings`]).
pub(crate) const SETTLED_AFTER_ANSWER: Duration =
    STORE_SETTLE_BOUND.saturating_add(STORE_RETRY_ROOM);

/// The pause before storing a transfer again after `attempts` attempts
/// (50 ms doubling to 400 ms), or `None` when it would leave less than
/// [`STORE_RETRY_ROOM`] before `answer_by`.
fn store_retry_pause(attempts: u32, answer_by: tokio::time::Instant) -> Option<Duration> {
    let pause = UNAVAILABLE_RETRY_MIN
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(UNAVAILABLE_RETRY_MAX);
    (tokio::time::Instant::now() + pause + STORE_RETRY_ROOM <= answer_by).then_some(pause)
}

/// Whether a transfer stored after its request stopped waiting for it may
/// be executed: its task takes it over once stored, unless the request
/// gave up first (it answered 503, [`SubmitError::NotStored`]); each happens only if the other
/// has not. A request dropped without giving up (its customer hung up) leaves
/// the task free to execute.
#[derive(Debug, Default)]
struct Handover(AtomicU8);

impl Handover {
    const WAITING: u8 = 0;
    const TAKEN_OVER: u8 = 1;
    const GIVEN_UP: u8 = 2;

    /// The stored transfer's task: true when it may execute it.
    fn take_over(&self) -> bool {
        self.0
            .compare_exchange(
                Self::WAITING,
                Self::TAKEN_OVER,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Whether the request gave up.
    fn given_up(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::GIVEN_UP
    }

    /// The request, at its deadline: true when it may answer that the
    /// transfer was not made (it will not be executed).
    fn give_up(&self) -> bool {
        self.0
            .compare_exchange(
                Self::WAITING,
                Self::GIVEN_UP,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

/// Counts a request in `transfer_requests_total` by its answer, or as
/// `abandoned` when it is dropped unanswered (the customer hung up; its
/// transfer goes on).
struct Unanswered(Option<TransferId>);

impl Unanswered {
    fn answered(mut self, result: &'static str) {
        self.0 = None;
        metrics::counter!("transfer_requests_total", "result" => result).increment(1);
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            tracing::info!(transfer_id = %id, "the request was dropped before its answer (the client left); the transfer goes on");
            metrics::counter!("transfer_requests_total", "result" => "abandoned").increment(1);
        }
    }
}

/// What the customer asked for.
#[derive(Debug, Clone)]
pub struct NewTransfer {
    /// Source (must be the customer's).
    pub from_account: AccountId,
    /// Target.
    pub to_account: AccountId,
    /// Amount.
    pub amount: Amount,
    /// Memo.
    pub memo: Option<String>,
}

/// Why a transfer was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The source account has a pending transfer.
    #[error("a transfer from this account is in progress")]
    InProgress(TransferId),
    /// Each attempt collided with a pending transfer that had resolved by the
    /// time it was looked up (other transfers from the account keep starting
    /// and finishing): nothing to name, so the caller retries.
    #[error("the account's transfers kept changing during the request")]
    Contended,
    /// The idempotency key was used for a different request.
    #[error("the idempotency key was used for a different transfer ({0} differs)")]
    IdempotencyConflict(&'static str),
    /// The transfer could not be stored before the answer was due; it is
    /// never executed (if it is stored after all, it is failed at once).
    #[error("the transfer could not be stored in time; it was not made")]
    NotStored,
    /// The channel database failed.
    #[error("channel database")]
    Db(#[from] DbErr),
}

impl SubmitError {
    /// The request's result in `transfer_requests_total`.
    fn result(&self) -> &'static str {
        match self {
            SubmitError::InProgress(_) => "transfer_in_progress",
            SubmitError::Contended => "contended",
            SubmitError::IdempotencyConflict(_) => "idempotency_conflict",
            SubmitError::NotStored => "not_stored",
            SubmitError::Db(_) => "error",
        }
    }
}

/// The transfer use case.
#[derive(Debug, Clone)]
pub struct TransferService {
    db: DatabaseConnection,
    core: CoreClient,
    core_timeout: Duration,
    resolver: Resolver,
    /// Tasks storing and executing transfers (each may outlive its request:
    /// the customer was answered 202 or 503 at the deadline, or hung up).
    /// Shutdown waits for them, bounded.
    executions: TaskTracker,
}

impl TransferService {
    /// A service over the channel database and the core.
    pub fn new(
        db: DatabaseConnection,
        core: CoreClient,
        core_timeout: Duration,
        resolver: Resolver,
    ) -> Self {
        Self {
            db,
            core,
            core_timeout,
            resolver,
            executions: TaskTracker::new(),
        }
    }

    /// At shutdown, once no request is in flight: waits (at most `within`)
    /// for the tasks that outlived their answers (storing, executing or
    /// withdrawing a transfer) to finish, so that a transfer the core
    /// executed is not left pending for the next process's reconciler.
    /// Those still running at the bound leave their rows, if stored,
    /// pending: the reconciler of the next process, or another replica's,
    /// settles them from the core's record or fences them.
    pub async fn finish_executions(&self, within: Duration) {
        self.executions.close();
        let running = self.executions.len();
        if running == 0 {
            return;
        }
        tracing::warn!(
            running,
            within_ms = within.as_millis() as u64,
            "waiting for transfer executions that outlived their answers"
        );
        if tokio::time::timeout(within, self.executions.wait())
            .await
            .is_ok()
        {
            tracing::info!("every transfer execution finished");
            return;
        }
        tracing::warn!(
            left = self.executions.len(),
            "transfer executions still running at the shutdown bound; their transfers stay pending for a reconciler"
        );
    }

    /// The transfer an earlier request of `customer` made under `key`, as
    /// [`Self::submit`] would answer its replay (a conflict if `new` differs
    /// from it), or `None` if the key is new. Needs only the channel's
    /// database: a customer repeating a request to learn its outcome gets it
    /// while the core cannot be reached (the owner was checked when the
    /// transfer was made).
    pub async fn replay(
        &self,
        customer: &CustomerId,
        key: &str,
        new: &NewTransfer,
    ) -> Result<Option<TransferRequest>, SubmitError> {
        let replayed = match find_by_key(&self.db, customer, key).await? {
            Some(existing) => same_request(existing, new).map(Some),
            None => return Ok(None),
        };
        let result = replayed
            .as_ref()
            .map_or_else(SubmitError::result, |_| "replay");
        metrics::counter!("transfer_requests_total", "result" => result).increment(1);
        replayed
    }

    /// Accepts, stores and executes a transfer; returns it in its current
    /// status (`pending` when the core did not answer in time). The answer
    /// comes by `answer_by` at the latest (before the HTTP request timeout
    /// would answer 503 and leave a customer who sent no `Idempotency-Key`
    /// unsure whether to send again): 503 when the transfer could not be
    /// stored by then ([`SubmitError::NotStored`]), and it is then never
    /// executed.
    /// A key already recorded is the caller's to answer first
    /// ([`Self::replay`], before the owner check); one recorded meanwhile by a
    /// concurrent request with the same key is answered here as a replay.
    pub async fn submit(
        &self,
        customer: &CustomerId,
        new: NewTransfer,
        idempotency_key: Option<String>,
        answer_by: tokio::time::Instant,
    ) -> Result<TransferRequest, SubmitError> {
        let req = TransferRequest {
            transfer_id: TransferId::generate(),
            customer_id: customer.clone(),
            from_account: new.from_account.clone(),
            to_account: new.to_account.clone(),
            amount: new.amount,
            memo: new.memo.clone(),
            status: TransferStatus::Pending,
            reason: None,
            requested_at: now_micros(),
            idempotency_key,
            from_seq: None,
            to_seq: None,
            resolved_at: None,
        };
        let unanswered = Unanswered(Some(req.transfer_id.clone()));
        // Storing and executing run on a task of their own, so that neither
        // the answer's deadline nor a customer who hangs up (the request is
        // dropped) cuts them short: a transfer stored after its customer
        // left is executed, as one stored before would be (nobody was told
        // otherwise), never left pending until its fence. Only this
        // request's own 503 ([`SubmitError::NotStored`]) stops it ([`Handover`]).
        let handover = Arc::new(Handover::default());
        let (stored_tx, stored_rx) = oneshot::channel();
        let execution = {
            let this = self.clone();
            let (req, handover) = (req.clone(), handover.clone());
            // In this request's span: the core call carries its trace.
            self.executions.spawn(
                async move {
                    // Bounded as a whole: an attempt may wait on a lock or
                    // a connection far longer than the pauses between them.
                    let settled_by = answer_by + SETTLED_AFTER_ANSWER;
                    let stored = tokio::time::timeout_at(
                        settled_by,
                        this.store(&req, &new, answer_by, &handover),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(transfer_id = %req.transfer_id, "storing the transfer did not end in time; if it was stored, the reconciler fences it after the TTL");
                        Err(SubmitError::NotStored)
                    });
                    match stored {
                        Ok(None) if handover.take_over() => {
                            let _ = stored_tx.send(Ok(None));
                            Some(this.execute(req).await)
                        }
                        Ok(None) => {
                            this.withdraw(&req, answer_by).await;
                            None
                        }
                        other => {
                            let _ = stored_tx.send(other);
                            None
                        }
                    }
                }
                .in_current_span(),
            )
        };
        let stored = match tokio::time::timeout_at(answer_by, stored_rx).await {
            Ok(Ok(stored)) => stored,
            // The task ended without a word: it failed.
            Ok(Err(_)) => Err(SubmitError::NotStored),
            Err(_) if handover.give_up() => {
                tracing::warn!(transfer_id = %req.transfer_id, "the transfer could not be stored before the answer was due; answering 503 (it is never executed)");
                Err(SubmitError::NotStored)
            }
            // Stored at the deadline: pending.
            Err(_) => Ok(None),
        };
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                unanswered.answered(e.result());
                return Err(e);
            }
        };
        if let Some(replay) = stored {
            unanswered.answered("replay");
            return Ok(replay);
        }
        tracing::info!(transfer_id = %req.transfer_id, from = %req.from_account, to = %req.to_account, "transfer pending; calling the core");
        let result = match tokio::time::timeout_at(answer_by, execution).await {
            Ok(Ok(Some(result))) => result,
            // The task withdraws the transfer only once this request gave
            // up above, so this is the join error's case: a failed task.
            Ok(Ok(None)) | Ok(Err(_)) => {
                tracing::error!(transfer_id = %req.transfer_id, "executing the transfer failed; it stays pending for the resolver");
                self.resolver.spawn(req.clone());
                req
            }
            Err(_) => {
                tracing::warn!(transfer_id = %req.transfer_id, "no outcome before the answer was due; answering pending while the execution goes on");
                req
            }
        };
        unanswered.answered(result.status.as_str());
        Ok(result)
    }

    /// Stores `req` as pending with its event: `None` once stored, or the
    /// transfer a concurrent request with the same idempotency key stored
    /// (a replay).
    async fn store(
        &self,
        req: &TransferRequest,
        new: &NewTransfer,
        answer_by: tokio::time::Instant,
        handover: &Handover,
    ) -> Result<Option<TransferRequest>, SubmitError> {
        let customer = &req.customer_id;
        // Conflicts with a pending transfer gone by the look-up.
        let mut conflicts = 0;
        // Attempts since the first whose outcome is unknown (the connection
        // was lost while it ran): from then on the transfer may be stored,
        // and writing it again by the same id, the only way to learn which,
        // goes on past the answer's deadline for at most
        // `STORE_SETTLE_BOUND`, whatever the errors.
        let mut unknown = 0;
        loop {
            if handover.given_up() {
                // The request answered 503: nothing stored so far, so store
                // nothing; or settle it without ever storing it pending.
                if unknown == 0 {
                    return Err(SubmitError::NotStored);
                }
                self.withdraw(req, answer_by).await;
                return Err(SubmitError::NotStored);
            }
            let conflict = match insert_pending(&self.db, self.resolver.outbox(), req).await {
                Ok(()) => return Ok(None),
                // An earlier attempt whose answer was lost had stored it
                // (storing the same id again is otherwise a no-op).
                Err(InsertError::InProgress(Some(id))) if id == req.transfer_id => return Ok(None),
                // The connection was lost while the statement ran: the
                // transfer may have been stored (a commit whose answer was
                // lost). Storing it again with the same id settles which,
                // waiting for an attempt still in flight; so a stored
                // transfer is executed (or, after a 503, withdrawn), not left
                // pending, unexecuted, holding the account until its fence.
                // Once unknown, any failure is retried the same way (one
                // PostgreSQL answered says nothing of the earlier attempt).
                Err(InsertError::Db(e)) if unknown > 0 || common::db::outcome_unknown(&e) => {
                    unknown += 1;
                    self.settle_pause(req, unknown, answer_by, e).await?;
                    continue;
                }
                // Nothing was stored (PostgreSQL answered with the error, or
                // no connection was had): 503 at once.
                Err(InsertError::Db(e)) => return Err(SubmitError::Db(e)),
                Err(conflict) => conflict,
            };
            // A concurrent submit with the same key (both missed the look-up
            // before) collides on the key, or on the one-pending index,
            // which PostgreSQL may report first: it is a replay (or this
            // request's own row, stored by an attempt whose answer was lost).
            let keyed = match &req.idempotency_key {
                Some(key) => match find_by_key(&self.db, customer, key).await {
                    Ok(found) => found,
                    Err(e) if unknown > 0 => {
                        unknown += 1;
                        self.settle_pause(req, unknown, answer_by, e).await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
                None => None,
            };
            if let Some(existing) = keyed {
                return own_or_replay(existing, req, new);
            }
            match conflict {
                // The pending transfer resolved between the conflict and our
                // look-up: try again after a short pause (a few times, so the
                // answer names the pending transfer as API.md requires).
                InsertError::InProgress(None) if conflicts + 1 < IN_PROGRESS_ATTEMPTS => {
                    conflicts += 1;
                    tokio::time::sleep(Duration::from_millis(1 << conflicts)).await;
                }
                InsertError::InProgress(None) => return Err(SubmitError::Contended),
                InsertError::InProgress(Some(id)) => return Err(SubmitError::InProgress(id)),
                InsertError::KeyTaken => {
                    return Err(SubmitError::Db(DbErr::RecordNotFound(
                        "idempotency key vanished".into(),
                    )));
                }
                InsertError::Db(e) => return Err(SubmitError::Db(e)),
            }
        }
    }

    /// Waits before writing transfer `req` again after `unknown` attempts,
    /// the last failing with `error`, while the outcome is unknown; the
    /// error once `STORE_SETTLE_BOUND` past `answer_by` leaves no room.
    async fn settle_pause(
        &self,
        req: &TransferRequest,
        unknown: u32,
        answer_by: tokio::time::Instant,
        error: DbErr,
    ) -> Result<(), SubmitError> {
        let Some(pause) = store_retry_pause(unknown, answer_by + STORE_SETTLE_BOUND) else {
            tracing::error!(transfer_id = %req.transfer_id, error = %error, "whether the transfer was stored is still unknown; if it was, the reconciler fences it after the TTL");
            return Err(SubmitError::Db(error));
        };
        tracing::warn!(transfer_id = %req.transfer_id, error = %error, attempt = unknown, "writing the transfer failed and may have committed; writing it again by the same id");
        tokio::time::sleep(pause).await;
        Ok(())
    }

    /// Settles a transfer after its request answered 503
    /// ([`SubmitError::NotStored`]) once it was stored, or may have been
    /// ([`withdraw`]: a stored row is failed and its idempotency key freed;
    /// otherwise the id is taken): the core never received it (only the
    /// request's own task calls the core with a new transfer), and the
    /// customer was told it was not made. Retried on any error for as long as a store of
    /// unknown outcome is ([`STORE_SETTLE_BOUND`] past `answer_by`); if it
    /// still cannot, the reconciler fences it after the TTL.
    async fn withdraw(&self, req: &TransferRequest, answer_by: tokio::time::Instant) {
        let outbox = self.resolver.outbox();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let e = match withdraw(&self.db, outbox, req).await {
                Ok(stored) => {
                    tracing::warn!(transfer_id = %req.transfer_id, stored, "a transfer is settled after its request answered 503: failed (never_received) if it was stored");
                    return;
                }
                Err(e) => e,
            };
            let Some(pause) = store_retry_pause(attempts, answer_by + STORE_SETTLE_BOUND) else {
                tracing::error!(transfer_id = %req.transfer_id, error = %e, "settling a transfer after its request answered 503 failed; if it was stored, the reconciler fences it after the TTL");
                return;
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Calls the core for a pending transfer and records its answer; the
    /// transfer as it then stands (still pending, handed to a resolver,
    /// when the outcome is not known).
    async fn execute(&self, req: TransferRequest) -> TransferRequest {
        // The core may be briefly unreachable (restarting) or fail with a
        // 5xx: nothing executed, or, if a gateway answered while the
        // request went on, the same transfer id is executed at most once
        // whatever the number of copies. So the call is repeated with
        // backoff while the core timeout leaves room for an answer,
        // instead of leaving the transfer to be fenced after the TTL. The
        // core's own 503 `overloaded` (its queue is full) is called again
        // too, but only after a longer pause, so that the calls do not keep
        // the queue full. Not repeated: a timeout (it has used up the
        // budget); such a transfer stays pending for the resolver.
        let deadline = tokio::time::Instant::now() + self.core_timeout;
        let answer = (|| async {
            self.core
                .transfer(
                    &req.transfer_id,
                    &req.from_account,
                    &req.to_account,
                    req.amount,
                    req.requested_at,
                    req.memo.as_deref(),
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                )
                .await
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(UNAVAILABLE_RETRY_MIN)
                .with_max_delay(UNAVAILABLE_RETRY_MAX)
                .without_max_times()
                .with_jitter(),
        )
        .when(|e: &CoreError| matches!(e, CoreError::Unavailable(_) | CoreError::Overloaded))
        // A pause never leaves the next call less than the room it needs:
        // when it would, the last answer stands.
        .adjust(|e: &CoreError, pause: Option<Duration>| {
            let pause = match e {
                CoreError::Overloaded => pause.map(|p| p.max(OVERLOADED_PAUSE)),
                _ => pause,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            pause.filter(|p| left.saturating_sub(*p) >= UNAVAILABLE_RETRY_ROOM)
        })
        .notify(|e: &CoreError, wait: Duration| {
            tracing::info!(transfer_id = %req.transfer_id, error = %e, wait_ms = wait.as_millis() as u64, "the core is unavailable; calling it again");
        })
        .await;
        let resolution = match answer {
            Ok(t) => Some(super::reconciler::resolution(&t)),
            Err(CoreError::Refused {
                status: 422, code, ..
            }) if CORE_REFUSALS.contains(&code.as_str()) => {
                Some(Resolution::Failed { reason: code })
            }
            Err(CoreError::Refused {
                status,
                code,
                message,
                ..
            }) if status == 422 || CORE_REJECTIONS.contains(&status) => {
                // Bad input or credentials, as the core rejects them, but
                // also what a gateway between the two services may answer
                // while the request (or a retried copy) goes on: the
                // transfer is fenced at once, so that no copy can execute
                // after the customer was told it failed (B12). The fence
                // answers with the core's own record: executed (it had
                // arrived) or fenced (it never will). Other statuses (408,
                // 409, 429, ...) leave the transfer pending for the resolver.
                tracing::error!(transfer_id = %req.transfer_id, status, %code, %message, "a transfer request was rejected on the way to the core; fencing it");
                match self.core.fence(&req.transfer_id).await {
                    Ok(answer) => Some(super::reconciler::resolution(&answer)),
                    Err(e) => {
                        tracing::warn!(transfer_id = %req.transfer_id, error = %e, "fencing failed; the transfer stays pending");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(transfer_id = %req.transfer_id, error = %e, "no answer from the core; the transfer stays pending");
                None
            }
        };
        match resolution {
            Some(r) => match self.record(&req, &r).await {
                Ok(recorded) => recorded,
                Err(e) => {
                    // The core has answered, but the answer could not be
                    // recorded: the transfer is still pending here, so the
                    // customer is told so, and the resolver asks the core
                    // again and records the outcome once the database is back.
                    tracing::error!(transfer_id = %req.transfer_id, error = %e, "recording the core's answer failed; the transfer stays pending for the resolver");
                    self.resolver.spawn(req.clone());
                    req
                }
            },
            None => {
                self.resolver.spawn(req.clone());
                req
            }
        }
    }
}

impl TransferService {
    /// Records the core's answer; the request as it now stands.
    async fn record(
        &self,
        req: &TransferRequest,
        resolution: &Resolution,
    ) -> Result<TransferRequest, DbErr> {
        Ok(
            match resolve(&self.db, self.resolver.outbox(), req, resolution).await? {
                Some(updated) => updated,
                // Resolved meanwhile by the resolver: its record stands.
                None => find(&self.db, &req.transfer_id)
                    .await?
                    .unwrap_or_else(|| req.clone()),
            },
        )
    }

    /// Asks the core about a pending transfer now and resolves it if its
    /// outcome is known (fencing it when it is past the TTL).
    pub async fn settle_now(
        &self,
        t: &TransferRequest,
    ) -> Result<Option<TransferRequest>, super::reconciler::SettleError> {
        super::reconciler::settle(
            &self.db,
            self.resolver.outbox(),
            &self.core,
            t,
            self.resolver.fence_after(),
        )
        .await
    }
}

/// Statuses by which the core rejects a transfer request it will never
/// execute (malformed, unauthorized, unknown route, too large, wrong type).
/// Something between the services may answer them too, so they are final
/// only once the transfer is fenced.
const CORE_REJECTIONS: [u16; 7] = [400, 401, 403, 404, 405, 413, 415];

/// The core's refusals of a transfer (API.md), each recorded there as final.
const CORE_REFUSALS: [&str; 9] = [
    "insufficient_funds",
    "account_not_found",
    "account_not_active",
    "withdrawal_stopped",
    "deposit_stopped",
    "same_account",
    "request_expired",
    "transfer_fenced",
    "balance_limit_exceeded",
];

/// An idempotency-key replay: the same request gets the stored transfer.
/// The transfer a key conflict names: this request's own (stored by an
/// attempt whose answer was lost: `None`, stored), or another request's,
/// answered as a replay if it asked for the same.
fn own_or_replay(
    existing: TransferRequest,
    req: &TransferRequest,
    new: &NewTransfer,
) -> Result<Option<TransferRequest>, SubmitError> {
    if existing.transfer_id == req.transfer_id {
        Ok(None)
    } else {
        same_request(existing, new).map(Some)
    }
}

fn same_request(
    existing: TransferRequest,
    new: &NewTransfer,
) -> Result<TransferRequest, SubmitError> {
    let field = if existing.from_account != new.from_account {
        Some("from_account")
    } else if existing.to_account != new.to_account {
        Some("to_account")
    } else if existing.amount != new.amount {
        Some("amount")
    } else if existing.memo != new.memo {
        Some("memo")
    } else {
        None
    };
    match field {
        Some(f) => Err(SubmitError::IdempotencyConflict(f)),
        None => Ok(existing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn b09_storing_again_pauses_doubling_and_stops_short_of_the_answer_deadline() {
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        let pauses: Vec<_> = (1..=6).map(|n| store_retry_pause(n, far)).collect();
        assert_eq!(
            pauses,
            [50, 100, 200, 400, 400, 400].map(|ms| Some(Duration::from_millis(ms)))
        );
        // 50 ms of pause and the 500 ms of room do not fit in 520 ms.
        let near = tokio::time::Instant::now() + Duration::from_millis(520);
        assert_eq!(store_retry_pause(1, near), None);
    }
}

//! Resolving pending transfers (B11, B13).
//!
//! A transfer stays pending when the core did not answer in time. Two loops
//! resolve it, both through [`settle`]:
//!
//! - right after the timeout, a [`Resolver`] task polls the core's status
//!   with backoff (100 ms doubling to 1 s), so a transfer the core executed
//!   late is resolved within about a second of the core's commit;
//! - the reconciler runs at start-up and every `RECONCILE_INTERVAL_MS` over
//!   the pending transfers older than a second (younger ones are still in
//!   their request's hands), up to 50,000 a pass (100 pages of 500; the rest
//!   at the next pass), so nothing stays pending after a crash.
//!
//! Once a pending transfer is older than the request TTL plus a margin, the
//! core refuses it by time (B5); [`settle`] then calls the core's fence, which
//! either reports the transfer's real result or records that the id can never
//! execute (B12), and the transfer is resolved accordingly. Both operations
//! are idempotent, so replicas and the two loops may overlap safely.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::outbox::RelayWaker;
use common::shutdown::CancellationToken;
use futures::StreamExt;
use sea_orm::{DatabaseConnection, DbErr};
use tokio::sync::Semaphore;

use super::{Resolution, TransferRequest, find, pending_before, pending_stats, resolve};
use crate::core_client::{CoreClient, CoreError, CoreTransfer, CoreTransferStatus};

/// Most resolver tasks at once; beyond it the reconciler takes over.
const MAX_RESOLVERS: usize = 1024;
/// Pending transfers read per page of a reconciler pass, pages per pass (a
/// pass covers up to 50,000 transfers, so those behind a long head of
/// transfers the core never saw are not left waiting), and transfers
/// settled at once.
const PASS_PAGE: u64 = 500;
const PASS_MAX_PAGES: usize = 100;
const PASS_CONCURRENCY: usize = 16;

/// Why settling failed (it is retried by the next pass).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The core could not be asked.
    #[error("asking the core")]
    Core(#[from] CoreError),
    /// The channel database failed.
    #[error("channel database")]
    Db(#[from] DbErr),
}

/// The outcome the core's record of a transfer says.
pub(super) fn resolution(t: &CoreTransfer) -> Resolution {
    match t.status {
        CoreTransferStatus::Succeeded => Resolution::Succeeded {
            from_seq: t.from_seq,
            to_seq: t.to_seq,
        },
        CoreTransferStatus::Failed => Resolution::Failed {
            reason: t.reason.clone().unwrap_or_else(|| "refused".into()),
        },
    }
}

/// Resolves one pending transfer if its outcome can be known now: from the
/// core's status, or, past `fence_after`, by fencing. Returns the resolved
/// transfer, or `None` if it is still pending.
pub async fn settle(
    db: &DatabaseConnection,
    outbox: &RelayWaker,
    core: &CoreClient,
    req: &TransferRequest,
    fence_after: Duration,
) -> Result<Option<TransferRequest>, SettleError> {
    let id = &req.transfer_id;
    let age = (Utc::now() - req.requested_at).to_std().unwrap_or_default();
    let (answer, action) = if age > fence_after {
        (Some(core.fence(id).await?), "fenced")
    } else {
        (core.transfer_status(id).await?, "status")
    };
    let Some(answer) = answer else {
        return Ok(None);
    };
    let res = resolution(&answer);
    let resolved = resolve(db, outbox, req, &res).await?;
    if let Some(r) = &resolved {
        let label = match (&res, action) {
            (Resolution::Failed { reason }, "fenced") if reason == super::NEVER_RECEIVED => {
                "fenced_never_received"
            }
            (_, "fenced") => "fenced_found",
            _ => "resolved_from_status",
        };
        metrics::counter!("reconciler_actions_total", "action" => label).increment(1);
        tracing::info!(transfer_id = %id, status = r.status.as_str(), reason = ?r.reason, action = label, "pending transfer resolved");
    }
    Ok(resolved)
}

/// Spawns fast pollers for transfers that just timed out.
#[derive(Debug, Clone)]
pub struct Resolver {
    db: DatabaseConnection,
    core: CoreClient,
    fence_after: Duration,
    outbox: RelayWaker,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Resolver {
    /// A resolver; its tasks stop on `shutdown`.
    pub fn new(
        db: DatabaseConnection,
        outbox: RelayWaker,
        core: CoreClient,
        fence_after: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            db,
            core,
            fence_after,
            outbox,
            permits: Arc::new(Semaphore::new(MAX_RESOLVERS)),
            shutdown,
        }
    }

    /// The waker of the outbox relay.
    pub fn outbox(&self) -> &RelayWaker {
        &self.outbox
    }

    /// Age past which pending transfers are fenced.
    pub fn fence_after(&self) -> Duration {
        self.fence_after
    }

    /// Polls the core for `id` until it resolves (or shutdown). Skipped when
    /// too many pollers run; the reconciler covers it then.
    pub fn spawn(&self, req: TransferRequest) {
        let id = req.transfer_id.clone();
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(transfer_id = %id, "too many pending transfers being polled; leaving this one to the reconciler");
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut wait = Duration::from_millis(100);
            loop {
                tokio::select! {
                    _ = this.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match settle(&this.db, &this.outbox, &this.core, &req, this.fence_after).await {
                    Ok(Some(_)) => return,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(transfer_id = %id, error = %e, "polling a pending transfer")
                    }
                }
                // Another replica or the reconciler may have resolved it.
                if let Ok(Some(t)) = find(&this.db, &id).await
                    && t.status != common::events::TransferStatus::Pending
                {
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        });
    }
}

/// The periodic reconciler: at start-up, then every `interval`.
pub async fn run(
    db: DatabaseConnection,
    outbox: RelayWaker,
    core: CoreClient,
    interval: Duration,
    fence_after: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A pass can take long (a slow core, many pending transfers): at
        // shutdown it stops where it is. Each transfer is settled by
        // idempotent steps (the core's status or fence, then one
        // transaction), so one cut short stays pending for the next pass,
        // here or in another process.
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = pass(&db, &outbox, &core, fence_after) => result,
        };
        if let Err(e) = result {
            metrics::counter!("reconciler_errors_total").increment(1);
            tracing::warn!(error = %e, "reconciler pass failed");
        }
    }
}

/// One pass over the pending transfers older than a second, page by page.
pub async fn pass(
    db: &DatabaseConnection,
    outbox: &RelayWaker,
    core: &CoreClient,
    fence_after: Duration,
) -> Result<usize, DbErr> {
    let (count, oldest) = pending_stats(db).await?;
    metrics::gauge!("pending_transfers").set(count as f64);
    metrics::gauge!("pending_transfers_oldest_age_seconds").set(oldest);
    if count == 0 {
        return Ok(0);
    }
    let cutoff = Utc::now() - chrono::Duration::seconds(1);
    let mut after: Option<TransferRequest> = None;
    let mut resolved = 0;
    let mut failed = 0u64;
    let mut last_error: Option<String> = None;
    for _ in 0..PASS_MAX_PAGES {
        let page = pending_before(db, cutoff, after.as_ref(), PASS_PAGE).await?;
        let full = page.len() as u64 == PASS_PAGE;
        after = page.last().cloned();
        let outcomes: Vec<Result<bool, String>> = futures::stream::iter(page)
            .map(|p| async move {
                settle(db, outbox, core, &p, fence_after)
                    .await
                    .map(|r| r.is_some())
                    .map_err(|e| format!("{}: {}", p.transfer_id, common::error_chain(&e)))
            })
            .buffer_unordered(PASS_CONCURRENCY)
            .collect()
            .await;
        for o in outcomes {
            match o {
                Ok(true) => resolved += 1,
                Ok(false) => {}
                Err(e) => {
                    failed += 1;
                    last_error = Some(e);
                }
            }
        }
        if !full {
            break;
        }
    }
    if failed > 0 {
        // Counted with the failed passes: either way pending transfers are
        // not being settled (usually the core is unreachable or refuses the
        // channel's credential). One line per pass, not per transfer.
        metrics::counter!("reconciler_errors_total").increment(failed);
        tracing::warn!(
            failed,
            last_error = last_error.as_deref().unwrap_or(""),
            "the reconciler could not settle pending transfers"
        );
    }
    Ok(resolved)
}

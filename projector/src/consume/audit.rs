//! The ledger audit: accounts whose history stopped short of the core's
//! ledger get what is missing (B15, F7).
//!
//! Gap fill ([`super::ledger`]) fetches missing entries when a later event
//! of the same account arrives. An account's *last* events have no later
//! event: lost (a stream message deleted, the stream's storage lost, expired
//! past its maximum age while the projector was down), nothing else would
//! bring them, and the history would stay short of the ledger for as long as
//! the account stays quiet. So every `PROJECTOR_AUDIT_SECS` the audit pages
//! through the core's accounts (`GET /v1/accounts`, `PROJECTOR_AUDIT_PAGE`
//! at a time, in id order), compares each one's `last_seq` with the
//! history's `synced_through_seq`, and remembers the accounts that are
//! behind, with the seq they were behind of. An account still short of that
//! seq a pass later had a whole interval for its events to arrive: it is
//! synced from the core ([`sync::sync_account`], [`SYNCS_IN_FLIGHT`] at a
//! time). A sync that applied entries is logged at warn and counted
//! (`projector_audit_repairs_total`); one that applied nothing (the core's
//! entries do not continue the history) is logged and counted as an error
//! (`projector_audit_errors_total`).
//!
//! What keeps it cheap and quiet:
//! - one replica audits at a time: the one holding the `audit_lease` row,
//!   renewed at every page and taken over once it has expired (two
//!   intervals without a renewal);
//! - no pass runs while the ledger consumer has more than [`BACKLOG_MAX`]
//!   messages waiting (accounts behind a backlog are the consumer's work,
//!   not lost events);
//! - a page the core or the database fails is tried again (3 times, with
//!   backoff); a pass that still fails resumes at that page at the next
//!   interval instead of starting over, and what it found is kept;
//! - what is remembered is bounded ([`REMEMBERED_MAX`]); past it, accounts
//!   are looked at again by the passes after.
//!
//! Events held up for longer than an interval (NATS or the core's relay
//! down that long) look the same as lost ones: their accounts are synced
//! from the core, which is the same work done sooner, and counted as
//! repairs. What is remembered lives in memory: a replica restarted more
//! often than every interval does not repair (another one takes the lease).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use backon::{ExponentialBuilder, Retryable};
use common::AccountId;
use common::shutdown::CancellationToken;
use futures::StreamExt;
use sea_orm::{ConnectionTrait, DbErr, Statement};
use transfer::core_client::{CoreAccount, CoreError};
use transfer::history::sync;

use super::Context;

/// Accounts synced at once by a pass.
pub const SYNCS_IN_FLIGHT: usize = 4;

/// Most accounts remembered as behind from one pass to the next.
pub const REMEMBERED_MAX: usize = 100_000;

/// Messages waiting on the ledger consumer above which no pass runs.
pub const BACKLOG_MAX: u64 = 10_000;

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The core's accounts could not be read.
    #[error("reading the core's accounts")]
    Core(#[from] CoreError),
    /// The channel database failed.
    #[error("reading the history's progress")]
    Db(#[from] DbErr),
}

/// Accounts found behind the core: account id to the core's `last_seq`
/// then.
#[derive(Debug, Default)]
struct Behind(HashMap<String, i64>);

impl Behind {
    fn remember(&mut self, account: &AccountId, last_seq: i64) {
        if self.0.len() < REMEMBERED_MAX {
            self.0.insert(account.to_string(), last_seq);
        }
    }
}

/// Where the audit is: the accounts the last complete pass found behind,
/// those the current pass found so far, and where it goes on.
#[derive(Debug, Default)]
pub struct AuditState {
    earlier: Behind,
    now: Behind,
    after: Option<String>,
}

/// What one pass (or the part of it run so far) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuditPass {
    /// Accounts compared.
    pub accounts: u64,
    /// Accounts synced from the core because they stayed behind, that got
    /// entries.
    pub repaired: u64,
    /// Entries those syncs wrote.
    pub entries: u64,
    /// Whether the pass reached the last account.
    pub complete: bool,
}

/// Runs the pass of `state` to its end, `page` accounts at a time: syncs
/// the accounts the pass before found behind that are still short of the
/// seq they were behind of, and remembers the ones behind for the first
/// time. On an error, `state` keeps where it stopped.
pub async fn audit_once(
    ctx: &Context,
    page: u32,
    holder: &str,
    lease: Duration,
    state: &mut AuditState,
) -> Result<AuditPass, AuditError> {
    let mut pass = AuditPass::default();
    loop {
        if !hold_lease(ctx, holder, lease).await? {
            tracing::debug!("another replica holds the audit lease; this pass stops");
            return Ok(pass);
        }
        let after = state.after.clone();
        let (accounts, next) = (|| ctx.core.accounts(after.as_deref(), page.max(1)))
            .retry(retry_a_page())
            .await?;
        let held = (|| synced_through(ctx, &accounts))
            .retry(retry_a_page())
            .await?;
        pass.accounts += accounts.len() as u64;
        let mut stale = Vec::new();
        for a in &accounts {
            let synced = held.get(a.account_id.as_str()).copied().unwrap_or(0);
            if a.last_seq <= synced {
                continue;
            }
            match state.earlier.0.get(a.account_id.as_str()) {
                Some(&seen) if synced < seen => stale.push((a.account_id.clone(), synced, seen)),
                _ => state.now.remember(&a.account_id, a.last_seq),
            }
        }
        let synced: Vec<_> = futures::stream::iter(stale)
            .map(|(account, synced, seen)| async move {
                let result = sync::sync_account(&ctx.db, &ctx.core, &account).await;
                (account, synced, seen, result)
            })
            .buffer_unordered(SYNCS_IN_FLIGHT)
            .collect()
            .await;
        for (account, synced, seen, result) in synced {
            match result {
                Ok(report) if report.applied > 0 => {
                    pass.repaired += 1;
                    pass.entries += report.applied;
                    metrics::counter!("projector_audit_repairs_total").increment(1);
                    tracing::warn!(account = %account, synced_through_seq = synced, core_last_seq = seen, applied = report.applied, now_through = report.synced_through_seq, "an account's history stayed behind the core's ledger for a whole audit interval (its last events lost, or held up that long); synced from the core");
                }
                // Caught up meanwhile (the events arrived): nothing to do.
                Ok(report) if report.synced_through_seq >= seen => {}
                Ok(report) => {
                    metrics::counter!("projector_audit_errors_total").increment(1);
                    tracing::warn!(account = %account, synced_through_seq = report.synced_through_seq, core_last_seq = seen, "an account's history stays behind the core's ledger and its sync applied nothing (the core's entries do not continue it)");
                }
                Err(e) => {
                    // Tried again at the next pass.
                    state.now.remember(&account, seen);
                    metrics::counter!("projector_audit_errors_total").increment(1);
                    tracing::warn!(account = %account, error = %common::error_chain(&e), "syncing an account the audit found behind failed; tried again at the next pass");
                }
            }
        }
        match next {
            Some(n) if !accounts.is_empty() => state.after = Some(n),
            _ => {
                state.after = None;
                state.earlier = std::mem::take(&mut state.now);
                pass.complete = true;
                return Ok(pass);
            }
        }
    }
}

/// A page read again after a failure: 3 more times, from 200 ms.
fn retry_a_page() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(3)
        .with_jitter()
}

/// Takes or renews the audit lease for `holder` until `lease` from now;
/// false when another replica holds it.
async fn hold_lease(ctx: &Context, holder: &str, lease: Duration) -> Result<bool, DbErr> {
    let millis = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let row = ctx
        .db
        .query_one_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "INSERT INTO audit_lease (id, holder, until) \
             VALUES (true, $1, now() + make_interval(secs => $2::float8 / 1000)) \
             ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
               WHERE audit_lease.holder = EXCLUDED.holder OR audit_lease.until < now() \
             RETURNING holder",
            [holder.into(), millis.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// The history's `synced_through_seq` of `accounts` (absent: nothing held).
async fn synced_through(
    ctx: &Context,
    accounts: &[CoreAccount],
) -> Result<HashMap<String, i64>, DbErr> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<String> = accounts.iter().map(|a| a.account_id.to_string()).collect();
    let rows = ctx
        .db
        .query_all_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "SELECT account_id, synced_through_seq FROM history_sync WHERE account_id = ANY($1)",
            [ids.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<String>("", "account_id")?,
                r.try_get::<i64>("", "synced_through_seq")?,
            ))
        })
        .collect()
}

/// Messages waiting on the ledger consumer (none known: 0).
async fn ledger_backlog(consumer: &mut PullConsumer) -> u64 {
    match consumer.info().await {
        Ok(info) => info.num_pending + info.num_ack_pending as u64,
        Err(e) => {
            tracing::debug!(error = %e, "reading the ledger consumer's backlog");
            0
        }
    }
}

/// Runs the audit every `every` until `shutdown` (see the module's docs);
/// `ledger` is the ledger consumer, whose backlog holds passes back.
pub async fn audit(
    ctx: Context,
    mut ledger: PullConsumer,
    every: Duration,
    page: u32,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let holder = format!(
        "{}-{}-{:016x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "projector".to_owned()),
        std::process::id(),
        rand::random::<u64>()
    );
    let lease = every.saturating_mul(2);
    let mut state = AuditState::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let backlog = ledger_backlog(&mut ledger).await;
        if backlog > BACKLOG_MAX {
            tracing::debug!(
                backlog,
                "the ledger consumer has a backlog; no audit pass now"
            );
            continue;
        }
        // A pass can wait long on a core that does not answer: shutdown does
        // not wait for it (each sync it made is committed).
        let pass = tokio::select! {
            _ = shutdown.cancelled() => return,
            pass = audit_once(&ctx, page, &holder, lease, &mut state) => pass,
        };
        match pass {
            Ok(pass) => {
                if pass.complete {
                    metrics::counter!("projector_audit_passes_total").increment(1);
                }
                tracing::debug!(
                    accounts = pass.accounts,
                    repaired = pass.repaired,
                    entries = pass.entries,
                    complete = pass.complete,
                    behind = state.earlier.0.len(),
                    "ledger audit pass"
                );
            }
            Err(e) => {
                metrics::counter!("projector_audit_errors_total").increment(1);
                tracing::warn!(error = %common::error_chain(&e), "ledger audit pass failed; the next one goes on from where it stopped");
            }
        }
    }
}

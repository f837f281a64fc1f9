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
//! history's `synced_through_seq`, and records the accounts that are behind,
//! with the seq they were behind of (`audit_behind`). An account still short
//! of that seq a pass later had a whole interval for its events to arrive:
//! it is synced from the core ([`sync::sync_account`], [`SYNCS_IN_FLIGHT`]
//! at a time). A sync that applied entries is logged at warn and counted
//! (`projector_audit_repairs_total`); one that applied nothing (the core's
//! entries do not continue the history) is logged and counted as an error
//! (`projector_audit_errors_total`).
//!
//! What keeps it cheap, quiet and going:
//! - one replica audits at a time: the one holding the `audit_lease` row,
//!   renewed at every page and taken over once it has expired (two
//!   intervals without a renewal);
//! - what a pass found and where it is are in the channel database, not in
//!   the process: a replica restarted, or another one taking the lease over,
//!   goes on from the page the last one reached, and an account recorded
//!   behind by either is synced once its row is older than half an interval
//!   and the account still short of that seq;
//! - no pass runs while the ledger consumer has more than [`BACKLOG_MAX`]
//!   messages waiting (accounts behind a backlog are the consumer's work,
//!   not lost events);
//! - a page the core or the database fails is tried again (3 times, with
//!   backoff); a pass that still fails goes on from that page at the next
//!   interval.
//!
//! An account whose history holds *more* than the core's ledger (a forged
//! event that continued the balances, or an entry the core lost in a
//! failover) would show it for as long as the account stays quiet: no later
//! entry of the core comes to contradict it. The audit syncs such an account
//! at once; the sync checks the first entry past the core's last seq
//! against the core and cuts it, with everything after it, if it is not the
//! core's ([`sync::sync_account`]), and the audit counts that as a repair.
//! An account the core moved on after its page was read looks ahead too:
//! its sync cuts nothing, and no repair is counted (a busy account would
//! otherwise raise the alert at every pass). Its events lost right after
//! the page was read are filled by that sync uncounted: within a pass that
//! cannot be told from events on their way.
//!
//! Events held up for longer than an interval (NATS or the core's relay
//! down that long) look the same as lost ones: their accounts are synced
//! from the core, which is the same work done sooner, and counted as
//! repairs.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use backon::{ExponentialBuilder, Retryable};
use common::shutdown::CancellationToken;
use futures::StreamExt;
use sea_orm::{ConnectionTrait, DbErr, Statement};
use transfer::core_client::{CoreAccount, CoreError};
use transfer::history::sync;

use super::Context;

/// Accounts synced at once by a pass.
pub const SYNCS_IN_FLIGHT: usize = 4;

/// Messages waiting on the ledger consumer above which no pass runs.
pub const BACKLOG_MAX: u64 = 10_000;

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The core's accounts could not be read.
    #[error("reading the core's accounts")]
    Core(#[from] CoreError),
    /// The channel database failed.
    #[error("reading or recording the history's progress")]
    Db(#[from] DbErr),
}

/// What one pass (or the part of it run so far) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuditPass {
    /// Accounts compared.
    pub accounts: u64,
    /// Accounts repaired: synced from the core because they stayed behind
    /// (and got entries), or cut back to the core's ledger because their
    /// history held entries past it that are not the core's.
    pub repaired: u64,
    /// Entries those syncs wrote.
    pub entries: u64,
    /// Whether the pass reached the last account.
    pub complete: bool,
}

/// An account of a page as the channel database has it.
#[derive(Debug)]
struct Progress {
    /// The history's `synced_through_seq` (0: nothing held).
    synced: i64,
    /// Its `audit_behind` row: the seq it was behind of, and whether the
    /// row is from an earlier pass (older than half an interval).
    behind: Option<(i64, bool)>,
}

/// How a page found an account's history against the core's `last_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Still short of the seq an earlier pass recorded.
    Behind,
    /// Past the core's `last_seq` as the page read it.
    Ahead,
}

/// Runs a pass to its end, `page` accounts at a time, from where the last
/// holder of the lease stopped: syncs the accounts found behind at least
/// half of `every` ago (by this replica or another) that are still short of
/// the seq they were behind of, and records the ones behind for the first
/// time. What it found and where it is live in the channel database
/// (`audit_behind`, `audit_lease.resume_after`), so a restart or a handover
/// of the lease loses neither.
pub async fn audit_once(
    ctx: &Context,
    page: u32,
    holder: &str,
    lease: Duration,
    every: Duration,
) -> Result<AuditPass, AuditError> {
    let mut pass = AuditPass::default();
    loop {
        let Some(after) = hold_lease(ctx, holder, lease).await? else {
            tracing::debug!("another replica holds the audit lease; this pass stops");
            return Ok(pass);
        };
        let (accounts, next) = (|| ctx.core.accounts(after.as_deref(), page.max(1)))
            .retry(retry_a_page())
            .await?;
        let progress = (|| read_progress(ctx, &accounts, every))
            .retry(retry_a_page())
            .await?;
        pass.accounts += accounts.len() as u64;
        let mut to_sync = Vec::new();
        let mut first_seen = Vec::new();
        let mut settled = Vec::new();
        for a in &accounts {
            let Some(p) = progress.get(a.account_id.as_str()) else {
                continue;
            };
            if a.last_seq <= p.synced {
                if p.behind.is_some() {
                    settled.push(a.account_id.to_string());
                }
                if a.last_seq < p.synced {
                    // Ahead of the core's page: synced at once (the sync
                    // cuts what is not the core's). Mostly an account the
                    // core moved on since its page was read, which the
                    // sync leaves as it is.
                    to_sync.push((a.account_id.clone(), p.synced, a.last_seq, Found::Ahead));
                }
                continue;
            }
            match p.behind {
                Some((seen, true)) if p.synced < seen => {
                    to_sync.push((a.account_id.clone(), p.synced, seen, Found::Behind));
                }
                // Found behind lately: looked at again at the next pass.
                Some((seen, false)) if p.synced < seen => {}
                _ => first_seen.push((a.account_id.to_string(), a.last_seq)),
            }
        }
        let synced: Vec<_> = futures::stream::iter(to_sync)
            .map(|(account, synced, seen, found)| async move {
                let result = sync::sync_account(&ctx.db, &ctx.core, &account).await;
                (account, synced, seen, found, result)
            })
            .buffer_unordered(SYNCS_IN_FLIGHT)
            .collect()
            .await;
        for (account, synced, seen, found, result) in synced {
            let report = match result {
                Ok(report) => report,
                Err(e) => {
                    // Its row stays: tried again at the next pass.
                    metrics::counter!("projector_audit_errors_total").increment(1);
                    tracing::warn!(account = %account, error = %common::error_chain(&e), "syncing an account the audit found behind or ahead of the core failed; tried again at the next pass");
                    continue;
                }
            };
            settled.push(account.to_string());
            if report.cut {
                pass.repaired += 1;
                pass.entries += report.applied;
                metrics::counter!("projector_audit_repairs_total").increment(1);
                tracing::warn!(account = %account, synced_through_seq = synced, core_last_seq = seen, now_through = report.synced_through_seq, "an account's history held entries that are not the core's (past its last seq, or in place of its entries); cut back and synced from the core");
            } else if found == Found::Ahead {
                // Nothing cut: the core had moved on (what the sync applied
                // is the projector's work, done sooner).
                pass.entries += report.applied;
            } else if report.applied > 0 {
                pass.repaired += 1;
                pass.entries += report.applied;
                metrics::counter!("projector_audit_repairs_total").increment(1);
                tracing::warn!(account = %account, synced_through_seq = synced, core_last_seq = seen, applied = report.applied, now_through = report.synced_through_seq, "an account's history stayed behind the core's ledger for a whole audit interval (its last events lost, or held up that long); synced from the core");
            } else if report.synced_through_seq < seen {
                // Found behind afresh by a later pass, and tried again the
                // pass after. (Caught up meanwhile, the events having
                // arrived, is nothing to do.)
                metrics::counter!("projector_audit_errors_total").increment(1);
                tracing::warn!(account = %account, synced_through_seq = report.synced_through_seq, core_last_seq = seen, "an account's history stays behind the core's ledger and its sync applied nothing (the core's entries do not continue it)");
            }
        }
        let resume = match next {
            Some(n) if !accounts.is_empty() => Some(n),
            _ => None,
        };
        // What the page found and where the pass goes on, in one
        // statement: a pass cut short before it does the page again.
        (|| record_page(ctx, holder, &first_seen, &settled, resume.as_deref()))
            .retry(retry_a_page())
            .await?;
        if resume.is_none() {
            pass.complete = true;
            return Ok(pass);
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

/// Takes or renews the audit lease for `holder` until `lease` from now:
/// where the pass goes on (`None` inside: from the first account), or
/// `None` when another replica holds it.
async fn hold_lease(
    ctx: &Context,
    holder: &str,
    lease: Duration,
) -> Result<Option<Option<String>>, DbErr> {
    let millis = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let row = ctx
        .db
        .query_one_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "INSERT INTO audit_lease (id, holder, until) \
             VALUES (true, $1, now() + make_interval(secs => $2::float8 / 1000)) \
             ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
               WHERE audit_lease.holder = EXCLUDED.holder OR audit_lease.until < now() \
             RETURNING resume_after",
            [holder.into(), millis.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<Option<String>>("", "resume_after"))
        .transpose()
}

/// Each of `accounts`' history progress and audit row; an account is
/// behind "from an earlier pass" when its row is older than half of
/// `every` (a pass of a replica started right after another's is not a
/// pass later).
async fn read_progress(
    ctx: &Context,
    accounts: &[CoreAccount],
    every: Duration,
) -> Result<HashMap<String, Progress>, DbErr> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<String> = accounts.iter().map(|a| a.account_id.to_string()).collect();
    let half_ms = i64::try_from(every.as_millis() / 2).unwrap_or(i64::MAX);
    let rows = ctx
        .db
        .query_all_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "SELECT x.id AS account_id, COALESCE(s.synced_through_seq, 0) AS synced, \
                    b.behind_of_seq, \
                    COALESCE(b.seen_at < now() - make_interval(secs => $2::float8 / 1000), false) AS earlier \
             FROM unnest($1::text[]) AS x(id) \
             LEFT JOIN history_sync s ON s.account_id = x.id \
             LEFT JOIN audit_behind b ON b.account_id = x.id",
            [ids.into(), half_ms.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            let behind: Option<i64> = r.try_get("", "behind_of_seq")?;
            let earlier: bool = r.try_get("", "earlier")?;
            Ok((
                r.try_get::<String>("", "account_id")?,
                Progress {
                    synced: r.try_get("", "synced")?,
                    behind: behind.map(|seq| (seq, earlier)),
                },
            ))
        })
        .collect()
}

/// Records what a page found, in one statement: `behind` (account, the
/// core's last seq now) as found behind now, `settled` forgotten, and where
/// the pass of the lease's `holder` goes on (`after`; `None`: it ended, the
/// next one starts from the first account).
async fn record_page(
    ctx: &Context,
    holder: &str,
    behind: &[(String, i64)],
    settled: &[String],
    after: Option<&str>,
) -> Result<(), DbErr> {
    let (ids, seqs): (Vec<String>, Vec<i64>) = behind.iter().cloned().unzip();
    ctx.db
        .execute_raw(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            "WITH forget AS (DELETE FROM audit_behind WHERE account_id = ANY($3::text[])), \
                  resume AS (UPDATE audit_lease SET resume_after = $5 WHERE holder = $4) \
             INSERT INTO audit_behind (account_id, behind_of_seq, seen_at) \
             SELECT id, seq, now() FROM unnest($1::text[], $2::bigint[]) AS x(id, seq) \
             ON CONFLICT (account_id) DO UPDATE \
               SET behind_of_seq = EXCLUDED.behind_of_seq, seen_at = EXCLUDED.seen_at",
            [
                ids.into(),
                seqs.into(),
                settled.to_vec().into(),
                holder.into(),
                after.map(str::to_owned).into(),
            ],
        ))
        .await?;
    Ok(())
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
            pass = audit_once(&ctx, page, &holder, lease, every) => pass,
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

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
//! seq at the next pass had a whole interval for its events to arrive: it is
//! synced from the core ([`sync::sync_account`], [`SYNCS_IN_FLIGHT`] at a
//! time), logged at warn and counted (`projector_audit_repairs_total`). So a
//! lost last event is repaired within two intervals of being written, and an
//! account merely behind a backlog is left to its events unless the backlog
//! takes longer than an interval (then the sync is the same work, done
//! sooner; the writer is idempotent).
//!
//! One pass reads every account once: at ten million accounts, 10,000 pages,
//! about 17 a second at a pass every ten minutes. Every replica audits on its
//! own (the repairs are idempotent). What is remembered is bounded
//! ([`REMEMBERED_MAX`]); past it, accounts are looked at again by the passes
//! after. A failed pass (the core or the database unavailable) is logged and
//! counted (`projector_audit_errors_total`) and the next one starts over; what
//! it remembered so far is kept.

use std::collections::HashMap;
use std::time::Duration;

use common::AccountId;
use common::shutdown::CancellationToken;
use futures::StreamExt;
use sea_orm::{ConnectionTrait, DbErr, Statement};
use transfer::core_client::CoreError;
use transfer::history::sync;

use super::Context;

/// Accounts synced at once by a pass.
pub const SYNCS_IN_FLIGHT: usize = 4;

/// Most accounts remembered as behind from one pass to the next.
pub const REMEMBERED_MAX: usize = 100_000;

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

/// Accounts found behind the core by a pass: account id to the core's
/// `last_seq` then.
#[derive(Debug, Default)]
pub struct Behind(HashMap<String, i64>);

impl Behind {
    /// How many accounts are remembered.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn remember(&mut self, account: &AccountId, last_seq: i64) {
        if self.0.len() < REMEMBERED_MAX {
            self.0.insert(account.to_string(), last_seq);
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuditPass {
    /// Accounts compared.
    pub accounts: u64,
    /// Accounts synced from the core because they stayed behind.
    pub repaired: u64,
    /// Entries those syncs wrote.
    pub entries: u64,
}

/// One pass over every account of the core, `page` at a time: syncs the
/// accounts `earlier` found behind that are still short of the seq they were
/// behind of, and remembers in `now` the ones behind for the first time.
pub async fn audit_once(
    ctx: &Context,
    page: u32,
    earlier: &Behind,
    now: &mut Behind,
) -> Result<AuditPass, AuditError> {
    let mut pass = AuditPass::default();
    let mut after: Option<String> = None;
    loop {
        let (accounts, next) = ctx.core.accounts(after.as_deref(), page.max(1)).await?;
        pass.accounts += accounts.len() as u64;
        let held = synced_through(ctx, &accounts).await?;
        let mut stale = Vec::new();
        for a in &accounts {
            let synced = held.get(a.account_id.as_str()).copied().unwrap_or(0);
            if a.last_seq <= synced {
                continue;
            }
            match earlier.0.get(a.account_id.as_str()) {
                Some(&seen) if synced < seen => stale.push((a.account_id.clone(), synced, seen)),
                _ => now.remember(&a.account_id, a.last_seq),
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
                Ok(report) => {
                    pass.repaired += 1;
                    pass.entries += report.applied;
                    metrics::counter!("projector_audit_repairs_total").increment(1);
                    tracing::warn!(account = %account, synced_through_seq = synced, core_last_seq = seen, applied = report.applied, now_through = report.synced_through_seq, "an account's history stayed behind the core's ledger for a whole audit interval (its last events never arrived); synced from the core");
                }
                Err(e) => {
                    // Tried again at the next pass.
                    now.remember(&account, seen);
                    metrics::counter!("projector_audit_errors_total").increment(1);
                    tracing::warn!(account = %account, error = %common::error_chain(&e), "syncing an account the audit found behind failed; tried again at the next pass");
                }
            }
        }
        match next {
            Some(n) if !accounts.is_empty() => after = Some(n),
            _ => return Ok(pass),
        }
    }
}

/// The history's `synced_through_seq` of `accounts` (absent: nothing held).
async fn synced_through(
    ctx: &Context,
    accounts: &[transfer::core_client::CoreAccount],
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

/// Runs [`audit_once`] every `every` until `shutdown`.
pub async fn audit(ctx: Context, every: Duration, page: u32, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut earlier = Behind::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut now = Behind::default();
        // A pass can wait long on a core that does not answer: shutdown does
        // not wait for it (each sync it made is committed).
        let pass = tokio::select! {
            _ = shutdown.cancelled() => return,
            pass = audit_once(&ctx, page, &earlier, &mut now) => pass,
        };
        match pass {
            Ok(pass) => {
                metrics::counter!("projector_audit_passes_total").increment(1);
                tracing::debug!(
                    accounts = pass.accounts,
                    repaired = pass.repaired,
                    entries = pass.entries,
                    behind = now.len(),
                    "ledger audit pass"
                );
                earlier = now;
            }
            Err(e) => {
                metrics::counter!("projector_audit_errors_total").increment(1);
                tracing::warn!(error = %common::error_chain(&e), "ledger audit pass failed; the next one starts over");
                // What this pass found is added to what was remembered.
                for (account, seq) in now.0 {
                    if earlier.0.len() >= REMEMBERED_MAX {
                        break;
                    }
                    earlier.0.insert(account, seq);
                }
            }
        }
    }
}

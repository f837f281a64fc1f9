//! Bringing one account's history up to date from the core (B18, B19).

use common::AccountId;
use common::events::LedgerEntry;
use sea_orm::{DatabaseConnection, DbErr};

use super::writer;
use crate::core_client::{CoreClient, CoreError};

/// Entries fetched per call to the core.
const PAGE: u32 = 1000;
/// Most pages one sync fetches (a million entries); the rest waits for the
/// projector or the next sync.
const MAX_PAGES: u32 = 1000;

/// Why a sync stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The core could not be read.
    #[error("reading entries from the core")]
    Core(#[from] CoreError),
    /// The channel database failed.
    #[error("writing the history")]
    Db(#[from] DbErr),
}

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// The history holds every seq up to here.
    pub synced_through_seq: i64,
    /// Entries written by this sync.
    pub applied: u64,
    /// Whether this sync cut back entries that were not the core's (the
    /// history then held them up to a seq it may no longer reach).
    pub cut: bool,
}

/// Fetches the entries after `synced_through_seq` from the core and applies
/// them through the writer, until the history reaches the core's last seq.
/// A history that holds more than the core's last seq (a forged event that
/// continued the balances, on an account that stayed quiet since) has the
/// entry after it checked against the core ([`repair_unless_the_cores`],
/// which asks the core again, so an entry made since stands) and, if it is
/// not the core's, is cut back to it (`cut`): `synced_through_seq` then
/// comes back lower than it was. Cut by another writer meanwhile, the
/// history is fetched again from where it now ends.
pub async fn sync_account(
    db: &DatabaseConnection,
    core: &CoreClient,
    account: &AccountId,
) -> Result<SyncReport, SyncError> {
    let mut applied = 0;
    let mut synced = writer::synced_through(db, account).await?;
    let (mut repaired, mut cut) = (false, false);
    for _ in 0..MAX_PAGES {
        let page = core.entries(account, synced, PAGE).await?;
        if page.entries.is_empty() {
            if page.last_seq < synced && !repaired {
                repaired = true;
                let (was_cut, now) =
                    cut_unless_the_cores(db, core, account, page.last_seq + 1).await?;
                cut |= was_cut;
                // Cut by this sync, or by another since the history's seq
                // was read: fetched again from where the history now ends.
                if now != synced {
                    synced = now;
                    continue;
                }
            }
            break;
        }
        let report = writer::apply(db, &page.entries).await?;
        applied += report.applied;
        let now = report
            .synced
            .get(account.as_str())
            .copied()
            .unwrap_or(synced);
        if now <= synced && synced > 0 && !repaired {
            // The core's next entry does not continue the history: the last
            // entry held may not be the core's.
            repaired = true;
            let (was_cut, now) = cut_unless_the_cores(db, core, account, synced).await?;
            if was_cut {
                cut = true;
                synced = now;
                continue;
            }
        }
        if now <= synced || now >= page.last_seq {
            synced = now;
            break;
        }
        synced = now;
    }
    metrics::counter!("history_sync_applied_total").increment(applied);
    Ok(SyncReport {
        synced_through_seq: synced,
        applied,
        cut,
    })
}

/// [`repair_unless_the_cores`] at `seq`, then where the history now ends
/// (lower if this check cut it, or another writer did meanwhile).
async fn cut_unless_the_cores(
    db: &DatabaseConnection,
    core: &CoreClient,
    account: &AccountId,
    seq: i64,
) -> Result<(bool, i64), SyncError> {
    let cut = repair_unless_the_cores(db, core, account, seq).await?.cut;
    Ok((cut, writer::synced_through(db, account).await?))
}

/// What [`repair_unless_the_cores`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCheck {
    /// The core's entry at that seq (none if the core has none).
    pub cores: Option<LedgerEntry>,
    /// Whether the history was cut back to before that seq.
    pub cut: bool,
}

/// Checks the history's entry at `seq` against the core's. If the core has
/// another entry at that seq, or none (also when it has no such account at
/// all), the history held an entry that is not the core's (a forged or
/// damaged event that continued the balances): the history is cut back to
/// before `seq`, and the caller fetches the core's entries again.
pub async fn repair_unless_the_cores(
    db: &DatabaseConnection,
    core: &CoreClient,
    account: &AccountId,
    seq: i64,
) -> Result<HeldCheck, SyncError> {
    let cores = match core.entries(account, seq - 1, 1).await {
        Ok(page) => page.entries.into_iter().find(|e| e.seq == seq),
        // The core keeps an account's entries with the account, so an
        // account it does not have has no entry of the core's.
        Err(e) if e.is_unknown_account() => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(entry) = &cores {
        // Given again, the core's entry is a duplicate checked against the
        // one held (or applied, if the history no longer holds that seq).
        let report = writer::apply(db, std::slice::from_ref(entry)).await?;
        if report.conflicts.is_empty() {
            return Ok(HeldCheck { cores, cut: false });
        }
    }
    // Checked again under the lock: another repair may have cut and fetched
    // the core's entries since.
    let cut = writer::truncate_from(db, account, seq, cores.as_ref()).await?;
    if cut {
        metrics::counter!("history_repairs_total").increment(1);
        tracing::error!(account = %account, seq, "the history held an entry that is not the core's; cut back to before it, to be fetched from the core again");
    }
    Ok(HeldCheck { cores, cut })
}

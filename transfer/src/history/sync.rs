//! Bringing one account's history up to date from the core (B18, B19).

use common::AccountId;
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
}

/// Fetches the entries after `synced_through_seq` from the core and applies
/// them through the writer, until the history reaches the core's last seq.
pub async fn sync_account(
    db: &DatabaseConnection,
    core: &CoreClient,
    account: &AccountId,
) -> Result<SyncReport, SyncError> {
    let mut applied = 0;
    let mut synced = writer::synced_through(db, account).await?;
    for _ in 0..MAX_PAGES {
        let page = core.entries(account, synced, PAGE).await?;
        if page.entries.is_empty() {
            break;
        }
        let report = writer::apply(db, &page.entries).await?;
        applied += report.applied;
        if !report.conflicts.is_empty() {
            // The core's own entries differ from what the history holds: the
            // projector repairs this when it meets it; say so loudly here.
            metrics::counter!("history_conflicts_total").increment(report.conflicts.len() as u64);
            tracing::error!(account = %account, first_seq = report.conflicts[0].seq, count = report.conflicts.len(), "the history holds entries that differ from the core's");
        }
        let now = report
            .synced
            .get(account.as_str())
            .copied()
            .unwrap_or(synced);
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
    })
}

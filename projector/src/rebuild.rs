//! `projector rebuild`: re-derives the channel history from the core.
//!
//! Accounts are read from the core a page at a time (never all ids at once)
//! and each is synced until its history reaches the core's last seq as read
//! with the account (one sync fetches at most a million entries; a longer
//! history takes several). With `reset`, an account's history is deleted
//! first and rebuilt from seq 1, but only once the core has answered for
//! that account: a core that cannot be read leaves the history as it was.
//! An account whose history was deleted and whose sync then failed is
//! reported failed; the ledger audit (`consume::audit`) also brings it back.

use common::AccountId;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{DatabaseConnection, DbErr};
use transfer::core_client::{CoreClient, CoreError};
use transfer::history::{sync::sync_account, writer};

/// Accounts read from the core per call.
const PAGE: u32 = 1000;

/// What a rebuild did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RebuildReport {
    /// Accounts processed.
    pub accounts: u64,
    /// Entries written.
    pub applied: u64,
    /// Accounts that failed (with why).
    pub failed: Vec<(String, String)>,
}

/// Why a rebuild stopped before its accounts were done (an account whose
/// own sync fails is listed in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The core's account list could not be read.
    #[error("listing accounts at the core")]
    Core(#[from] CoreError),
    /// An account's history could not be deleted.
    #[error("resetting an account's history")]
    Db(#[from] DbErr),
}

/// Rebuilds one account, or every account of the core, with a progress bar.
/// With `reset`, each account's history is deleted first and rebuilt from
/// seq 1 (see the module's docs).
pub async fn rebuild(
    db: &DatabaseConnection,
    core: &CoreClient,
    only: Option<AccountId>,
    reset: bool,
) -> Result<RebuildReport, RebuildError> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} rebuilding history [{bar:40}] {pos}/{len} accounts, {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut report = RebuildReport::default();
    if let Some(account) = only {
        bar.inc_length(1);
        let last_seq = match core.account(&account).await {
            Ok(a) => a.last_seq,
            Err(e) => {
                report
                    .failed
                    .push((account.to_string(), common::error_chain(&e)));
                bar.finish();
                return Ok(report);
            }
        };
        rebuild_one(db, core, &account, last_seq, reset, &mut report).await?;
        bar.inc(1);
    } else {
        let mut after: Option<String> = None;
        loop {
            let (page, next) = core.accounts(after.as_deref(), PAGE).await?;
            bar.inc_length(page.len() as u64);
            for a in &page {
                rebuild_one(db, core, &a.account_id, a.last_seq, reset, &mut report).await?;
                bar.set_message(format!("{} entries", report.applied));
                bar.inc(1);
            }
            match next {
                Some(n) if !page.is_empty() => after = Some(n),
                _ => break,
            }
        }
    }
    bar.finish();
    Ok(report)
}

/// Syncs `account` until its history reaches `last_seq` (the core's, read
/// with the account), deleting it first with `reset` once the core answered
/// for it.
async fn rebuild_one(
    db: &DatabaseConnection,
    core: &CoreClient,
    account: &AccountId,
    last_seq: i64,
    reset: bool,
    report: &mut RebuildReport,
) -> Result<(), RebuildError> {
    report.accounts += 1;
    if reset {
        // The core must answer for the account before its history goes.
        if let Err(e) = core.entries(account, 0, 1).await {
            report.failed.push((
                account.to_string(),
                format!(
                    "not reset: the core cannot be read: {}",
                    common::error_chain(&e)
                ),
            ));
            return Ok(());
        }
        writer::reset(db, account).await?;
    }
    loop {
        match sync_account(db, core, account).await {
            Ok(r) => {
                report.applied += r.applied;
                if r.synced_through_seq >= last_seq {
                    return Ok(());
                }
                if r.applied == 0 {
                    report.failed.push((
                        account.to_string(),
                        format!(
                            "the history stops at seq {} of the core's {last_seq}",
                            r.synced_through_seq
                        ),
                    ));
                    return Ok(());
                }
            }
            Err(e) => {
                report
                    .failed
                    .push((account.to_string(), common::error_chain(&e)));
                return Ok(());
            }
        }
    }
}

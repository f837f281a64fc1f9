//! `projector rebuild`: re-derives the channel history from the core.

use common::AccountId;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{DatabaseConnection, DbErr};
use transfer::core_client::{CoreClient, CoreError};
use transfer::history::{sync::sync_account, writer};

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
/// With `reset`, each account's history is deleted first and rebuilt from seq 1.
pub async fn rebuild(
    db: &DatabaseConnection,
    core: &CoreClient,
    only: Option<AccountId>,
    reset: bool,
) -> Result<RebuildReport, RebuildError> {
    let accounts = match only {
        Some(a) => vec![a],
        None => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (page, next) = core.account_ids(after.as_deref(), 1000).await?;
                all.extend(page);
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            all
        }
    };
    let bar = ProgressBar::new(accounts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} rebuilding history [{bar:40}] {pos}/{len} accounts, {msg} ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut report = RebuildReport::default();
    for account in accounts {
        if reset {
            writer::reset(db, &account).await?;
        }
        match sync_account(db, core, &account).await {
            Ok(r) => report.applied += r.applied,
            Err(e) => report
                .failed
                .push((account.to_string(), common::error_chain(&e))),
        }
        report.accounts += 1;
        bar.set_message(format!("{} entries", report.applied));
        bar.inc(1);
    }
    bar.finish();
    Ok(report)
}

//! `projector rebuild`: re-derives the channel history from the core.

use common::AccountId;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::DatabaseConnection;
use transfer::core_client::CoreClient;
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

/// Rebuilds one account, or every account of the core, with a progress bar.
/// With `reset`, each account's history is deleted first and rebuilt from seq 1.
pub async fn rebuild(
    db: &DatabaseConnection,
    core: &CoreClient,
    only: Option<AccountId>,
    reset: bool,
) -> anyhow::Result<RebuildReport> {
    let accounts = match only {
        Some(a) => vec![a],
        None => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (page, next) = core
                    .account_ids(after.as_deref(), 1000)
                    .await
                    .map_err(|e| anyhow::anyhow!("listing accounts at the core: {e}"))?;
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
            Err(e) => report.failed.push((account.to_string(), format!("{e:#}"))),
        }
        report.accounts += 1;
        bar.set_message(format!("{} entries", report.applied));
        bar.inc(1);
    }
    bar.finish();
    Ok(report)
}

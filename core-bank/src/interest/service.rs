//! The expected-interest query, shadow verification and the batch verifier.

use std::sync::Arc;

use chrono::NaiveDate;
use common::AccountId;
use common::events::InterestMismatchEvent;
use common::outbox::{self, OutboxMessage, RelayWaker};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::cache::{InterestCache, Lookup};
use super::rollout::Rollout;
use super::{AccountTerms, Accrual, InterestSettings, Path, daily, legacy};
use crate::clock::Clock;

/// How many times the verifier tries an account again after a transient
/// database error before the run fails.
const VERIFY_RETRIES: usize = 5;

/// Paid days the verifier compares besides the unpaid ones: an account paid
/// every day has no unpaid day, and its maintained daily balances would
/// otherwise never be compared with its history.
pub const VERIFY_PAID_DAYS: u64 = 31;

/// Errors of interest queries.
#[derive(Debug, thiserror::Error)]
pub enum InterestError {
    /// No such account.
    #[error("account not found")]
    AccountNotFound,
    /// The database failed.
    #[error("interest storage")]
    Db(#[from] DbErr),
}

/// A disagreement between the two paths.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Mismatch {
    /// The account.
    #[schema(value_type = String)]
    pub account_id: AccountId,
    /// Legacy figure.
    pub legacy: Accrual,
    /// New figure.
    pub new: Accrual,
    /// The legacy figure's interest before rounding down (a decimal text):
    /// a drift too small to move a whole won shows here.
    pub legacy_exact: String,
    /// The new figure's, likewise.
    pub new_exact: String,
}

/// Result of a verification run.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VerifyReport {
    /// Accounts compared.
    pub checked: u64,
    /// Accounts whose figures differ.
    pub mismatches: Vec<Mismatch>,
}

/// Interest queries of the core.
#[derive(Debug, Clone)]
pub struct InterestService {
    db: DatabaseConnection,
    clock: Clock,
    settings: InterestSettings,
    /// `settings` in their canonical text ([`InterestSettings::terms`]),
    /// written once: every payout records it.
    rates: Arc<str>,
    rollout: Rollout,
    cache: InterestCache,
    outbox: RelayWaker,
    shadow_tasks: TaskTracker,
    shadow_turns: Arc<Semaphore>,
    shadow_places: Arc<Semaphore>,
}

/// Shadow comparisons running at once in one process.
pub const SHADOW_CONCURRENCY: usize = 4;

/// Shadow comparisons waiting for a turn in one process; beyond them new
/// ones are skipped (`interest_shadow_skipped_total`) rather than queued
/// without bound in memory: comparisons come from queries and payouts, and
/// with the cache unavailable every query is one. What shadow mode skips,
/// `core-bank verify-interest` covers.
pub const SHADOW_QUEUE_MAX: usize = 64;

/// The two paths' figures for one account, when they disagree in shadow mode.
#[derive(Debug, Clone)]
pub struct ShadowMismatch {
    /// The legacy path's figure.
    pub legacy: Accrual,
    /// The new path's figure.
    pub new: Accrual,
    /// The business date of the calculation.
    pub as_of: NaiveDate,
}

impl InterestService {
    /// A service over the core database.
    pub fn new(
        db: DatabaseConnection,
        clock: Clock,
        settings: InterestSettings,
        rollout: Rollout,
        cache: InterestCache,
        outbox: RelayWaker,
    ) -> Self {
        Self {
            db,
            clock,
            rates: Arc::from(settings.terms()),
            settings,
            rollout,
            cache,
            outbox,
            shadow_tasks: TaskTracker::new(),
            shadow_turns: Arc::new(Semaphore::new(SHADOW_CONCURRENCY)),
            shadow_places: Arc::new(Semaphore::new(SHADOW_CONCURRENCY + SHADOW_QUEUE_MAX)),
        }
    }

    /// Wakes the outbox relay after a commit that wrote events.
    pub fn wake_relay(&self) {
        self.outbox.wake();
    }

    /// The cache (for invalidation by writers).
    pub fn cache(&self) -> &InterestCache {
        &self.cache
    }

    /// The rollout in force.
    pub fn rollout(&self) -> &Rollout {
        &self.rollout
    }

    /// The product settings.
    pub fn settings(&self) -> &InterestSettings {
        &self.settings
    }

    /// The settings in their canonical text ([`InterestSettings::terms`]).
    pub fn rates(&self) -> &str {
        &self.rates
    }

    /// Reads what the calculation needs about an account.
    pub async fn terms<C: ConnectionTrait>(
        conn: &C,
        account: &AccountId,
    ) -> Result<Option<AccountTerms>, DbErr> {
        let row = conn
            .query_one_raw(Statement::from_sql_and_values(
                conn.get_database_backend(),
                "SELECT opened_on, interest_paid_through FROM accounts WHERE account_id = $1",
                [account.to_string().into()],
            ))
            .await?;
        row.map(|r| {
            Ok(AccountTerms {
                account_id: account.clone(),
                opened_on: r.try_get("", "opened_on")?,
                paid_through: r.try_get("", "interest_paid_through")?,
            })
        })
        .transpose()
    }

    /// One path's figure.
    pub async fn compute<C: ConnectionTrait>(
        &self,
        conn: &C,
        terms: &AccountTerms,
        today: NaiveDate,
        path: Path,
    ) -> Result<Accrual, DbErr> {
        match path {
            Path::Legacy => legacy::accrue(conn, &self.settings, terms, today).await,
            Path::New => daily::accrue(conn, &self.settings, terms, today).await,
        }
    }

    /// The figure of the account's rollout bucket: the one the caller gets
    /// and a payout pays. The other path, in shadow mode, is
    /// [`shadow_check`](Self::shadow_check)'s.
    pub async fn compute_for_bucket<C: ConnectionTrait>(
        &self,
        conn: &C,
        terms: &AccountTerms,
        today: NaiveDate,
    ) -> Result<Accrual, DbErr> {
        let path = self.rollout.path_for(&terms.account_id);
        self.compute(conn, terms, today, path).await
    }

    /// Whether both paths run (B27).
    pub fn shadow_mode(&self) -> bool {
        self.rollout.get().shadow
    }

    /// Computes the path `chosen` did not take and reports a disagreement
    /// (B27; run by [`spawn_shadow_check`](Self::spawn_shadow_check)). It reads on a connection of the pool, never
    /// in the caller's transaction: the legacy path replays the period's
    /// history, which must neither hold the account's lock while it runs nor
    /// fail the payout or query whose figure is already decided. Its own
    /// failure is logged and counted (`interest_shadow_errors_total`), never
    /// returned.
    ///
    /// After a payout's transaction the figures of the completed days it
    /// paid do not change (the payout's entry, and every later one, is dated
    /// `today` or after), so the comparison reads what the payout read.
    async fn shadow_check(&self, terms: &AccountTerms, today: NaiveDate, chosen: &Accrual) {
        let other_path = chosen.path.other();
        let other = match self.compute(&self.db, terms, today, other_path).await {
            Ok(other) => other,
            Err(e) => {
                metrics::counter!("interest_shadow_errors_total").increment(1);
                tracing::warn!(
                    error = %common::error_chain(&e),
                    account = %terms.account_id,
                    path = other_path.as_str(),
                    "interest shadow calculation failed; the figure of the account's path stands"
                );
                return;
            }
        };
        if !chosen.same_figures(&other) {
            let (legacy, new) = match chosen.path {
                Path::Legacy => (chosen.clone(), other),
                Path::New => (other, chosen.clone()),
            };
            self.report_mismatch(&ShadowMismatch {
                legacy,
                new,
                as_of: today,
            })
            .await;
        }
    }

    /// In shadow mode, [`shadow_check`](Self::shadow_check) on a task of its own, tracked so
    /// that a clean shutdown waits for it ([`Self::shadow_tasks`]). At most
    /// [`SHADOW_CONCURRENCY`] run at once (each holds a pooled connection for
    /// a replay that may be long); at most [`SHADOW_QUEUE_MAX`] others wait
    /// for their turn, and the rest are skipped.
    pub fn spawn_shadow_check(&self, terms: AccountTerms, today: NaiveDate, chosen: Accrual) {
        if !self.shadow_mode() {
            return;
        }
        let Ok(place) = self.shadow_places.clone().try_acquire_owned() else {
            metrics::counter!("interest_shadow_skipped_total").increment(1);
            tracing::debug!(account = %terms.account_id, "shadow comparison skipped: too many waiting");
            return;
        };
        let this = self.clone();
        self.shadow_tasks.spawn(async move {
            let _place = place;
            let Ok(_turn) = this.shadow_turns.acquire().await else {
                return;
            };
            this.shadow_check(&terms, today, &chosen).await;
        });
    }

    /// The shadow checks running on tasks of their own.
    pub fn shadow_tasks(&self) -> &TaskTracker {
        &self.shadow_tasks
    }

    /// Reports a shadow disagreement: logged, counted, and published on
    /// `ALERTS` through the outbox.
    pub async fn report_mismatch(&self, m: &ShadowMismatch) {
        let ShadowMismatch {
            legacy,
            new,
            as_of: today,
        } = m;
        metrics::counter!("interest_shadow_mismatches_total").increment(1);
        tracing::warn!(
            account = %legacy.account_id,
            legacy_gross = %legacy.gross, new_gross = %new.gross,
            legacy_days = legacy.days, new_days = new.days,
            legacy_exact = %legacy.exact_gross(), new_exact = %new.exact_gross(),
            "interest shadow mismatch"
        );
        let event = InterestMismatchEvent {
            event_id: format!(
                "mismatch:{}:{today}:{}:{}",
                legacy.account_id, legacy.gross, new.gross
            ),
            account_id: legacy.account_id.clone(),
            legacy: legacy.gross,
            new: new.gross,
            as_of: *today,
        };
        // A transient database failure (a lock timeout, a lost connection)
        // is retried: the alert is the only trace of the mismatch outside
        // this process's log and metrics.
        let result = match OutboxMessage::from_event(&event) {
            Ok(msg) => common::db::retry_transient(9, || {
                outbox::enqueue(&self.db, std::slice::from_ref(&msg))
            })
            .await
            .map_err(|e| common::error_chain(&e)),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => self.outbox.wake(),
            Err(e) => {
                tracing::error!(error = %e, account = %legacy.account_id, "could not publish interest mismatch alert")
            }
        }
    }

    /// Expected interest for the completed unpaid days, through the cache.
    pub async fn expected(&self, account: &AccountId) -> Result<Accrual, InterestError> {
        let today = self.clock.today();
        let path = self.rollout.path_for(account);
        let generation = match self.cache.get(account, today, path).await {
            Lookup::Hit(a) => {
                metrics::counter!("interest_cache_hits_total").increment(1);
                return Ok(a);
            }
            Lookup::Miss { generation } => {
                metrics::counter!("interest_cache_misses_total").increment(1);
                Some(generation)
            }
            Lookup::Unavailable => {
                metrics::counter!("interest_cache_fallbacks_total").increment(1);
                None
            }
        };
        let terms = Self::terms(&self.db, account)
            .await?
            .ok_or(InterestError::AccountNotFound)?;
        let accrual = self.compute_for_bucket(&self.db, &terms, today).await?;
        if let Some(generation) = generation {
            self.cache
                .put(
                    &accrual,
                    today,
                    generation,
                    self.clock.secs_until_midnight(),
                )
                .await;
        }
        self.spawn_shadow_check(terms, today, accrual.clone());
        Ok(accrual)
    }

    /// Compares both paths over all accounts, or over `sample` random ones,
    /// calling `progress(done, total)` as it goes.
    pub async fn verify(
        &self,
        sample: Option<u64>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, DbErr> {
        let today = self.clock.today();
        let ids = self.accounts_to_verify(sample).await?;
        let total = ids.len() as u64;
        let mut report = VerifyReport {
            checked: 0,
            mismatches: Vec::new(),
        };
        for id in ids {
            // A transient failure (a lock timeout behind a migration, a
            // connection lost) is tried again for this account, so a long
            // run over every account does not end at the first blip.
            let compared =
                common::db::retry_transient(VERIFY_RETRIES, || self.compare(&id, today)).await?;
            if let Some(m) = compared {
                self.report_mismatch(&m).await;
                report.mismatches.push(Mismatch {
                    account_id: id,
                    legacy_exact: m.legacy.exact_gross(),
                    new_exact: m.new.exact_gross(),
                    legacy: m.legacy,
                    new: m.new,
                });
            }
            report.checked += 1;
            progress(report.checked, total);
        }
        Ok(report)
    }

    /// Both paths' figures for `id` as of `today`, when they differ: over
    /// the unpaid days and at least the last [`VERIFY_PAID_DAYS`] days
    /// (yesterday included), paid or not (the figures then cover more than
    /// a payout would pay; `from` says from when).
    async fn compare(
        &self,
        id: &AccountId,
        today: NaiveDate,
    ) -> Result<Option<ShadowMismatch>, DbErr> {
        let Some(mut terms) = Self::terms(&self.db, id).await? else {
            return Ok(None);
        };
        let window_start = today
            .checked_sub_days(chrono::Days::new(VERIFY_PAID_DAYS + 1))
            .unwrap_or(today);
        terms.paid_through = terms.paid_through.map(|p| p.min(window_start));
        let legacy = self.compute(&self.db, &terms, today, Path::Legacy).await?;
        let new = self.compute(&self.db, &terms, today, Path::New).await?;
        Ok((!legacy.same_figures(&new)).then_some(ShadowMismatch {
            legacy,
            new,
            as_of: today,
        }))
    }

    async fn accounts_to_verify(&self, sample: Option<u64>) -> Result<Vec<AccountId>, DbErr> {
        let sql = match sample {
            Some(n) => Statement::from_sql_and_values(
                self.db.get_database_backend(),
                "SELECT account_id FROM accounts ORDER BY random() LIMIT $1",
                [(n.min(i64::MAX as u64) as i64).into()],
            ),
            None => Statement::from_string(
                self.db.get_database_backend(),
                "SELECT account_id FROM accounts ORDER BY account_id",
            ),
        };
        let rows = self.db.query_all_raw(sql).await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("", "account_id")?;
                AccountId::parse(id).map_err(|e| DbErr::Custom(format!("stored account id: {e}")))
            })
            .collect()
    }
}

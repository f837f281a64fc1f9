//! The expected-interest cache in Redis (B25).
//!
//! Key `bank:interest:<account>:<business date>:<path>`, expiring at the next
//! local midnight: a new business date reads a new key, so the database is
//! read at most once a day per account. The calculation path is part of the
//! key, so a rollout change (B26) takes effect at once for accounts already
//! cached: a rolled-back account reads the legacy path's own entry. In shadow
//! mode a hit runs neither path; both are compared when the figure is
//! computed, at every payout and by the verifier. A value also carries the
//! rates it was computed under (`INTEREST_TIERS`, `INTEREST_TAX_PERCENT`):
//! while a rate change rolls out, a replica never serves a figure another
//! one computed under the other rates.
//!
//! Invalidation (after a payout or any balance change) sets the account's
//! generation `bank:interest-gen:<account>` to a fresh random token; each
//! cached value carries the generation it was computed under, and a value
//! whose generation is not the current one is a miss. A slow reader that
//! stores a figure computed before a payout therefore never serves it. A
//! missing generation (never set, expired, or evicted under any
//! `maxmemory-policy`) is a miss too, and the next store sets a fresh token
//! only if none exists (`SET NX`): a value cached under a generation that is
//! gone can never match again, so eviction cannot bring back a figure from
//! before a payout. Generations expire after [`GENERATION_TTL_SECS`], longer
//! than any value lives (values expire at the next midnight). A payout answers only
//! after its increment reached Redis ([`InterestCache::invalidate_now`]), so
//! no replica serves the pre-payout figure once the customer has the answer;
//! a payout cut off before its outcome is known (a lost COMMIT answer, the
//! request dropped) queues the increment anyway, as it may have committed,
//! and makes it again a few seconds later, after a COMMIT in flight landed;
//! balance changes (which do not change the figure for completed days) are
//! applied in the background.
//!
//! Redis is optional at run time: any Redis error makes the query answer from
//! the database (counted in `interest_cache_fallbacks_total`). The connection
//! manager reconnects by itself; if Redis was down at start-up, a connection
//! is attempted again at most once a second. Invalidations that could not be
//! applied are retried by a background task until Redis answers (and once more
//! at shutdown); until then the affected accounts bypass the cache in this
//! process. If Redis is unreachable from this replica only, or the process
//! dies before Redis answers, other replicas may serve the older figure until
//! the increment lands or the key expires at midnight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use common::AccountId;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Accrual, Path};

/// Most balance-change invalidations waiting for Redis; beyond it new ones
/// are dropped with a warning. A balance change does not change the figure
/// of completed days, so a dropped one costs nothing but freshness.
const MAX_PENDING_INVALIDATIONS: usize = 100_000;

/// Most invalidations of any kind waiting for Redis. Those of payouts and
/// account changes (which do change what a query must answer) are kept up to
/// this bound, past the one above: a Redis outage long enough to reach it
/// would have to see 100,000 of them.
const MAX_PENDING_KEPT_INVALIDATIONS: usize = 2 * MAX_PENDING_INVALIDATIONS;

/// How much an invalidation matters when the pending set is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// A balance change: completed days' figures are unchanged.
    Droppable,
    /// A payout or an account change: the cached figure is wrong now.
    Kept,
}

/// How long a generation lives after it was set; cached values live until
/// the next local midnight, so at most about a day.
const GENERATION_TTL_SECS: u64 = 3 * 24 * 3600;

/// When an account's generation is moved a second time after a change whose
/// outcome was not known ([`InterestCache::invalidate_unsettled`]). A COMMIT
/// the server received lands within a WAL flush, milliseconds; this covers a
/// disk that stalls for seconds.
pub const UNSETTLED_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// A fresh generation: random, so a generation that was lost (expired or
/// evicted) is never issued again.
fn new_generation() -> i64 {
    (rand::random::<u64>() >> 1) as i64
}

/// The answer of a cache lookup.
#[derive(Debug)]
pub enum Lookup {
    /// A current figure.
    Hit(Accrual),
    /// No current figure; store the computed one under this generation.
    Miss {
        /// The account's generation when looked up; none if Redis has none
        /// (the store then sets one, unless another appeared meanwhile).
        generation: Option<i64>,
    },
    /// Redis could not be asked.
    Unavailable,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    generation: i64,
    /// The rates it was computed under ([`super::calc::InterestSettings::terms`]);
    /// a value without them (written before they were kept) is a miss.
    #[serde(default)]
    terms: String,
    accrual: Accrual,
}

/// The cache.
#[derive(Clone)]
pub struct InterestCache {
    client: Option<redis::Client>,
    /// The rates figures are computed under here.
    terms: Arc<str>,
    /// Second invalidations waiting for their time.
    unsettled: TaskTracker,
    /// Set once the first connection succeeds; the manager reconnects by
    /// itself after that, so lookups read it without a lock.
    conn: Arc<OnceCell<ConnectionManager>>,
    last_attempt: Arc<Mutex<Option<Instant>>>,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<tokio::sync::Notify>,
}

/// Accounts whose generation increment has not reached Redis yet, each with
/// the version of its latest invalidation: an account invalidated again while
/// an increment is in flight stays pending after that increment lands, since
/// a reader may have taken the new generation before the second change.
#[derive(Debug, Default)]
struct Pending {
    accounts: HashMap<String, u64>,
    next_version: u64,
}

impl Pending {
    /// Marks `accounts` as invalidated (again) and returns them with their
    /// new versions, to increment. When the set is full for `urgency`, new
    /// accounts are dropped with a warning (their keys still expire at
    /// midnight).
    fn add(&mut self, accounts: &[AccountId], urgency: Urgency) -> Vec<(String, u64)> {
        let limit = match urgency {
            Urgency::Droppable => MAX_PENDING_INVALIDATIONS,
            Urgency::Kept => MAX_PENDING_KEPT_INVALIDATIONS,
        };
        let mut added = Vec::with_capacity(accounts.len());
        for id in accounts {
            if self.accounts.len() >= limit && !self.accounts.contains_key(id.as_str()) {
                match urgency {
                    Urgency::Droppable => {
                        tracing::warn!(account = %id, "too many queued interest cache invalidations; dropping a balance change's")
                    }
                    Urgency::Kept => {
                        tracing::error!(account = %id, "too many queued interest cache invalidations; dropping a payout's or an account change's: other replicas may serve the older figure until midnight")
                    }
                }
                continue;
            }
            self.next_version += 1;
            self.accounts.insert(id.to_string(), self.next_version);
            added.push((id.to_string(), self.next_version));
        }
        added
    }

    /// Up to `n` pending accounts with their versions, to increment.
    fn take(&self, n: usize) -> Vec<(String, u64)> {
        self.accounts
            .iter()
            .take(n)
            .map(|(id, v)| (id.clone(), *v))
            .collect()
    }

    /// Forgets the accounts whose increments landed, unless invalidated again
    /// since they were taken.
    fn done(&mut self, landed: &[(String, u64)]) {
        for (id, version) in landed {
            if self.accounts.get(id) == Some(version) {
                self.accounts.remove(id);
            }
        }
    }
}

impl std::fmt::Debug for InterestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterestCache").finish_non_exhaustive()
    }
}

fn key(account: &AccountId, date: NaiveDate, path: Path) -> String {
    format!("bank:interest:{account}:{date}:{}", path.as_str())
}

fn gen_key(account: &str) -> String {
    format!("bank:interest-gen:{account}")
}

impl InterestCache {
    /// A cache over the Redis at `url` (connects lazily), of figures computed
    /// under the rates `terms`: a figure another replica cached under other
    /// rates (a rate change rolling out) is a miss, not served.
    pub fn new(url: &str, terms: String) -> Self {
        let client = match redis::Client::open(url) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "invalid REDIS_URL; the interest cache is disabled");
                None
            }
        };
        Self {
            client,
            terms: Arc::from(terms),
            unsettled: TaskTracker::new(),
            conn: Arc::new(OnceCell::new()),
            last_attempt: Arc::new(Mutex::new(None)),
            pending: Arc::new(Mutex::new(Pending::default())),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.conn.get() {
            return Some(c.clone());
        }
        {
            let mut last = self.last_attempt.lock().ok()?;
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let client = self.client.clone()?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        // Callers arriving during this attempt were turned away by the
        // throttle above (they answer from the database); one connection is
        // opened.
        match self
            .conn
            .get_or_try_init(|| ConnectionManager::new_with_config(client, config))
            .await
        {
            Ok(c) => Some(c.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable; interest queries read the database");
                None
            }
        }
    }

    fn bypass(&self, account: &AccountId) -> bool {
        self.pending
            .lock()
            .map(|p| p.accounts.contains_key(account.as_str()))
            .unwrap_or(true)
    }

    /// Looks up the figure of `account` for business date `date` computed by
    /// `path`.
    pub async fn get(&self, account: &AccountId, date: NaiveDate, path: Path) -> Lookup {
        if self.bypass(account) {
            return Lookup::Unavailable;
        }
        let Some(mut conn) = self.connection().await else {
            return Lookup::Unavailable;
        };
        let res: Result<(Option<String>, Option<i64>), _> = redis::pipe()
            .get(key(account, date, path))
            .get(gen_key(account.as_str()))
            .query_async(&mut conn)
            .await;
        let (value, generation) = match res {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "redis lookup failed");
                return Lookup::Unavailable;
            }
        };
        match value.map(|v| serde_json::from_str::<Cached>(&v)) {
            Some(Ok(c)) if Some(c.generation) == generation && *c.terms == *self.terms => {
                Lookup::Hit(c.accrual)
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, %account, "unreadable cached interest; recomputing");
                Lookup::Miss { generation }
            }
            _ => Lookup::Miss { generation },
        }
    }

    /// Stores a figure computed under `generation`, expiring after
    /// `ttl_secs`. With no generation, it first sets a fresh one if the
    /// account still has none, and stores nothing if another appeared (an
    /// invalidation may have come between the lookup and now).
    pub async fn put(
        &self,
        accrual: &Accrual,
        date: NaiveDate,
        generation: Option<i64>,
        ttl_secs: u64,
    ) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let generation = match generation {
            Some(g) => g,
            None => {
                let fresh = new_generation();
                let set: Result<Option<String>, _> = redis::cmd("SET")
                    .arg(gen_key(accrual.account_id.as_str()))
                    .arg(fresh)
                    .arg("NX")
                    .arg("EX")
                    .arg(GENERATION_TTL_SECS)
                    .query_async(&mut conn)
                    .await;
                match set {
                    Ok(Some(_)) => fresh,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "redis generation store failed");
                        return;
                    }
                }
            }
        };
        let cached = Cached {
            generation,
            terms: self.terms.to_string(),
            accrual: accrual.clone(),
        };
        let Ok(value) = serde_json::to_string(&cached) else {
            return;
        };
        let res: Result<(), _> = conn
            .set_ex(
                key(&accrual.account_id, date, accrual.path),
                value,
                ttl_secs,
            )
            .await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "redis store failed");
        }
    }

    /// Invalidates the cached figures of `accounts`. The accounts bypass the
    /// cache in this process at once; the generations are bumped in Redis by
    /// [`InterestCache::run_invalidations`] (coalesced, retried until Redis
    /// answers).
    pub fn invalidate(&self, accounts: &[AccountId]) {
        self.queue(accounts, Urgency::Droppable);
        self.wake.notify_one();
    }

    /// Like [`Self::invalidate_now`], without waiting for Redis: for a
    /// change whose outcome is not known (a payout abandoned or failed after
    /// it may have committed). An invalidation that was not needed costs one
    /// cache miss.
    fn invalidate_kept(&self, accounts: &[AccountId]) {
        self.queue(accounts, Urgency::Kept);
        self.wake.notify_one();
    }

    /// For a change whose outcome is not known (a payout cut off while its
    /// COMMIT may be on its way): [`Self::invalidate_kept`] now, and again
    /// after [`UNSETTLED_AGAIN_AFTER`]. A COMMIT the server received but had
    /// not answered may land after the first increment; a query in between
    /// computes the figure from before it and caches it under the new
    /// generation, and the second increment ends that figure's life. The
    /// second one is tracked ([`Self::unsettled_tasks`]): a clean shutdown
    /// waits for it.
    pub fn invalidate_unsettled(&self, accounts: &[AccountId]) {
        self.invalidate_kept(accounts);
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (cache, accounts) = (self.clone(), accounts.to_vec());
        self.unsettled.spawn(async move {
            tokio::time::sleep(UNSETTLED_AGAIN_AFTER).await;
            cache.invalidate_kept(&accounts);
        });
    }

    /// The second invalidations of [`Self::invalidate_unsettled`] still to
    /// come; a shutdown closes and waits for them (at most
    /// [`UNSETTLED_AGAIN_AFTER`]) before the last flush of
    /// [`Self::run_invalidations`].
    pub fn unsettled_tasks(&self) -> &TaskTracker {
        &self.unsettled
    }

    /// Invalidates the cached figures of `accounts` after a change of what
    /// they must answer (a payout, an account's state), and returns once the
    /// generations are bumped in Redis, or once that failed (bounded by the
    /// connection's 500 ms response timeout); what failed is left to
    /// [`InterestCache::run_invalidations`], as with [`Self::invalidate`],
    /// and is not dropped when balance changes fill the queue.
    pub async fn invalidate_now(&self, accounts: &[AccountId]) {
        let queued = self.queue(accounts, Urgency::Kept);
        if !queued.is_empty() && !self.bump_generations(&queued).await {
            self.wake.notify_one();
        }
    }

    /// Adds `accounts` to the pending set (they bypass the cache in this
    /// process from now on); returns them with their versions.
    fn queue(&self, accounts: &[AccountId], urgency: Urgency) -> Vec<(String, u64)> {
        match self.pending.lock() {
            Ok(mut p) => p.add(accounts, urgency),
            Err(_) => Vec::new(),
        }
    }

    /// Up to 1,000 pending accounts with their versions.
    fn next_batch(&self) -> Vec<(String, u64)> {
        self.pending
            .lock()
            .map(|p| p.take(1000))
            .unwrap_or_default()
    }

    /// Gives `taken` fresh generations in one pipeline and forgets those not
    /// invalidated again meanwhile; false if Redis failed.
    async fn bump_generations(&self, taken: &[(String, u64)]) -> bool {
        let Some(mut conn) = self.connection().await else {
            return false;
        };
        let mut pipe = redis::pipe();
        for (id, _) in taken {
            pipe.set_ex(gen_key(id), new_generation(), GENERATION_TTL_SECS)
                .ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.done(taken);
                }
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis invalidation failed; will retry");
                false
            }
        }
    }

    /// Applies queued invalidations in batches of up to 1,000, woken by
    /// [`InterestCache::invalidate`] and retrying every second while Redis
    /// fails, until `shutdown`; then makes one last attempt, so a clean stop
    /// leaves nothing behind that Redis could take.
    pub async fn run_invalidations(self, shutdown: CancellationToken) {
        loop {
            let taken = self.next_batch();
            if !taken.is_empty() && self.bump_generations(&taken).await {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        loop {
            let taken = self.next_batch();
            if taken.is_empty() {
                return;
            }
            if !self.bump_generations(&taken).await {
                tracing::warn!(
                    accounts = taken.len(),
                    "interest cache invalidations not applied at shutdown; other replicas may serve older figures until midnight"
                );
                return;
            }
        }
    }

    /// Checks Redis with a PING.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.connection().await.ok_or("redis unreachable")?;
        conn.ping::<String>()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<AccountId> {
        names
            .iter()
            .map(|n| AccountId::parse(*n).unwrap())
            .collect()
    }

    /// An account invalidated again while its increment is in flight must
    /// stay pending: a reader may have taken the incremented generation and
    /// stored a figure from before the second change.
    #[test]
    fn b25_an_invalidation_during_an_increment_is_not_lost() {
        let mut p = Pending::default();
        p.add(&ids(&["acc_a", "acc_b"]), Urgency::Droppable);
        let in_flight = p.take(1000);
        p.add(&ids(&["acc_a"]), Urgency::Droppable);
        p.done(&in_flight);
        assert!(
            p.accounts.contains_key("acc_a"),
            "re-invalidated: still pending"
        );
        assert!(!p.accounts.contains_key("acc_b"), "landed: forgotten");
        let again = p.take(1000);
        assert_eq!(again.len(), 1);
        p.done(&again);
        assert!(p.accounts.is_empty());
    }

    /// Balance changes filling the queue (Redis down for long) never crowd
    /// out a payout's invalidation.
    #[test]
    fn b25_a_full_queue_of_balance_changes_still_takes_a_payouts_invalidation() {
        let mut p = Pending::default();
        let many: Vec<AccountId> = (0..MAX_PENDING_INVALIDATIONS)
            .map(|i| AccountId::parse(format!("acc_{i:06}")).unwrap())
            .collect();
        assert_eq!(p.add(&many, Urgency::Droppable).len(), many.len());
        assert!(
            p.add(&ids(&["acc_moved"]), Urgency::Droppable).is_empty(),
            "a balance change is dropped"
        );
        assert_eq!(p.add(&ids(&["acc_paid"]), Urgency::Kept).len(), 1);
        assert!(p.accounts.contains_key("acc_paid"));
        assert!(!p.accounts.contains_key("acc_moved"));
        // Already pending: invalidated again whatever the size.
        assert_eq!(p.add(&many[..1], Urgency::Droppable).len(), 1);
    }
}

//! The expected-interest cache in Redis (B25).
//!
//! Key `bank:interest:<account>:<business date>`, expiring at the next local
//! midnight: a new business date reads a new key, so the database is read at
//! most once a day per account. Invalidation (after a payout or any balance
//! change) increments the account's generation `bank:interest-gen:<account>`;
//! each cached value carries the generation it was computed under, and a value
//! whose generation is not the current one is a miss. A slow reader that
//! stores a figure computed before a payout therefore never serves it.
//!
//! Redis is optional at run time: any Redis error makes the query answer from
//! the database (counted in `interest_cache_fallbacks_total`). The connection
//! manager reconnects by itself; if Redis was down at start-up, a connection
//! is attempted again at most once a second. Invalidations are applied by a background
//! task that retries until Redis answers; until then the affected accounts
//! bypass the cache in this process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use common::AccountId;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::Accrual;

/// Most invalidations waiting for Redis; beyond it new ones are dropped with
/// a warning (their keys still expire at midnight).
const MAX_PENDING_INVALIDATIONS: usize = 100_000;

/// The answer of a cache lookup.
#[derive(Debug)]
pub enum Lookup {
    /// A current figure.
    Hit(Accrual),
    /// No current figure; store the computed one under this generation.
    Miss {
        /// The account's generation when looked up.
        generation: i64,
    },
    /// Redis could not be asked.
    Unavailable,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    generation: i64,
    accrual: Accrual,
}

/// The cache.
#[derive(Clone)]
pub struct InterestCache {
    client: Option<redis::Client>,
    /// Set once the first connection succeeds; the manager reconnects by
    /// itself after that, so lookups read it without a lock.
    conn: Arc<OnceCell<ConnectionManager>>,
    last_attempt: Arc<Mutex<Option<Instant>>>,
    pending: Arc<Mutex<HashSet<String>>>,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for InterestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterestCache").finish_non_exhaustive()
    }
}

fn key(account: &AccountId, date: NaiveDate) -> String {
    format!("bank:interest:{account}:{date}")
}

fn gen_key(account: &str) -> String {
    format!("bank:interest-gen:{account}")
}

impl InterestCache {
    /// A cache over the Redis at `url` (connects lazily).
    pub fn new(url: &str) -> Self {
        let client = match redis::Client::open(url) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "invalid REDIS_URL; the interest cache is disabled");
                None
            }
        };
        Self {
            client,
            conn: Arc::new(OnceCell::new()),
            last_attempt: Arc::new(Mutex::new(None)),
            pending: Arc::new(Mutex::new(HashSet::new())),
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
            .map(|p| p.contains(account.as_str()))
            .unwrap_or(true)
    }

    /// Looks up the figure of `account` for business date `date`.
    pub async fn get(&self, account: &AccountId, date: NaiveDate) -> Lookup {
        if self.bypass(account) {
            return Lookup::Unavailable;
        }
        let Some(mut conn) = self.connection().await else {
            return Lookup::Unavailable;
        };
        let res: Result<(Option<String>, Option<i64>), _> = redis::pipe()
            .get(key(account, date))
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
        let generation = generation.unwrap_or(0);
        match value.map(|v| serde_json::from_str::<Cached>(&v)) {
            Some(Ok(c)) if c.generation == generation => Lookup::Hit(c.accrual),
            Some(Err(e)) => {
                tracing::warn!(error = %e, %account, "unreadable cached interest; recomputing");
                Lookup::Miss { generation }
            }
            _ => Lookup::Miss { generation },
        }
    }

    /// Stores a figure computed under `generation`, expiring after `ttl_secs`.
    pub async fn put(&self, accrual: &Accrual, date: NaiveDate, generation: i64, ttl_secs: u64) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let cached = Cached {
            generation,
            accrual: accrual.clone(),
        };
        let Ok(value) = serde_json::to_string(&cached) else {
            return;
        };
        let res: Result<(), _> = conn
            .set_ex(key(&accrual.account_id, date), value, ttl_secs)
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
        if accounts.is_empty() {
            return;
        }
        if let Ok(mut p) = self.pending.lock() {
            for id in accounts {
                if p.len() < MAX_PENDING_INVALIDATIONS {
                    p.insert(id.to_string());
                } else {
                    tracing::warn!(account = %id, "too many queued interest cache invalidations; dropping one");
                }
            }
        }
        self.wake.notify_one();
    }

    async fn bump_generations(&self, ids: &[String]) -> bool {
        let Some(mut conn) = self.connection().await else {
            return false;
        };
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.incr(gen_key(id), 1).ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "redis invalidation failed; will retry");
                false
            }
        }
    }

    /// Applies queued invalidations in batches of up to 1,000, woken by
    /// [`InterestCache::invalidate`] and retrying every second while Redis
    /// fails, until `shutdown`.
    pub async fn run_invalidations(self, shutdown: CancellationToken) {
        loop {
            let ids: Vec<String> = match self.pending.lock() {
                Ok(p) => p.iter().take(1000).cloned().collect(),
                Err(_) => Vec::new(),
            };
            if !ids.is_empty() && self.bump_generations(&ids).await {
                if let Ok(mut p) = self.pending.lock() {
                    for id in &ids {
                        p.remove(id);
                    }
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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

//! Configuration of the transfer service (API.md).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser};
use common::config::{HttpArgs, NatsArgs, PoolArgs, RelayArgs, TelemetryArgs};

use crate::core_client::CoreLinkArgs;

/// The transfer service: the customer channel.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "transfer",
    version,
    about = "Transfer service: customer transfers, history and interest"
)]
pub struct Cli {
    /// What to do; with none, serve.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings.
    #[command(flatten)]
    pub config: Config,
}

/// Sub-commands besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print a customer token signed with AUTH_JWT_SECRET (for demos and
    /// tests; production tokens come from the bank's identity provider).
    IssueToken {
        /// The customer id (the token's `sub`).
        #[arg(long)]
        customer: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

/// Every setting of the transfer service.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(
        long = "http-addr",
        env = "TRANSFER_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// PostgreSQL database of the channel.
    #[arg(
        long = "database-url",
        env = "CHANNEL_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/bank_channel?sslmode=disable",
        hide_env_values = true
    )]
    pub database_url: common::config::Secret,
    /// How to reach the core.
    #[command(flatten)]
    pub core: CoreLinkArgs,
    /// HS256 secret of customer tokens.
    #[arg(
        long = "jwt-secret",
        env = "AUTH_JWT_SECRET",
        default_value = "dev-jwt-secret",
        hide_env_values = true
    )]
    pub jwt_secret: common::config::Secret,
    /// Request TTL; must equal the core's. (1 s to 1 day)
    #[arg(
        long = "request-ttl-secs",
        env = "REQUEST_TTL_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub request_ttl_secs: u64,
    /// How long a transfer request waits for the core before answering 202.
    /// (100 ms to 10 minutes)
    #[arg(
        long = "core-timeout-ms",
        env = "CORE_TIMEOUT_MS",
        default_value_t = 3_000,
        value_parser = clap::value_parser!(u64).range(100..=600_000)
    )]
    pub core_timeout_ms: u64,
    /// How often stuck pending transfers are checked. (10 ms to 1 day)
    #[arg(
        long = "reconcile-interval-ms",
        env = "RECONCILE_INTERVAL_MS",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(10..=86_400_000)
    )]
    pub reconcile_interval_ms: u64,
    /// Safety margin after the TTL before a pending transfer is fenced.
    /// (0 to 10 minutes)
    #[arg(long, env = "RECONCILE_FENCE_MARGIN_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub fence_margin_ms: u64,
    /// How long account ownership read from the core is cached.
    #[arg(long, env = "OWNERSHIP_CACHE_SECS", default_value_t = 30)]
    pub ownership_cache_secs: u64,
    /// HTTP server limits.
    #[command(flatten)]
    pub http: HttpArgs,
    /// NATS.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Outbox relay.
    #[command(flatten)]
    pub relay: RelayArgs,
    /// Database pool.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Logs and traces.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl Config {
    /// Defaults for every setting (used by tests, which override what they need).
    pub fn defaults() -> Self {
        Cli::parse_from(["transfer"]).config
    }

    /// The request TTL.
    pub fn request_ttl(&self) -> Duration {
        Duration::from_secs(self.request_ttl_secs)
    }

    /// How long after `requested_at` a pending transfer is fenced.
    pub fn fence_after(&self) -> Duration {
        self.request_ttl() + Duration::from_millis(self.fence_margin_ms)
    }

    /// What a transfer's execution is given once its pending row is
    /// written: the core's wait, a fence call, and 2 s for its database
    /// statements (`CORE_TIMEOUT_MS` + 7 s). The calls to the core are
    /// bounded by it; the statements only by the database's statement
    /// timeout, so a stalled database can take longer. Shutdown waits this
    /// long at most for the tasks that outlived their answers, storing or
    /// executing (one cut short leaves a pending row, if any, for the next
    /// process's reconciler: it fences or settles it).
    pub fn execution_bound(&self) -> Duration {
        Duration::from_millis(self.core_timeout_ms) + CORE_CALL_TIMEOUT + REQUEST_TIMEOUT_MARGIN
    }

    /// Refuses settings under which a transfer request would not have time
    /// for its calls to the core before its answer is due (the HTTP request
    /// timeout less [`REQUEST_TIMEOUT_MARGIN`]): it waits at most `CORE_TIMEOUT_MS` for
    /// the core, then (when the core rejected it on the way)
    /// [`CORE_CALL_TIMEOUT`] for the fence. (The answer itself is due in
    /// time whatever the calls and the database wait on: after its pending
    /// row is written a request answers 202 at the deadline, never the 503
    /// of the HTTP timeout.)
    pub fn check(&self) -> Result<(), String> {
        let least = self.execution_bound();
        if self.http.request_timeout() < least {
            return Err(format!(
                "HTTP_REQUEST_TIMEOUT_MS ({}) must be at least CORE_TIMEOUT_MS ({}) + {} ms \
                 (a fence call) + {} ms: {} ms",
                self.http.http_request_timeout_ms,
                self.core_timeout_ms,
                CORE_CALL_TIMEOUT.as_millis(),
                REQUEST_TIMEOUT_MARGIN.as_millis(),
                least.as_millis()
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Settings that are allowed but break a promise, each as a sentence for
    /// the log: the pool's ([`common::config::PoolArgs::warnings`]), and a
    /// fence margin and reconciler period that together exceed 4 s, which
    /// fail a transfer the core never saw later than SPEC B11's
    /// `REQUEST_TTL_SECS` + 5 s (the reconciler finds it up to one period
    /// after the margin, then fences it with a call to the core).
    ///
    /// And a fence sooner after a request than its answer's deadline plus
    /// the time a transfer answered 503 may take to be withdrawn
    /// (`transfers::service::SETTLED_AFTER_ANSWER`, by when its last
    /// withdrawal starts, and `DATABASE_LOCK_TIMEOUT_MS`, the longest that
    /// statement waits for the account's lock):
    /// such a transfer, whose store's outcome was unknown, may then be
    /// fenced first, failed `never_received` with its `Idempotency-Key`
    /// kept, so the retry the 503 invites gets that failure instead of
    /// making the transfer.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.pool.warnings();
        let withdrawn_by = self
            .http
            .request_timeout()
            .saturating_sub(REQUEST_TIMEOUT_MARGIN)
            .saturating_add(crate::transfers::service::SETTLED_AFTER_ANSWER)
            .saturating_add(Duration::from_millis(self.pool.db_lock_timeout_ms));
        if self.fence_after() <= withdrawn_by {
            warnings.push(format!(
                "REQUEST_TTL_SECS ({}) + RECONCILE_FENCE_MARGIN_MS ({}) do not exceed \
                 HTTP_REQUEST_TIMEOUT_MS ({}) - {} ms + {} ms + DATABASE_LOCK_TIMEOUT_MS ({}): \
                 a transfer answered 503 while its \
                 store's outcome was unknown may be fenced before it is withdrawn, and a retry \
                 with its Idempotency-Key then gets that failure instead of making the transfer",
                self.request_ttl_secs,
                self.fence_margin_ms,
                self.http.http_request_timeout_ms,
                REQUEST_TIMEOUT_MARGIN.as_millis(),
                crate::transfers::service::SETTLED_AFTER_ANSWER.as_millis(),
                self.pool.db_lock_timeout_ms
            ));
        }
        let late = self
            .fence_margin_ms
            .saturating_add(self.reconcile_interval_ms);
        if late > B11_FENCE_BUDGET_MS {
            warnings.push(format!(
                "RECONCILE_FENCE_MARGIN_MS ({}) + RECONCILE_INTERVAL_MS ({}) exceed {B11_FENCE_BUDGET_MS} ms: \
                 a transfer the core never saw may fail later than REQUEST_TTL_SECS + 5 s",
                self.fence_margin_ms, self.reconcile_interval_ms
            ));
        }
        warnings
    }
}

/// What the fence margin and the reconciler period may add up to while a
/// transfer the core never saw still fails within `REQUEST_TTL_SECS` + 5 s
/// (the last second is the fence call's).
pub const B11_FENCE_BUDGET_MS: u64 = 4_000;

/// How long a call to the core other than the transfer itself (a fence, a
/// status question, a sync) may take.
pub const CORE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Room a transfer request keeps beyond its calls to the core, for its
/// database statements: once its pending row is written it is answered
/// this long before the HTTP request timeout at the latest.
pub const REQUEST_TIMEOUT_MARGIN: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::Config;

    #[test]
    fn a_request_ttl_outside_one_second_to_one_day_is_refused() {
        use clap::Parser;
        let ttl = |v: &str| super::Cli::try_parse_from(["transfer", "--request-ttl-secs", v]);
        assert!(ttl("0").is_err());
        assert!(ttl("86401").is_err());
        assert!(ttl("18446744073709551615").is_err());
        assert_eq!(
            ttl("86400").ok().map(|c| c.config.request_ttl_secs),
            Some(86_400)
        );
        assert_eq!(ttl("1").ok().map(|c| c.config.request_ttl_secs), Some(1));
    }

    #[test]
    fn a_request_timeout_shorter_than_a_transfers_calls_to_the_core_is_refused() {
        let mut config = Config::defaults();
        assert_eq!(config.check(), Ok(()), "the defaults");
        config.http.http_request_timeout_ms = 9_999;
        assert!(config.check().is_err(), "3000 + 5000 + 2000 ms is 10000");
        config.http.http_request_timeout_ms = 10_000;
        assert_eq!(config.check(), Ok(()));
        config.core_timeout_ms = 3_001;
        let refused = config.check().err().unwrap_or_default();
        assert!(
            refused.contains("HTTP_REQUEST_TIMEOUT_MS (10000)"),
            "{refused}"
        );
        assert!(refused.contains("10001 ms"), "{refused}");
    }

    #[test]
    fn b11_a_fence_margin_and_reconciler_period_beyond_four_seconds_are_warned_of() {
        let mut config = Config::defaults();
        assert!(config.warnings().is_empty(), "the defaults: 2000 + 1000 ms");
        config.fence_margin_ms = 3_000;
        assert!(config.warnings().is_empty(), "3000 + 1000 ms");
        config.reconcile_interval_ms = 1_001;
        assert_eq!(config.warnings().len(), 1);
    }

    #[test]
    fn b09_a_fence_before_a_503d_transfer_can_be_withdrawn_is_warned_of() {
        let mut config = Config::defaults();
        assert!(config.warnings().is_empty(), "the defaults");
        // Answered by 28 s, the last withdrawal started by 38.5 s and done
        // by 40.5 s (a 2 s lock timeout): the fence must come later.
        config.http.http_request_timeout_ms = 30_000;
        config.pool.db_lock_timeout_ms = 2_000;
        config.request_ttl_secs = 38;
        config.fence_margin_ms = 2_501;
        assert!(config.warnings().is_empty(), "fenced at 40.501 s");
        config.fence_margin_ms = 2_500;
        let warned = config.warnings();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("REQUEST_TTL_SECS (38)"), "{warned:?}");
    }

    #[test]
    fn a_core_timeout_below_100_ms_is_refused() {
        use clap::Parser;
        let timeout = |v: &str| super::Cli::try_parse_from(["transfer", "--core-timeout-ms", v]);
        assert!(timeout("0").is_err());
        assert!(timeout("99").is_err());
        assert!(timeout("600001").is_err());
        assert!(timeout("100").is_ok());
    }
}

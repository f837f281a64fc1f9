//! Configuration of the core bank, from flags or the environment (API.md).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use common::config::{HttpArgs, NatsArgs, PoolArgs, RelayArgs, TelemetryArgs};

/// The core bank: ledger of record.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "core-bank",
    version,
    about = "Core bank: the ledger of record (accounts, transfers, deposits, interest)"
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
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Compare the legacy and new interest calculations over all accounts (or
    /// a random sample) and list the mismatches. Exits 1 if any mismatch.
    VerifyInterest {
        /// Check only this many randomly chosen accounts.
        #[arg(long)]
        sample: Option<u64>,
    },
}

/// Every setting of the core bank.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(
        long = "http-addr",
        env = "CORE_HTTP_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub http_addr: SocketAddr,
    /// PostgreSQL database of the core.
    #[arg(
        long = "database-url",
        env = "CORE_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/bank_core?sslmode=disable",
        hide_env_values = true
    )]
    pub database_url: common::config::Secret,
    /// Redis for the expected-interest cache.
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: common::config::Secret,
    /// Service credential every `/v1` caller must present as a bearer token.
    #[arg(
        long = "api-token",
        env = "CORE_API_TOKEN",
        default_value = "dev-core-token",
        hide_env_values = true
    )]
    pub api_token: common::config::Secret,
    /// An optional second credential that may only read (`GET`): for
    /// callers that never move money, such as the projector. A write with it
    /// is refused with 403.
    #[arg(
        long = "read-api-token",
        env = "CORE_READ_API_TOKEN",
        hide_env_values = true
    )]
    pub read_api_token: Option<common::config::Secret>,
    /// Requests older than this (by `requested_at`, on the core's clock) are refused. (1 s to 1 day)
    #[arg(
        long = "request-ttl-secs",
        env = "REQUEST_TTL_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub request_ttl_secs: u64,
    /// When true, `POST /v1/admin/clock` may move the business date (tests and demos).
    #[arg(long = "test-clock", env = "BANK_TEST_CLOCK", default_value = "0", value_parser = parse_flag)]
    pub test_clock: bool,
    /// Most commands executed together in one ledger transaction (1-10000).
    #[arg(long, env = "LEDGER_BATCH_MAX", default_value_t = 128,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub ledger_batch_max: usize,
    /// Ledger worker tasks (each runs one transaction at a time). About the
    /// database's cores: fewer concurrent transactions make larger batches,
    /// and on the 2-core bench machine 2 workers gave ~15% more transfers/s
    /// and a lower p99 than 4 (README, performance). (1-64)
    #[arg(long, env = "LEDGER_WORKERS", default_value_t = 2,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub ledger_workers: usize,
    /// Commands waiting for a ledger worker before new ones are refused
    /// (503). (1-1000000)
    #[arg(long, env = "LEDGER_QUEUE_MAX", default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub ledger_queue_max: usize,
    /// HTTP server limits.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Interest product settings.
    #[command(flatten)]
    pub interest: InterestArgs,
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

/// The interest product.
#[derive(Debug, Clone, Args)]
pub struct InterestArgs {
    /// Rate tiers as `UPPER_BOUND:ANNUAL_PERCENT,...,*:ANNUAL_PERCENT`: each
    /// part of the closing balance up to the bound earns that rate.
    #[arg(long, env = "INTEREST_TIERS", default_value = "50000000:2.0,*:0.1")]
    pub interest_tiers: String,
    /// Withholding tax on interest, in percent.
    #[arg(long, env = "INTEREST_TAX_PERCENT", default_value = "15.4")]
    pub interest_tax_percent: String,
    /// Time zone of the business date.
    #[arg(long, env = "BANK_TIME_ZONE", default_value = "Asia/Seoul")]
    pub time_zone: String,
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected 1 or 0, got {other:?}")),
    }
}

impl Config {
    /// The request TTL.
    pub fn request_ttl(&self) -> Duration {
        Duration::from_secs(self.request_ttl_secs)
    }

    /// Defaults for every setting, as if started with no flags and no
    /// environment (used by tests, which then override what they need).
    pub fn defaults() -> Self {
        Cli::parse_from(["core-bank"]).config
    }

    /// Settings that are allowed but costly, each as a sentence for the log:
    /// the ledger can hold two connections per worker (a worker's batch and
    /// as many batches parked on held accounts), and with them all taken,
    /// reads, fences and payouts wait for a connection.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.pool.warnings();
        let ledger = self.ledger_workers.saturating_mul(2);
        if ledger >= self.pool.db_max_connections as usize {
            warnings.push(format!(
                "LEDGER_WORKERS ({}) may hold {ledger} of the {} connections of DATABASE_MAX_CONNECTIONS \
                 (a batch per worker and as many parked on held accounts): reads, fences and payouts may wait for one",
                self.ledger_workers, self.pool.db_max_connections
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Config};

    #[test]
    fn ledger_settings_outside_their_ranges_are_refused() {
        for (flag, bad, good) in [
            ("--ledger-batch-max", ["0", "10001"], "10000"),
            ("--ledger-workers", ["0", "65"], "64"),
            ("--ledger-queue-max", ["0", "1000001"], "1000000"),
        ] {
            for v in bad {
                assert!(
                    Cli::try_parse_from(["core-bank", flag, v]).is_err(),
                    "{flag} {v}"
                );
            }
            assert!(
                Cli::try_parse_from(["core-bank", flag, good]).is_ok(),
                "{flag} {good}"
            );
        }
    }

    #[test]
    fn ledger_workers_that_may_hold_the_whole_pool_are_warned_of() {
        let mut config = Config::defaults();
        assert!(
            config.warnings().is_empty(),
            "the defaults: 2 workers, 16 connections"
        );
        config.ledger_workers = 8;
        assert_eq!(config.warnings().len(), 1);
    }
}

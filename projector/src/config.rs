//! Configuration of the projector (API.md) and its command line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use common::config::{HttpArgs, NatsArgs, PoolArgs, TelemetryArgs};
use transfer::core_client::CoreLinkArgs;

/// The projector: ledger events into the channel history, interest events
/// into tax records.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "projector",
    version,
    about = "Projector: channel history and tax records from JetStream"
)]
pub struct Cli {
    /// What to do; with none, serve.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings.
    #[command(flatten)]
    pub config: Config,
}

/// Operator commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Dead letters: list, show, replay.
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Re-derive the channel history from the core's entries API (recovery of
    /// a lost or damaged channel database), with a progress bar.
    Rebuild {
        /// Only this account (default: every account of the core).
        #[arg(long)]
        account: Option<String>,
        /// Delete the account's history first and rebuild it from seq 1.
        #[arg(long)]
        reset: bool,
    },
}

/// Dead-letter operations.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// List dead letters.
    List {
        /// Letters read from the stream per request.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
        page: u16,
    },
    /// Show one dead letter with its body.
    Show {
        /// Dead letter id (its sequence in the DLQ stream).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Apply dead letters again through the normal path; applied ones leave the list.
    Replay {
        /// Dead letter id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: Option<u64>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// With `--all`: letters read from the stream per request.
        #[arg(long, requires = "all", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
        page: u16,
    },
}

/// Every setting of the projector.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address of the operations API (health, metrics, dead letters, tax records).
    #[arg(
        long = "http-addr",
        env = "PROJECTOR_HTTP_ADDR",
        default_value = "127.0.0.1:8082"
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
    /// How to reach the core (gap fill, rebuild).
    #[command(flatten)]
    pub core: CoreLinkArgs,
    /// When set, `/v1` routes require `Authorization: Bearer <token>`.
    #[arg(
        long = "api-token",
        env = "PROJECTOR_API_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<common::config::Secret>,
    /// Durable consumer name on `LEDGER`.
    #[arg(
        long,
        env = "PROJECTOR_LEDGER_CONSUMER",
        default_value = "projector-ledger"
    )]
    pub ledger_consumer: String,
    /// Durable consumer name on `INTEREST`.
    #[arg(
        long,
        env = "PROJECTOR_INTEREST_CONSUMER",
        default_value = "projector-interest"
    )]
    pub interest_consumer: String,
    /// Deliveries of a failing message before it is dead-lettered.
    #[arg(long, env = "PROJECTOR_MAX_DELIVERIES", default_value_t = 8)]
    pub max_deliveries: i64,
    /// First retry delay; doubles per delivery (with jitter).
    #[arg(long, env = "PROJECTOR_RETRY_BASE_MS", default_value_t = 500)]
    pub retry_base_ms: u64,
    /// Longest retry delay.
    #[arg(long, env = "PROJECTOR_RETRY_MAX_MS", default_value_t = 60_000)]
    pub retry_max_ms: u64,
    /// Messages fetched and handled per batch (ledger batches are split by
    /// account into lanes, one database transaction each).
    #[arg(long, env = "PROJECTOR_BATCH", default_value_t = 2000)]
    pub batch: usize,
    /// Unacknowledged messages the server lets this consumer hold.
    #[arg(long, env = "PROJECTOR_MAX_ACK_PENDING", default_value_t = 10_000)]
    pub max_ack_pending: i64,
    /// How long a delivered message may go unacknowledged before redelivery:
    /// how long the history of a killed projector's batch may lag. Work in
    /// progress tells the server so every third of it (at most every 10 s).
    #[arg(long, env = "PROJECTOR_ACK_WAIT_SECS", default_value_t = 30)]
    pub ack_wait_secs: u64,
    /// How often unrecorded payouts are looked for (history interest entries
    /// without a tax record, written at least this long ago), and recorded
    /// from the core.
    #[arg(long, env = "PROJECTOR_TAX_SWEEP_SECS", default_value_t = 60)]
    pub tax_sweep_secs: u64,
    /// Interest entries the sweep reads per query (and entries kept from
    /// earlier passes it tries again per pass).
    #[arg(long, env = "PROJECTOR_TAX_SWEEP_PAGE", default_value_t = 500,
          value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub tax_sweep_page: i64,
    /// How far before the time the last pass read up to each sweep pass
    /// starts reading again: an entry is stamped with the start of the transaction
    /// that wrote it, so one committed after a pass may be older than what
    /// that pass read. Longer than any transaction of the history writer.
    #[arg(long, env = "PROJECTOR_TAX_SWEEP_OVERLAP_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub tax_sweep_overlap_secs: u64,
    /// How often the ledger audit compares every account's history with
    /// the core's last seq, and syncs from the core the accounts that stayed
    /// behind since the pass before (their last events lost).
    #[arg(long, env = "PROJECTOR_AUDIT_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub audit_secs: u64,
    /// Accounts the ledger audit reads from the core per call.
    #[arg(long, env = "PROJECTOR_AUDIT_PAGE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub audit_page: u32,
    /// HTTP server limits.
    #[command(flatten)]
    pub http: HttpArgs,
    /// NATS.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Database pool.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Logs and traces.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl Config {
    /// Defaults for every setting (tests override what they need).
    pub fn defaults() -> Self {
        Cli::parse_from(["projector"]).config
    }

    /// Retry delay before delivery number `delivered + 1`: exponential from
    /// the base, capped, with full jitter over the upper half.
    pub fn retry_delay(&self, delivered: i64) -> Duration {
        let exp = delivered.clamp(1, 30) as u32 - 1;
        let base = self.retry_base_ms.saturating_mul(1u64 << exp.min(20));
        let capped = base.min(self.retry_max_ms).max(1);
        let jittered = capped / 2 + rand::random::<u64>() % (capped / 2 + 1);
        Duration::from_millis(jittered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b16_retry_delay_grows_is_capped_and_jittered() {
        let mut c = Config::defaults();
        c.retry_base_ms = 100;
        c.retry_max_ms = 1000;
        for d in 1..=20 {
            let ms = c.retry_delay(d).as_millis() as u64;
            let ceiling = (100u64 << (d - 1).min(20)).min(1000);
            assert!(ms >= ceiling / 2 && ms <= ceiling, "delivery {d}: {ms} ms");
        }
        // Jitter: messages that failed together do not come back together.
        // 50 draws over 501 values all equal has probability 501^-49.
        let delays: std::collections::HashSet<Duration> =
            (0..50).map(|_| c.retry_delay(10)).collect();
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }

    #[test]
    fn b16_the_dlq_commands_refuse_letter_id_0() {
        use clap::Parser;
        let parse = |args: &[&str]| Cli::try_parse_from([&["projector", "dlq"], args].concat());
        assert!(parse(&["show", "0"]).is_err());
        assert!(parse(&["replay", "0"]).is_err());
        assert!(parse(&["show", "1"]).is_ok());
        assert!(parse(&["replay", "7"]).is_ok());
        assert!(parse(&["replay", "--all"]).is_ok());
    }
}

//! Settings shared by all three services, as `clap` argument groups that each
//! service flattens into its own configuration. Every setting can come from the
//! environment variable named in API.md, and every default works with the
//! local services that `make run` brings up.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// A credential setting (a service token, a signing secret). `Debug` and
/// `Display` print `[redacted]`, so a configuration logged whole, or a
/// struct holding one, never shows it; [`Secret::expose`] is the one way to
/// read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that must send or check it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Parsing a setting as a [`Secret`] refuses an empty (or blank) value: an
/// empty service token would match an empty `Authorization` credential, and
/// an empty signing key lets anyone sign tokens. A service given one does not
/// start.
impl std::str::FromStr for Secret {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("a credential must not be empty");
        }
        Ok(Self::new(s))
    }
}

/// Connection to NATS JetStream.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL.
    #[arg(
        long = "nats-url",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: Secret,
    /// Replicas of the streams this service creates (3 in a production cluster).
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging and tracing.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (also read from `RUST_LOG`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Which spans become OpenTelemetry spans (`tracing` filter syntax).
    #[arg(
        long,
        env = "OTEL_TRACES_FILTER",
        default_value = "info,h2=off,tonic=off,hyper=off,sqlx=off"
    )]
    pub trace_filter: String,
    /// OTLP gRPC endpoint for traces; no export when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// The outbox relay's limits.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Rows published per relay batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 500)]
    pub outbox_batch_size: u32,
    /// Fallback poll interval when no notification arrives.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", default_value_t = 500)]
    pub outbox_poll_interval_ms: u64,
    /// How long published rows are kept before pruning.
    #[arg(long, env = "OUTBOX_RETENTION_SECS", default_value_t = 86_400)]
    pub outbox_retention_secs: u64,
}

impl RelayArgs {
    /// The fallback poll interval.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_poll_interval_ms)
    }
}

/// The HTTP server's limits, the same for every service.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Longest an HTTP request may take before it is answered 503.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub http_request_timeout_ms: u64,
    /// Pause between readiness turning 503 and the listener closing, on SIGTERM.
    #[arg(long, env = "SHUTDOWN_DRAIN_DELAY_MS", default_value_t = 0)]
    pub shutdown_drain_delay_ms: u64,
}

impl HttpArgs {
    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http_request_timeout_ms)
    }

    /// The drain delay on SIGTERM.
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_delay_ms)
    }
}

/// PostgreSQL connection pool limits.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Most connections this process opens to its database.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// How long a statement may wait for a row lock before it is retried.
    #[arg(long, env = "DATABASE_LOCK_TIMEOUT_MS", default_value_t = 2_000)]
    pub db_lock_timeout_ms: u64,
    /// Longest a single statement may run.
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub db_statement_timeout_ms: u64,
}

impl PoolArgs {
    /// Settings that are allowed but work against the services' handling,
    /// each as a sentence for the log: a lock wait that is not bounded below
    /// the statement timeout ends as a statement timeout, which the services
    /// take for a failure of the database as a whole (not retried, not
    /// isolated to the commands that wait), instead of a lock timeout.
    pub fn warnings(&self) -> Vec<String> {
        let (lock, statement) = (self.db_lock_timeout_ms, self.db_statement_timeout_ms);
        let unbounded = lock == 0 && statement > 0;
        if unbounded || (statement > 0 && lock >= statement) {
            vec![format!(
                "DATABASE_LOCK_TIMEOUT_MS ({lock}) should be above 0 and below DATABASE_STATEMENT_TIMEOUT_MS ({statement}): \
                 a long lock wait then ends as a statement timeout, answered as a database failure instead of retried"
            )]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn a_secret_never_prints_its_value() {
        let s: Secret = "hunter2-token"
            .parse()
            .unwrap_or_else(|_| Secret::new("refused"));
        assert_eq!(s.expose(), "hunter2-token");
        for shown in [format!("{s:?}"), format!("{s}"), format!("{:?}", Some(&s))] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn an_empty_or_blank_secret_is_refused() {
        for value in ["", " ", "\t\n"] {
            assert!(value.parse::<Secret>().is_err(), "{value:?} accepted");
        }
    }

    #[test]
    fn a_lock_timeout_not_below_the_statement_timeout_is_warned_of() {
        let pool = |lock, statement| super::PoolArgs {
            db_max_connections: 16,
            db_lock_timeout_ms: lock,
            db_statement_timeout_ms: statement,
        };
        assert!(pool(2_000, 30_000).warnings().is_empty());
        assert!(pool(0, 0).warnings().is_empty(), "neither bounded");
        assert_eq!(pool(0, 30_000).warnings().len(), 1);
        assert_eq!(pool(30_000, 30_000).warnings().len(), 1);
    }
}

//! Test kit for the bank backbone: real PostgreSQL databases per test, a
//! dedicated `nats-server` per test, the three services spawned in-process
//! (port 0) or as processes, typed HTTP helpers, a fault-injecting HTTP proxy
//! and polling helpers. Used by the tests in `tests/tests/`, by `make bench`
//! and by `make chaos`.
//!
//! Nothing here is mocked: a test that cannot reach PostgreSQL, Redis or a
//! `nats-server` binary fails with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod apps;
pub mod client;
pub mod cpu;
pub mod db;
pub mod metrics;
pub mod nats;
pub mod otlp;
pub mod process;
pub mod procs;
pub mod proxy;
pub mod tcp_proxy;
pub mod verify;
pub mod wait;

pub use apps::{CoreApp, ProjectorApp, Stack, StackOptions, TransferApp};
pub use client::{Api, Reply};
pub use nats::NatsServer;
pub use wait::eventually;

use std::sync::Once;

/// PostgreSQL server used by tests (a maintenance database URL).
pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL").unwrap_or_else(|_| {
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".to_owned()
    })
}

/// Redis used by tests.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Installs a log subscriber once (level from `TEST_LOG`, default `warn`).
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber_init();
    });
}

fn tracing_subscriber_init() -> anyhow::Result<()> {
    let args = common::config::TelemetryArgs {
        log_format: common::config::LogFormat::Text,
        log_filter: std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        trace_filter: "info".to_owned(),
        otlp_endpoint: None,
    };
    // The guard is leaked on purpose: spans must keep ids for the whole test
    // process (trace propagation is under test).
    let guard = common::telemetry::init("tests", &args, common::telemetry::LogOutput::Stdout)?;
    std::mem::forget(guard);
    Ok(())
}

/// A unique, subject-safe suffix for ids and names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

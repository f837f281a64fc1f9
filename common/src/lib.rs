//! The shared contract of the bank backbone.
//!
//! `common` holds what the three services must agree on -- money, ids, the
//! event wire format, the outbox and its relay, JetStream stream definitions --
//! and the small edge pieces every service needs the same way (configuration
//! flags, telemetry, the HTTP error shape, health and metrics endpoints).
//! Service logic does not live here.

pub mod config;
pub mod db;
pub mod events;
pub mod http;
pub mod ids;
pub mod jetstream;
pub mod metrics;
pub mod money;
pub mod outbox;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;

pub use ids::{AccountId, CustomerId, DepositId, PayoutId, TransferId};
pub use money::{Amount, MAX_BALANCE_WON, MAX_WON, MoneyError, Won};

/// An error and its sources, `outer: inner: ...`, for a log line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    chain
}

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
pub mod shutdown;
pub mod telemetry;
pub mod time;

pub use ids::{AccountId, CustomerId, DepositId, PayoutId, TransferId};
pub use money::{Amount, MAX_BALANCE_WON, MAX_WON, MoneyError, Won};

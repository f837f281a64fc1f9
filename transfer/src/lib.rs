//! The transfer service: the customer-facing channel.
//!
//! Accepts customers' transfers and guards them against duplicates (B9-B13),
//! serves the channel's copy of the transaction history (B17-B19), and
//! forwards interest requests to the core. The history writer in
//! [`history::writer`] is shared with the projector. See `ARCHITECTURE.md`.

pub mod app;
pub mod auth;
pub mod config;
pub mod core_client;
pub mod history;
pub mod http;
pub mod migration;
pub mod transfers;

pub use app::App;
pub use config::{Cli, Command, Config};

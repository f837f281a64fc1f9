//! The projector: keeps the channel's history in step with the core's ledger
//! (from `LEDGER`) and records withholding tax (from `INTEREST`), with
//! backoff, gap fill from the core and a dead-letter stream. It writes the
//! history only through `transfer::history::writer`. See `ARCHITECTURE.md`.

pub mod app;
pub mod config;
pub mod consume;
pub mod http;
pub mod migration;
pub mod rebuild;

pub use app::App;
pub use config::{Cli, Command, Config, DlqAction};

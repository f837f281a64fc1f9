//! The core bank: the ledger of record.
//!
//! Customers, accounts, balances and their gap-free per-account entry
//! sequences; transfers between accounts of this bank; deposits from other
//! banks; interest. Every ledger change is published through the outbox to
//! the `LEDGER` stream. See `ARCHITECTURE.md` for the map and the invariants.

pub mod accounts;
pub mod app;
pub mod clock;
pub mod config;
pub mod http;
pub mod interest;
pub mod ledger;
pub mod migration;
pub mod store;

pub use app::App;
pub use config::{Cli, Command, Config};

//! The channel's copy of the ledger (B14-B19).
//!
//! - [`writer`]: the **only** code that writes `history_entries` and
//!   `history_sync`. Used by the projector (events from JetStream), by this
//!   service's sync (entries from the core) and by `projector rebuild`.
//! - [`page`]: reading pages newest-first with keyset cursors.
//! - [`sync`]: bringing one account up to date from the core's entries API.

pub mod page;
pub mod sync;
pub mod writer;

pub use writer::{ApplyReport, Gap, apply};

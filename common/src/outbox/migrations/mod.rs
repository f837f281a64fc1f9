//! The outbox's own migrations after its table was created, the same in every
//! service's database: each service's migrator lists them (under their file
//! names, which name them in its migrations table).

pub mod m20261122_000001_outbox_notify_opt_out;
pub mod m20261203_000002_outbox_vacuum;

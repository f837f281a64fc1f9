//! The history's interest entries by when they were written, for the
//! projector's sweep that recovers tax records whose event was lost (B23).
//!
//! A plain `CREATE INDEX` (migrations run in a transaction) blocks history
//! writes while it builds; it is small (interest entries only), but where
//! that matters, create `history_entries_payout_applied` `CONCURRENTLY` by
//! hand before upgrading: `IF NOT EXISTS` then skips it here.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: "CREATE INDEX IF NOT EXISTS history_entries_payout_applied \
                 ON history_entries (applied_at) WHERE payout_id IS NOT NULL",
    down: "DROP INDEX IF EXISTS history_entries_payout_applied",
);

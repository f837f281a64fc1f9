//! A dead-lettered message is identified by its stream, its sequence and the
//! time the stream stored it: a stream deleted and created again reuses
//! sequence numbers, and a new message at a reused sequence must get its own
//! letter. Rows from before this column (0) match any time.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: "ALTER TABLE dead_lettered ADD COLUMN stored_at_ns BIGINT NOT NULL DEFAULT 0",
    down: "ALTER TABLE dead_lettered DROP COLUMN IF EXISTS stored_at_ns",
);

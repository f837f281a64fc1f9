//! Vacuums the outbox after a fixed number of dead rows, so the relay's
//! index of unpublished rows stays small under load (see
//! `crate::outbox::VACUUM_SETTINGS_SQL`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

crate::sql_migration!(
    Migration,
    up: crate::outbox::VACUUM_SETTINGS_SQL,
    down: crate::outbox::VACUUM_SETTINGS_RESET_SQL,
);

//! Migrations of the channel database's transfer and history tables.

use common::outbox::migrations as outbox;
use sea_orm_migration::prelude::*;

mod m20261121_000001_channel_schema;
mod m20261203_000001_history_payout_index;

/// The channel migrator (the projector has its own, with its own table).
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_channel_schema::Migration),
            Box::new(outbox::m20261122_000001_outbox_notify_opt_out::Migration),
            Box::new(m20261203_000001_history_payout_index::Migration),
            Box::new(outbox::m20261203_000002_outbox_vacuum::Migration),
        ]
    }
}

//! Database migrations of the core, applied at start-up.

use common::outbox::migrations as outbox;
use sea_orm_migration::prelude::*;

mod m20261121_000001_core_schema;
mod m20261203_000001_account_last_business_date;
mod m20261204_000001_transfer_shape;
mod m20261204_000003_payout_rates;

/// The core's migrator.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_core_schema::Migration),
            Box::new(outbox::m20261122_000001_outbox_notify_opt_out::Migration),
            Box::new(m20261203_000001_account_last_business_date::Migration),
            Box::new(outbox::m20261203_000002_outbox_vacuum::Migration),
            Box::new(m20261204_000001_transfer_shape::Migration),
            Box::new(m20261204_000003_payout_rates::Migration),
        ]
    }
}

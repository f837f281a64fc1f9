//! The projector's own tables in the channel database. They are tracked in
//! their own migrations table, apart from the transfer service's.

use sea_orm_migration::prelude::*;

mod m20261121_000001_tax_records;
mod m20261122_000001_dead_lettered;
mod m20261203_000001_dead_lettered_published;
mod m20261204_000001_overdue_and_audit_lease;
mod m20261204_000002_audit_behind;
mod m20261205_000001_tax_sweep_progress;

/// The projector's migrator.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_tax_records::Migration),
            Box::new(m20261122_000001_dead_lettered::Migration),
            Box::new(m20261203_000001_dead_lettered_published::Migration),
            Box::new(m20261204_000001_overdue_and_audit_lease::Migration),
            Box::new(m20261204_000002_audit_behind::Migration),
            Box::new(m20261205_000001_tax_sweep_progress::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("seaql_migrations_projector").into_iden()
    }
}

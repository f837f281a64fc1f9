//! The business date of each account's last entry, kept on the account row,
//! so a writer that waited for the row's lock sees it: the dates of an
//! account's entries never go backwards, even between replicas whose clocks
//! cross midnight a moment apart.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    // The column only (a catalog change, instant): no backfill, which
    // would scan the whole ledger with `accounts` locked. Until an
    // account's next entry sets it, NULL means "no constraint", which
    // is what it was before.
    up: "ALTER TABLE accounts ADD COLUMN IF NOT EXISTS last_business_date DATE",
    down: "ALTER TABLE accounts DROP COLUMN IF EXISTS last_business_date",
);

//! The rates each interest payout was computed under (`INTEREST_TIERS` and
//! `INTEREST_TAX_PERCENT`, as `InterestSettings::terms` writes them: the upper
//! bound of each tier with its annual rate, and the tax rate, as fractions, e.g.
//! `50000000:0.02,*:0.001/0.154`), so that a payout made while a rate change rolled
//! out can be told from its record, not guessed from deployment times.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    // A nullable column (a catalog change, instant): payouts made before it
    // have NULL, their rates unknown.
    up: "ALTER TABLE interest_payouts ADD COLUMN IF NOT EXISTS rates TEXT",
    down: "ALTER TABLE interest_payouts DROP COLUMN IF EXISTS rates",
);

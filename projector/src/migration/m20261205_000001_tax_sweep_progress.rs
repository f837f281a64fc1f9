//! `tax_sweep_progress`: one row, the time before which the tax sweep has
//! settled every interest entry of the history (each has its tax record,
//! or was given up), so that a restarted projector sweeps on from there
//! instead of reading the whole 30-day window again (`consume::tax`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: r#"
CREATE TABLE IF NOT EXISTS tax_sweep_progress (
    id           BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    swept_until  TIMESTAMPTZ NOT NULL
);
"#,
    down: "DROP TABLE IF EXISTS tax_sweep_progress",
);

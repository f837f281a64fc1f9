//! Withholding-tax records of interest payouts (B23).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: r#"
CREATE TABLE tax_records (
    payout_id    TEXT PRIMARY KEY,
    account_id   TEXT NOT NULL,
    gross        NUMERIC(30,0) NOT NULL,
    tax          NUMERIC(30,0) NOT NULL,
    net          NUMERIC(30,0) NOT NULL,
    from_date    DATE NOT NULL,
    through_date DATE NOT NULL,
    paid_at      TIMESTAMPTZ NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX tax_records_account ON tax_records (account_id, paid_at);
"#,
    down: "DROP TABLE IF EXISTS tax_records",
);

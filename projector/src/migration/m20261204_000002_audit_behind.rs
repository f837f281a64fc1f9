//! The ledger audit's findings, kept in the channel database so that a
//! restart or a handover of the audit lease does not lose them
//! (`consume::audit`):
//!
//! - `audit_behind`: accounts a pass found behind the core's last seq, with
//!   that seq and when; one still short of it a pass later is synced;
//! - `audit_lease.resume_after`: the last account of the page the pass
//!   reached (NULL: the next pass starts from the first account).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: r#"
CREATE TABLE IF NOT EXISTS audit_behind (
    account_id    TEXT PRIMARY KEY,
    behind_of_seq BIGINT NOT NULL,
    seen_at       TIMESTAMPTZ NOT NULL
);
ALTER TABLE audit_lease ADD COLUMN IF NOT EXISTS resume_after TEXT;
"#,
    down: "DROP TABLE IF EXISTS audit_behind; ALTER TABLE audit_lease DROP COLUMN IF EXISTS resume_after",
);

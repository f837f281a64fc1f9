//! Two small tables of the projector's own:
//!
//! - `overdue_attempts`: a message delivered past twice the delivery limit
//!   without its handling ever ending is handled alone, with a row here
//!   (its delivery count) while it is; a row of an earlier delivery still
//!   there means that handling never ended either (the process died on it),
//!   and the message is dead-lettered (`consume::overdue`).
//! - `audit_lease`: one row; the replica holding it runs the ledger audit's
//!   passes until it expires (`consume::audit`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: r#"
CREATE TABLE IF NOT EXISTS overdue_attempts (
    stream       TEXT NOT NULL,
    stream_seq   BIGINT NOT NULL,
    published_ns BIGINT NOT NULL,
    delivered    BIGINT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, stream_seq, published_ns)
);
CREATE TABLE IF NOT EXISTS audit_lease (
    id     BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    holder TEXT NOT NULL,
    until  TIMESTAMPTZ NOT NULL
);
"#,
    down: "DROP TABLE IF EXISTS overdue_attempts, audit_lease",
);

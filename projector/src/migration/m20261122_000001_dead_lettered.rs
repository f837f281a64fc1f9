//! Which source messages already have a letter in `DLQ`, so a redelivery
//! long after the first dead-lettering (beyond JetStream's duplicate window,
//! for example after a broker crash rolled back the consumer's acknowledgement
//! state) does not letter the same message twice.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: r#"
CREATE TABLE dead_lettered (
    stream          TEXT   NOT NULL,
    stream_seq      BIGINT NOT NULL,
    dlq_seq         BIGINT NOT NULL,
    dead_lettered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, stream_seq)
);
"#,
    down: "DROP TABLE IF EXISTS dead_lettered",
);

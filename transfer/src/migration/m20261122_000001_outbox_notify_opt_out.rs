//! Lets sessions that wake their relay in-process skip the outbox `NOTIFY`
//! (`bank.outbox_notify = off`; see `common::outbox`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: common::outbox::NOTIFY_OPT_OUT_SQL,
    down: common::outbox::CREATE_SQL,
);

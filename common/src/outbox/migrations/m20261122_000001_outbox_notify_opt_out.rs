//! Lets sessions that wake their relay in-process skip the outbox `NOTIFY`
//! (`bank.outbox_notify = off`; see `common::outbox`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

crate::sql_migration!(
    Migration,
    up: crate::outbox::NOTIFY_OPT_OUT_SQL,
    down: crate::outbox::CREATE_SQL,
);

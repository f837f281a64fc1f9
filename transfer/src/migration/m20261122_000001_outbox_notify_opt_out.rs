//! Lets sessions that wake their relay in-process skip the outbox `NOTIFY`
//! (`bank.outbox_notify = off`; see `common::outbox`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(common::outbox::NOTIFY_OPT_OUT_SQL)
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(common::outbox::CREATE_SQL)
            .await?;
        Ok(())
    }
}

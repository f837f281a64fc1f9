//! The business date of each account's last entry, kept on the account row,
//! so a writer that waited for the row's lock sees it: the dates of an
//! account's entries never go backwards, even between replicas whose clocks
//! cross midnight a moment apart.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE accounts ADD COLUMN IF NOT EXISTS last_business_date DATE;
                 UPDATE accounts a SET last_business_date = e.last
                 FROM (SELECT account_id, max(business_date) AS last FROM ledger_entries GROUP BY account_id) e
                 WHERE e.account_id = a.account_id AND a.last_business_date IS NULL;",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE accounts DROP COLUMN IF EXISTS last_business_date")
            .await?;
        Ok(())
    }
}

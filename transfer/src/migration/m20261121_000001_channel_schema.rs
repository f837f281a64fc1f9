//! The channel schema: transfer requests, the history copy and its sync
//! state, and the transfer service's outbox.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE transfer_requests (
    transfer_id     TEXT PRIMARY KEY,
    customer_id     TEXT NOT NULL,
    from_account    TEXT NOT NULL,
    to_account      TEXT NOT NULL,
    amount          NUMERIC(30,0) NOT NULL CHECK (amount > 0),
    memo            TEXT,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason          TEXT,
    requested_at    TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT,
    from_seq        BIGINT,
    to_seq          BIGINT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at     TIMESTAMPTZ
);
-- B10: at most one pending transfer per source account, enforced here.
CREATE UNIQUE INDEX transfer_requests_one_pending_per_account
    ON transfer_requests (from_account) WHERE status = 'pending';
CREATE UNIQUE INDEX transfer_requests_idempotency_key
    ON transfer_requests (customer_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX transfer_requests_pending_age ON transfer_requests (requested_at) WHERE status = 'pending';
CREATE INDEX transfer_requests_to_pending ON transfer_requests (to_account) WHERE status = 'pending';
CREATE INDEX transfer_requests_from_seq ON transfer_requests (from_account, from_seq);
CREATE INDEX transfer_requests_to_seq ON transfer_requests (to_account, to_seq);

-- The channel's copy of the ledger, written only by the history writer.
CREATE TABLE history_entries (
    account_id    TEXT NOT NULL,
    seq           BIGINT NOT NULL CHECK (seq > 0),
    kind          TEXT NOT NULL,
    amount        NUMERIC(30,0) NOT NULL,
    balance_after NUMERIC(30,0) NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    business_date DATE NOT NULL,
    transfer_id   TEXT,
    deposit_id    TEXT,
    payout_id     TEXT,
    counterparty  TEXT,
    memo          TEXT,
    applied_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, seq)
);

-- Per account: every seq up to synced_through_seq is in history_entries.
CREATE TABLE history_sync (
    account_id         TEXT PRIMARY KEY,
    synced_through_seq BIGINT NOT NULL DEFAULT 0 CHECK (synced_through_seq >= 0),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(UP).await?;
        db.execute_unprepared(common::outbox::CREATE_SQL).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(common::outbox::DROP_SQL).await?;
        db.execute_unprepared(
            "DROP TABLE IF EXISTS history_sync, history_entries, transfer_requests",
        )
        .await?;
        Ok(())
    }
}

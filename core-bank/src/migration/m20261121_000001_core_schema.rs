//! The core schema: customers, accounts, the ledger, transfers, deposits,
//! interest, the business clock, the rollout setting and the outbox.
//!
//! Money columns are `NUMERIC(30,0)`: whole won, exact. Balances may not go
//! negative (a `CHECK`, the last line of defence behind the ledger's own
//! funds check).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'normal'
                CHECK (status IN ('normal', 'identity_theft', 'hacked', 'deceased')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    account_id            TEXT PRIMARY KEY,
    customer_id           TEXT NOT NULL REFERENCES customers (customer_id),
    balance               NUMERIC(30,0) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    last_seq              BIGINT NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    status                TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'closed')),
    deposit_stopped       BOOLEAN NOT NULL DEFAULT false,
    withdrawal_stopped    BOOLEAN NOT NULL DEFAULT false,
    opened_on             DATE NOT NULL,
    interest_paid_through DATE,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX accounts_customer ON accounts (customer_id);

-- The ledger. (account_id, seq) is the primary key: a second entry with the
-- same sequence number cannot exist, whatever the code does.
CREATE TABLE ledger_entries (
    account_id    TEXT NOT NULL REFERENCES accounts (account_id),
    seq           BIGINT NOT NULL CHECK (seq > 0),
    kind          TEXT NOT NULL CHECK (kind IN ('transfer_out', 'transfer_in', 'deposit', 'interest')),
    amount        NUMERIC(30,0) NOT NULL CHECK (amount <> 0),
    balance_after NUMERIC(30,0) NOT NULL CHECK (balance_after >= 0),
    occurred_at   TIMESTAMPTZ NOT NULL,
    business_date DATE NOT NULL,
    transfer_id   TEXT,
    deposit_id    TEXT,
    payout_id     TEXT,
    counterparty  TEXT,
    memo          TEXT,
    PRIMARY KEY (account_id, seq)
);

-- Every transfer request the core decided on, succeeded or refused, and the
-- fences recorded for ids it never received (fenced = true, no request
-- fields). One row per id: a fence and a late request for the same id
-- conflict on the primary key, so exactly one of them wins.
CREATE TABLE transfers (
    transfer_id  TEXT PRIMARY KEY,
    from_account TEXT,
    to_account   TEXT,
    amount       NUMERIC(30,0),
    memo         TEXT,
    requested_at TIMESTAMPTZ,
    status       TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')),
    reason       TEXT,
    from_seq     BIGINT,
    to_seq       BIGINT,
    fenced       BOOLEAN NOT NULL DEFAULT false,
    completed_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE deposits (
    deposit_id    TEXT PRIMARY KEY,
    to_account    TEXT NOT NULL,
    amount        NUMERIC(30,0) NOT NULL,
    sender_bank   TEXT NOT NULL,
    sender_name   TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')),
    reason        TEXT,
    seq           BIGINT,
    balance_after NUMERIC(30,0),
    completed_at  TIMESTAMPTZ NOT NULL
);

-- Closing balance of each account on each business date on which it changed;
-- days without a row closed with the previous row's balance. Maintained by
-- every ledger write; read by the new interest path.
CREATE TABLE daily_balances (
    account_id      TEXT NOT NULL,
    business_date   DATE NOT NULL,
    closing_balance NUMERIC(30,0) NOT NULL,
    PRIMARY KEY (account_id, business_date)
);

CREATE TABLE interest_payouts (
    payout_id     TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts (account_id),
    business_date DATE NOT NULL,
    from_date     DATE NOT NULL,
    through_date  DATE NOT NULL,
    days          INTEGER NOT NULL,
    gross         NUMERIC(30,0) NOT NULL,
    tax           NUMERIC(30,0) NOT NULL,
    net           NUMERIC(30,0) NOT NULL,
    seq           BIGINT NOT NULL,
    balance_after NUMERIC(30,0) NOT NULL,
    path          TEXT NOT NULL,
    paid_at       TIMESTAMPTZ NOT NULL,
    CONSTRAINT interest_payouts_once_per_day UNIQUE (account_id, business_date)
);

CREATE TABLE business_clock (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    today DATE
);
INSERT INTO business_clock (id, today) VALUES (1, NULL);

CREATE TABLE interest_rollout (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    new_path_percent INTEGER NOT NULL DEFAULT 0 CHECK (new_path_percent BETWEEN 0 AND 100),
    shadow           BOOLEAN NOT NULL DEFAULT false,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO interest_rollout (id) VALUES (1);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS interest_rollout, business_clock, interest_payouts, daily_balances,
    deposits, transfers, ledger_entries, accounts, customers;
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
        db.execute_unprepared(DOWN).await?;
        Ok(())
    }
}

//! The ledger: the only code that changes balances.
//!
//! Every money movement (transfer, deposit; interest payouts in
//! [`crate::interest::payout`]) runs in one database transaction that locks the
//! account rows it changes (`SELECT ... FOR UPDATE`, in account-id order, so two
//! transactions never wait on each other's account rows in a cycle; two
//! batches inserting the same ids in opposite orders can still deadlock on
//! the records' keys, which PostgreSQL detects and the batch retries), checks states, stops and
//! funds, assigns each account's next sequence number under that lock, and
//! writes the entries, the transfer or deposit record, the new balances, the
//! daily closing balances and the outbox rows of the ledger events together.
//!
//! Concurrent requests are executed in **batches**: a small pool of workers
//! takes whatever commands are queued (up to `LEDGER_BATCH_MAX`) and runs them in
//! one transaction, each command keeping its own result -- the idea TigerBeetle
//! is built on. Under light load a batch holds one command and adds no wait;
//! under heavy load a batch amortises the round trips and the commit over many
//! commands. See [`executor`].

mod batch;
pub mod executor;
mod held;
pub mod queries;

use chrono::{DateTime, NaiveDate, Utc};
use common::{AccountId, Amount, DepositId, TransferId, Won};
use serde::Serialize;

pub use executor::{Ledger, LedgerConfig};

/// Largest balance an account may reach (10^18 won); a deposit or transfer
/// that would exceed it is refused with `balance_limit_exceeded`. The same
/// bound is what every balance read back from the wire may hold.
pub use common::MAX_BALANCE_WON;

/// Why the core refused to execute a movement. Refusals are final: they are
/// recorded, and a replay of the same request gets the same refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source balance is lower than the amount.
    InsufficientFunds,
    /// An account does not exist.
    AccountNotFound,
    /// An account is suspended or closed.
    AccountNotActive,
    /// The source account may not send money.
    WithdrawalStopped,
    /// The target account may not receive money.
    DepositStopped,
    /// Source and target are the same account.
    SameAccount,
    /// `requested_at` is older than the request TTL.
    RequestExpired,
    /// The id was fenced by a reconciliation before the request arrived.
    TransferFenced,
    /// The target balance would exceed [`MAX_BALANCE_WON`].
    BalanceLimitExceeded,
}

impl Refusal {
    /// The code of API.md.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::InsufficientFunds => "insufficient_funds",
            Refusal::AccountNotFound => "account_not_found",
            Refusal::AccountNotActive => "account_not_active",
            Refusal::WithdrawalStopped => "withdrawal_stopped",
            Refusal::DepositStopped => "deposit_stopped",
            Refusal::SameAccount => "same_account",
            Refusal::RequestExpired => "request_expired",
            Refusal::TransferFenced => "transfer_fenced",
            Refusal::BalanceLimitExceeded => "balance_limit_exceeded",
        }
    }

    /// A sentence for humans.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::InsufficientFunds => "the source account's balance is lower than the amount",
            Refusal::AccountNotFound => "an account of the request does not exist",
            Refusal::AccountNotActive => "an account of the request is suspended or closed",
            Refusal::WithdrawalStopped => "the source account is stopped for withdrawals",
            Refusal::DepositStopped => "the target account is stopped for deposits",
            Refusal::SameAccount => "source and target are the same account",
            Refusal::RequestExpired => {
                "the request is older than the request TTL and was not executed"
            }
            Refusal::TransferFenced => {
                "this transfer id was declared never received and can no longer execute"
            }
            Refusal::BalanceLimitExceeded => {
                "the target balance would exceed the supported maximum"
            }
        }
    }
}

/// A transfer between two accounts of this bank, as requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferCmd {
    /// Chosen by the caller; the idempotency key.
    pub transfer_id: TransferId,
    /// Source.
    pub from_account: AccountId,
    /// Target.
    pub to_account: AccountId,
    /// Amount to move.
    pub amount: Amount,
    /// Free text, at most 140 characters.
    pub memo: Option<String>,
    /// When the caller created the request (checked against the TTL).
    pub requested_at: DateTime<Utc>,
}

/// An inbound deposit from another bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepositCmd {
    /// Chosen by the sender; the idempotency key.
    pub deposit_id: DepositId,
    /// Target.
    pub to_account: AccountId,
    /// Amount received.
    pub amount: Amount,
    /// The sending bank.
    pub sender_bank: String,
    /// The sender's name.
    pub sender_name: String,
}

/// Final status of a movement at the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Executed.
    Succeeded,
    /// Refused (or fenced).
    Failed,
}

impl Status {
    /// Database and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// What the core decided for a transfer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecord {
    /// The id.
    pub transfer_id: TransferId,
    /// The request, absent for a fence recorded before any request arrived.
    pub request: Option<TransferCmd>,
    /// Succeeded or failed.
    pub status: Status,
    /// Refusal code when failed (`never_received` for a fence).
    pub reason: Option<String>,
    /// Sequence number of the debit entry.
    pub from_seq: Option<i64>,
    /// Sequence number of the credit entry.
    pub to_seq: Option<i64>,
    /// True when this record is a fence.
    pub fenced: bool,
    /// When the decision committed.
    pub completed_at: DateTime<Utc>,
}

/// What the core decided for a deposit id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepositRecord {
    /// The request.
    pub request: DepositCmd,
    /// Succeeded or failed.
    pub status: Status,
    /// Refusal code when failed.
    pub reason: Option<String>,
    /// Sequence number of the credit entry.
    pub seq: Option<i64>,
    /// Balance after the credit.
    pub balance_after: Option<Won>,
    /// When the decision committed.
    pub completed_at: DateTime<Utc>,
}

/// Errors of the ledger that are not refusals.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The id is known with a different request.
    #[error("{kind} {id} was already requested with a different {field}")]
    IdempotencyConflict {
        /// "transfer" or "deposit".
        kind: &'static str,
        /// The id.
        id: String,
        /// First field that differs.
        field: &'static str,
    },
    /// The ledger queue is full; the caller should retry later.
    #[error("the ledger is overloaded; retry later")]
    Overloaded,
    /// An account of the command is held by another transaction past the
    /// lock timeout and the ledger is already waiting on held accounts as
    /// much as it may; nothing was executed, the caller should retry later.
    #[error("an account of the request is held by another operation; retry later")]
    AccountBusy,
    /// The ledger is shutting down.
    #[error("the ledger is shutting down")]
    ShuttingDown,
    /// The database failed (after transparent retries).
    #[error("ledger database")]
    Db(#[from] sea_orm::DbErr),
}

/// A closing balance carried into a business date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyBalance {
    /// The date.
    pub date: NaiveDate,
    /// Balance at the end of that date.
    pub closing: Won,
}

//! Customers and accounts: opening, reading, and changing their states.
//!
//! State changes of an account lock its row, like money movements do, so a
//! change (say, a deposit stop) and a transfer are ordered: the transfer sees
//! the account either before or after the change, never half of it.

use chrono::{NaiveDate, Utc};
use common::{AccountId, CustomerId};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionTrait,
};
use serde::{Deserialize, Serialize};

use crate::store::{account, customer};

/// Customer states. All but `normal` are protected: no interest payout (B24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CustomerStatus {
    /// No restriction.
    Normal,
    /// Victim of identity theft.
    IdentityTheft,
    /// Victim of hacking.
    Hacked,
    /// Deceased.
    Deceased,
}

impl CustomerStatus {
    /// Database name.
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerStatus::Normal => "normal",
            CustomerStatus::IdentityTheft => "identity_theft",
            CustomerStatus::Hacked => "hacked",
            CustomerStatus::Deceased => "deceased",
        }
    }

    /// True for protected states.
    pub fn is_protected(self) -> bool {
        self != CustomerStatus::Normal
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "normal" => CustomerStatus::Normal,
            "identity_theft" => CustomerStatus::IdentityTheft,
            "hacked" => CustomerStatus::Hacked,
            "deceased" => CustomerStatus::Deceased,
            _ => return None,
        })
    }
}

/// Account states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    /// Money may move.
    Active,
    /// Temporarily blocked.
    Suspended,
    /// Closed for good.
    Closed,
}

impl AccountStatus {
    /// Database name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Suspended => "suspended",
            AccountStatus::Closed => "closed",
        }
    }
}

/// Errors of account and customer operations.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// No such customer.
    #[error("customer not found")]
    CustomerNotFound,
    /// No such account.
    #[error("account not found")]
    AccountNotFound,
    /// Closing needs a zero balance.
    #[error("an account can only be closed with a zero balance")]
    BalanceNotZero,
    /// Closed is final.
    #[error("the account is closed; its state can no longer change")]
    AccountClosed,
    /// The database failed.
    #[error("accounts storage")]
    Db(#[from] DbErr),
}

/// Changes requested by `PATCH /v1/accounts/{id}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChanges {
    /// New state.
    pub status: Option<AccountStatus>,
    /// Stop or allow incoming money.
    pub deposit_stopped: Option<bool>,
    /// Stop or allow outgoing money.
    pub withdrawal_stopped: Option<bool>,
}

/// Creates a customer.
pub async fn create_customer(
    db: &DatabaseConnection,
    name: &str,
) -> Result<customer::Model, AccountsError> {
    let now = Utc::now();
    let model = customer::ActiveModel {
        customer_id: Set(CustomerId::generate().into_string()),
        name: Set(name.to_owned()),
        status: Set(CustomerStatus::Normal.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    };
    Ok(model.insert(db).await?)
}

/// Sets a customer's status.
pub async fn set_customer_status(
    db: &DatabaseConnection,
    id: &CustomerId,
    status: CustomerStatus,
) -> Result<customer::Model, AccountsError> {
    let found = customer::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(AccountsError::CustomerNotFound)?;
    let mut model: customer::ActiveModel = found.into();
    model.status = Set(status.as_str().to_owned());
    model.updated_at = Set(Utc::now());
    Ok(model.update(db).await?)
}

/// Reads a customer.
pub async fn get_customer(
    db: &DatabaseConnection,
    id: &CustomerId,
) -> Result<customer::Model, AccountsError> {
    customer::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(AccountsError::CustomerNotFound)
}

/// Opens an account for a customer; interest accrues from `today`.
pub async fn open_account(
    db: &DatabaseConnection,
    customer_id: &CustomerId,
    today: NaiveDate,
) -> Result<account::Model, AccountsError> {
    get_customer(db, customer_id).await?;
    let now = Utc::now();
    let model = account::ActiveModel {
        account_id: Set(AccountId::generate().into_string()),
        customer_id: Set(customer_id.to_string()),
        balance: Set(rust_decimal::Decimal::ZERO),
        last_seq: Set(0),
        status: Set(AccountStatus::Active.as_str().to_owned()),
        deposit_stopped: Set(false),
        withdrawal_stopped: Set(false),
        opened_on: Set(today),
        interest_paid_through: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    };
    Ok(model.insert(db).await?)
}

/// Reads an account.
pub async fn get_account(
    db: &DatabaseConnection,
    id: &AccountId,
) -> Result<account::Model, AccountsError> {
    account::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(AccountsError::AccountNotFound)
}

/// Lists accounts by id, optionally of one customer, after `after` (keyset).
pub async fn list_accounts(
    db: &DatabaseConnection,
    customer: Option<&CustomerId>,
    after: Option<&AccountId>,
    limit: u64,
) -> Result<Vec<account::Model>, AccountsError> {
    let mut q = account::Entity::find()
        .order_by_asc(account::Column::AccountId)
        .limit(limit);
    if let Some(c) = customer {
        q = q.filter(account::Column::CustomerId.eq(c.to_string()));
    }
    if let Some(a) = after {
        q = q.filter(account::Column::AccountId.gt(a.to_string()));
    }
    Ok(q.all(db).await?)
}

/// Changes an account's state under its row lock.
pub async fn change_account(
    db: &DatabaseConnection,
    id: &AccountId,
    changes: AccountChanges,
) -> Result<account::Model, AccountsError> {
    let txn = db.begin().await?;
    let current = account::Entity::find_by_id(id.to_string())
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or(AccountsError::AccountNotFound)?;
    if current.status == AccountStatus::Closed.as_str() {
        return Err(AccountsError::AccountClosed);
    }
    if changes.status == Some(AccountStatus::Closed) && !current.balance.is_zero() {
        return Err(AccountsError::BalanceNotZero);
    }
    let mut update = account::Entity::update_many()
        .col_expr(account::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(account::Column::AccountId.eq(id.to_string()));
    if let Some(s) = changes.status {
        update = update.col_expr(account::Column::Status, Expr::value(s.as_str()));
    }
    if let Some(v) = changes.deposit_stopped {
        update = update.col_expr(account::Column::DepositStopped, Expr::value(v));
    }
    if let Some(v) = changes.withdrawal_stopped {
        update = update.col_expr(account::Column::WithdrawalStopped, Expr::value(v));
    }
    update.exec(&txn).await?;
    let updated = account::Entity::find_by_id(id.to_string())
        .one(&txn)
        .await?
        .ok_or(AccountsError::AccountNotFound)?;
    txn.commit().await?;
    Ok(updated)
}

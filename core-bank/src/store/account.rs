//! `accounts`.

use sea_orm::entity::prelude::*;

/// An account row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "accounts")]
pub struct Model {
    /// Id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    /// Owner.
    pub customer_id: String,
    /// Balance in whole won.
    #[sea_orm(column_type = "Decimal(Some((30, 0)))")]
    pub balance: Decimal,
    /// Sequence number of the latest entry.
    pub last_seq: i64,
    /// `active`, `suspended` or `closed`.
    pub status: String,
    /// Refuses incoming money.
    pub deposit_stopped: bool,
    /// Refuses outgoing money.
    pub withdrawal_stopped: bool,
    /// Business date of opening: the first day that can earn interest.
    pub opened_on: Date,
    /// Last business date covered by an interest payout.
    pub interest_paid_through: Option<Date>,
    /// Created.
    pub created_at: DateTimeUtc,
    /// Last changed.
    pub updated_at: DateTimeUtc,
}

/// No relations are navigated through the ORM.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

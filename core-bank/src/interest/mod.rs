//! "Receive interest now" (B21-B27).
//!
//! - [`calc`]: the product arithmetic (tiers, tax, rounding), pure and exact.
//! - [`legacy`] and [`daily`]: the two implementations of "interest accrued
//!   since the last payout" -- the legacy one replays the day-by-day ledger,
//!   the new one reads the daily closing balances the ledger maintains.
//! - [`rollout`]: which accounts use which path, and shadow mode.
//! - [`cache`]: the expected-interest cache in Redis.
//! - [`service`]: the expected-interest query and the batch verifier.
//! - [`payout`]: the payout transaction.

pub mod cache;
pub mod calc;
pub mod daily;
pub mod legacy;
pub mod payout;
pub mod rollout;
pub mod service;

use chrono::NaiveDate;
use common::{AccountId, Won};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use calc::InterestSettings;
pub use service::InterestService;

/// Which implementation computed a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// Day-by-day replay of the ledger.
    Legacy,
    /// Maintained daily balances.
    New,
}

impl Path {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Legacy => "legacy",
            Path::New => "new",
        }
    }

    /// The other path (the one shadow mode compares with).
    pub fn other(self) -> Self {
        match self {
            Path::Legacy => Path::New,
            Path::New => Path::Legacy,
        }
    }
}

/// Interest accrued over the completed, unpaid business days of an account:
/// the answer of `GET /v1/accounts/{id}/interest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Accrual {
    /// The account.
    #[schema(value_type = String)]
    pub account_id: AccountId,
    /// First unpaid business date.
    pub from: NaiveDate,
    /// Last completed business date (yesterday); before `from` when `days` is 0.
    pub through: NaiveDate,
    /// Completed unpaid days.
    pub days: i64,
    /// Interest before tax, rounded down to a won.
    #[schema(value_type = String)]
    pub gross: Won,
    /// Withholding tax, rounded down to a won.
    #[schema(value_type = String)]
    pub tax: Won,
    /// `gross - tax`, what a payout credits.
    #[schema(value_type = String)]
    pub net: Won,
    /// The implementation that computed it.
    pub path: Path,
    /// The days' summed annual weights (365 times the exact interest, before
    /// rounding down): compared by the shadow check and the verifier too, so
    /// a drift too small to move a whole won is still seen. Not part of the
    /// answer (nor of a cached figure, which is never compared).
    #[serde(skip)]
    pub weight: Decimal,
}

impl Accrual {
    /// True when both paths agree on every figure.
    pub fn same_figures(&self, other: &Accrual) -> bool {
        self.from == other.from
            && self.through == other.through
            && self.days == other.days
            && self.gross == other.gross
            && self.tax == other.tax
            && self.net == other.net
            && self.weight == other.weight
    }

    /// The interest before rounding down, exact (to 12 places), as text:
    /// where two figures that agree to the won differ.
    pub fn exact_gross(&self) -> String {
        calc::exact_interest(self.weight)
            .round_dp(12)
            .normalize()
            .to_string()
    }
}

/// What both paths need to know about an account.
#[derive(Debug, Clone)]
pub struct AccountTerms {
    /// The account.
    pub account_id: AccountId,
    /// First business date that can earn interest.
    pub opened_on: NaiveDate,
    /// Last business date already paid.
    pub paid_through: Option<NaiveDate>,
}

impl AccountTerms {
    /// The unpaid period ending yesterday: `(from, through)`.
    pub fn period(&self, today: NaiveDate) -> (NaiveDate, NaiveDate) {
        let from = self
            .paid_through
            .and_then(|d| d.succ_opt())
            .unwrap_or(self.opened_on)
            .max(self.opened_on);
        let through = today.pred_opt().unwrap_or(today);
        (from, through)
    }
}

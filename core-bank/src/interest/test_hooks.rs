//! Fault injection for tests only (feature `test-hooks`, enabled by the test
//! crate): makes the new interest path disagree with the legacy one for
//! chosen accounts, to prove shadow verification notices.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use common::AccountId;
use rust_decimal::Decimal;

fn skews() -> &'static Mutex<HashMap<String, Decimal>> {
    static SKEWS: OnceLock<Mutex<HashMap<String, Decimal>>> = OnceLock::new();
    SKEWS.get_or_init(Default::default)
}

/// From now on the new path adds `won` to the gross interest of `account`.
pub fn skew_new_path(account: &AccountId, won: Decimal) {
    if let Ok(mut m) = skews().lock() {
        m.insert(account.to_string(), won);
    }
}

/// The skew set for `account` (zero if none).
pub fn skew_for(account: &AccountId) -> Decimal {
    skews()
        .lock()
        .ok()
        .and_then(|m| m.get(account.as_str()).copied())
        .unwrap_or(Decimal::ZERO)
}

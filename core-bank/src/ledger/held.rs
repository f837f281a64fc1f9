//! What the executor remembers of accounts another transaction held past the
//! lock timeout.
//!
//! Once a batch has waited a lock timeout on an account, the next batches
//! run their commands on it apart, while there is a place for that (see
//! [`super::executor`]), instead of waiting the lock timeout on a worker
//! again. The memory is only a hint of where a wait is likely: it refuses
//! nothing, and an account is forgotten once a parked batch that locked it
//! commits, or a while after it was last found held.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an account is remembered after it was last found held. Past it,
/// a batch on a worker waits one lock timeout on the account again.
const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// Most accounts remembered at once; beyond it, new ones are not (the
/// executor then waits a lock timeout on them, as without the memory).
const REMEMBER_MAX: usize = 1024;

/// Accounts found held, with when the database last said so.
#[derive(Debug, Default)]
pub(super) struct HeldAccounts {
    seen: Mutex<HashMap<String, Instant>>,
}

impl HeldAccounts {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // The map stays consistent whatever a panicking holder did: every
        // change is one insert or remove.
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that `held` were found held past a lock timeout just now.
    pub(super) fn remember<'a>(&self, held: impl IntoIterator<Item = &'a String>) {
        self.remember_at(held, Instant::now());
    }

    fn remember_at<'a>(&self, held: impl IntoIterator<Item = &'a String>, now: Instant) {
        let mut seen = self.seen();
        seen.retain(|_, at| now.duration_since(*at) < REMEMBER_FOR);
        for id in held {
            if seen.len() < REMEMBER_MAX || seen.contains_key(id) {
                seen.insert(id.clone(), now);
            }
        }
    }

    /// Notes that `free` are not held (a transaction could lock them).
    pub(super) fn forget<'a>(&self, free: impl IntoIterator<Item = &'a str>) {
        let mut seen = self.seen();
        for id in free {
            seen.remove(id);
        }
    }

    /// Which of `accounts` were found held lately (each once).
    pub(super) fn recalled<'a>(&self, accounts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        self.recalled_at(accounts, Instant::now())
    }

    fn recalled_at<'a>(
        &self,
        accounts: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Vec<String> {
        let seen = self.seen();
        if seen.is_empty() {
            return Vec::new();
        }
        let mut recalled: Vec<String> = accounts
            .into_iter()
            .filter(|id| {
                seen.get(*id)
                    .is_some_and(|at| now.duration_since(*at) < REMEMBER_FOR)
            })
            .map(str::to_owned)
            .collect();
        recalled.sort_unstable();
        recalled.dedup();
        recalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("acc_{i}")).collect()
    }

    #[test]
    fn b03_held_accounts_are_recalled_until_forgotten_or_stale() {
        let held = HeldAccounts::default();
        let start = Instant::now();
        let accounts = ids(3);
        held.remember_at(&accounts[..2], start);
        let asked = ["acc_1", "acc_2", "acc_1", "acc_0"];
        assert_eq!(
            held.recalled_at(asked, start),
            vec!["acc_0".to_owned(), "acc_1".to_owned()]
        );
        held.forget(["acc_0"]);
        assert_eq!(held.recalled_at(asked, start), vec!["acc_1".to_owned()]);
        // Said held again later: remembered from then.
        held.remember_at([&accounts[1]], start + REMEMBER_FOR / 2);
        assert_eq!(
            held.recalled_at(asked, start + REMEMBER_FOR),
            vec!["acc_1".to_owned()]
        );
        assert!(held.recalled_at(asked, start + REMEMBER_FOR * 2).is_empty());
    }

    #[test]
    fn b03_held_account_memory_is_bounded() {
        let held = HeldAccounts::default();
        let start = Instant::now();
        let accounts = ids(REMEMBER_MAX + 10);
        held.remember_at(&accounts, start);
        assert_eq!(held.seen().len(), REMEMBER_MAX);
        // A remembered account is still refreshed at the limit.
        held.remember_at([&accounts[0]], start + REMEMBER_FOR / 2);
        assert_eq!(
            held.recalled_at(["acc_0", "acc_1"], start + REMEMBER_FOR),
            vec!["acc_0".to_owned()]
        );
        // Stale ones make room.
        held.remember_at(&accounts[REMEMBER_MAX..], start + REMEMBER_FOR);
        assert_eq!(held.seen().len(), 11);
    }
}

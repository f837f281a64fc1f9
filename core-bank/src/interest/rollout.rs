//! The gradual rollout of the new interest path (B26).
//!
//! The setting lives in the core database (`interest_rollout`), so every
//! replica follows the same one; each replica re-reads it every second, and
//! the replica that changes it applies it at once (a re-read that began
//! before that change is discarded, so it cannot undo it). Accounts are bucketed by a
//! stable hash of their id (FNV-1a, fixed by this code, not by the Rust
//! version): bucket `< new_path_percent` means the new path. Raising the
//! percentage only ever adds accounts to the new path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use common::AccountId;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use serde::{Deserialize, Serialize};

use super::Path;

/// The rollout setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSetting {
    /// Percentage of accounts (0-100) served by the new path.
    pub new_path_percent: u8,
    /// When true, both paths run and mismatches are reported.
    pub shadow: bool,
}

/// Which local stores a refresh's read may predate (see
/// [`Rollout::apply_refreshed`]).
#[derive(Debug, Clone, Copy)]
pub struct RefreshTicket(u64);

/// The setting in force in this process.
#[derive(Debug, Clone)]
pub struct Rollout {
    current: Arc<RwLock<RolloutSetting>>,
    /// Incremented by every local `store`: a refresh whose read began before
    /// a store may have read the old row, and is discarded.
    stores: Arc<AtomicU64>,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            current: Arc::new(RwLock::new(RolloutSetting {
                new_path_percent: 0,
                shadow: false,
            })),
            stores: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// The stable bucket (0..100) of an account.
pub fn bucket(account: &AccountId) -> u8 {
    (common::ids::stable_hash(account.as_str()) % 100) as u8
}

impl Rollout {
    /// The setting in force.
    pub fn get(&self) -> RolloutSetting {
        self.current.read().map(|g| *g).unwrap_or(RolloutSetting {
            new_path_percent: 0,
            shadow: false,
        })
    }

    /// The path serving `account` under the current setting.
    pub fn path_for(&self, account: &AccountId) -> Path {
        if bucket(account) < self.get().new_path_percent {
            Path::New
        } else {
            Path::Legacy
        }
    }

    /// Re-reads the setting from the database.
    pub async fn refresh(&self, db: &DatabaseConnection) -> Result<(), DbErr> {
        let ticket = self.refresh_ticket();
        if let Some(read) = Self::read(db).await? {
            self.apply_refreshed(ticket, read);
        }
        Ok(())
    }

    /// Taken before a refresh reads the database; see [`Self::apply_refreshed`].
    pub fn refresh_ticket(&self) -> RefreshTicket {
        RefreshTicket(self.stores.load(Ordering::SeqCst))
    }

    /// The setting stored in the database, if the row exists.
    pub async fn read(db: &DatabaseConnection) -> Result<Option<RolloutSetting>, DbErr> {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT new_path_percent, shadow FROM interest_rollout WHERE id = 1",
            ))
            .await?;
        row.map(|r| {
            let percent: i32 = r.try_get("", "new_path_percent")?;
            Ok(RolloutSetting {
                new_path_percent: percent.clamp(0, 100) as u8,
                shadow: r.try_get("", "shadow")?,
            })
        })
        .transpose()
    }

    /// Applies a setting read by a refresh, unless this process stored a
    /// setting since `ticket` was taken: that read may have seen the row as it
    /// was before the store, and applying it would undo the store here until
    /// the next refresh.
    pub fn apply_refreshed(&self, ticket: RefreshTicket, read: RolloutSetting) {
        // Checked under the lock that `store` also takes to apply its
        // setting, so a store cannot slip in between check and write.
        if let Ok(mut g) = self.current.write()
            && self.stores.load(Ordering::SeqCst) == ticket.0
        {
            *g = read;
        }
    }

    /// Stores a new setting (validated by the caller) and applies it here now.
    pub async fn store(
        &self,
        db: &DatabaseConnection,
        s: RolloutSetting,
    ) -> Result<RolloutSetting, DbErr> {
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE interest_rollout SET new_path_percent = $1, shadow = $2, updated_at = now() WHERE id = 1",
            [i32::from(s.new_path_percent).into(), s.shadow.into()],
        ))
        .await?;
        if let Ok(mut g) = self.current.write() {
            self.stores.fetch_add(1, Ordering::SeqCst);
            *g = s;
        }
        tracing::info!(
            new_path_percent = s.new_path_percent,
            shadow = s.shadow,
            "interest rollout changed"
        );
        Ok(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        let a = AccountId::parse("acc_fixed_example").unwrap();
        // A fixed value: a change of the hash would silently move accounts
        // between the paths on upgrade.
        assert_eq!(bucket(&a), 98);
        let mut seen = [0u32; 100];
        for _ in 0..10_000 {
            seen[bucket(&AccountId::generate()) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&n| n > 40),
            "buckets badly spread: {seen:?}"
        );
    }
}

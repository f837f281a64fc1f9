//! The gradual rollout of the new interest path (B26).
//!
//! The setting lives in the core database (`interest_rollout`), so every
//! replica follows the same one; each replica re-reads it every second, and
//! the replica that changes it applies it at once. Accounts are bucketed by a
//! stable hash of their id (FNV-1a, fixed by this code, not by the Rust
//! version): bucket `< new_path_percent` means the new path. Raising the
//! percentage only ever adds accounts to the new path.

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

/// The setting in force in this process.
#[derive(Debug, Clone)]
pub struct Rollout {
    current: Arc<RwLock<RolloutSetting>>,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            current: Arc::new(RwLock::new(RolloutSetting {
                new_path_percent: 0,
                shadow: false,
            })),
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

    fn set_local(&self, s: RolloutSetting) {
        if let Ok(mut g) = self.current.write() {
            *g = s;
        }
    }

    /// Re-reads the setting from the database.
    pub async fn refresh(&self, db: &DatabaseConnection) -> Result<(), DbErr> {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT new_path_percent, shadow FROM interest_rollout WHERE id = 1",
            ))
            .await?;
        if let Some(r) = row {
            let percent: i32 = r.try_get("", "new_path_percent")?;
            self.set_local(RolloutSetting {
                new_path_percent: percent.clamp(0, 100) as u8,
                shadow: r.try_get("", "shadow")?,
            });
        }
        Ok(())
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
        self.set_local(s);
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

//! Typed identifiers.
//!
//! Ids are opaque strings on the wire. They are restricted to 1..=64 characters
//! of `[A-Za-z0-9_-]` so that any id can be used as a NATS subject token
//! (`bank.ledger.<account_id>`), a Redis key part or a log field without
//! escaping. Ids the services create are a short prefix plus a UUIDv7, which
//! sorts by creation time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not an acceptable id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("id must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct IdError;

/// Checks the id alphabet and length.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(IdError) }
}

/// A stable 64-bit hash of an id (FNV-1a), fixed by this code rather than by
/// the Rust version, for anything that must place an id the same way
/// everywhere and forever: rollout buckets, processing lanes, partitions.
pub fn stable_hash(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Prefix of ids this system generates for this kind.
            pub const PREFIX: &'static str = $prefix;

            /// Parses and validates an id.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_id(&s)?;
                Ok(Self(s))
            }

            /// Generates a new, time-ordered id with this kind's prefix.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as owned text.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// A customer of the bank.
    CustomerId,
    "cus_"
);
typed_id!(
    /// A deposit account held at the core.
    AccountId,
    "acc_"
);
typed_id!(
    /// A transfer between two accounts of this bank, chosen by the caller.
    TransferId,
    "trf_"
);
typed_id!(
    /// An inbound deposit from another bank, chosen by the sender.
    DepositId,
    "dep_"
);
typed_id!(
    /// An interest payout, chosen by the caller.
    PayoutId,
    "pay_"
);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_prefixed() {
        let id = AccountId::generate();
        assert!(id.as_str().starts_with("acc_"));
        assert!(AccountId::parse(id.as_str()).is_ok());
    }

    #[test]
    fn rejects_subject_breaking_characters() {
        for bad in ["", "a.b", "a*", "a>", "a b", "é", &"x".repeat(65)] {
            assert!(AccountId::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_value::<TransferId>(serde_json::json!(bad)).is_err());
        }
        assert!(serde_json::from_value::<TransferId>(serde_json::json!(12)).is_err());
        assert!(TransferId::parse("t-1_A").is_ok());
    }
}

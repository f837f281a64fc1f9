//! Timestamps at the precision the databases store (microseconds), so a value
//! returned right after a write equals the same value read back later.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// Drops sub-microsecond digits.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t)
}

/// The current instant, truncated to microseconds.
pub fn now_micros() -> DateTime<Utc> {
    truncate_micros(Utc::now())
}

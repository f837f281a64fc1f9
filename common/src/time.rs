//! Timestamps at the precision the databases store (microseconds), so a value
//! returned right after a write equals the same value read back later.

use chrono::{DateTime, Timelike, Utc};

/// Drops sub-microsecond digits, for any instant chrono can hold (rounding
/// through a nanosecond count would fail outside the years 1677-2262).
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// The current instant, truncated to microseconds.
pub fn now_micros() -> DateTime<Utc> {
    truncate_micros(Utc::now())
}

#[cfg(test)]
mod tests {
    use super::truncate_micros;
    use chrono::{DateTime, Utc};

    fn at(text: &str) -> DateTime<Utc> {
        let parsed = text.parse();
        assert!(parsed.is_ok(), "{text} does not parse");
        parsed.unwrap_or_default()
    }

    #[test]
    fn sub_microsecond_digits_are_dropped_in_every_century() {
        for (given, truncated) in [
            (
                "2026-12-03T10:00:00.123456789Z",
                "2026-12-03T10:00:00.123456Z",
            ),
            (
                "1600-01-01T00:00:00.999999999Z",
                "1600-01-01T00:00:00.999999Z",
            ),
            ("2300-06-30T23:59:59.000000500Z", "2300-06-30T23:59:59Z"),
        ] {
            assert_eq!(truncate_micros(at(given)), at(truncated), "{given}");
        }
    }
}

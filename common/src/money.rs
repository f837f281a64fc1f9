//! Money on the wire and in the ledger.
//!
//! All amounts are Korean won held as [`rust_decimal::Decimal`]. They travel as
//! JSON **strings** (`"15000"`, `"-15000"`); a JSON number is rejected because
//! binary floating point cannot represent every decimal and clients that send
//! numbers have usually already lost precision. Parsing happens once, at the
//! edge, into types that cannot hold an invalid value ("parse, don't validate").

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest amount of a single movement: 10^15 won (one quadrillion),
/// far above any real transfer.
pub const MAX_WON: i64 = 1_000_000_000_000_000;

/// The largest balance an account may reach, and so the bound of every
/// signed figure ([`Won`]) read from the wire: 10^18 won. Several movements
/// can take a balance past [`MAX_WON`], so balances (`balance_after` in
/// events and entries) must parse up to this. It leaves room in
/// the `NUMERIC(30,0)` columns for sums over many accounts.
pub const MAX_BALANCE_WON: i64 = 1_000_000_000_000_000_000;

/// Why a string is not an acceptable amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The text is not a plain decimal number.
    #[error("amount must be a decimal number written as a string, like \"15000\"")]
    NotANumber,
    /// A fraction of a won where only whole won are allowed.
    #[error("amount must be whole won, without a fraction part")]
    Fractional,
    /// Zero or negative where a positive amount is required.
    #[error("amount must be greater than zero")]
    NotPositive,
    /// Larger than the type's bound ([`MAX_WON`] for an [`Amount`],
    /// [`MAX_BALANCE_WON`] for a [`Won`]) in absolute value.
    #[error("amount must not exceed {max} won")]
    TooLarge {
        /// The bound.
        max: i64,
    },
}

/// Parses the strict textual form shared by all money types: an optional `-`,
/// then ASCII digits, with no exponent, sign `+`, spaces or fraction, at most
/// `max` in absolute value.
fn parse_whole_won(text: &str, max: i64) -> Result<Decimal, MoneyError> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() {
        return Err(MoneyError::NotANumber);
    }
    if let Some((int, frac)) = digits.split_once('.') {
        let numeric = !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.bytes().all(|b| b.is_ascii_digit());
        return Err(if numeric {
            MoneyError::Fractional
        } else {
            MoneyError::NotANumber
        });
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MoneyError::NotANumber);
    }
    // 19 digits are enough for MAX_BALANCE_WON; longer inputs are too large
    // (or padded with zeros, which we refuse rather than interpret).
    if digits.len() > 19 {
        return Err(MoneyError::TooLarge { max });
    }
    let value = Decimal::from_str(text).map_err(|_| MoneyError::NotANumber)?;
    if value.abs() > Decimal::from(max) {
        return Err(MoneyError::TooLarge { max });
    }
    Ok(value)
}

/// Formats a whole-won decimal without a fraction part (`"15000"`, `"-15000"`).
fn format_whole(value: Decimal, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut v = value;
    v.rescale(0);
    write!(f, "{v}")
}

/// Visitor accepting JSON strings only.
struct StrOnly<T>(std::marker::PhantomData<T>);

impl<T: FromStr<Err = MoneyError>> serde::de::Visitor<'_> for StrOnly<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an amount of won as a string, like \"15000\"")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        T::from_str(v).map_err(E::custom)
    }
}

/// A positive amount of whole won, at most [`MAX_WON`]: what a transfer,
/// deposit or payout moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(Decimal);

impl Amount {
    /// Builds an amount from a decimal, applying the same rules as parsing.
    pub fn new(value: Decimal) -> Result<Self, MoneyError> {
        if !value.fract().is_zero() {
            return Err(MoneyError::Fractional);
        }
        if value <= Decimal::ZERO {
            return Err(MoneyError::NotPositive);
        }
        if value > Decimal::from(MAX_WON) {
            return Err(MoneyError::TooLarge { max: MAX_WON });
        }
        Ok(Self(value.normalize()))
    }

    /// Builds an amount from whole won.
    pub fn from_won(won: i64) -> Result<Self, MoneyError> {
        Self::new(Decimal::from(won))
    }

    /// The amount as a decimal.
    pub fn value(self) -> Decimal {
        self.0
    }
}

impl FromStr for Amount {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(parse_whole_won(s, MAX_WON)?)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_whole(self.0, f)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOnly::<Amount>(std::marker::PhantomData))
    }
}

/// A signed amount of whole won: balances, signed ledger amounts, interest
/// figures. Bounded by [`MAX_BALANCE_WON`] in absolute value when parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Won(Decimal);

impl Won {
    /// Zero won.
    pub const ZERO: Won = Won(Decimal::ZERO);

    /// Wraps a decimal that holds whole won. Fractions are refused; the bound
    /// is not checked here because sums of balances may exceed it.
    pub fn new(value: Decimal) -> Result<Self, MoneyError> {
        if !value.fract().is_zero() {
            return Err(MoneyError::Fractional);
        }
        Ok(Self(value.normalize()))
    }

    /// Wraps whole won.
    pub fn from_won(won: i64) -> Self {
        Self(Decimal::from(won))
    }

    /// The value as a decimal.
    pub fn value(self) -> Decimal {
        self.0
    }

    /// True when below zero.
    pub fn is_negative(self) -> bool {
        self.0.is_sign_negative() && !self.0.is_zero()
    }
}

impl From<Amount> for Won {
    fn from(a: Amount) -> Self {
        Won(a.0)
    }
}

impl std::ops::Add for Won {
    type Output = Won;
    fn add(self, rhs: Won) -> Won {
        Won(self.0 + rhs.0)
    }
}

impl std::ops::Sub for Won {
    type Output = Won;
    fn sub(self, rhs: Won) -> Won {
        Won(self.0 - rhs.0)
    }
}

impl std::ops::Neg for Won {
    type Output = Won;
    fn neg(self) -> Won {
        Won(-self.0)
    }
}

impl std::iter::Sum for Won {
    fn sum<I: Iterator<Item = Won>>(iter: I) -> Won {
        iter.fold(Won::ZERO, |a, b| a + b)
    }
}

impl FromStr for Won {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(parse_whole_won(s, MAX_BALANCE_WON)?)
    }
}

impl fmt::Display for Won {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_whole(self.0, f)
    }
}

impl Serialize for Won {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Won {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOnly::<Won>(std::marker::PhantomData))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[derive(Debug, Deserialize)]
    struct Body {
        amount: Amount,
    }

    fn parse_json(json: &str) -> Result<Amount, String> {
        serde_json::from_str::<Body>(json)
            .map(|b| b.amount)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_whole_won_strings() {
        assert_eq!(
            parse_json(r#"{"amount":"15000"}"#).unwrap().value(),
            dec!(15000)
        );
        assert_eq!(parse_json(r#"{"amount":"1"}"#).unwrap().value(), dec!(1));
        assert_eq!(
            parse_json(r#"{"amount":"1000000000000000"}"#)
                .unwrap()
                .value(),
            Decimal::from(MAX_WON)
        );
    }

    #[test]
    fn rejection_table() {
        let cases = [
            (r#"{"amount":15000}"#, "string"),
            (r#"{"amount":15000.5}"#, "string"),
            (r#"{"amount":"0"}"#, "greater than zero"),
            (r#"{"amount":"-5"}"#, "greater than zero"),
            (r#"{"amount":"-0"}"#, "greater than zero"),
            (r#"{"amount":"10.5"}"#, "whole won"),
            (r#"{"amount":"15000.00"}"#, "whole won"),
            (r#"{"amount":"1000000000000001"}"#, "exceed"),
            (r#"{"amount":"99999999999999999999999999"}"#, "exceed"),
            (r#"{"amount":"1e5"}"#, "decimal number"),
            (r#"{"amount":"+5"}"#, "decimal number"),
            (r#"{"amount":" 5"}"#, "decimal number"),
            (r#"{"amount":""}"#, "decimal number"),
            (r#"{"amount":"-"}"#, "decimal number"),
            (r#"{"amount":"abc"}"#, "decimal number"),
            (r#"{"amount":"NaN"}"#, "decimal number"),
            (r#"{"amount":".5"}"#, "decimal number"),
            (r#"{"amount":null}"#, "string"),
            (r#"{"amount":true}"#, "string"),
        ];
        for (json, expected) in cases {
            let err = parse_json(json).expect_err(json);
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn signed_won_round_trips_without_fraction() {
        let w: Won = serde_json::from_str(r#""-15000""#).unwrap();
        assert_eq!(w.value(), dec!(-15000));
        assert_eq!(serde_json::to_string(&w).unwrap(), r#""-15000""#);
        let scaled = Won::new(dec!(15000.00)).unwrap();
        assert_eq!(scaled.to_string(), "15000");
        assert!(serde_json::from_str::<Won>("-15000").is_err());
        assert!(Won::new(dec!(0.5)).is_err());
    }

    /// Balances grow past the single-movement bound (two deposits of 10^15
    /// make 2 * 10^15), and every `balance_after` is read back through `Won`.
    #[test]
    fn signed_won_parses_balances_up_to_the_balance_bound() {
        for text in [
            "2000000000000000",
            "1000000000000000000",
            "-1000000000000000000",
        ] {
            let w: Won = serde_json::from_str(&format!("\"{text}\"")).unwrap();
            assert_eq!(w.to_string(), text);
        }
        for text in [
            "1000000000000000001",
            "10000000000000000000",
            "-1000000000000000001",
        ] {
            let err = serde_json::from_str::<Won>(&format!("\"{text}\"")).unwrap_err();
            assert!(
                err.to_string().contains("exceed 1000000000000000000"),
                "{text}: {err}"
            );
        }
        // The movement bound is unchanged.
        assert!(parse_json(r#"{"amount":"2000000000000000"}"#).is_err());
    }

    #[test]
    fn amount_serializes_as_plain_string() {
        let a = Amount::new(dec!(15000.000)).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""15000""#);
        assert!(Amount::new(dec!(1.5)).is_err());
    }
}

//! Interest arithmetic.
//!
//! A day's interest is, for each tier, the part of that day's closing balance
//! inside the tier times the tier's annual rate / 365. To stay exact, the
//! products `part x rate` (exact decimals) are summed over all days first and
//! divided by 365 once; that equals the sum of the daily figures. `gross` is
//! that sum rounded down to a won, `tax` is `gross x tax rate` rounded down,
//! and `net = gross - tax`.

use std::str::FromStr;

use common::Won;
use rust_decimal::{Decimal, RoundingStrategy};

/// One rate tier: the part of a balance up to `upper` (exclusive of lower
/// tiers) earns `annual_rate` (a fraction, 0.02 for 2%).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Upper bound of the tier in won; `None` for the last, unbounded tier.
    pub upper: Option<Decimal>,
    /// Annual rate as a fraction.
    pub annual_rate: Decimal,
}

/// The product's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterestSettings {
    /// Rate tiers, ascending bounds, last one unbounded.
    pub tiers: Vec<Tier>,
    /// Tax rate as a fraction (0.154 for 15.4%).
    pub tax_rate: Decimal,
}

/// Days in the interest year.
const DAYS_PER_YEAR: i64 = 365;

/// The interest of days whose annual weights sum to `summed_weight`, exact
/// (before rounding down to a won).
pub fn exact_interest(summed_weight: Decimal) -> Decimal {
    summed_weight / Decimal::from(DAYS_PER_YEAR)
}

impl InterestSettings {
    /// The settings in one canonical text (`UPPER:RATE,...,*:RATE/TAX`, as
    /// fractions, normalized): equal exactly when the settings are, so a
    /// figure computed under other rates is told apart (the cache keeps it
    /// with its figures).
    pub fn terms(&self) -> String {
        let tiers: Vec<String> = self
            .tiers
            .iter()
            .map(|t| {
                let upper = t
                    .upper
                    .map_or_else(|| "*".to_owned(), |u| u.normalize().to_string());
                format!("{upper}:{}", t.annual_rate.normalize())
            })
            .collect();
        format!("{}/{}", tiers.join(","), self.tax_rate.normalize())
    }

    /// Parses `UPPER:PERCENT,...,*:PERCENT` and a tax percentage.
    pub fn parse(tiers: &str, tax_percent: &str) -> Result<Self, String> {
        let hundred = Decimal::from(100);
        let mut parsed = Vec::new();
        for part in tiers.split(',') {
            let (upper, pct) = part
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("tier {part:?} is not UPPER:PERCENT"))?;
            let rate =
                Decimal::from_str(pct.trim()).map_err(|e| format!("tier rate {pct:?}: {e}"))?;
            if rate.is_sign_negative() || rate > hundred {
                return Err(format!("tier rate {pct:?} must be between 0 and 100"));
            }
            let upper = match upper.trim() {
                "*" => None,
                u => Some(Decimal::from_str(u).map_err(|e| format!("tier bound {u:?}: {e}"))?),
            };
            parsed.push(Tier {
                upper,
                annual_rate: rate / hundred,
            });
        }
        let Some(last) = parsed.last() else {
            return Err("at least one tier is required".into());
        };
        if last.upper.is_some() {
            return Err("the last tier must be unbounded (*:PERCENT)".into());
        }
        let bounds: Vec<Decimal> = parsed.iter().filter_map(|t| t.upper).collect();
        if bounds.len() != parsed.len() - 1
            || bounds.windows(2).any(|w| w[0] >= w[1])
            || bounds.first().is_some_and(|b| *b <= Decimal::ZERO)
        {
            return Err(
                "tier bounds must be positive and strictly ascending, with only the last unbounded"
                    .into(),
            );
        }
        let tax = Decimal::from_str(tax_percent.trim())
            .map_err(|e| format!("tax percent {tax_percent:?}: {e}"))?;
        if tax.is_sign_negative() || tax >= hundred {
            return Err("tax percent must be at least 0 and below 100".into());
        }
        Ok(Self {
            tiers: parsed,
            tax_rate: tax / hundred,
        })
    }

    /// `sum over tiers of part x rate` for one closing balance: 365 times the
    /// day's interest, exact.
    pub fn annual_weight(&self, closing: Decimal) -> Decimal {
        let mut lower = Decimal::ZERO;
        let mut total = Decimal::ZERO;
        for tier in &self.tiers {
            if closing <= lower {
                break;
            }
            let top = tier.upper.map_or(closing, |u| closing.min(u));
            total += (top - lower) * tier.annual_rate;
            match tier.upper {
                Some(u) => lower = u,
                None => break,
            }
        }
        total
    }

    /// Gross, tax and net from the summed annual weights of the days.
    pub fn settle(&self, summed_weight: Decimal) -> (Won, Won, Won) {
        let exact = exact_interest(summed_weight);
        let gross = exact.round_dp_with_strategy(0, RoundingStrategy::ToZero);
        let tax = (gross * self.tax_rate).round_dp_with_strategy(0, RoundingStrategy::ToZero);
        let won = |d: Decimal| Won::new(d).unwrap_or_default();
        (won(gross), won(tax), won(gross - tax))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn defaults() -> InterestSettings {
        InterestSettings::parse("50000000:2.0,*:0.1", "15.4").unwrap()
    }

    #[test]
    fn b25_terms_name_the_rates_whatever_their_spelling() {
        assert_eq!(defaults().terms(), "50000000:0.02,*:0.001/0.154");
        let same = InterestSettings::parse("50000000.00:2,*:0.10", "15.40");
        assert_eq!(same.map(|s| s.terms()), Ok(defaults().terms()));
        let other = InterestSettings::parse("50000000:1.9,*:0.1", "15.4");
        assert_ne!(other.map(|s| s.terms()), Ok(defaults().terms()));
    }

    #[test]
    fn worked_example() {
        let s = defaults();
        let w = s.annual_weight(dec!(60000000)) * Decimal::from(3);
        let (g, t, n) = s.settle(w);
        assert_eq!(
            (g, t, n),
            (
                Won::from_won(8301),
                Won::from_won(1278),
                Won::from_won(7023)
            )
        );
    }

    #[test]
    fn tier_boundaries() {
        let s = defaults();
        assert_eq!(s.annual_weight(Decimal::ZERO), Decimal::ZERO);
        assert_eq!(s.annual_weight(dec!(50000000)), dec!(1000000));
        assert_eq!(s.annual_weight(dec!(50000001)), dec!(1000000.001));
        assert_eq!(s.annual_weight(dec!(1000)), dec!(20));
    }

    #[test]
    fn parse_rejects_bad_tiers() {
        for bad in [
            "",
            "50000000:2.0",
            "*:1,*:2",
            "100:2,50:1,*:1",
            "x:1,*:1",
            "100:-1,*:1",
            "0:1,*:1",
        ] {
            assert!(InterestSettings::parse(bad, "15.4").is_err(), "{bad}");
        }
        assert!(InterestSettings::parse("*:1", "100").is_err());
        assert!(InterestSettings::parse("*:1", "0").is_ok());
    }
}

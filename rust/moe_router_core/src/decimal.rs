//! Decimal numbers as they print: the exact value of a capacity factor.
//!
//! A factor given as `1.1` means 11/10, not the float64 nearest to it, so the
//! capacity formula can round exactly (`crate::capacity`).

use std::fmt;

use crate::error::{Result, RouterError};

/// A non-negative decimal `digits * 10^exp10`, parsed from its shortest printed form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    digits: u128,
    exp10: i32,
}

impl Decimal {
    /// The decimal 1.
    pub const ONE: Decimal = Decimal { digits: 1, exp10: 0 };

    /// `digits * 10^exp10`.
    pub const fn from_parts(digits: u128, exp10: i32) -> Decimal {
        Decimal { digits, exp10 }
    }

    /// Parse a plain or scientific decimal such as `"1.25"`, `"2"`, `"1e-05"`, `"3.5E+2"`.
    ///
    /// Returns `None` for anything else (signs other than a leading `+`, NaN, infinities,
    /// more than 38 significant digits).
    pub fn from_decimal_str(text: &str) -> Option<Decimal> {
        let text = text.trim();
        let text = text.strip_prefix('+').unwrap_or(text);
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
            None => (text, 0),
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let mut digits: u128 = 0;
        let mut significant = 0usize;
        for c in int_part.chars().chain(frac_part.chars()) {
            let d = c.to_digit(10)? as u128;
            if digits > 0 || d > 0 {
                significant += 1;
            }
            if significant > 38 {
                return None;
            }
            digits = digits * 10 + d;
        }
        let frac_len = i32::try_from(frac_part.len()).ok()?;
        let mut exp10 = exponent.checked_sub(frac_len)?;
        // Canonical form: strip trailing zeros so equal values compare equal.
        while digits != 0 && digits.is_multiple_of(10) {
            digits /= 10;
            exp10 = exp10.checked_add(1)?;
        }
        if digits == 0 {
            exp10 = 0;
        }
        Some(Decimal { digits, exp10 })
    }

    /// Parse the factor given for `field`, with an error naming the field.
    pub fn parse_factor(field: &'static str, text: &str) -> Result<Decimal> {
        let d = Decimal::from_decimal_str(text).ok_or_else(|| {
            RouterError::config(field, text, "must be a finite number > 0, or None for dropless routing")
        })?;
        if d.is_zero() {
            return Err(RouterError::config(
                field,
                text,
                "must be > 0; use None for dropless routing (no capacity limit)",
            ));
        }
        Ok(d)
    }

    /// True for 0.
    pub fn is_zero(&self) -> bool {
        self.digits == 0
    }

    /// The nearest float64.
    pub fn to_f64(&self) -> f64 {
        // Going through the text form gives the correctly rounded value.
        self.to_string().parse().unwrap_or(f64::INFINITY)
    }

    /// `ceil(self * numerator / denominator)`, exactly; saturates at `u64::MAX`.
    pub fn ceil_mul_div(&self, numerator: u64, denominator: u64) -> u64 {
        if self.digits == 0 || numerator == 0 {
            return 0;
        }
        let denominator = denominator.max(1) as u128;
        let scaled = self.digits.checked_mul(numerator as u128);
        let Some(scaled) = scaled else { return u64::MAX };
        if self.exp10 >= 0 {
            let pow = checked_pow10(self.exp10 as u32);
            let num = pow.and_then(|p| scaled.checked_mul(p));
            match num {
                Some(n) => saturate(n.div_ceil(denominator)),
                None => u64::MAX,
            }
        } else {
            match checked_pow10(self.exp10.unsigned_abs()).and_then(|p| p.checked_mul(denominator)) {
                Some(den) => saturate(scaled.div_ceil(den)),
                // The denominator exceeds u128 while the numerator fits: 0 < value < 1.
                None => 1,
            }
        }
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}e{}", self.digits, self.exp10)
    }
}

fn checked_pow10(exp: u32) -> Option<u128> {
    10u128.checked_pow(exp)
}

fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_printed_forms() {
        assert_eq!(Decimal::from_decimal_str("1.10"), Decimal::from_decimal_str("1.1"));
        assert_eq!(Decimal::from_decimal_str("1e-05").unwrap().to_f64(), 1e-5);
        assert_eq!(Decimal::from_decimal_str("3.5E+2").unwrap().to_f64(), 350.0);
        assert!(Decimal::from_decimal_str("-1").is_none());
        assert!(Decimal::from_decimal_str("nan").is_none());
        assert!(Decimal::from_decimal_str("inf").is_none());
        assert!(Decimal::from_decimal_str(".").is_none());
        assert!(Decimal::from_decimal_str("10e2147483647").is_none());
    }
}

//! The capacity formula: `max(min_capacity, ceil(cf * T * k / E))`.
//!
//! The factor is kept as the decimal it prints as (`1.1` is 11/10), so the
//! default rounding is exact: T=200, E=4, k=1, cf=1.1 gives 55, where
//! Megatron-Core's float64 product gives 56. The peers' own roundings are
//! available for compatibility (`CapacityRounding`).

use std::fmt;

use crate::config::{CapacityFactor, CapacityRounding};
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

/// Per-expert capacity for `active_tokens` routed tokens, or `None` when dropless.
///
/// `active_tokens` excludes masked (padding) tokens. Formulas:
/// - `Exact`: `ceil(cf * T * k / E)` on the decimal value of `cf`;
/// - `Megatron`: `ceil((T*k / E) * cf)` in float64 (Megatron-Core `get_capacity`);
/// - `DeepSpeed`: `ceil(f32(T / E) * f32(cf * k))` (DeepSpeed `_capacity`, float32 tensors);
///
/// then `max(min_capacity, .)` in every mode.
pub fn expert_capacity(
    factor: &CapacityFactor,
    rounding: CapacityRounding,
    min_capacity: usize,
    active_tokens: usize,
    top_k: usize,
    num_experts: usize,
) -> Option<usize> {
    let cf = match factor {
        CapacityFactor::Dropless => return None,
        CapacityFactor::Fixed(n) => return Some((*n).max(min_capacity)),
        CapacityFactor::Factor(cf) => cf,
    };
    let t = active_tokens as u64;
    let e = num_experts.max(1) as u64;
    let k = top_k as u64;
    let raw: u64 = match rounding {
        CapacityRounding::Exact => cf.ceil_mul_div(t.saturating_mul(k), e),
        CapacityRounding::Megatron => float_to_count(((t * k) as f64 / e as f64 * cf.to_f64()).ceil()),
        CapacityRounding::DeepSpeed => {
            let per_expert = (t as f64 / e as f64) as f32;
            let factor = (cf.to_f64() * k as f64) as f32;
            float_to_count(f64::from((per_expert * factor).ceil()))
        }
    };
    let raw = usize::try_from(raw).unwrap_or(usize::MAX);
    Some(raw.max(min_capacity))
}

fn float_to_count(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(cf: &str, rounding: CapacityRounding, min: usize, t: usize, k: usize, e: usize) -> Option<usize> {
        let d = Decimal::from_decimal_str(cf).unwrap();
        expert_capacity(&CapacityFactor::Factor(d), rounding, min, t, k, e)
    }

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

    #[test]
    fn exact_capacity_matches_the_survey_table() {
        use CapacityRounding::*;
        // (T, E, k, cf) -> exact, Megatron, DeepSpeed(min_capacity 4): anchors.md section 11.2.
        assert_eq!(cap("1.1", Exact, 0, 200, 1, 4), Some(55));
        assert_eq!(cap("1.1", Megatron, 0, 200, 1, 4), Some(56));
        assert_eq!(cap("1.1", DeepSpeed, 4, 200, 1, 4), Some(55));
        assert_eq!(cap("1.05", Exact, 0, 320, 1, 6), Some(56));
        assert_eq!(cap("1.05", Megatron, 0, 320, 1, 6), Some(57));
        assert_eq!(cap("1.05", Exact, 0, 320, 2, 6), Some(112));
        assert_eq!(cap("1.05", Megatron, 0, 320, 2, 6), Some(113));
        assert_eq!(cap("1.05", DeepSpeed, 4, 320, 2, 6), Some(112));
        assert_eq!(cap("1.25", Exact, 0, 4096, 2, 64), Some(160));
        assert_eq!(cap("1.0", DeepSpeed, 4, 20, 1, 8), Some(4));
        assert_eq!(cap("1.0", Exact, 0, 20, 1, 8), Some(3));
    }

    #[test]
    fn capacity_never_floors_to_zero() {
        // The seed floors T*k/E first: 4*1/8 = 0 and every token is dropped.
        assert_eq!(cap("0.5", CapacityRounding::Exact, 0, 4, 1, 8), Some(1));
        assert_eq!(cap("0.5", CapacityRounding::Exact, 0, 0, 1, 8), Some(0));
        assert_eq!(cap("0.5", CapacityRounding::Exact, 3, 0, 1, 8), Some(3));
    }

    #[test]
    fn extreme_factors_saturate_or_round_up() {
        assert_eq!(cap("1e300", CapacityRounding::Exact, 0, 10, 1, 4), Some(u64::MAX as usize));
        assert_eq!(cap("1e-300", CapacityRounding::Exact, 0, 10, 1, 4), Some(1));
        assert_eq!(expert_capacity(&CapacityFactor::Dropless, CapacityRounding::Exact, 0, 10, 1, 4), None);
    }
}

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

    /// `ceil(self * numerator / denominator)`, exactly, or `None` when it exceeds
    /// `u64::MAX` (a denominator of 0 counts as 1).
    ///
    /// Exact for every factor and count: the product is held in 256 bits, and
    /// the divisions by `denominator` and by each power of ten round up one at a
    /// time (`ceil(ceil(x / a) / b) = ceil(x / (a b))` for integers `a, b > 0`).
    pub fn ceil_mul_div(&self, numerator: u64, denominator: u64) -> Option<u64> {
        if self.digits == 0 || numerator == 0 {
            return Some(0);
        }
        let mut n = Wide::product(self.digits, numerator);
        let denominator = denominator.max(1);
        if self.exp10 >= 0 {
            for _ in 0..self.exp10 {
                // At or above 2^128 the quotient by a u64 exceeds u64::MAX.
                if !n.below_2_128() {
                    return None;
                }
                n.mul_small(10);
            }
            if !n.below_2_128() {
                return None;
            }
            n.ceil_div_small(denominator);
        } else {
            n.ceil_div_small(denominator);
            for _ in 0..self.exp10.unsigned_abs() {
                if n.is_one() {
                    break; // ceil(1 / 10) = 1 from here on
                }
                n.ceil_div_small(10);
            }
        }
        n.to_u64()
    }

    /// `floor(self * n)`, exactly, or `None` when it exceeds `u64::MAX` (Tutel's and
    /// fairseq's `int(capacity_factor * tokens_per_expert)` on the decimal factor).
    pub fn floor_mul(&self, n: u64) -> Option<u64> {
        let mut x = Wide::product(self.digits, n);
        if self.exp10 >= 0 {
            for _ in 0..self.exp10 {
                if !x.below_2_128() {
                    return None;
                }
                x.mul_small(10);
            }
        } else {
            // floor(floor(x / a) / b) = floor(x / (a b)); once 0, it stays 0.
            for _ in 0..self.exp10.unsigned_abs() {
                if x.is_zero() {
                    break;
                }
                x.div_small(10, false);
            }
        }
        x.to_u64()
    }
}

/// A 256-bit unsigned integer, little-endian limbs: just enough arithmetic for
/// `ceil_mul_div` (a `u128` times a `u64` fits in 192 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wide([u64; 4]);

impl Wide {
    fn product(a: u128, b: u64) -> Wide {
        let lo = (a as u64 as u128) * b as u128;
        let hi = (a >> 64) * b as u128 + (lo >> 64);
        Wide([lo as u64, hi as u64, (hi >> 64) as u64, 0])
    }

    fn below_2_128(&self) -> bool {
        self.0[2] == 0 && self.0[3] == 0
    }

    fn is_one(&self) -> bool {
        *self == Wide([1, 0, 0, 0])
    }

    fn is_zero(&self) -> bool {
        *self == Wide([0; 4])
    }

    /// `self *= m`; the caller keeps `self` below 2^128 first, so it cannot overflow.
    fn mul_small(&mut self, m: u64) {
        let mut carry = 0u128;
        for limb in self.0.iter_mut() {
            let v = *limb as u128 * m as u128 + carry;
            *limb = v as u64;
            carry = v >> 64;
        }
    }

    /// `self = ceil(self / d)`, `d >= 1`.
    fn ceil_div_small(&mut self, d: u64) {
        self.div_small(d, true);
    }

    /// `self = ceil(self / d)` (`up`) or `floor(self / d)`, `d >= 1`.
    fn div_small(&mut self, d: u64, up: bool) {
        let mut rem = 0u128;
        for limb in self.0.iter_mut().rev() {
            let v = (rem << 64) | *limb as u128;
            *limb = (v / d as u128) as u64;
            rem = v % d as u128;
        }
        if up && rem != 0 {
            for limb in self.0.iter_mut() {
                let (v, overflow) = limb.overflowing_add(1);
                *limb = v;
                if !overflow {
                    break;
                }
            }
        }
    }

    fn to_u64(self) -> Option<u64> {
        (self.0[1..].iter().all(|&l| l == 0)).then_some(self.0[0])
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}e{}", self.digits, self.exp10)
    }
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

    #[test]
    fn ceil_mul_div_is_exact_where_the_result_fits() {
        let d = |t: &str| Decimal::from_decimal_str(t).unwrap();
        assert_eq!(d("1.1").ceil_mul_div(200, 4), Some(55));
        assert_eq!(d("1e18").ceil_mul_div(10, 4), Some(2_500_000_000_000_000_000));
        assert_eq!(d("1e19").ceil_mul_div(10, 4), None); // 2.5e19 > u64::MAX
        assert_eq!(d("1e300").ceil_mul_div(10, 4), None);
        assert_eq!(d("1e-300").ceil_mul_div(10, 4), Some(1));
        assert_eq!(d("18446744073709551615").ceil_mul_div(1, 1), Some(u64::MAX));
        assert_eq!(d("18446744073709551616").ceil_mul_div(1, 1), None);
        assert_eq!(d("18446744073709551616").ceil_mul_div(3, 4), Some(13_835_058_055_282_163_712));
        // 38 significant digits times 2^40: the product exceeds u128, the result does not.
        let many = d("1234.5678901234567890123456789012345678");
        assert_eq!(many.ceil_mul_div(1 << 40, 1), Some(1_357_421_750_469_624));
    }

    #[test]
    fn floor_mul_agrees_with_u128_arithmetic() {
        let d = |t: &str| Decimal::from_decimal_str(t).unwrap();
        // Python's float product 0.29 * 100 is 28.999999999999996; the decimal's is 29.
        assert_eq!(d("0.29").floor_mul(100), Some(29));
        assert_eq!(d("1.25").floor_mul(7), Some(8));
        assert_eq!(d("1e-300").floor_mul(10), Some(0));
        assert_eq!(d("1e19").floor_mul(2), None);
        let mut next = crate::rng::xorshift(0x2545_f491_4f6c_dd1du64);
        for _ in 0..20_000 {
            let digits = u128::from(next() >> (next() % 64));
            let exp10 = (next() % 41) as i32 - 20;
            let n = next() >> (next() % 64);
            let reference = (|| {
                let product = digits.checked_mul(u128::from(n))?;
                let scale = 10u128.checked_pow(exp10.unsigned_abs())?;
                let value = if exp10 >= 0 { product.checked_mul(scale)? } else { product / scale };
                Some(u64::try_from(value).ok())
            })();
            if let Some(r) = reference {
                assert_eq!(Decimal::from_parts(digits, exp10).floor_mul(n), r, "{digits}e{exp10} * {n}");
            }
        }
    }

    #[test]
    fn ceil_mul_div_agrees_with_u128_arithmetic() {
        let mut next = crate::rng::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..20_000 {
            let digits = u128::from(next() >> (next() % 64));
            let exp10 = (next() % 41) as i32 - 20;
            let (n, den) = (next() >> (next() % 64), (next() >> (next() % 64)).max(1));
            let x = Decimal::from_parts(digits, exp10);
            let got = x.ceil_mul_div(n, den);
            let reference = (|| {
                let product = digits.checked_mul(u128::from(n))?;
                let (num, dd) = if exp10 >= 0 {
                    (product.checked_mul(10u128.checked_pow(exp10 as u32)?)?, u128::from(den))
                } else {
                    (product, u128::from(den).checked_mul(10u128.checked_pow(exp10.unsigned_abs())?)?)
                };
                Some(u64::try_from(num.div_ceil(dd)).ok())
            })();
            if let Some(r) = reference {
                assert_eq!(got, r, "{digits}e{exp10} * {n} / {den}");
            }
        }
    }
}

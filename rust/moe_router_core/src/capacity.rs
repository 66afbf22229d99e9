//! The capacity formula: `max(min_capacity, ceil(cf * T * k / E))`.
//!
//! The factor is kept as the decimal it prints as (`1.1` is 11/10, see
//! `crate::decimal`), so the default rounding is exact: T=200, E=4, k=1, cf=1.1 gives 55, where
//! Megatron-Core's float64 product gives 56. The peers' own roundings are
//! available for compatibility (`CapacityRounding`).

use crate::config::{CapacityFactor, CapacityRounding};

/// Per-expert capacity for `active_tokens` routed tokens, or `None` when there
/// is no limit.
///
/// `active_tokens` excludes masked (padding) tokens. Formulas:
/// - `Exact`: `ceil(cf * T * k / E)` on the decimal value of `cf`;
/// - `Megatron`: `ceil((T*k / E) * cf)` in float64 (Megatron-Core `get_capacity`);
/// - `DeepSpeed`: `ceil(f32(T / E) * f32(cf * k))` (DeepSpeed `_capacity`, float32 tensors);
/// - `Flaxformer`: `round_half_even(cf * T / E)` on the decimal value, without k
///   (flaxformer's expert-choice `int(round(cf * T / E))`; Python's `round` is banker's);
///
/// then `max(min_capacity, .)` in every mode. No limit: a dropless factor, or a
/// formula value beyond `usize::MAX` (2^64 - 1), reported as exactly that
/// rather than a saturated number; such a capacity is above `active_tokens`, so
/// it could not bind anyway.
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
    let raw = match rounding {
        CapacityRounding::Exact => cf.ceil_mul_div(t.saturating_mul(k), e),
        CapacityRounding::Megatron => float_to_count(((t * k) as f64 / e as f64 * cf.to_f64()).ceil()),
        CapacityRounding::DeepSpeed => {
            let per_expert = (t as f64 / e as f64) as f32;
            let factor = (cf.to_f64() * k as f64) as f32;
            float_to_count(f64::from((per_expert * factor).ceil()))
        }
        CapacityRounding::Flaxformer => cf.round_half_even_mul_div(t, e),
    };
    let raw = usize::try_from(raw?).ok()?;
    Some(raw.max(min_capacity))
}

/// A non-negative whole float as a count; `None` at or above 2^64 (and for +inf).
fn float_to_count(x: f64) -> Option<u64> {
    if x.is_nan() || x <= 0.0 {
        Some(0)
    } else if x >= u64::MAX as f64 {
        None
    } else {
        Some(x as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(cf: &str, rounding: CapacityRounding, min: usize, t: usize, k: usize, e: usize) -> Option<usize> {
        let d = crate::decimal::Decimal::from_decimal_str(cf).unwrap();
        expert_capacity(&CapacityFactor::Factor(d), rounding, min, t, k, e)
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
        // flaxformer column: no k factor, banker's rounding, its min_capacity 4.
        assert_eq!(cap("1.05", Flaxformer, 4, 320, 2, 6), Some(56));
        assert_eq!(cap("1.25", Flaxformer, 4, 4096, 2, 64), Some(80));
        assert_eq!(cap("1.0", Flaxformer, 4, 100, 2, 8), Some(12));
        assert_eq!(cap("1.0", Flaxformer, 4, 36, 1, 8), Some(4)); // 4.5 -> 4
        assert_eq!(cap("1.0", Flaxformer, 0, 44, 1, 8), Some(6)); // 5.5 -> 6
        assert_eq!(cap("1.0", Flaxformer, 4, 20, 1, 8), Some(4));
    }

    #[test]
    fn capacity_never_floors_to_zero() {
        // Flooring T*k/E first would give 4*1/8 = 0 and drop every token.
        assert_eq!(cap("0.5", CapacityRounding::Exact, 0, 4, 1, 8), Some(1));
        assert_eq!(cap("0.5", CapacityRounding::Exact, 0, 0, 1, 8), Some(0));
        assert_eq!(cap("0.5", CapacityRounding::Exact, 3, 0, 1, 8), Some(3));
    }

    #[test]
    fn extreme_factors_are_exact_or_no_limit() {
        use CapacityRounding::*;
        for rounding in [Exact, Megatron, DeepSpeed, Flaxformer] {
            assert_eq!(cap("1e300", rounding, 0, 10, 1, 4), None, "{rounding:?}");
            assert_eq!(cap("1e30", rounding, 7, 10, 1, 4), None, "{rounding:?}");
        }
        // DeepSpeed's float32 factor underflows to 0 (its own min_capacity, 4, covers that).
        assert_eq!(cap("1e-300", Exact, 0, 10, 1, 4), Some(1));
        assert_eq!(cap("1e-300", Megatron, 0, 10, 1, 4), Some(1));
        assert_eq!(cap("1e-300", DeepSpeed, 0, 10, 1, 4), Some(0));
        assert_eq!(cap("1e18", Exact, 0, 10, 1, 4), Some(2_500_000_000_000_000_000));
        assert_eq!(cap("1e18", Megatron, 0, 10, 1, 4), Some(2_500_000_000_000_000_000));
        assert_eq!(expert_capacity(&CapacityFactor::Dropless, Exact, 0, 10, 1, 4), None);
    }
}

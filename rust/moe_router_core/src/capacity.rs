//! The capacity formula: `max(min_capacity, ceil(cf * T * k / E))`.
//!
//! The factor is kept as the decimal it prints as (`1.1` is 11/10, see
//! `crate::decimal`), so the default rounding is exact: T=200, E=4, k=1, cf=1.1 gives 55, where
//! Megatron-Core's float64 product gives 56. The peers' own roundings are
//! available for compatibility (`CapacityRounding`).

use crate::config::{CapacityFactor, CapacityRounding, RouterConfig};

/// The capacity of `options` for `active_tokens` routed tokens, or `None` when
/// there is no limit: in evaluation with `eval_capacity_token_fraction` set,
/// `max(min_capacity, ceil(fraction * T))` exactly (fairseq's
/// `math.ceil(moe_eval_capacity_token_fraction * num_tokens)`), otherwise
/// [`expert_capacity`] of the factor that applies; then rounded up to a
/// multiple of `capacity_alignment` (Tutel `extract_critical`'s `alignment`).
pub fn capacity_limit(options: &RouterConfig, training: bool, active_tokens: usize) -> Option<usize> {
    let raw = match (&options.eval_capacity_token_fraction, training, options.expert_capacity) {
        (Some(fraction), false, None) => {
            usize::try_from(fraction.ceil_mul_div(active_tokens as u64, 1)?).ok()?.max(options.min_capacity)
        }
        _ => expert_capacity(
            &options.capacity_factor_for(training),
            options.capacity_rounding,
            options.min_capacity,
            active_tokens,
            options.top_k,
            options.num_experts,
        )?,
    };
    let alignment = options.capacity_alignment.max(1);
    raw.div_ceil(alignment).checked_mul(alignment)
}

/// Per-expert capacity for `active_tokens` routed tokens, or `None` when there
/// is no limit.
///
/// `active_tokens` excludes masked (padding) tokens. Formulas:
/// - `Exact`: `ceil(cf * T * k / E)` on the decimal value of `cf`;
/// - `Megatron`: `ceil((T*k / E) * cf)` in float64 (Megatron-Core `get_capacity`);
/// - `DeepSpeed`: `ceil(f32(T / E) * f32(cf * k))` (DeepSpeed `_capacity`, float32 tensors);
/// - `Tutel`: `k * floor(cf * ceil(T / E))` (Tutel `fast_dispatch.extract_critical`);
/// - `Fairseq`: `floor(cf * ceil(T / E))` for k = 1 (fairseq `top1gating`), `k * ceil(T / E)`
///   otherwise, `2 * ceil(T / E)` for its top-2 (`top2gating`, which has no factor);
///
/// `Tutel` and `Fairseq` take the floor of the exact decimal product, where the
/// frameworks multiply Python floats (`0.29 * 100` is 28.999999999999996 there).
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
        CapacityRounding::Tutel => cf.floor_mul(t.div_ceil(e)).and_then(|c| c.checked_mul(k)),
        CapacityRounding::Fairseq if k == 1 => cf.floor_mul(t.div_ceil(e)),
        CapacityRounding::Fairseq => t.div_ceil(e).checked_mul(k),
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
    }

    #[test]
    fn peer_roundings_match_the_survey_table() {
        use CapacityRounding::*;
        // anchors.md 11.2: (320, 6, 2, 1.05) Tutel 112, fairseq 108; (4096, 64, 2, 1.25) 160 / 128;
        // (100, 8, 2, 1.0) 26 / 26; (36, 8, 1, 1.0) 5 / 5; (20, 8, 1, 1.0) 3 / 3.
        assert_eq!(cap("1.05", Tutel, 0, 320, 2, 6), Some(112));
        assert_eq!(cap("1.05", Fairseq, 0, 320, 2, 6), Some(108));
        assert_eq!(cap("1.25", Tutel, 0, 4096, 2, 64), Some(160));
        assert_eq!(cap("1.25", Fairseq, 0, 4096, 2, 64), Some(128));
        assert_eq!(cap("1.0", Tutel, 0, 100, 2, 8), Some(26));
        assert_eq!(cap("1.0", Fairseq, 0, 100, 2, 8), Some(26));
        assert_eq!(cap("1.1", Fairseq, 0, 200, 1, 4), Some(55));
        assert_eq!(cap("1.0", Tutel, 0, 36, 1, 8), Some(5));
        assert_eq!(cap("1.0", Fairseq, 0, 20, 1, 8), Some(3));
        // Floor of the product: cf * ceil(T/E) = 0.5 * 1 floors to 0 (both frameworks drop everything).
        assert_eq!(cap("0.5", Tutel, 0, 4, 1, 8), Some(0));
        assert_eq!(cap("0.29", Fairseq, 0, 800, 1, 8), Some(29));
        assert_eq!(cap("1e30", Tutel, 0, 10, 2, 4), None);
    }

    #[test]
    fn alignment_and_eval_token_fraction() {
        let d = |t: &str| crate::decimal::Decimal::from_decimal_str(t).unwrap();
        let mut o = RouterConfig::new(8, 2);
        o.capacity_factor = CapacityFactor::Factor(d("1.0"));
        o.capacity_rounding = CapacityRounding::Tutel;
        assert_eq!(capacity_limit(&o, true, 100), Some(26));
        o.capacity_alignment = 8;
        assert_eq!(capacity_limit(&o, true, 100), Some(32));
        assert_eq!(capacity_limit(&o, true, 0), Some(0));
        o.eval_capacity_token_fraction = Some(d("0.25"));
        assert_eq!(capacity_limit(&o, true, 100), Some(32));
        o.capacity_alignment = 1;
        assert_eq!(capacity_limit(&o, false, 101), Some(26)); // ceil(25.25)
        o.min_capacity = 30;
        assert_eq!(capacity_limit(&o, false, 101), Some(30));
        o.capacity_factor = CapacityFactor::Dropless;
        assert_eq!(capacity_limit(&o, true, 101), None);
        o.capacity_alignment = usize::MAX;
        assert_eq!(capacity_limit(&o, false, 101), Some(usize::MAX));
        o.min_capacity = 0;
        o.capacity_alignment = usize::MAX - 1;
        assert_eq!(capacity_limit(&o, false, 101), Some(usize::MAX - 1));
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
        for rounding in [Exact, Megatron, DeepSpeed] {
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

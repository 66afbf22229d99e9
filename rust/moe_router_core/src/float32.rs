//! The peers' float32 score arithmetic (`score_precision = "float32"` or
//! `"float32_logits"`, set by the compatibility presets).
//!
//! Megatron-Core, DeepSpeed and the Hugging Face routers score float32 logits
//! in float32: softmax probabilities of losing experts underflow to exactly 0
//! (from a logit gap of about 104) and sigmoid scores saturate to exactly 1.0
//! (above about 16.6) or 0 (below about -88.7, where `exp(-z)` overflows).
//! Ranking by those values ties where the exact scores do not; reproducing the
//! arithmetic makes the ties fall where the peers' do (decided by the lower
//! index, this project's rule, where torch's order is unspecified), and makes
//! a 0 weight 0. The operations follow torch's CPU kernels: softmax is
//! `exp(z - max)` summed in order, times the float32 reciprocal of the sum;
//! sigmoid is `1 / (1 + exp(-z))`; `exp` is rounded once from float64 (torch's
//! vectorized float32 `exp` is within a few units in the last place of it, so
//! scores strictly between the saturation points can differ by such a step).
//! The exponentials use the vector kernel; the float32 sums, divisions and the
//! selection on the float32 keys are scalar.

use crate::config::{RouterConfig, ScoreFunction, ScorePrecision};
use crate::math::{exp_shifted, ln_one, sqrt_softplus};
use crate::score::RowScores;
use crate::simd::Simd;
use crate::weights::Chosen;

/// Added to the sum of a token's chosen sigmoid scores before dividing by it
/// (Megatron-Core `topk_routing_with_score_function`, Hugging Face DeepSeek-V3).
const SIGMOID_DENOMINATOR_EPS: f32 = 1e-20;

/// Whether `options` score in float32 (probability rows are never rescored).
pub(crate) fn applies(options: &RouterConfig) -> bool {
    options.score_precision != ScorePrecision::Float64 && options.score_function != ScoreFunction::Probabilities
}

/// Whether experts are ranked by their float32 scores (plus bias) rather than by the logits.
pub(crate) fn ranks_scores(options: &RouterConfig) -> bool {
    options.score_precision == ScorePrecision::Float32 && options.score_function != ScoreFunction::Probabilities
}

fn exp32(x: f32) -> f32 {
    f64::from(x).exp() as f32
}

/// Overwrite `buffer` with the float32 scores of `logits` (as float64 values;
/// `-inf` logits score 0) and return how to read it (`scale` 1). `z_term` is the
/// row's float64 z-loss term for sigmoid; softmax computes its own, `(m + ln S)^2`
/// in float64 from the float32 max `m` and sum `S` (within float32 precision of the
/// exact value, as the peers' float32 z-loss). `scratch` has the row's length. The logits must be
/// within the float32 range. The exponentials run through the vector kernel
/// (`exp_shifted`, float64, then rounded to float32 once).
pub(crate) fn score_row(
    simd: Simd,
    function: ScoreFunction,
    logits: &[f64],
    buffer: &mut [f64],
    scratch: &mut [f64],
    z_term: f64,
) -> RowScores {
    if function.is_elementwise() {
        if function == ScoreFunction::Sigmoid {
            for (x, &z) in scratch.iter_mut().zip(logits) {
                *x = f64::from(-(z as f32));
            }
            exp_shifted(simd, scratch, 0.0, buffer);
            for b in buffer.iter_mut() {
                *b = f64::from(1.0 / (1.0 + *b as f32));
            }
        } else {
            // torch's float32 `softplus(z).sqrt()`, rounded once from float64.
            for (b, &z) in buffer.iter_mut().zip(logits) {
                *b = f64::from(sqrt_softplus(f64::from(z as f32)) as f32);
            }
        }
        let sum = buffer.iter().fold(0.0, |a, &b| a + b);
        // The loss's distribution is normalized with the same epsilon (Megatron-Core's aux-loss scores).
        let prob_scale = 1.0 / (sum + f64::from(SIGMOID_DENOMINATOR_EPS));
        return RowScores { z_term, scale: 1.0, prob_scale };
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z as f32));
    for (x, &z) in scratch.iter_mut().zip(logits) {
        *x = f64::from(z as f32 - max);
    }
    exp_shifted(simd, scratch, 0.0, buffer);
    let mut sum = 0.0f32;
    for b in buffer.iter_mut() {
        let e = *b as f32;
        *b = f64::from(e);
        sum += e;
    }
    let reciprocal = 1.0 / sum; // sum >= 1: the largest logit contributes exp(0)
    for b in buffer.iter_mut() {
        *b = f64::from(*b as f32 * reciprocal);
    }
    let lse = f64::from(max) + ln_one(simd, f64::from(sum));
    RowScores { z_term: lse * lse, scale: 1.0, prob_scale: 1.0 }
}

/// A selection key: the float32 score plus the float32 bias, added in float32.
pub(crate) fn biased(score: f64, bias: Option<f64>) -> f64 {
    match bias {
        Some(b) => f64::from(score as f32 + b as f32),
        None => score,
    }
}

/// Pass 1 in float32: the chosen scores (from `score_row`, `chosen.scale` 1), normalized
/// with `normalize_weights` as the peer does, times `weight_scale`; 0 where not routed.
///
/// - softmax ranked by logits: a float32 softmax over the chosen logits (Megatron-Core);
/// - softmax ranked by scores: `p_j / sum_i p_i` (Hugging Face `routing_weights /= sum`);
/// - sigmoid and sqrtsoftplus: `s_j / (sum_i s_i + 1e-20)` (Megatron-Core, Hugging Face DeepSeek-V3).
pub(crate) fn write_weights(options: &RouterConfig, chosen: &Chosen, weights: &mut [f32]) {
    let picked = || chosen.experts.iter().zip(chosen.routed).filter(|(_, &r)| r).map(|(&x, _)| x as usize);
    let scale = options.weight_scale as f32;
    let softmax_of_logits = options.normalize_weights
        && chosen.function == ScoreFunction::Softmax
        && options.score_precision == ScorePrecision::Float32Logits;
    let (max, mut sum) = (picked().map(|x| chosen.logits[x] as f32).fold(f32::NEG_INFINITY, f32::max), 0.0f32);
    for x in picked() {
        sum += if softmax_of_logits { exp32(chosen.logits[x] as f32 - max) } else { chosen.buffer[x] as f32 };
    }
    let denominator = if chosen.function.is_elementwise() { sum + SIGMOID_DENOMINATOR_EPS } else { sum };
    for ((w, &x), &r) in weights.iter_mut().zip(chosen.experts).zip(chosen.routed) {
        let s = chosen.buffer[x as usize] as f32;
        *w = if !r {
            0.0
        } else if !options.normalize_weights {
            s * scale
        } else if softmax_of_logits {
            exp32(chosen.logits[x as usize] as f32 - max) * (1.0 / denominator) * scale
        } else {
            s / denominator * scale
        };
    }
}

/// Pass 3 in float32: rescale the kept weights `w` of one token (0 where not kept)
/// by `weight_scale / max(sum, float32 epsilon)`, DeepSpeed's clamped denominator, so
/// kept weights that sum below the epsilon (an underflowed survivor) are not scaled up to 1.
pub(crate) fn renormalize_kept(options: &RouterConfig, w: &mut [f32], kept: &[bool]) {
    let sum: f32 = w.iter().zip(kept).filter(|(_, &k)| k).map(|(&x, _)| x).sum();
    let denominator = sum.max(f32::EPSILON);
    let scale = options.weight_scale as f32;
    for x in w.iter_mut() {
        *x = *x / denominator * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqrtsoftplus_scores_are_the_rounded_element_wise_values() {
        // torch: softplus(z).sqrt() in float32; softplus(0) = ln 2, softplus(-100) underflows
        // to e^-100, still a float32 normal.
        let z = [0.0, 3.5, -2.0, 40.0, -100.0];
        let mut s = [0.0; 5];
        let row = score_row(Simd::current(), ScoreFunction::SqrtSoftplus, &z, &mut s, &mut [0.0; 5], 7.0);
        let want = z.map(|v| f64::from(sqrt_softplus(v) as f32));
        assert_eq!(s, want);
        assert_eq!(s[0], f64::from(std::f64::consts::LN_2.sqrt() as f32));
        assert_eq!(row.z_term, 7.0);
        let sum = want.iter().fold(0.0, |a, &b| a + b);
        assert_eq!(row.prob_scale, 1.0 / (sum + f64::from(SIGMOID_DENOMINATOR_EPS)));
    }

    #[test]
    fn softmax_underflows_and_sigmoid_saturates_as_torch_does() {
        // Values from torch 2.13 on CPU: softmax([0, -x]) and sigmoid(+-x) in float32.
        let mut b = [0.0; 2];
        score_row(Simd::current(), ScoreFunction::Softmax, &[0.0, -103.9], &mut b, &mut [0.0; 2], 0.0);
        assert_eq!(b[1], f64::from(f32::from_bits(1))); // the smallest subnormal
        score_row(Simd::current(), ScoreFunction::Softmax, &[0.0, -104.0], &mut b, &mut [0.0; 2], 0.0);
        assert_eq!(b, [1.0, 0.0]);
        score_row(Simd::current(), ScoreFunction::Softmax, &[200.0, 200.0], &mut b, &mut [0.0; 2], 0.0);
        assert_eq!(b, [0.5, 0.5]);
        let z = [16.64, 16.6, -88.7, -88.8, f64::NEG_INFINITY];
        let mut s = [0.0; 5];
        score_row(Simd::current(), ScoreFunction::Sigmoid, &z, &mut s, &mut [0.0; 5], 0.0);
        // 16.64: correctly rounded it would be 1 - 2^-24; -88.8: exp(88.8) overflows float32
        let want = [1.0, 1.0 - f32::EPSILON, 3.006_636e-39, 0.0, 0.0];
        assert_eq!(s, want.map(f64::from));
    }

    #[test]
    fn softmax_of_neg_inf_is_zero_and_rows_sum_to_one() {
        let mut b = [0.0; 3];
        let r = score_row(
            Simd::current(),
            ScoreFunction::Softmax,
            &[f64::NEG_INFINITY, 1.0, 2.0],
            &mut b,
            &mut [0.0; 3],
            0.0,
        );
        assert_eq!(b[0], 0.0);
        assert!((b.iter().sum::<f64>() - 1.0).abs() < 1e-7);
        let lse = (1.0f64.exp() + 2.0f64.exp()).ln();
        assert_eq!(r.scale, 1.0);
        assert!((r.z_term.sqrt() - lse).abs() < 1e-6);
    }

    /// The float32 scores of a 3-expert row and the weights of its experts 0 and 1.
    fn first_two_weights(options: &RouterConfig, logits: &[f64; 3]) -> ([f64; 3], [f32; 2]) {
        let mut buffer = [0.0; 3];
        score_row(Simd::current(), options.score_function, logits, &mut buffer, &mut [0.0; 3], 0.0);
        let chosen = Chosen {
            function: options.score_function,
            logits,
            buffer: &buffer,
            scale: 1.0,
            experts: &[0, 1],
            routed: &[true, true],
        };
        let mut w = [0f32; 2];
        write_weights(options, &chosen, &mut w);
        (buffer, w)
    }

    #[test]
    fn sigmoid_weights_carry_the_peers_epsilon() {
        let options = RouterConfig {
            score_function: ScoreFunction::Sigmoid,
            normalize_weights: true,
            score_precision: ScorePrecision::Float32,
            ..RouterConfig::new(3, 2)
        };
        let logits = [-46.0, -47.0, -200.0];
        let (buffer, mut w) = first_two_weights(&options, &logits);
        let (s0, s1) = (buffer[0] as f32, buffer[1] as f32);
        assert!(s0 > 0.0 && s1 > 0.0 && buffer[2] == 0.0);
        assert_eq!(w, [s0 / (s0 + s1 + 1e-20), s1 / (s0 + s1 + 1e-20)]);
        assert!(w[0] + w[1] < 0.99); // the epsilon is not negligible at these scores
        let all_zero = Chosen {
            function: ScoreFunction::Sigmoid,
            logits: &logits,
            buffer: &buffer,
            scale: 1.0,
            experts: &[2, 2],
            routed: &[true, true],
        };
        write_weights(&options, &all_zero, &mut w);
        assert_eq!(w, [0.0, 0.0]);
    }

    #[test]
    fn megatron_weights_are_a_softmax_of_the_chosen_logits() {
        let options = RouterConfig {
            normalize_weights: true,
            score_precision: ScorePrecision::Float32Logits,
            ..RouterConfig::new(3, 2)
        };
        let (_, w) = first_two_weights(&options, &[80.0, -40.0, 0.0]);
        assert_eq!(w, [1.0, 0.0]); // exp(-120) underflows float32
    }

    #[test]
    fn renormalization_clamps_the_denominator_at_the_epsilon() {
        let options = RouterConfig { score_precision: ScorePrecision::Float32, ..RouterConfig::new(3, 2) };
        let mut w = [0.0f32, 1e-9];
        renormalize_kept(&options, &mut w, &[false, true]);
        assert_eq!(w, [0.0, 1e-9 / f32::EPSILON]);
        let mut w = [0.25f32, 0.5];
        renormalize_kept(&options, &mut w, &[true, true]);
        assert_eq!(w, [0.25 / 0.75, 0.5 / 0.75]);
    }
}

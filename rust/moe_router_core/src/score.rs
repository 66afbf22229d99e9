//! Scores of one token's row of logits: softmax, sigmoid or sqrtsoftplus, with the
//! log-sum-exp that the z-loss needs.
//!
//! `-inf` logits are allowed and mean "not eligible": their score is 0.
//! All arithmetic is float64 whatever the input dtype, so float32 and float64
//! inputs holding the same values route identically. Softmax scores are left
//! unnormalized in the buffer (`score_e = buffer[e] * scale`) so that the
//! normalization costs no extra pass over the row.

use crate::config::ScoreFunction;
use crate::math::{exp_f64, exp_shifted, ln_one, log_sqrt_softplus, sigmoid_row, sqrt_softplus_row};
use crate::simd::Simd;

/// A sigmoid row whose scores sum to less than this is held relative to its
/// largest score (see `score_row`).
const TINY: f64 = 1e-290;

/// How to read a scored row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowScores {
    /// The token's z-loss term: `logsumexp(z)^2` over the eligible logits (ST-MoE).
    pub z_term: f64,
    /// `score_e = buffer[e] * scale`.
    pub scale: f64,
    /// The token's score distribution for the load-balance loss:
    /// `buffer[e] * prob_scale` (softmax: the probabilities; sigmoid: scores
    /// normalized to sum 1, as DeepSeek-V3 and Megatron-Core do). 0 when all scores are 0.
    pub prob_scale: f64,
}

/// Score `logits` into `buffer` (same length) and return how to read it.
///
/// `max_logit` is the largest logit of the row; the row holds at least one finite logit.
/// For `Probabilities` the row already holds the scores (`-inf` where 0) and
/// the z-term is 0 (the source supplies its own).
pub(crate) fn score_row(
    simd: Simd,
    function: ScoreFunction,
    logits: &[f64],
    max_logit: f64,
    buffer: &mut [f64],
) -> RowScores {
    let (mut row, exp_sum) = score_row_before_ln(simd, function, logits, max_logit, buffer);
    if let Some(sum) = exp_sum {
        let lse = max_logit + ln_one(simd, sum);
        row.z_term = lse * lse;
    }
    row
}

/// [`score_row`] without the logarithm of the z-loss term: `z_term` is 0 and
/// the second value is `sum_e exp(z_e - max_logit)` (at least 1), whose
/// `max_logit + ln(sum)` is the logsumexp; `None` for `Probabilities`, whose
/// `z_term` 0 is final.
pub(crate) fn score_row_before_ln(
    simd: Simd,
    function: ScoreFunction,
    logits: &[f64],
    max_logit: f64,
    buffer: &mut [f64],
) -> (RowScores, Option<f64>) {
    debug_assert_eq!(logits.len(), buffer.len());
    if function == ScoreFunction::Probabilities {
        let mut sum = 0.0;
        for (b, &p) in buffer.iter_mut().zip(logits) {
            *b = if p > 0.0 { p } else { 0.0 };
            sum += *b;
        }
        return (RowScores { z_term: 0.0, scale: 1.0, prob_scale: if sum > 0.0 { 1.0 / sum } else { 0.0 } }, None);
    }
    // exp(-inf - m) = 0: ineligible experts fall out of every sum.
    let exp_sum = exp_shifted(simd, logits, max_logit, buffer);
    let scores = match function {
        ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus => {
            let mut sum = if function == ScoreFunction::Sigmoid {
                sigmoid_row(simd, logits, buffer)
            } else {
                sqrt_softplus_row(logits, buffer)
            };
            let mut scale = 1.0;
            if sum < TINY {
                // Every score is subnormal-sized or 0 (sigmoid logits below about
                // -667, sqrtsoftplus ones below about -1335):
                // hold them relative to the largest, from their logarithms, so
                // that their ratios, 1 / sum and the normalized weights stay
                // exact. `scale`, the largest score, may underflow to 0.
                let top = log_score(function, max_logit);
                sum = 0.0;
                for (b, &z) in buffer.iter_mut().zip(logits) {
                    *b = exp_f64(log_score(function, z) - top);
                    sum += *b;
                }
                scale = exp_f64(top);
            }
            RowScores { z_term: 0.0, scale, prob_scale: if sum > 0.0 { 1.0 / sum } else { 0.0 } }
        }
        _ => RowScores { z_term: 0.0, scale: 1.0 / exp_sum, prob_scale: 1.0 / exp_sum },
    };
    (scores, Some(exp_sum))
}

/// The logarithm of an eligible expert's score, up to a constant of the row
/// (`value` is its logit, or its probability for `Probabilities`): `z` for
/// softmax, `log(sigmoid(z))` for sigmoid, `log(sqrt(softplus(z)))`, `log(p)`. Finite for every finite
/// logit, where the score itself may underflow to a subnormal or 0.
pub(crate) fn log_score(function: ScoreFunction, value: f64) -> f64 {
    match function {
        ScoreFunction::Softmax => value,
        // log(sigmoid(z)) = -log(1 + e^-z), written so that e^. never overflows.
        ScoreFunction::Sigmoid if value > 0.0 => -exp_f64(-value).ln_1p(),
        ScoreFunction::Sigmoid => value - exp_f64(value).ln_1p(),
        ScoreFunction::SqrtSoftplus => log_sqrt_softplus(value),
        ScoreFunction::Probabilities => value.ln(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_scores_match_the_scores() {
        for z in [-800.0f64, -745.0, -30.0, -1.0, 0.0, 0.5, 40.0, 800.0] {
            let s = 1.0 / (1.0 + (-z).exp());
            let ls = log_score(ScoreFunction::Sigmoid, z);
            assert!(ls.is_finite() && ls <= 0.0, "{z}: {ls}");
            if s > 1e-300 {
                assert!((ls.exp() - s).abs() <= 1e-13 * s, "{z}: {ls}"); // exp amplifies by |ls|
            } else {
                assert!((ls - z).abs() < 1e-12, "{z}: {ls}");
            }
        }
        assert_eq!(log_score(ScoreFunction::Softmax, -1e300), -1e300);
        assert!((log_score(ScoreFunction::Probabilities, 0.25) - 0.25f64.ln()).abs() < 1e-16);
    }

    #[test]
    fn softmax_sums_to_one_and_lse_is_exact() {
        let z = [2.0, 1.0, 0.0, -1.0];
        let mut s = [0.0; 4];
        let r = score_row(Simd::current(), ScoreFunction::Softmax, &z, 2.0, &mut s);
        assert!((s.iter().sum::<f64>() * r.scale - 1.0).abs() < 1e-15);
        let lse = z.iter().map(|v: &f64| v.exp()).sum::<f64>().ln();
        assert!((r.z_term.sqrt() - lse).abs() < 1e-14);
        assert!((s[0] * r.scale - 0.6439142598879724).abs() < 1e-15);
    }

    #[test]
    fn sqrtsoftplus_rows_and_tiny_rows() {
        let z = [-1.0, 0.0, 2.0, f64::NEG_INFINITY];
        let mut s = [0.0; 4];
        let r = score_row(Simd::current(), ScoreFunction::SqrtSoftplus, &z, 2.0, &mut s);
        let want: Vec<f64> = z.iter().map(|&v: &f64| v.exp().ln_1p().sqrt()).collect();
        for (a, b) in s.iter().zip(&want) {
            assert!((a * r.scale - b).abs() < 1e-15, "{a} {b}");
        }
        assert!((r.prob_scale * want.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        // Scores below 1e-290: held relative to the largest, ratios exact.
        let z = [-1400.0, -1402.0];
        let r = score_row(Simd::current(), ScoreFunction::SqrtSoftplus, &z, -1400.0, &mut s[..2]);
        assert!((s[1] / s[0] - (-1.0f64).exp()).abs() < 1e-15 && r.prob_scale > 0.0);
    }

    #[test]
    fn neg_inf_is_zero_score() {
        let z = [f64::NEG_INFINITY, 0.0];
        let mut s = [0.0; 2];
        let r = score_row(Simd::current(), ScoreFunction::Sigmoid, &z, 0.0, &mut s);
        assert_eq!(s, [0.0, 0.5]);
        assert_eq!(r.prob_scale, 2.0);
        assert_eq!(r.z_term, 0.0);
    }

    #[test]
    fn z_loss_input_is_stable_for_large_logits() {
        let z = [100.0, 0.0, 0.0, 0.0];
        let mut s = [0.0; 4];
        let r = score_row(Simd::current(), ScoreFunction::Softmax, &z, 100.0, &mut s);
        assert!((r.z_term.sqrt() - 100.0).abs() < 1e-12);
    }
}

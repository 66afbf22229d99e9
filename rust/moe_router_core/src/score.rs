//! Scores of one token's row of logits: softmax or sigmoid, with the
//! log-sum-exp that the z-loss needs.
//!
//! `-inf` logits are allowed and mean "not eligible": their score is 0.
//! All arithmetic is float64 whatever the input dtype, so float32 and float64
//! inputs holding the same values route identically. Softmax scores are left
//! unnormalized in the buffer (`score_e = buffer[e] * scale`) so that the
//! normalization costs no extra pass over the row.

use crate::config::ScoreFunction;
use crate::math::{exp_shifted, sigmoid_row};
use crate::simd::Simd;

const TINY: f64 = 1e-290;
const UP: f64 = f64::from_bits((1023 + 600) << 52); // 2^600

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
    debug_assert_eq!(logits.len(), buffer.len());
    if function == ScoreFunction::Probabilities {
        let mut sum = 0.0;
        for (b, &p) in buffer.iter_mut().zip(logits) {
            *b = if p > 0.0 { p } else { 0.0 };
            sum += *b;
        }
        return RowScores { z_term: 0.0, scale: 1.0, prob_scale: if sum > 0.0 { 1.0 / sum } else { 0.0 } };
    }
    // exp(-inf - m) = 0: ineligible experts fall out of every sum.
    let exp_sum = exp_shifted(simd, logits, max_logit, buffer);
    let lse = max_logit + exp_sum.ln();
    match function {
        ScoreFunction::Sigmoid => {
            let mut sum = sigmoid_row(simd, logits, buffer);
            let mut scale = 1.0;
            if sum > 0.0 && sum < TINY {
                // Every score is subnormal-sized: rescale by a power of two (exact)
                // so that 1 / sum and the normalized weights stay finite.
                for b in buffer.iter_mut() {
                    *b *= UP;
                }
                sum *= UP;
                scale = 1.0 / UP;
            }
            RowScores { z_term: lse * lse, scale, prob_scale: if sum > 0.0 { 1.0 / sum } else { 0.0 } }
        }
        _ => RowScores { z_term: lse * lse, scale: 1.0 / exp_sum, prob_scale: 1.0 / exp_sum },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Scores of one token's row of logits: softmax or sigmoid, with the
//! log-sum-exp that the z-loss needs.
//!
//! `-inf` logits are allowed and mean "not eligible": their score is 0.
//! All arithmetic is float64 whatever the input dtype, so float32 and float64
//! inputs holding the same values route identically.

use crate::config::ScoreFunction;
use crate::math::exp_f64;

/// What the losses need from one scored row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScores {
    /// `logsumexp(z)` over the eligible logits (ST-MoE z-loss input).
    pub lse: f64,
    /// Sum of the scores: 1 for softmax, the sum of sigmoids otherwise. The
    /// load-balance loss uses `score / score_sum`, a distribution over experts.
    pub score_sum: f64,
}

/// Write the scores of `logits` into `scores` (same length) and return the row's sums.
///
/// `max_logit` is the largest finite logit of the row (the caller has found it
/// while validating); the row holds at least one finite logit.
pub fn score_row(function: ScoreFunction, logits: &[f64], max_logit: f64, scores: &mut [f64]) -> RowScores {
    debug_assert_eq!(logits.len(), scores.len());
    let mut exp_sum = 0.0f64;
    for (s, &z) in scores.iter_mut().zip(logits) {
        // exp(-inf - m) = 0: ineligible experts fall out of every sum.
        let x = exp_f64(z - max_logit);
        *s = x;
        exp_sum += x;
    }
    let lse = max_logit + exp_sum.ln();
    match function {
        ScoreFunction::Softmax => {
            let inv = 1.0 / exp_sum;
            for s in scores.iter_mut() {
                *s *= inv;
            }
            RowScores { lse, score_sum: 1.0 }
        }
        ScoreFunction::Sigmoid => {
            let mut sum = 0.0;
            for (s, &z) in scores.iter_mut().zip(logits) {
                let v = sigmoid(z);
                *s = v;
                sum += v;
            }
            RowScores { lse, score_sum: sum }
        }
    }
}

/// Logistic sigmoid, stable for large |z|; `sigmoid(-inf) = 0`.
#[inline]
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + exp_f64(-z))
    } else {
        let e = exp_f64(z);
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_lse_is_exact() {
        let z = [2.0, 1.0, 0.0, -1.0];
        let mut s = [0.0; 4];
        let r = score_row(ScoreFunction::Softmax, &z, 2.0, &mut s);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let lse = z.iter().map(|v: &f64| v.exp()).sum::<f64>().ln();
        assert!((r.lse - lse).abs() < 1e-14);
        assert!((s[0] - 0.6439142598879724).abs() < 1e-15);
    }

    #[test]
    fn neg_inf_is_zero_score() {
        let z = [f64::NEG_INFINITY, 0.0];
        let mut s = [0.0; 2];
        let r = score_row(ScoreFunction::Sigmoid, &z, 0.0, &mut s);
        assert_eq!(s, [0.0, 0.5]);
        assert_eq!(r.score_sum, 0.5);
        assert_eq!(r.lse, 0.0);
    }

    #[test]
    fn z_loss_input_is_stable_for_large_logits() {
        let z = [100.0, 0.0, 0.0, 0.0];
        let mut s = [0.0; 4];
        let r = score_row(ScoreFunction::Softmax, &z, 100.0, &mut s);
        assert!((r.lse - 100.0).abs() < 1e-12);
    }
}

//! Global-batch load balancing: per-expert statistics summed over the
//! micro-batches of one global batch (gradient accumulation) and over the
//! data-parallel ranks, and the balancing updates made from them once per
//! global batch.
//!
//! - Load-balance loss of the global batch (Megatron-Core `global_aux_loss`,
//!   "Demons in the Detail", arXiv:2501.11873): `E / (k N^2) * sum_e n_e S_e`
//!   with `n_e` the routed (pre-capacity) assignments of expert e over the
//!   global batch, `S_e` the sum over its tokens of e's share of the score
//!   distribution and `N` its tokens; `E * sum_e f_e P_e` with global `f`, `P`.
//! - Aux-loss-free bias (DeepSeek-V3, arXiv:2408.15664; Megatron-Core
//!   `get_updated_expert_bias`): `b_e += rate * sign(mean(n) - n_e)`.
//! - Quantile balancing (Megatron-Core `qb_dual_update` and
//!   `_update_router_qb_beta`): each micro-batch gives per-expert quantiles;
//!   once per global batch their mean is EMA-blended into the dual `beta`
//!   and mean-centred. Megatron selects on `s - beta`; this router adds its
//!   bias, so the bias is `-beta`.
//!
//! Sums are taken in the order the statistics arrive (one thread), so a
//! given sequence of additions gives the same bits at any thread count.

use rayon::prelude::*;

use crate::error::{Result, RouterError};

/// Per-expert statistics of a global batch.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalBalance {
    num_experts: usize,
    top_k: usize,
    tokens_per_expert: Vec<i64>,
    prob_sums: Vec<f64>,
    num_tokens: u64,
    num_micro_batches: u64,
    quantile_sums: Vec<f64>,
    num_quantile_batches: u64,
}

fn invalid(field: &'static str, value: impl ToString, allowed: impl Into<String>) -> RouterError {
    RouterError::InvalidConfig { field, value: value.to_string(), allowed: allowed.into() }
}

fn entry(argument: &'static str, index: usize, value: impl ToString, allowed: &str) -> RouterError {
    RouterError::InvalidEntry {
        argument,
        index: format!("[{index}]"),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

fn check_len(argument: &'static str, len: usize, experts: usize) -> Result<()> {
    if len == experts {
        Ok(())
    } else {
        Err(RouterError::shape(argument, format!("[{experts}] (num_experts)"), format!("[{len}]")))
    }
}

/// `bias`, checked: E finite values.
fn check_bias(bias: &[f64], experts: usize) -> Result<()> {
    check_len("expert_bias", bias.len(), experts)?;
    match bias.iter().position(|b| !b.is_finite()) {
        Some(i) => {
            Err(RouterError::NonFiniteParameter { argument: "expert_bias", index: i, value: bias[i].to_string() })
        }
        None => Ok(()),
    }
}

/// The aux-loss-free sign update: `bias_e + rate * sign(mean(load) - load_e)`
/// (0 change for an expert exactly at the mean). The one definition of the
/// rule, for the global batch and for `LoadBalancer`'s per-step update.
///
/// Errors: `load` or `bias` not of length E, a negative or non-finite load,
/// a non-finite bias, a rate that is negative or not finite.
pub fn sign_bias_update(load: &[f64], bias: &[f64], rate: f64) -> Result<Vec<f64>> {
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(invalid("rate", rate, "must be a finite number >= 0"));
    }
    check_len("load", load.len(), bias.len())?;
    check_bias(bias, load.len())?;
    if let Some(i) = load.iter().position(|l| !(l.is_finite() && *l >= 0.0)) {
        return Err(entry("load", i, load[i], "every load must be finite and >= 0"));
    }
    let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
    let step = |l: f64| {
        if l < mean {
            rate
        } else if l > mean {
            -rate
        } else {
            0.0
        }
    };
    Ok(bias.iter().zip(load).map(|(&b, &l)| b + step(l)).collect())
}

/// Megatron-Core's `qb_dual_update` for one micro-batch: per expert, the
/// `(T k / E + 1)`-th largest over tokens of `s_te - alpha_t`, with `alpha_t`
/// the `(k+1)`-th largest of the token's `s_t + bias` (the best score that
/// is not selected). `scores` is `[T, E]` row-major and finite.
///
/// Errors: `top_k >= E` (there is no (k+1)-th expert), `T = 0` or `T k` not
/// a multiple of E (`scores`), a non-finite score (the first token named),
/// a bias of the wrong length or not finite.
pub fn expert_quantiles(scores: &[f64], experts: usize, top_k: usize, bias: &[f64]) -> Result<Vec<f64>> {
    if top_k == 0 || top_k >= experts {
        return Err(invalid("top_k", top_k, format!("quantile balancing needs 1 <= top_k < num_experts ({experts})")));
    }
    check_bias(bias, experts)?;
    let tokens = scores.len() / experts;
    if tokens == 0 || tokens * experts != scores.len() || !(tokens * top_k).is_multiple_of(experts) {
        return Err(RouterError::shape(
            "scores",
            format!("[T, {experts}] with T >= 1 and T * top_k ({top_k}) a multiple of num_experts"),
            format!("{} values (T = {tokens})", scores.len()),
        ));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(RouterError::BadValue {
            argument: "scores",
            problem: "holds a value that is not finite",
            token: i / experts,
            hint: "quantile balancing needs finite scores",
        });
    }
    let descending = |a: &f64, b: &f64| b.total_cmp(a);
    let alpha: Vec<f64> = scores
        .par_chunks(experts)
        .map_init(Vec::new, |keys: &mut Vec<f64>, row| {
            keys.clear();
            keys.extend(row.iter().zip(bias).map(|(s, b)| s + b));
            *keys.select_nth_unstable_by(top_k, descending).1
        })
        .collect();
    let target = tokens * top_k / experts;
    let quantiles = (0..experts)
        .into_par_iter()
        .map_init(Vec::new, |column: &mut Vec<f64>, e| {
            column.clear();
            column.extend(alpha.iter().enumerate().map(|(t, a)| scores[t * experts + e] - a));
            *column.select_nth_unstable_by(target, descending).1
        })
        .collect();
    Ok(quantiles)
}

impl GlobalBalance {
    /// Empty statistics for E experts and k choices per token.
    ///
    /// Errors: `num_experts` 0, `top_k` 0 or above E (`InvalidConfig`).
    pub fn new(num_experts: usize, top_k: usize) -> Result<Self> {
        if num_experts == 0 {
            return Err(invalid("num_experts", 0, "must be >= 1"));
        }
        if top_k == 0 || top_k > num_experts {
            return Err(invalid("top_k", top_k, format!("must be in [1, num_experts = {num_experts}]")));
        }
        Ok(GlobalBalance {
            num_experts,
            top_k,
            tokens_per_expert: vec![0; num_experts],
            prob_sums: vec![0.0; num_experts],
            num_tokens: 0,
            num_micro_batches: 0,
            quantile_sums: vec![0.0; num_experts],
            num_quantile_batches: 0,
        })
    }

    /// Add `micro_batches` micro-batches' statistics: routed assignments per
    /// expert, the sums over tokens of each expert's score share, and tokens.
    ///
    /// Errors (nothing is added then): lengths other than E, a negative count,
    /// a negative or non-finite probability sum, more assignments than
    /// `num_tokens * k`, or totals that overflow.
    pub fn add_counts(
        &mut self,
        tokens_per_expert: &[i64],
        prob_sums: &[f64],
        num_tokens: u64,
        micro_batches: u64,
    ) -> Result<()> {
        let e = self.num_experts;
        check_len("tokens_per_expert", tokens_per_expert.len(), e)?;
        check_len("prob_sums", prob_sums.len(), e)?;
        if let Some(i) = tokens_per_expert.iter().position(|&n| n < 0) {
            return Err(entry("tokens_per_expert", i, tokens_per_expert[i], "counts must be >= 0"));
        }
        if let Some(i) = prob_sums.iter().position(|p| !(p.is_finite() && *p >= 0.0)) {
            return Err(entry("prob_sums", i, prob_sums[i], "sums must be finite and >= 0"));
        }
        let assignments: i128 = tokens_per_expert.iter().map(|&n| n as i128).sum();
        if assignments > num_tokens as i128 * self.top_k as i128 {
            return Err(RouterError::InvalidEntry {
                argument: "tokens_per_expert",
                index: "'s total".into(),
                value: assignments.to_string(),
                allowed: format!("at most num_tokens * top_k = {num_tokens} * {}", self.top_k),
            });
        }
        let overflow = |what: &'static str| RouterError::InvalidEntry {
            argument: what,
            index: "'s running total".into(),
            value: "beyond 2**63 - 1".into(),
            allowed: "reset the accumulator once per global batch".into(),
        };
        let counts = self
            .tokens_per_expert
            .iter()
            .zip(tokens_per_expert)
            .map(|(&a, &b)| a.checked_add(b))
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| overflow("tokens_per_expert"))?;
        let tokens = self.num_tokens.checked_add(num_tokens).filter(|&n| n <= i64::MAX as u64);
        let tokens = tokens.ok_or_else(|| overflow("num_tokens"))?;
        let batches = self.num_micro_batches.checked_add(micro_batches).ok_or_else(|| overflow("num_micro_batches"))?;
        self.tokens_per_expert = counts;
        self.prob_sums.iter_mut().zip(prob_sums).for_each(|(a, b)| *a += b);
        self.num_tokens = tokens;
        self.num_micro_batches = batches;
        Ok(())
    }

    /// Add one micro-batch's quantiles (see [`expert_quantiles`]).
    pub fn add_quantiles(&mut self, scores: &[f64], bias: &[f64]) -> Result<()> {
        let q = expert_quantiles(scores, self.num_experts, self.top_k, bias)?;
        self.quantile_sums.iter_mut().zip(&q).for_each(|(a, b)| *a += b);
        self.num_quantile_batches += 1;
        Ok(())
    }

    /// Add `other`'s statistics (another rank's, or another accumulator's).
    ///
    /// Errors: a different E or k (`Inconsistent`), totals that overflow.
    pub fn merge(&mut self, other: &GlobalBalance) -> Result<()> {
        if (other.num_experts, other.top_k) != (self.num_experts, self.top_k) {
            return Err(RouterError::Inconsistent {
                argument: "other",
                detail: format!(
                    "it has num_experts = {}, top_k = {}; this accumulator has {}, {}",
                    other.num_experts, other.top_k, self.num_experts, self.top_k
                ),
            });
        }
        let mut sum = self.clone();
        sum.add_counts(&other.tokens_per_expert, &other.prob_sums, other.num_tokens, other.num_micro_batches)?;
        sum.quantile_sums.iter_mut().zip(&other.quantile_sums).for_each(|(a, b)| *a += b);
        sum.num_quantile_batches += other.num_quantile_batches;
        *self = sum;
        Ok(())
    }

    /// Forget every statistic (E and k stay).
    pub fn reset(&mut self) {
        *self = GlobalBalance::new(self.num_experts, self.top_k).unwrap_or_else(|_| self.clone());
    }

    /// `E / (k N^2) * sum_e n_e S_e`; 0 when no token was added.
    pub fn load_balance_loss(&self) -> f64 {
        if self.num_tokens == 0 {
            return 0.0;
        }
        let n = self.num_tokens as f64;
        let dot: f64 = self.tokens_per_expert.iter().zip(&self.prob_sums).map(|(&c, &s)| c as f64 * s).sum();
        self.num_experts as f64 / (self.top_k as f64 * n) * (dot / n)
    }

    /// [`sign_bias_update`] on the global batch's routed counts.
    pub fn bias_update(&self, bias: &[f64], rate: f64) -> Result<Vec<f64>> {
        let load: Vec<f64> = self.tokens_per_expert.iter().map(|&n| n as f64).collect();
        sign_bias_update(&load, bias, rate)
    }

    /// The next bias of quantile balancing (`_update_router_qb_beta`): with
    /// `beta = -bias` and `q` the mean of the added quantiles,
    /// `beta' = ema * beta + (1 - ema) * q`, minus its mean; returns `-beta'`.
    ///
    /// Errors: `ema` outside [0, 1], no quantiles added, a bad bias.
    pub fn quantile_bias_update(&self, bias: &[f64], ema: f64) -> Result<Vec<f64>> {
        if !(0.0..=1.0).contains(&ema) {
            return Err(invalid("ema", ema, "must be in [0, 1]"));
        }
        check_bias(bias, self.num_experts)?;
        if self.num_quantile_batches == 0 {
            return Err(RouterError::Inconsistent {
                argument: "quantiles",
                detail: "none were added since the last reset; call add_quantiles first".into(),
            });
        }
        let count = self.num_quantile_batches as f64;
        let beta: Vec<f64> =
            bias.iter().zip(&self.quantile_sums).map(|(&b, &q)| ema * -b + (1.0 - ema) * (q / count)).collect();
        let mean = beta.iter().sum::<f64>() / self.num_experts as f64;
        Ok(beta.iter().map(|b| mean - b).collect())
    }

    /// E.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// k.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// `[E]` routed (pre-capacity) assignments per expert.
    pub fn tokens_per_expert(&self) -> &[i64] {
        &self.tokens_per_expert
    }
    /// `[E]` sums over tokens of each expert's share of the score distribution.
    pub fn prob_sums(&self) -> &[f64] {
        &self.prob_sums
    }
    /// Tokens (active ones) added.
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }
    /// Micro-batches added.
    pub fn num_micro_batches(&self) -> u64 {
        self.num_micro_batches
    }
    /// `[E]` sums of the added quantiles.
    pub fn quantile_sums(&self) -> &[f64] {
        &self.quantile_sums
    }
    /// Micro-batches whose quantiles were added.
    pub fn num_quantile_batches(&self) -> u64 {
        self.num_quantile_batches
    }

    /// Statistics from their parts (the inverse of the getters), checked as `add_counts` checks.
    pub fn from_parts(
        num_experts: usize,
        top_k: usize,
        counts: (&[i64], &[f64], u64, u64),
        quantiles: (&[f64], u64),
    ) -> Result<Self> {
        let mut g = GlobalBalance::new(num_experts, top_k)?;
        g.add_counts(counts.0, counts.1, counts.2, counts.3)?;
        check_len("quantile_sums", quantiles.0.len(), num_experts)?;
        g.quantile_sums = quantiles.0.to_vec();
        g.num_quantile_batches = quantiles.1;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_one_at_balance_and_sums_merge() {
        let mut a = GlobalBalance::new(4, 2).unwrap();
        a.add_counts(&[2, 2, 2, 2], &[1.0; 4], 4, 1).unwrap();
        assert_eq!(a.load_balance_loss(), 1.0);
        let mut b = GlobalBalance::new(4, 2).unwrap();
        b.add_counts(&[4, 0, 0, 0], &[1.0, 1.0, 1.0, 1.0], 2, 1).unwrap();
        let mut m = a.clone();
        m.merge(&b).unwrap();
        assert_eq!(m.tokens_per_expert(), &[6, 2, 2, 2]);
        assert_eq!((m.num_tokens(), m.num_micro_batches()), (6, 2));
        assert!(m.merge(&GlobalBalance::new(4, 1).unwrap()).is_err());
        assert!(a.add_counts(&[9, 0, 0, 0], &[0.0; 4], 4, 1).is_err());
        assert_eq!(a.num_tokens(), 4);
        m.reset();
        assert_eq!(m, GlobalBalance::new(4, 2).unwrap());
    }

    #[test]
    fn sign_rule() {
        let b = sign_bias_update(&[6.0, 2.0, 0.0, 0.0], &[0.0; 4], 0.5).unwrap();
        assert_eq!(b, vec![-0.5, 0.0, 0.5, 0.5]);
        assert!(sign_bias_update(&[1.0, -1.0], &[0.0; 2], 0.1).is_err());
        assert!(sign_bias_update(&[1.0, 1.0], &[0.0; 2], f64::NAN).is_err());
    }

    #[test]
    fn quantiles_by_hand() {
        // T = 4, E = 2, k = 1: target 2, the 3rd largest of s_te - alpha_t.
        let s = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.4, 0.6];
        let q = expert_quantiles(&s, 2, 1, &[0.0, 0.0]).unwrap();
        // alpha = [0.1, 0.2, 0.3, 0.4]; column 0: [0.8, 0.6, 0.4, 0.0]; column 1: [0, 0, 0, 0.2].
        assert!((q[0] - 0.4).abs() < 1e-15 && q[1] == 0.0);
        assert!(expert_quantiles(&s[..6], 2, 1, &[0.0, 0.0]).is_err());
        assert!(expert_quantiles(&s, 2, 2, &[0.0, 0.0]).is_err());
    }
}

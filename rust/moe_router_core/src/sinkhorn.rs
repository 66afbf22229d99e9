//! Sinkhorn routing (S-BASE; Megatron-Core `moe_utils.sinkhorn` and
//! `TopKRouter.sinkhorn_load_balancing`; Clark et al. 2022, "Unified Scaling
//! Laws for Routed Language Models").
//!
//! In training, the cost `c_te = exp(z_te - max_e z_te)` of the active tokens
//! is balanced by alternating scalings, from `d1 = 1`:
//! `d0_t = (1/T) * 1 / (sum_e d1_e c_te + 1e-8)`, then
//! `d1_e = (1/E) * 1 / (sum_t d0_t c_te + 1e-8)`, until
//! `mean_e |d1_new - d1_old| <= sinkhorn_tolerance` (Megatron's stopping rule)
//! or `sinkhorn_max_iterations` iterations. Each token takes the top k of its
//! row of the balanced matrix `d1_e c_te d0_t` (ties to the lower expert,
//! ineligible experts last). The selection carries no gradient; the weights
//! are the unbalanced activation at the chosen experts, `sigmoid(z)` for k = 1
//! and `softmax(z)` over all E for k > 1, not renormalized, times
//! `weight_scale`: the token-choice pipeline routes the logits with that score
//! function and this selection (as a replay, `crate::replay`), so capacity,
//! drops, losses and the backward are the token-choice ones. A call that
//! replays a recording routes the recorded experts with these weights. In evaluation the selection is the plain top-k of
//! the activation (no Sinkhorn).
//!
//! Unlike Megatron, each row's maximum is subtracted before `exp`, so no
//! logit overflows (Megatron's float32 `exp` is inf above 88.7). Without the
//! `1e-8` terms the balanced matrix would not change: a per-row factor `a_t` of
//! the cost is absorbed by `d0_t` (`d0_t -> d0_t / a_t`). With them it changes
//! slightly: a row sum `S_t` becomes `a_t S_t + 1e-8` instead of
//! `a_t (S_t + 1e-8)`, so the iterates match Megatron's only where `1e-8` is
//! negligible beside the row sums (logits not far below 0 in Megatron's
//! unshifted form); here every row sum is at least `d1` at its largest cost 1.
//!
//! Deterministic and parallel: `d0` per token (parallel over the fixed token
//! chunks of `route::chunk_tokens`), the column sums of `d1` per chunk, then
//! added chunk by chunk in chunk order. Extra memory: the `[T, E]` float64
//! cost matrix (8 T E bytes) and the `[T, k]` selection.

use rayon::prelude::*;

use crate::config::{RouterConfig, RoutingAlgorithm, ScoreFunction};
use crate::error::{Result, RouterError};
use crate::math::{exp_shifted, read_row};
use crate::replay::Replay;
use crate::route::{chunk_tokens, route_into, RouteCall, Routing};
use crate::simd::Simd;
use crate::source::{ChunkBuf, LogitSource};
use crate::topk::select_top_k;

/// Megatron-Core's guard against a zero row or column sum.
const EPS: f64 = 1e-8;

/// The result of balancing a cost matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkhornBalance {
    /// `[T]` token scaling (0 for inactive tokens).
    pub d0: Vec<f64>,
    /// `[E]` expert scaling.
    pub d1: Vec<f64>,
    /// Iterations run.
    pub iterations: usize,
    /// Whether the stopping rule was met (otherwise the iteration cap stopped it).
    pub converged: bool,
}

/// Balance the row-major `[T, E]` non-negative `cost` over the tokens flagged in
/// `active` (all when None), with Megatron-Core's iteration (module docs).
///
/// `tolerance` > 0 and `max_iterations` >= 1 (not checked here: the
/// configuration validates them). With no active token nothing runs
/// (0 iterations, converged).
pub fn sinkhorn_balance(
    cost: &[f64],
    experts: usize,
    active: Option<&[bool]>,
    tolerance: f64,
    max_iterations: usize,
) -> SinkhornBalance {
    let t = cost.len().checked_div(experts).unwrap_or(0);
    let is_active = |tok: usize| active.is_none_or(|m| m[tok]);
    let n_active = (0..t).filter(|&tok| is_active(tok)).count();
    let mut d0 = vec![0.0; t];
    let mut d1 = vec![1.0; experts];
    if n_active == 0 {
        return SinkhornBalance { d0, d1, iterations: 0, converged: true };
    }
    let (inv_t, inv_e) = (1.0 / n_active as f64, 1.0 / experts as f64);
    let chunk = chunk_tokens(t, experts);
    let (mut iterations, mut converged) = (0, false);
    while iterations < max_iterations {
        iterations += 1;
        // One pass: each token's d0 from the old d1, and its part of the column sums.
        let parts: Vec<Vec<f64>> = cost
            .par_chunks(chunk * experts)
            .zip(d0.par_chunks_mut(chunk))
            .enumerate()
            .map(|(c, (rows, d0c))| {
                let mut columns = vec![0.0; experts];
                for (i, (row, d)) in rows.chunks_exact(experts).zip(d0c.iter_mut()).enumerate() {
                    if !is_active(c * chunk + i) {
                        continue;
                    }
                    let s: f64 = row.iter().zip(&d1).map(|(&v, &w)| w * v).sum();
                    *d = inv_t * (1.0 / (s + EPS));
                    for (acc, &v) in columns.iter_mut().zip(row) {
                        *acc += *d * v;
                    }
                }
                columns
            })
            .collect();
        let mut columns = vec![0.0; experts];
        for part in &parts {
            for (acc, &v) in columns.iter_mut().zip(part) {
                *acc += v;
            }
        }
        let mut change = 0.0;
        for (w, &s) in d1.iter_mut().zip(&columns) {
            let new = inv_e * (1.0 / (s + EPS));
            change += (new - *w).abs();
            *w = new;
        }
        if change / experts as f64 <= tolerance {
            converged = true;
            break;
        }
    }
    SinkhornBalance { d0, d1, iterations, converged }
}

impl RouterConfig {
    /// The Sinkhorn fields' ranges, and the settings Sinkhorn routing does not
    /// combine with (each error names the field).
    pub(crate) fn check_sinkhorn(&self) -> Result<()> {
        let tol = self.sinkhorn_tolerance;
        if !(tol.is_finite() && tol > 0.0) {
            return Err(RouterError::config("sinkhorn_tolerance", format!("{tol:?}"), "must be a finite number > 0"));
        }
        if self.sinkhorn_max_iterations == 0 {
            return Err(RouterError::config("sinkhorn_max_iterations", 0, "must be an integer >= 1"));
        }
        if self.routing != RoutingAlgorithm::Sinkhorn {
            return Ok(());
        }
        let refuse = |field: &'static str, value: String, why: &str| {
            Err(RouterError::config(field, value, format!("is not available with routing='sinkhorn': {why}")))
        };
        match self.score_function {
            ScoreFunction::Softmax => {}
            ScoreFunction::Probabilities => {
                return refuse("score_function", "probabilities".into(), "Sinkhorn balances logits; use gate='linear'")
            }
            f => {
                return refuse(
                    "score_function",
                    format!("'{f}'"),
                    "its weights are sigmoid(z) for top_k = 1 and softmax(z) for top_k > 1 (Megatron-Core); \
                     leave score_function='softmax'",
                )
            }
        }
        if self.normalize_weights {
            return refuse("normalize_weights", "True".into(), "its weights are not renormalized (Megatron-Core)");
        }
        if let Some(g) = self.num_groups {
            return refuse("num_groups", g.to_string(), "the balanced selection has no group limit");
        }
        if self.expert_bias.is_some() {
            return refuse("expert_bias", "a bias".into(), "Sinkhorn balances the load itself");
        }
        if self.jitter_eps > 0.0 || self.noise_std > 0.0 {
            let (field, value) =
                if self.jitter_eps > 0.0 { ("jitter_eps", self.jitter_eps) } else { ("noise_std", self.noise_std) };
            return refuse(field, format!("{value:?}"), "the balanced selection is computed from the noiseless logits");
        }
        Ok(())
    }

    /// The token-choice configuration that weighs a Sinkhorn selection: its
    /// scores are the activation (`sigmoid` for k = 1, `softmax` for k > 1).
    pub(crate) fn sinkhorn_activation(&self) -> RouterConfig {
        let score_function = if self.top_k == 1 { ScoreFunction::Sigmoid } else { ScoreFunction::Softmax };
        RouterConfig { score_function, normalize_weights: false, ..self.as_token_choice() }
    }
}

/// Route `source` with Sinkhorn routing (module docs); `probs_out` as in [`route_into`].
pub(crate) fn route_sinkhorn<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    probs_out: Option<&mut [f32]>,
) -> Result<Routing> {
    let activation = options.sinkhorn_activation();
    if call.expert_bias.is_some() {
        return Err(RouterError::config(
            "expert_bias",
            "a bias",
            "is not available with routing='sinkhorn': Sinkhorn balances the load itself",
        ));
    }
    if !call.training || call.replay.is_some() || source.num_experts() != options.num_experts {
        // Evaluation: the plain top-k of the activation; a replay: the recorded experts
        // (a shape error is reported there too).
        return route_into(source, &activation, call, probs_out);
    }
    let Some((selection, balance)) = balanced_selection(source, options, call) else {
        // A row the pipeline refuses (NaN, +inf, no eligible expert): it reports it.
        return route_into(source, &activation, call, probs_out);
    };
    let t = source.num_tokens();
    let active: Vec<bool> = (0..t).map(|tok| call.token_mask.is_none_or(|m| m[tok])).collect();
    let replay =
        Replay { experts: &selection, active: &active, num_experts: options.num_experts, top_k: options.top_k };
    let mut routing = route_into(source, &activation, &RouteCall { replay: Some(replay), ..*call }, probs_out)?;
    routing.sinkhorn_iterations = Some(balance.iterations);
    routing.sinkhorn_converged = Some(balance.converged);
    Ok(routing)
}

/// The `[T, k]` Sinkhorn selection of `source`'s active tokens and the balance
/// it came from; None when a row is not valid router input.
fn balanced_selection<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
) -> Option<(Vec<i32>, SinkhornBalance)> {
    let (t, e, k) = (source.num_tokens(), options.num_experts, options.top_k);
    if call.token_mask.is_some_and(|m| m.len() != t) {
        return None;
    }
    let is_active = |tok: usize| call.token_mask.is_none_or(|m| m[tok]);
    let chunk = chunk_tokens(t, e);
    // Cost rows; an ineligible expert's cost is -0.0, so that it adds nothing to
    // the sums but stays apart from a cost that underflowed to +0.
    let mut cost = vec![0.0f64; t * e];
    let simd = Simd::current();
    let scratch = || (ChunkBuf::default(), vec![0.0f64; e]);
    let valid = cost.par_chunks_mut(chunk * e).enumerate().map_init(scratch, |(buf, z), (c, block)| {
        let start = c * chunk;
        let rows = source.chunk(start, start + block.len() / e, buf).rows;
        for (i, (dst, row)) in block.chunks_exact_mut(e).zip(rows.chunks_exact(e)).enumerate() {
            if !is_active(start + i) {
                continue;
            }
            let read = read_row(simd, row, z);
            if read.bad || read.max == f64::NEG_INFINITY {
                return false;
            }
            exp_shifted(simd, z, read.max, dst);
            for (d, &v) in dst.iter_mut().zip(z.iter()) {
                if v == f64::NEG_INFINITY {
                    *d = -0.0;
                }
            }
        }
        true
    });
    if !valid.all(|ok| ok) {
        return None;
    }
    let balance =
        sinkhorn_balance(&cost, e, call.token_mask, options.sinkhorn_tolerance, options.sinkhorn_max_iterations);
    let mut selection = vec![0i32; t * k];
    selection.par_chunks_mut(chunk * k).zip(cost.par_chunks(chunk * e)).enumerate().for_each_init(
        || (vec![0.0; e], vec![false; k], vec![0.0; k], Vec::new()),
        |(keys, routed, best, candidates), (c, (sel, rows))| {
            for (i, (out, row)) in sel.chunks_exact_mut(k).zip(rows.chunks_exact(e)).enumerate() {
                let tok = c * chunk + i;
                let d0 = balance.d0[tok];
                for ((key, &v), &w) in keys.iter_mut().zip(row).zip(&balance.d1) {
                    *key = if v.is_sign_negative() { f64::NEG_INFINITY } else { w * v * d0 };
                }
                select_top_k(simd, keys, None, out, routed, best, f64::NEG_INFINITY, candidates);
            }
        },
    );
    Some((selection, balance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::route_logits;
    use ndarray::Array2;

    fn logits(t: usize, e: usize, seed: u64) -> Array2<f64> {
        Array2::from_shape_fn((t, e), |(i, j)| {
            3.0 * (crate::rng::uniform(seed, crate::rng::Stream::Jitter, 0, i as u64, j as u64) - 0.5)
        })
    }

    fn sinkhorn_config(k: usize) -> RouterConfig {
        let mut c = RouterConfig::new(8, k);
        c.routing = RoutingAlgorithm::Sinkhorn;
        c.capacity_factor = crate::config::CapacityFactor::Dropless;
        c
    }

    #[test]
    fn balanced_sums_after_convergence() {
        let z = logits(300, 8, 1);
        let cost: Vec<f64> = z.iter().map(|v| v.exp()).collect();
        // The 1e-8 terms make (d0, d1) drift slowly along their scale (about 1e-7
        // per iteration here), so a tolerance below that would never be met.
        let b = sinkhorn_balance(&cost, 8, None, 1e-6, 10_000);
        assert!(b.converged && b.iterations > 1);
        for e in 0..8 {
            let col: f64 = (0..300).map(|t| b.d1[e] * cost[t * 8 + e] * b.d0[t]).sum();
            assert!((col * 8.0 - 1.0).abs() < 1e-6, "{col}");
        }
        for t in 0..300 {
            let row: f64 = (0..8).map(|e| b.d1[e] * cost[t * 8 + e] * b.d0[t]).sum();
            assert!((row * 300.0 - 1.0).abs() < 1e-5, "{row}");
        }
    }

    #[test]
    fn cap_is_honoured() {
        let z = logits(64, 8, 2);
        let cost: Vec<f64> = z.iter().map(|v| v.exp()).collect();
        let b = sinkhorn_balance(&cost, 8, None, 1e-300, 3);
        assert_eq!((b.iterations, b.converged), (3, false));
    }

    #[test]
    fn training_balances_the_load_and_eval_is_plain_top_k() {
        // Every token prefers expert 0: Sinkhorn spreads them, eval does not.
        let mut z = logits(400, 8, 3);
        z.column_mut(0).mapv_inplace(|v| v + 4.0);
        let options = sinkhorn_config(1);
        let train = route_logits(z.view(), &options, &RouteCall { training: true, ..RouteCall::default() }).unwrap();
        let eval = route_logits(z.view(), &options, &RouteCall::default()).unwrap();
        assert!(train.sinkhorn_converged == Some(true) && eval.sinkhorn_iterations.is_none());
        assert!(train.tokens_per_expert.iter().all(|&n| (30..=70).contains(&n)), "{:?}", train.tokens_per_expert);
        assert_eq!(eval.tokens_per_expert[0], 400);
        // k = 1: the weight is sigmoid(z) at the chosen expert.
        for t in 0..400 {
            let x = train.expert_indices[t] as usize;
            let s = 1.0 / (1.0 + (-z[[t, x]]).exp());
            assert!((f64::from(train.expert_weights[t]) - s).abs() < 1e-6);
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let z = logits(100, 8, 4).mapv(|v| v * 1e4);
        let r =
            route_logits(z.view(), &sinkhorn_config(2), &RouteCall { training: true, ..RouteCall::default() }).unwrap();
        assert!(r.expert_weights.iter().all(|w| w.is_finite()));
        assert!(r.sinkhorn_iterations.is_some());
    }

    #[test]
    fn refuses_what_it_cannot_combine() {
        let mut c = sinkhorn_config(2);
        c.normalize_weights = true;
        assert!(c.validate().unwrap_err().to_string().contains("normalize_weights"));
        let mut c = sinkhorn_config(2);
        c.sinkhorn_tolerance = f64::NAN;
        assert!(c.validate().unwrap_err().to_string().contains("sinkhorn_tolerance"));
    }
}

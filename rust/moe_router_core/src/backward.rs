//! The router's gradient with respect to its logits, in closed form.
//!
//! For one routing call, the gradient of
//! `sum(g_w * expert_weights) + g_aux * auxiliary_loss + sum(g_p * router_probs)`
//! with respect to the `[T, E]` logits, for the decision that call made. The
//! selection (top-k, groups, bias, capacity, drops, reroutes) is piecewise
//! constant, so it is taken as made; the counts `f_e` of the balance losses
//! are constants (a stop-gradient, as in Megatron-Core, DeepSpeed and Hugging
//! Face). Each row is scored again from the caller's logits exactly as the
//! routing pass scored it (same float64 arithmetic, same noise draws); nothing
//! `[T, E]` is kept between the passes.
//!
//! Per active token, with scores `s` (softmax over the eligible experts, or
//! sigmoid), choice j of expert `x_j`, kept factor `m_j` (1, or
//! `reroute_weight_scale` for a moved assignment, 0 when dropped) and scale
//! `ws`:
//! - weights: `w_j = ws * m_j * s_{x_j} / B` with `B = 1` (no normalization),
//!   `B = sum over routed i of s_{x_i}` (`normalize_weights`), or `B = sum
//!   over kept i of m_i s_{x_i}` (`renormalize_after_drop`, which overrides
//!   the former: its factor cancels);
//! - balance loss: `d lb / d q_te = E n_e / (k T_a^2)` with `q` the score
//!   distribution (`s`, or `s / sum s` for sigmoid) and `n_e` the routed
//!   counts; per sequence the same with the sequence's counts, divided by the
//!   number of sequences;
//! - z-loss: `d z / d x_te = 2 lse_t softmax(x_t)_e / T_a` (ST-MoE);
//! - then through the score function (softmax or sigmoid Jacobian) and the
//!   training jitter (`x' = x * (1 - eps + 2 eps u)`; additive noise has
//!   derivative 1). Formulas as TransformerEngine's fused router backward and
//!   Megatron-Core's `MoEAuxLossAutoScaler` compute them.

use rayon::prelude::*;

use crate::config::{RouterConfig, ScoreFunction};
use crate::error::{Result, RouterError};
use crate::route::{chunk_tokens, RouteCall};
use crate::row::{RowContext, RowRouter};
use crate::source::{ChunkBuf, Logit, LogitSource};

/// What the forward call decided, as the backward reads it (`[T, k]` row-major).
#[derive(Debug, Clone, Copy)]
pub struct SavedRouting<'a> {
    /// Final experts (after reroutes).
    pub expert_indices: &'a [i32],
    /// Experts before reroutes (whose scores the weights are made of); the
    /// same slice as `expert_indices` when nothing was rerouted.
    pub original_experts: &'a [i32],
    /// Routed before capacity (not a filler choice, token active).
    pub routed: &'a [bool],
    /// Kept after capacity and reroutes.
    pub kept: &'a [bool],
    /// Moved to another expert on overflow; empty when no reroute happened.
    pub rerouted: &'a [bool],
    /// `[E]` routed assignments per expert before capacity (`n_e`).
    pub pre_drop_tokens_per_expert: &'a [i64],
    /// `T_a`.
    pub active_tokens: usize,
}

/// The cotangents of the decision's outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cotangents<'a> {
    /// `[T, k]` gradient of the combine weights, if any.
    pub expert_weights: Option<&'a [f64]>,
    /// Gradient of `auxiliary_loss`.
    pub auxiliary_loss: f64,
    /// `[T, E]` gradient of `router_probs`, if any.
    pub router_probs: Option<&'a [f32]>,
}

/// Per-sequence constants of the sequence balance loss: for token t of
/// sequence s, `d seq / d q_te = factor[s] * counts[s][e]`.
struct SequenceConstants {
    length: usize,
    counts: Vec<Vec<i64>>,
    factor: Vec<f64>,
}

impl SequenceConstants {
    fn new(options: &RouterConfig, call: &RouteCall, saved: &SavedRouting, t: usize) -> Option<Self> {
        let length = call.sequence_length.filter(|_| options.seq_load_balance_loss_coeff != 0.0)?.max(1);
        let (e, k) = (options.num_experts, options.top_k);
        let sequences = t.div_ceil(length);
        let mut counts = vec![vec![0i64; e]; sequences];
        let mut active = vec![0usize; sequences];
        for tok in 0..t {
            if call.token_mask.is_none_or(|m| m[tok]) {
                let s = tok / length;
                active[s] += 1;
                for j in 0..k {
                    if saved.routed[tok * k + j] {
                        counts[s][saved.original_experts[tok * k + j] as usize] += 1;
                    }
                }
            }
        }
        let with_tokens = active.iter().filter(|&&a| a > 0).count().max(1) as f64;
        let factor = active
            .iter()
            .map(|&a| if a == 0 { 0.0 } else { e as f64 / (with_tokens * k as f64 * (a as f64).powi(2)) })
            .collect();
        Some(SequenceConstants { length, counts, factor })
    }
}

/// Gradient of the call's outputs with respect to `source`'s logits, into
/// `out` (`[T, E]` row-major; masked rows are 0).
///
/// Errors: shapes that disagree (`Shape`), a source of gate probabilities
/// (`InvalidConfig`: the hierarchical gate has its own backward), or a row
/// that no longer scores as in the routing pass (`BadValue`: the logits were
/// changed since).
pub fn backward_logits<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    saved: &SavedRouting,
    grads: &Cotangents,
    out: &mut [S::Elem],
) -> Result<()>
where
    S::Elem: Logit,
{
    if options.score_function == ScoreFunction::Probabilities {
        return Err(RouterError::config(
            "score_function",
            "probabilities",
            "the hierarchical gate's probabilities have no logits backward",
        ));
    }
    let (t, e, k) = (source.num_tokens(), options.num_experts, options.top_k);
    let tk = t * k;
    let check = |name: &'static str, len: usize, want: usize, what: String| {
        if len == want {
            Ok(())
        } else {
            Err(RouterError::shape(name, what, format!("{len} values")))
        }
    };
    check("out", out.len(), t * e, format!("[{t}, {e}]"))?;
    check("expert_indices", saved.expert_indices.len(), tk, format!("[{t}, {k}]"))?;
    check("original_experts", saved.original_experts.len(), tk, format!("[{t}, {k}]"))?;
    check("routed", saved.routed.len(), tk, format!("[{t}, {k}]"))?;
    check("kept", saved.kept.len(), tk, format!("[{t}, {k}]"))?;
    if let Some(g) = grads.expert_weights {
        check("grad_expert_weights", g.len(), tk, format!("[{t}, {k}]"))?;
    }
    if let Some(g) = grads.router_probs {
        check("grad_router_probs", g.len(), t * e, format!("[{t}, {e}]"))?;
    }
    if e == 0 || t == 0 {
        return Ok(());
    }
    let active = saved.active_tokens.max(1) as f64;
    let aux = grads.auxiliary_loss;
    // d(aux)/d q_te = lb_factor * n_e (+ the sequence term), d(aux)/d x_te (z) = z_factor * lse * softmax
    let lb_factor = aux * options.load_balance_loss_coeff * e as f64 / (k as f64 * active * active);
    let z_factor = aux * options.router_z_loss_coeff * 2.0 / active;
    let seq = if aux != 0.0 { SequenceConstants::new(options, call, saved, t) } else { None };
    let ctx = RowContext::new(options, call, source.argument());
    let chunk = chunk_tokens(t, e);
    let scratch = || (RowRouter::new(options), ChunkBuf::default(), RowGrad::new(e));
    out.par_chunks_mut(chunk * e).enumerate().try_for_each_init(scratch, |(router, buf, work), (c, block)| {
        let start = c * chunk;
        let end = (start + chunk).min(t);
        let rows = source.chunk(start, end, buf).rows;
        for (i, dst) in block.chunks_exact_mut(e).enumerate() {
            let tok = start + i;
            if !ctx.is_active(tok) {
                dst.fill(S::Elem::from_f64(0.0));
                continue;
            }
            let row = router.rescore(&ctx, tok, &rows[i * e..(i + 1) * e], &mut work.jitter)?;
            let scores = router.scores();
            let at = tok * k..(tok + 1) * k;
            work.ds.fill(0.0);
            if let Some(g) = grads.expert_weights {
                weight_term(options, saved, at.clone(), &g[at.clone()], scores, row.scale, &mut work.ds);
            }
            if let Some(gp) = grads.router_probs {
                for (d, &g) in work.ds.iter_mut().zip(&gp[tok * e..(tok + 1) * e]) {
                    *d += f64::from(g);
                }
            }
            // Balance losses, on the score distribution q.
            work.dq.fill(0.0);
            if lb_factor != 0.0 {
                for (d, &n) in work.dq.iter_mut().zip(saved.pre_drop_tokens_per_expert) {
                    *d += lb_factor * n as f64;
                }
            }
            if let Some(seq) = &seq {
                let s = tok / seq.length;
                let f = aux * options.seq_load_balance_loss_coeff * seq.factor[s];
                for (d, &n) in work.dq.iter_mut().zip(&seq.counts[s]) {
                    *d += f * n as f64;
                }
            }
            distribution_term(options.score_function, scores, row.scale, row.prob_scale, &work.dq, &mut work.ds);
            // Through the score function to the logits the router used.
            let dx = &mut work.dx;
            match options.score_function {
                ScoreFunction::Sigmoid => {
                    for ((d, &b), &g) in dx.iter_mut().zip(scores).zip(&work.ds) {
                        let s = b * row.scale;
                        *d = g * s * (1.0 - s);
                    }
                }
                _ => {
                    let dot: f64 = scores.iter().zip(&work.ds).map(|(&b, &g)| b * row.scale * g).sum();
                    for ((d, &b), &g) in dx.iter_mut().zip(scores).zip(&work.ds) {
                        *d = b * row.scale * (g - dot);
                    }
                }
            }
            if z_factor != 0.0 {
                let lse = router.softmax_into(&mut work.softmax);
                for (d, &p) in dx.iter_mut().zip(&work.softmax) {
                    *d += z_factor * lse * p;
                }
            }
            for ((o, &d), &f) in dst.iter_mut().zip(dx.iter()).zip(&work.jitter) {
                *o = S::Elem::from_f64(d * f);
            }
        }
        Ok(())
    })
}

/// Per-thread buffers of the backward.
struct RowGrad {
    ds: Vec<f64>,
    dq: Vec<f64>,
    dx: Vec<f64>,
    softmax: Vec<f64>,
    jitter: Vec<f64>,
}

impl RowGrad {
    fn new(e: usize) -> Self {
        RowGrad { ds: vec![0.0; e], dq: vec![0.0; e], dx: vec![0.0; e], softmax: vec![0.0; e], jitter: vec![1.0; e] }
    }
}

/// `ds += d(sum_j g_j w_j)/ds` for one token (see the module docs).
fn weight_term(
    options: &RouterConfig,
    saved: &SavedRouting,
    at: std::ops::Range<usize>,
    g: &[f64],
    buffer: &[f64],
    scale: f64,
    ds: &mut [f64],
) {
    let ws = options.weight_scale;
    let score = |x: i32| buffer[x as usize] * scale;
    let experts = &saved.original_experts[at.clone()];
    let moved = |j: usize| !saved.rerouted.is_empty() && saved.rerouted[at.start + j];
    let numerator: Vec<f64> = (0..g.len())
        .map(|j| match (saved.kept[at.start + j], moved(j)) {
            (false, _) => 0.0,
            (true, true) => options.reroute_weight_scale,
            (true, false) => 1.0,
        })
        .collect();
    let denominator: Option<Vec<f64>> = if options.renormalize_after_drop {
        Some(numerator.clone())
    } else if options.normalize_weights {
        Some((0..g.len()).map(|j| if saved.routed[at.start + j] { 1.0 } else { 0.0 }).collect())
    } else {
        None
    };
    match denominator {
        None => {
            for (j, &x) in experts.iter().enumerate() {
                if numerator[j] != 0.0 {
                    ds[x as usize] += ws * g[j] * numerator[j];
                }
            }
        }
        Some(d) => {
            let b: f64 = experts.iter().zip(&d).map(|(&x, &dj)| if dj != 0.0 { dj * score(x) } else { 0.0 }).sum();
            if b > 0.0 {
                let weighted: f64 = (0..g.len())
                    .map(|j| g[j] * numerator[j] * if numerator[j] != 0.0 { score(experts[j]) } else { 0.0 })
                    .sum();
                for (j, &x) in experts.iter().enumerate() {
                    if numerator[j] != 0.0 {
                        ds[x as usize] += ws * g[j] * numerator[j] / b;
                    }
                    if d[j] != 0.0 {
                        ds[x as usize] -= d[j] * ws * weighted / (b * b);
                    }
                }
            }
        }
    }
}

/// `ds += (dq through q)`: `q = s` for softmax, `q = s / sum(s)` for sigmoid.
fn distribution_term(function: ScoreFunction, buffer: &[f64], scale: f64, prob_scale: f64, dq: &[f64], ds: &mut [f64]) {
    if dq.iter().all(|&d| d == 0.0) || prob_scale == 0.0 {
        return;
    }
    match function {
        ScoreFunction::Sigmoid => {
            // q_e = s_e / S, S = scale / prob_scale; d q_e / d s_f = (delta_ef - q_e) / S
            let sum = scale / prob_scale;
            let dot: f64 = buffer.iter().zip(dq).map(|(&b, &d)| b * prob_scale * d).sum();
            for (s, &d) in ds.iter_mut().zip(dq) {
                *s += (d - dot) / sum;
            }
        }
        _ => {
            for (s, &d) in ds.iter_mut().zip(dq) {
                *s += d;
            }
        }
    }
}

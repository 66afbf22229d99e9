//! The router's gradient with respect to its logits, in closed form.
//!
//! For one routing call, the gradient of
//! `sum(g_w * expert_weights) + g_aux * auxiliary_loss + sum(g_p * router_probs)`
//! with respect to the `[T, E]` logits, for the decision that call made. The
//! selection (top-k, groups, bias, capacity, drops, reroutes) is piecewise
//! constant, so it is taken as made; the counts `f_e` of the balance losses
//! are constants (a stop-gradient, as in Megatron-Core, DeepSpeed and Hugging
//! Face). Each row is scored again from the caller's logits as the routing
//! pass scored it (same float64 arithmetic, same noise draws), except that a
//! float32 softmax row without noise takes its `exp` in float32 arithmetic
//! (`crate::exp32`, within 2 ulp of float32, as the peers' float32 autograd);
//! nothing `[T, E]` is kept between the passes.
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
//!   counts (or a global batch's counts and tokens in place of `n_e` and
//!   `T_a`); per sequence the same with the sequence's counts, divided by the
//!   number of sequences;
//! - z-loss: `d z / d x_te = 2 lse_t softmax(x_t)_e / T_a` (ST-MoE);
//! - then through the score function (softmax or sigmoid Jacobian, or
//!   `d sqrt(softplus(x))/dx = sigmoid(x) / (2 sqrt(softplus(x)))`) and the
//!   training jitter (`x' = x * (1 - eps + 2 eps u)`; additive noise has
//!   derivative 1). Formulas as TransformerEngine's fused router backward and
//!   Megatron-Core's `MoEAuxLossAutoScaler` compute them.

use rayon::prelude::*;

use crate::config::{RouterConfig, RoutingAlgorithm, ScoreFunction};
use crate::error::{Result, RouterError};
use crate::exp32::exp32_shifted_dot;
use crate::math::{exp_shifted_dot, ln_lanes, ln_one, read_row, sqrt_softplus_slope, LANES};
use crate::route::{chunk_tokens, RouteCall};
use crate::row::{RowContext, RowRouter};
use crate::simd::Simd;
use crate::source::{ChunkBuf, Logit, LogitSource};

/// Softmax rows of at most this many experts are scored in groups of `LANES`
/// (8 rows of float64 scores, 4 KiB, stay in L1 until their gradient is written).
const GROUPED_MAX_EXPERTS: usize = 64;

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
    /// `T` of the balance loss `E / (k T^2) * sum_e n_e * sum_t q_te`: `T_a`,
    /// or a global batch's tokens when `pre_drop_tokens_per_expert` holds its
    /// counts (Megatron-Core `global_aux_loss`).
    pub balance_tokens: usize,
}

/// A `[T, k]` row-major gradient of the combine weights, float32 (as the
/// weights are) or float64; read as float64 (exactly) either way.
#[derive(Debug, Clone, Copy)]
pub enum WeightGrads<'a> {
    /// float32 values.
    F32(&'a [f32]),
    /// float64 values.
    F64(&'a [f64]),
}

impl WeightGrads<'_> {
    /// The number of values.
    pub fn len(&self) -> usize {
        match self {
            WeightGrads::F32(g) => g.len(),
            WeightGrads::F64(g) => g.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `tok`'s `k` values as float64: a view, or widened into `buf`.
    #[inline]
    fn row<'b>(&'b self, tok: usize, k: usize, buf: &'b mut [f64]) -> &'b [f64] {
        match self {
            WeightGrads::F64(g) => &g[tok * k..(tok + 1) * k],
            WeightGrads::F32(g) => {
                for (b, &v) in buf.iter_mut().zip(&g[tok * k..(tok + 1) * k]) {
                    *b = f64::from(v);
                }
                &buf[..k]
            }
        }
    }
}

/// The cotangents of the decision's outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cotangents<'a> {
    /// `[T, k]` gradient of the combine weights, if any.
    pub expert_weights: Option<WeightGrads<'a>>,
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
/// For `ScoreFunction::Probabilities` (a gate's probabilities routed as the
/// scores), `out` receives the gradient with respect to those probabilities
/// instead, without the z-loss (the gate's backward adds its own, see
/// `gate_backward`).
///
/// Errors: shapes that disagree (`Shape`), or a row that no longer scores as
/// in the routing pass (`BadValue`: the logits were changed since).
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
    // A Sinkhorn decision's weights are its activation's scores at the chosen experts.
    let activation;
    let options = if options.routing == RoutingAlgorithm::Sinkhorn {
        activation = options.sinkhorn_activation();
        &activation
    } else {
        options
    };
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
    // d(aux)/d q_te: the same for every token (micro-batch loss) plus its sequence's part.
    let balance = saved.balance_tokens.max(1) as f64;
    let lb_factor = aux * options.load_balance_loss_coeff * e as f64 / (k as f64 * balance * balance);
    let dq = BalanceRows::new(options, call, saved, lb_factor, aux, t);
    let has_dq = lb_factor != 0.0 || dq.sequence.is_some();
    // d(aux)/d x_te from the z-loss: z_factor * lse_t * softmax(x_t)_e.
    let z_factor = aux * options.router_z_loss_coeff * 2.0 / active;
    let ctx = RowContext::new(options, call, source.argument());
    // Element-wise scores (sigmoid, sqrtsoftplus) share every term but the slope.
    let sigmoid = matches!(options.score_function, ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus);
    let probabilities = options.score_function == ScoreFunction::Probabilities;
    let softmax = !sigmoid && !probabilities && grads.router_probs.is_none();
    // Without noise the softmax row needs no router: see `Softmax::rescore`.
    let fused = softmax && !ctx.has_noise();
    let chunk = chunk_tokens(t, e);
    // Narrow fused rows are scored LANES at a time, so that their z-loss terms take one
    // vector `ln`; wider rows would not stay in L1 until they are used, so they go one by one.
    let group_rows = if e <= GROUPED_MAX_EXPERTS { LANES } else { 1 };
    // per thread: the row router, the chunk's rows, the row gradient's buffers, the
    // fused softmax rows, and a token's weight cotangents widened to float64
    let scratch = || {
        (RowRouter::new(options), ChunkBuf::default(), RowGrad::new(e, k), Softmax::new(e, group_rows), vec![0.0; k])
    };
    let call_terms =
        CallTerms { options, saved, grads, dq: &dq, has_dq, z_factor, ctx: &ctx, softmax, sigmoid, probabilities };
    out.par_chunks_mut(chunk * e).enumerate().try_for_each_init(
        scratch,
        |(router, buf, work, sm, g_row), (c, block)| {
            let start = c * chunk;
            let end = (start + chunk).min(t);
            let rows = source.chunk(start, end, buf).rows;
            let chosen = |tok: usize| &saved.original_experts[tok * k..(tok + 1) * k];
            // Softmax rows check their own output; the others are scanned at the end.
            let mut checks = Checks { finite: true, unchecked: false };
            let mut row = |i: usize, work: &mut RowGrad, g_row: &mut [f64], dst: &mut [S::Elem]| -> Result<RowCheck> {
                let tok = start + i;
                if !ctx.is_active(tok) {
                    dst.fill(S::Elem::from_f64(0.0));
                    return Ok(RowCheck::Finite(true));
                }
                call_terms.row(router, work, g_row, tok, &rows[i * e..(i + 1) * e], dst)
            };
            if !fused {
                for (i, dst) in block.chunks_exact_mut(e).enumerate() {
                    checks.note(row(i, work, g_row, dst)?);
                }
            } else {
                let mut scored = [None; LANES];
                let mut lse_ln = [0.0; LANES];
                for (group_start, group) in
                    block.chunks_mut(group_rows * e).enumerate().map(|(g, b)| (g * group_rows, b))
                {
                    let rows_in_group = group.len() / e;
                    for (g, s) in scored.iter_mut().take(rows_in_group).enumerate() {
                        let tok = start + group_start + g;
                        *s = if ctx.is_active(tok) {
                            sm.rescore(
                                ctx.simd,
                                &rows[(group_start + g) * e..(group_start + g + 1) * e],
                                chosen(tok),
                                dq.row(tok),
                                g,
                            )
                        } else {
                            None
                        };
                    }
                    if z_factor != 0.0 {
                        if group_rows == LANES {
                            let scales = std::array::from_fn(|g| match scored[g] {
                                Some((_, _, scale)) if g < rows_in_group => scale,
                                _ => 1.0,
                            });
                            lse_ln = ln_lanes(ctx.simd, &scales);
                        } else if let Some((_, _, scale)) = scored[0] {
                            lse_ln[0] = ln_one(ctx.simd, scale);
                        }
                    }
                    for (g, dst) in group.chunks_exact_mut(e).enumerate() {
                        let tok = start + group_start + g;
                        // A row that does not read as valid goes the general way, which reports it.
                        match scored[g].take() {
                            Some((max, dot, scale)) => {
                                let weights = grads.expert_weights.as_ref().map(|w| w.row(tok, k, g_row));
                                let z = if z_factor != 0.0 { z_factor * (max - lse_ln[g]) } else { 0.0 };
                                let terms =
                                    SoftmaxTerms { dq: dq.row(tok), dot, z, buffer: sm.row(g), scale, noisy: false };
                                checks.finite &=
                                    softmax_row(ctx.simd, options, saved, tok * k, weights, &terms, work, dst);
                            }
                            None => checks.note(row(group_start + g, work, g_row, dst)?),
                        }
                    }
                }
            }
            if checks.finite && !checks.unchecked {
                return Ok(());
            }
            finite_rows(block, e, start)
        },
    )
}

/// How a row's output was checked: by the softmax row itself, or not yet.
enum RowCheck {
    Finite(bool),
    Unchecked,
}

/// A block's rows so far: whether all checked ones are finite, and whether some are unchecked.
struct Checks {
    finite: bool,
    unchecked: bool,
}

impl Checks {
    fn note(&mut self, check: RowCheck) {
        match check {
            RowCheck::Finite(f) => self.finite &= f,
            RowCheck::Unchecked => self.unchecked = true,
        }
    }
}

/// What every row of one backward call shares.
struct CallTerms<'a> {
    options: &'a RouterConfig,
    saved: &'a SavedRouting<'a>,
    grads: &'a Cotangents<'a>,
    dq: &'a BalanceRows,
    has_dq: bool,
    z_factor: f64,
    ctx: &'a RowContext<'a>,
    softmax: bool,
    sigmoid: bool,
    probabilities: bool,
}

impl CallTerms<'_> {
    /// The gradient row of active token `tok` from its logits `raw`, scored
    /// again by `router` as the routing pass scored it (any score function,
    /// noise and `router_probs` cotangent).
    fn row<F: Logit>(
        &self,
        router: &mut RowRouter,
        work: &mut RowGrad,
        g_row: &mut [f64],
        tok: usize,
        raw: &[F],
        dst: &mut [F],
    ) -> Result<RowCheck> {
        let (options, saved, grads, ctx) = (self.options, self.saved, self.grads, self.ctx);
        let (e, k) = (options.num_experts, options.top_k);
        let z_factor = self.z_factor;
        let (row, max) = router.rescore(ctx, tok, raw, &mut work.jitter)?;
        let scores = router.scores();
        let weights = grads.expert_weights.as_ref().map(|g| g.row(tok, k, g_row));
        if self.softmax {
            let dq = self.dq.row(tok);
            let z = if z_factor != 0.0 { z_factor * (max - ln_one(ctx.simd, row.scale)) } else { 0.0 };
            let dot = dense::dot(ctx.simd, scores, dq);
            let terms = SoftmaxTerms { dq, dot, z, buffer: scores, scale: row.scale, noisy: ctx.has_noise() };
            return Ok(RowCheck::Finite(softmax_row(ctx.simd, options, saved, tok * k, weights, &terms, work, dst)));
        }
        // ds: the gradient with respect to the scores s_e = buffer[e] * scale.
        match grads.router_probs {
            Some(gp) => {
                for (d, &g) in work.ds.iter_mut().zip(&gp[tok * e..(tok + 1) * e]) {
                    *d = f64::from(g);
                }
            }
            None => work.ds.fill(0.0),
        }
        if let Some(g) = weights {
            let experts = &saved.original_experts[tok * k..(tok + 1) * k];
            weight_terms(options, saved, tok * k, g, scores, row.scale, at_experts(&mut work.ds, experts));
        }
        if self.has_dq {
            let normalized = self.sigmoid || self.probabilities;
            distribution_term(normalized, scores, row.scale, row.prob_scale, self.dq.row(tok), &mut work.ds);
        }
        if self.probabilities {
            // The gate's backward takes it from here (its z-loss is its own).
            for (o, &d) in dst.iter_mut().zip(&work.ds) {
                *o = F::from_f64(d);
            }
            return Ok(RowCheck::Unchecked);
        }
        // Through the score function to the logits the router used.
        let (ds, dx) = (&work.ds, &mut work.dx);
        if options.score_function == ScoreFunction::SqrtSoftplus {
            for ((d, &x), &g) in dx.iter_mut().zip(router.logits()).zip(ds) {
                *d = g * sqrt_softplus_slope(x);
            }
        } else if self.sigmoid {
            for ((d, &b), &g) in dx.iter_mut().zip(scores).zip(ds) {
                let s = b * row.scale;
                *d = g * s * (1.0 - s);
            }
        } else {
            let dot: f64 = scores.iter().zip(ds).map(|(&b, &g)| b * g).sum::<f64>() * row.scale;
            for ((d, &b), &g) in dx.iter_mut().zip(scores).zip(ds) {
                *d = b * row.scale * (g - dot);
            }
        }
        if z_factor != 0.0 {
            if self.sigmoid {
                let lse = router.softmax_into(&mut work.softmax);
                for (d, &p) in dx.iter_mut().zip(&work.softmax) {
                    *d += z_factor * lse * p;
                }
            } else {
                // softmax: the scores are the probabilities and scale = 1 / sum(exp(x - max)).
                let lse = max - ln_one(ctx.simd, row.scale);
                let f = z_factor * lse * row.scale;
                for (d, &b) in dx.iter_mut().zip(scores) {
                    *d += f * b;
                }
            }
        }
        for ((o, &d), &f) in dst.iter_mut().zip(dx.iter()).zip(&work.jitter) {
            *o = F::from_f64(d * f);
        }
        Ok(RowCheck::Unchecked)
    }
}

/// Refuse a gradient block that overflowed the output's dtype (finite
/// cotangents can still overflow float32 through the products): a silent inf
/// would corrupt the caller's optimizer step. Branch-free scan while the block
/// is in cache; the position is looked up only on failure.
fn finite_rows<F: Logit>(block: &[F], e: usize, start: usize) -> Result<()> {
    if block.iter().fold(true, |all, v| all & v.to_f64().is_finite()) {
        return Ok(());
    }
    let at = block.iter().position(|v| !v.to_f64().is_finite()).unwrap_or(0);
    Err(RouterError::BadValue {
        argument: "grad_expert_weights",
        problem: "(with grad_auxiliary_loss and grad_router_probs) makes the gradient overflow the logits' dtype",
        token: start + at / e.max(1),
        hint: "scale the cotangents down, or route float64 logits",
    })
}

/// A softmax row scored without a `RowRouter` (no training noise): the
/// logits read and validated, then `exp` fused with the dot product with the
/// balance row, in the arithmetic of `RowRouter::rescore` and `dense::dot`
/// (the same bits, one pass fewer) for float64 rows, and in float32
/// arithmetic for float32 rows (`rescore_f32`).
///
/// The row's maximum is usually known before the row is read: it is the
/// logit of the token's first choice (always, for a plain top-k of the
/// logits). Taking it as the shift, `exp` reads the raw row once; the
/// same pass returns the row's true maximum and validity, and a row where the
/// guess was wrong (bias, groups, changed logits) is scored again in two
/// passes. The result is the same bits either way: the shift is the row's
/// maximum in both.
struct Softmax {
    logits: Vec<f64>,
    /// Rows of `exp(x - max)` (the scores times `sum`), one per slot.
    scores: Vec<f64>,
    experts: usize,
    /// Rows scored from a guessed maximum, and how many guesses were wrong:
    /// guessing stops where it mostly fails (a cost choice only).
    guesses: usize,
    misses: usize,
}

impl Softmax {
    fn new(e: usize, slots: usize) -> Self {
        Softmax { logits: vec![0.0; e], scores: vec![0.0; slots * e], experts: e, guesses: 0, misses: 0 }
    }

    /// The scores `rescore` wrote into `slot`.
    fn row(&self, slot: usize) -> &[f64] {
        &self.scores[slot * self.experts..(slot + 1) * self.experts]
    }

    /// `(max, sum_e scores_e dq_e, 1 / sum_e scores_e)` of `raw`, or `None`
    /// for a row with NaN, +inf or no finite logit. `chosen` are the token's
    /// experts, best first.
    #[inline]
    fn rescore<F: Logit>(
        &mut self,
        simd: Simd,
        raw: &[F],
        chosen: &[i32],
        dq: &[f64],
        slot: usize,
    ) -> Option<(f64, f64, f64)> {
        if let Some(raw) = F::as_f32(raw) {
            return self.rescore_f32(simd, raw, chosen, dq, slot);
        }
        let guessing = self.guessing();
        let e = self.experts;
        let scores = &mut self.scores[slot * e..(slot + 1) * e];
        if guessing {
            let guess =
                chosen.first().and_then(|&x| raw.get(usize::try_from(x).ok()?)).map_or(f64::NAN, |v| v.to_f64());
            // a zero maximum is left to the two passes, which fix its sign
            if guess.is_finite() && guess != 0.0 {
                self.guesses += 1;
                let r = exp_shifted_dot(simd, raw, guess, dq, scores);
                if !r.bad && r.max <= guess {
                    return Some((guess, r.dot, 1.0 / r.sum));
                }
                self.misses += 1;
            }
        }
        let read = read_row(simd, raw, &mut self.logits);
        if read.bad || read.max == f64::NEG_INFINITY {
            return None;
        }
        let r = exp_shifted_dot(simd, &self.logits, read.max, dq, scores);
        Some((read.max, r.dot, 1.0 / r.sum))
    }

    /// `rescore` of a float32 row, in float32 arithmetic (`crate::exp32`).
    /// A wrong guess costs one more pass: the first one found the maximum.
    fn rescore_f32(
        &mut self,
        simd: Simd,
        raw: &[f32],
        chosen: &[i32],
        dq: &[f64],
        slot: usize,
    ) -> Option<(f64, f64, f64)> {
        let guessing = self.guessing();
        let e = self.experts;
        let scores = &mut self.scores[slot * e..(slot + 1) * e];
        let mut shift = None;
        if guessing {
            let guess = chosen.first().and_then(|&x| raw.get(usize::try_from(x).ok()?)).copied();
            // a zero maximum is left to the read pass, as in `rescore`
            if let Some(guess) = guess.filter(|g| g.is_finite() && *g != 0.0) {
                self.guesses += 1;
                let r = exp32_shifted_dot(simd, raw, guess, dq, scores);
                if r.bad {
                    return None;
                }
                if r.max <= f64::from(guess) {
                    return Some((f64::from(guess), r.dot, 1.0 / r.sum));
                }
                self.misses += 1;
                shift = Some(r.max);
            }
        }
        let max = match shift {
            Some(max) => max,
            None => {
                let read = read_row(simd, raw, &mut self.logits);
                if read.bad || read.max == f64::NEG_INFINITY {
                    return None;
                }
                read.max
            }
        };
        // the maximum of float32 values is one
        let r = exp32_shifted_dot(simd, raw, max as f32, dq, scores);
        Some((max, r.dot, 1.0 / r.sum))
    }

    /// Whether to guess the maximum: guessing stops where it mostly fails (a cost choice only).
    #[inline]
    fn guessing(&self) -> bool {
        self.misses * 8 <= self.guesses + 8
    }
}

/// Per-thread buffers of the backward.
struct RowGrad {
    ds: Vec<f64>,
    dx: Vec<f64>,
    softmax: Vec<f64>,
    jitter: Vec<f64>,
    /// `[k]`: whether choice j is the first with its expert.
    first_time: Vec<bool>,
}

impl RowGrad {
    fn new(e: usize, k: usize) -> Self {
        RowGrad {
            ds: vec![0.0; e],
            dx: vec![0.0; e],
            softmax: vec![0.0; e],
            jitter: vec![1.0; e],
            first_time: vec![false; k],
        }
    }
}

/// Choice `j`'s factors in the weights: the numerator's (1, or
/// `reroute_weight_scale` for a moved assignment, 0 when dropped) and the
/// denominator's (the same with `renormalize_after_drop`, else whether it was
/// routed).
#[inline(always)]
fn choice_factors(options: &RouterConfig, saved: &SavedRouting, j: usize) -> (f64, f64) {
    let moved = !saved.rerouted.is_empty() && saved.rerouted[j];
    let numerator = match (saved.kept[j], moved) {
        (false, _) => 0.0,
        (true, true) => options.reroute_weight_scale,
        (true, false) => 1.0,
    };
    let denominator = if options.renormalize_after_drop {
        numerator
    } else if saved.routed[j] {
        1.0
    } else {
        0.0
    };
    (numerator, denominator)
}

/// The terms of `d(sum_j g_j w_j)/ds` for the token whose choices start at
/// `first` (see the module docs), given to `apply(j, added, subtracted)` for
/// every choice j in order: `ws g_j m_j / B` to add and `d_j ws W / B^2` to
/// subtract at the score of expert `x_j` (`W = sum_i g_i m_i s_{x_i}`), each
/// `None` where its factor is 0 (without normalization `B = 1` and nothing is
/// subtracted; with `B <= 0` there is no term).
#[inline(always)]
fn weight_terms(
    options: &RouterConfig,
    saved: &SavedRouting,
    first: usize,
    g: &[f64],
    buffer: &[f64],
    scale: f64,
    mut apply: impl FnMut(usize, Option<f64>, Option<f64>),
) {
    let ws = options.weight_scale;
    let k = g.len();
    let experts = &saved.original_experts[first..first + k];
    let factors = |j: usize| choice_factors(options, saved, first + j);
    if !options.renormalize_after_drop && !options.normalize_weights {
        for (j, &gj) in g.iter().enumerate() {
            let (n, _) = factors(j);
            apply(j, (n != 0.0).then_some(ws * gj * n), None);
        }
        return;
    }
    let score = |j: usize| buffer[experts[j] as usize] * scale;
    let b: f64 = (0..k).map(|j| (j, factors(j).1)).filter(|&(_, d)| d != 0.0).map(|(j, d)| d * score(j)).sum();
    if b <= 0.0 {
        (0..k).for_each(|j| apply(j, None, None));
        return;
    }
    let weighted: f64 =
        (0..k).map(|j| (j, factors(j).0)).filter(|&(_, n)| n != 0.0).map(|(j, n)| g[j] * n * score(j)).sum();
    for (j, &gj) in g.iter().enumerate() {
        let (n, d) = factors(j);
        apply(j, (n != 0.0).then(|| ws * gj * n / b), (d != 0.0).then(|| d * ws * weighted / (b * b)));
    }
}

/// `ds += d(sum_j g_j w_j)/ds`: `weight_terms` gathered at each choice's
/// expert of the `[E]` row `ds`.
fn at_experts<'a>(ds: &'a mut [f64], experts: &'a [i32]) -> impl FnMut(usize, Option<f64>, Option<f64>) + 'a {
    move |j, added, subtracted| {
        let x = experts[j] as usize;
        if let Some(a) = added {
            ds[x] += a;
        }
        if let Some(s) = subtracted {
            ds[x] -= s;
        }
    }
}

/// The most choices a token's weight terms take on the stack.
const DISTINCT_MAX_CHOICES: usize = 16;

/// `weight_terms` of a token whose experts are distinct: each choice's entry
/// of `ds` into `ds[j]`, from 0 with the operations of `at_experts` (the same
/// bits), without the `[E]` row.
fn at_choices(ds: &mut [f64]) -> impl FnMut(usize, Option<f64>, Option<f64>) + '_ {
    move |j, added, subtracted| {
        let mut v = 0.0;
        if let Some(a) = added {
            v += a;
        }
        if let Some(s) = subtracted {
            v -= s;
        }
        ds[j] = v;
    }
}

/// Whether no expert appears twice among a token's choices (an expert repeats
/// only as a filler beyond its eligible ones).
#[inline]
fn distinct(experts: &[i32]) -> bool {
    (1..experts.len()).all(|j| experts[..j].iter().all(|&x| x != experts[j]))
}

/// The dense inputs of one softmax row's gradient.
struct SoftmaxTerms<'a> {
    /// `[E]` d(aux)/d q of the token.
    dq: &'a [f64],
    /// `sum_f buffer_f dq_f`.
    dot: f64,
    /// The z-loss factor times lse (0 without the z-loss).
    z: f64,
    /// `[E]` `exp(x - max)`: the scores times `1 / scale`.
    buffer: &'a [f64],
    /// `1 / sum_e buffer_e`.
    scale: f64,
    /// Whether to multiply by `work.jitter`.
    noisy: bool,
}

/// The softmax row without a `router_probs` cotangent, written straight into
/// `out`: with `ds = dq + (the weights' k sparse entries)` and `z` the z-loss
/// factor times lse, `dx_e = s_e (ds_e - sum_f s_f ds_f + z)`, times the jitter
/// factor (`work.jitter` when `noisy`, else 1). One dense pass for the
/// output, then the k weighted experts are written again with their sparse
/// part. Returns whether every value written is finite.
#[allow(clippy::too_many_arguments)]
fn softmax_row<F: Logit>(
    simd: Simd,
    options: &RouterConfig,
    saved: &SavedRouting,
    first: usize,
    weights: Option<&[f64]>,
    terms: &SoftmaxTerms,
    work: &mut RowGrad,
    out: &mut [F],
) -> bool {
    let (buffer, scale, dq) = (terms.buffer, terms.scale, terms.dq);
    let k = work.first_time.len();
    let experts = &saved.original_experts[first..first + k];
    let Some(g) = weights else {
        let jitter = terms.noisy.then_some(&work.jitter[..]);
        // `+ 0.0`: the empty sparse sum, so that a dot of -0.0 gives the bits of the general case
        let c = (terms.dot + 0.0) * scale - terms.z;
        return dense::softmax_output(simd, buffer, scale, dq, c, jitter, out);
    };
    // The common case: each choice is its own entry of ds, kept on the stack.
    if k <= DISTINCT_MAX_CHOICES && distinct(experts) {
        let mut sparse_ds = [0.0; DISTINCT_MAX_CHOICES];
        let sparse_ds = &mut sparse_ds[..k];
        let jitter = terms.noisy.then_some(&work.jitter[..]);
        weight_terms(options, saved, first, g, buffer, scale, at_choices(sparse_ds));
        let mut sparse = 0.0;
        for (&x, &d) in experts.iter().zip(sparse_ds.iter()) {
            sparse += buffer[x as usize] * d;
        }
        let c = (terms.dot + sparse) * scale - terms.z;
        let mut finite = dense::softmax_output(simd, buffer, scale, dq, c, jitter, out);
        for (&x, &d) in experts.iter().zip(sparse_ds.iter()) {
            finite &= sparse_output(terms, c, d, jitter, x as usize, out);
        }
        return finite;
    }
    // The weights' entries, gathered into ds at their experts only.
    for (j, seen) in work.first_time.iter_mut().enumerate() {
        *seen = !experts[..j].contains(&experts[j]);
    }
    for &x in experts {
        work.ds[x as usize] = 0.0;
    }
    weight_terms(options, saved, first, g, buffer, scale, at_experts(&mut work.ds, experts));
    let mut sparse = 0.0;
    for (&x, _) in experts.iter().zip(&work.first_time).filter(|(_, &f)| f) {
        sparse += buffer[x as usize] * work.ds[x as usize];
    }
    let c = (terms.dot + sparse) * scale - terms.z;
    let jitter = terms.noisy.then_some(&work.jitter[..]);
    let mut finite = dense::softmax_output(simd, buffer, scale, dq, c, jitter, out);
    for (&x, _) in experts.iter().zip(&work.first_time).filter(|(_, &f)| f) {
        let x = x as usize;
        finite &= sparse_output(terms, c, work.ds[x], jitter, x, out);
    }
    finite
}

/// `out[x]` again with its sparse part `ds_x`; whether it is finite.
#[inline(always)]
fn sparse_output<F: Logit>(
    terms: &SoftmaxTerms,
    c: f64,
    ds_x: f64,
    jitter: Option<&[f64]>,
    x: usize,
    out: &mut [F],
) -> bool {
    let (buffer, scale, dq) = (terms.buffer, terms.scale, terms.dq);
    let d = buffer[x] * scale * (dq[x] - c) + buffer[x] * scale * ds_x;
    out[x] = F::from_f64(d * jitter.map_or(1.0, |j| j[x]));
    out[x].to_f64().is_finite()
}

/// `ds += (dq through q)`: `q = s` for softmax, `q = s / sum(s)` when
/// `normalized` (sigmoid, gate probabilities; `sum(s) = scale / prob_scale`).
fn distribution_term(normalized: bool, buffer: &[f64], scale: f64, prob_scale: f64, dq: &[f64], ds: &mut [f64]) {
    if prob_scale == 0.0 {
        return;
    }
    if normalized {
        let sum = scale / prob_scale;
        let dot: f64 = buffer.iter().zip(dq).map(|(&b, &q)| b * prob_scale * q).sum();
        for (s, &q) in ds.iter_mut().zip(dq) {
            *s += (q - dot) / sum;
        }
    } else {
        for (s, &q) in ds.iter_mut().zip(dq) {
            *s += q;
        }
    }
}

/// `d(aux) / d q_te` per token: the micro-batch part `lb_factor * n_e`, plus
/// the token's sequence's part when the sequence loss is on (one combined row
/// per sequence).
struct BalanceRows {
    batch: Vec<f64>,
    /// Sequence length and the `[sequences * E]` combined rows.
    sequence: Option<(usize, Vec<f64>)>,
}

impl BalanceRows {
    fn new(options: &RouterConfig, call: &RouteCall, saved: &SavedRouting, lb_factor: f64, aux: f64, t: usize) -> Self {
        let batch: Vec<f64> = saved.pre_drop_tokens_per_expert.iter().map(|&n| lb_factor * n as f64).collect();
        let sequence = (aux != 0.0).then(|| SequenceConstants::new(options, call, saved, t)).flatten().map(|seq| {
            let coeff = aux * options.seq_load_balance_loss_coeff;
            let rows = seq
                .counts
                .iter()
                .zip(&seq.factor)
                .flat_map(|(c, &f)| c.iter().zip(&batch).map(move |(&n, &q)| q + coeff * f * n as f64));
            (seq.length, rows.collect())
        });
        BalanceRows { batch, sequence }
    }

    /// The row of token `tok`.
    #[inline]
    fn row(&self, tok: usize) -> &[f64] {
        match &self.sequence {
            None => &self.batch,
            Some((length, rows)) => {
                let e = self.batch.len();
                let s = tok / length;
                &rows[s * e..(s + 1) * e]
            }
        }
    }
}

/// The dense loops of the softmax row, compiled for each instruction-set
/// level as the row kernels are (`crate::math`); every level gives the same
/// bits (the dot product sums fixed lanes in a fixed order, and no FMA).
mod dense {
    use crate::math::{dispatch, dot_lanes};
    use crate::simd::{Simd, SimdLevel};
    use crate::source::Logit;

    /// `out_e = s_e scale (dq_e - c) jitter_e` (`jitter_e = 1` without
    /// jitter: the same bits, one load fewer); whether every `out_e` is finite
    /// (branch-free, in the same pass).
    #[inline(always)]
    fn output<F: Logit>(s: &[f64], scale: f64, dq: &[f64], c: f64, jitter: Option<&[f64]>, out: &mut [F]) -> bool {
        let mut finite = true;
        let mut put = |o: &mut F, v: f64| {
            *o = F::from_f64(v);
            finite &= o.to_f64().is_finite();
        };
        match jitter {
            Some(jitter) => {
                for (((o, &b), &q), &f) in out.iter_mut().zip(s).zip(dq).zip(jitter) {
                    put(o, b * scale * (q - c) * f);
                }
            }
            None => {
                for ((o, &b), &q) in out.iter_mut().zip(s).zip(dq) {
                    put(o, b * scale * (q - c));
                }
            }
        }
        finite
    }

    /// The two loops compiled with `$feature` in module `$level`.
    macro_rules! build {
        ($level:ident $(, $feature:literal)?) => {
            mod $level {
                use super::*;

                $(#[target_feature(enable = $feature)])?
                pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
                    dot_lanes(a, b)
                }

                $(#[target_feature(enable = $feature)])?
                pub(super) fn softmax_output<F: Logit>(
                    s: &[f64],
                    scale: f64,
                    dq: &[f64],
                    c: f64,
                    jitter: Option<&[f64]>,
                    out: &mut [F],
                ) -> bool {
                    output(s, scale, dq, c, jitter, out)
                }
            }
        };
    }

    build!(portable);
    #[cfg(target_arch = "x86_64")]
    build!(avx2, "avx2,fma");
    #[cfg(target_arch = "x86_64")]
    build!(avx512, "avx512f");

    /// `sum_e a_e b_e` (fixed lanes).
    #[inline]
    pub(super) fn dot(simd: Simd, a: &[f64], b: &[f64]) -> f64 {
        dispatch!(simd, dot(a, b))
    }

    /// `out_e = s_e scale (dq_e - c) jitter_e`, rounded to `F`; whether all are finite.
    #[inline]
    pub(super) fn softmax_output<F: Logit>(
        simd: Simd,
        s: &[f64],
        scale: f64,
        dq: &[f64],
        c: f64,
        jitter: Option<&[f64]>,
        out: &mut [F],
    ) -> bool {
        dispatch!(simd, softmax_output(s, scale, dq, c, jitter, out))
    }
}

#[cfg(test)]
mod tests {
    use super::{at_choices, at_experts, dense, distinct, weight_terms, RowGrad, SavedRouting, Softmax};
    use crate::config::RouterConfig;
    use crate::math::LANES;
    use crate::simd::Simd;

    #[test]
    fn the_stack_weight_term_gives_the_bits_of_the_row_one() {
        let e = 12;
        let buffer: Vec<f64> = (0..e).map(|i| ((i * 5 % 7) as f64 * 0.31).exp()).collect();
        for k in [1usize, 2, 3, 8] {
            let experts: Vec<i32> = (0..k).map(|j| ((j * 5 + 3) % e) as i32).collect();
            assert!(distinct(&experts));
            let g: Vec<f64> = (0..k).map(|j| (j as f64 * 1.7).sin() - 0.25).collect();
            // every pattern of kept / routed / moved over the choices, each option on and off
            for pattern in 0..(1usize << k).min(64) {
                let kept: Vec<bool> = (0..k).map(|j| pattern >> j & 1 == 1).collect();
                let routed: Vec<bool> = (0..k).map(|j| kept[j] || j % 2 == 0).collect();
                let moved: Vec<bool> = (0..k).map(|j| kept[j] && j == 1).collect();
                for (normalize, renormalize, rerouting) in [
                    (false, false, false),
                    (true, false, false),
                    (false, true, false),
                    (true, true, true),
                    (false, false, true),
                ] {
                    let mut options = RouterConfig::new(e, k);
                    options.normalize_weights = normalize;
                    options.renormalize_after_drop = renormalize;
                    options.weight_scale = 2.5;
                    options.reroute_weight_scale = 0.5;
                    let saved = SavedRouting {
                        expert_indices: &experts,
                        original_experts: &experts,
                        routed: &routed,
                        kept: &kept,
                        rerouted: if rerouting { &moved } else { &[] },
                        pre_drop_tokens_per_expert: &[],
                        active_tokens: 1,
                        balance_tokens: 1,
                    };
                    let mut work = RowGrad::new(e, k);
                    work.ds.fill(0.0);
                    weight_terms(&options, &saved, 0, &g, &buffer, 0.125, at_experts(&mut work.ds, &experts));
                    let mut ds = vec![f64::NAN; k];
                    weight_terms(&options, &saved, 0, &g, &buffer, 0.125, at_choices(&mut ds));
                    for (j, &x) in experts.iter().enumerate() {
                        assert_eq!(ds[j].to_bits(), work.ds[x as usize].to_bits(), "k={k} {pattern:b} j={j}");
                    }
                }
            }
        }
        assert!(!distinct(&[3, 1, 3]));
        assert!(distinct(&[]));
    }

    #[test]
    fn a_guessed_maximum_gives_the_bits_of_the_two_passes() {
        for e in [1usize, 7, 8, 67, 256] {
            let raw: Vec<f32> = (0..e).map(|i| ((i * 7919 % 61) as f32 - 30.0) * 0.37).collect();
            let top = (0..e).fold(0, |b, i| if raw[i] > raw[b] { i } else { b }) as i32;
            let dq: Vec<f64> = (0..e).map(|i| (i as f64 * 0.3).cos() * 1e-2).collect();
            for simd in Simd::all() {
                let mut sm = Softmax::new(e, LANES);
                // no choice to guess from: the two passes
                let want = sm.rescore(simd, &raw, &[], &dq, 0).expect("valid row");
                let scores = sm.row(0).to_vec();
                // right guess, wrong guess (a smaller logit), out-of-range choice
                let low = (0..e as i32).find(|&i| raw[i as usize] < raw[top as usize]).unwrap_or(top);
                for chosen in [vec![top], vec![low, top], vec![-1], vec![e as i32]] {
                    let got = sm.rescore(simd, &raw, &chosen, &dq, 0).expect("valid row");
                    assert_eq!(
                        (got.0.to_bits(), got.1.to_bits(), got.2.to_bits()),
                        (want.0.to_bits(), want.1.to_bits(), want.2.to_bits()),
                        "{simd:?} e={e} {chosen:?}"
                    );
                    assert!(sm.row(0).iter().zip(&scores).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
                // every slot holds its own row, and writing one leaves the others alone
                let other: Vec<f32> = raw.iter().map(|v| v * 0.5).collect();
                let at_zero = sm.rescore(simd, &other, &[], &dq, 0).expect("valid row");
                let zero_row = sm.row(0).to_vec();
                let last = sm.rescore(simd, &raw, &[top], &dq, LANES - 1).expect("valid row");
                assert_eq!((last.0.to_bits(), last.2.to_bits()), (want.0.to_bits(), want.2.to_bits()));
                assert!(sm.row(LANES - 1).iter().zip(&scores).all(|(a, b)| a.to_bits() == b.to_bits()));
                assert!(sm.row(0).iter().zip(&zero_row).all(|(a, b)| a.to_bits() == b.to_bits()));
                assert!(at_zero.2 != want.2 || e == 1);
                // NaN or +inf anywhere is refused, guessed or not
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut r = raw.clone();
                    r[e / 2] = bad;
                    let first = if e / 2 == top as usize { 0 } else { top };
                    assert!(sm.rescore(simd, &r, &[first], &dq, 0).is_none(), "{simd:?} e={e}");
                    assert!(sm.rescore(simd, &r, &[], &dq, 0).is_none(), "{simd:?} e={e}");
                }
            }
        }
    }

    #[test]
    fn dense_loops_give_the_same_bits_at_every_level() {
        for e in [1usize, 7, 8, 13, 64, 67] {
            let s: Vec<f64> = (0..e).map(|i| ((i * 37 % 11) as f64 * 0.173).exp() / 9.0).collect();
            let dq: Vec<f64> = (0..e).map(|i| (i as f64 * 0.61).sin() * 1e-3).collect();
            let jitter: Vec<f64> = (0..e).map(|i| 1.0 + (i % 3) as f64 * 0.01).collect();
            let run = |simd: Simd| {
                let dot = dense::dot(simd, &s, &dq);
                let (mut o32, mut o64) = (vec![0f32; e], vec![0f64; e]);
                assert!(dense::softmax_output(simd, &s, 0.5, &dq, dot, Some(&jitter), &mut o32));
                assert!(dense::softmax_output(simd, &s, 0.5, &dq, dot, Some(&jitter), &mut o64));
                // without jitter: the bits of a jitter of ones
                let (mut plain, mut ones) = (vec![0f32; e], vec![0f32; e]);
                assert!(dense::softmax_output(simd, &s, 0.5, &dq, dot, None, &mut plain));
                assert!(dense::softmax_output(simd, &s, 0.5, &dq, dot, Some(&vec![1.0; e]), &mut ones));
                assert_eq!(plain, ones);
                // an overflow of float32 is reported
                assert!(!dense::softmax_output(simd, &s, 1e300, &dq, -1.0, None, &mut plain));
                (dot.to_bits(), o32.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), o64)
            };
            let want = run(Simd::all()[0]);
            let plain: f64 = s.iter().zip(&dq).map(|(a, b)| a * b).sum();
            assert!((f64::from_bits(want.0) - plain).abs() <= 1e-15 * plain.abs().max(1e-300) * e as f64);
            for (i, &o) in want.2.iter().enumerate() {
                let d = s[i] * 0.5 * (dq[i] - f64::from_bits(want.0)) * jitter[i];
                assert_eq!(o, d, "e={e} i={i}");
            }
            for simd in Simd::all() {
                let got = run(simd);
                assert_eq!(got.0, want.0, "{simd:?} e={e}");
                assert_eq!(got.1, want.1, "{simd:?} e={e}");
                assert!(got.2.iter().zip(&want.2).all(|(a, b)| a.to_bits() == b.to_bits()), "{simd:?} e={e}");
            }
        }
    }
}

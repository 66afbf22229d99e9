//! Routing of one token: validate its logits, add training noise, score,
//! limit to the best groups, select the top k, weigh the choices.

use crate::config::{GroupScoreInput, RouterConfig, ScoreFunction};
use crate::error::{Result, RouterError};
use crate::float32;
use crate::groups::limit_to_best_groups;
use crate::losses::SequenceLoss;
use crate::math::{ln_one, read_row, RowRead, LANES};
use crate::rng::{self, Stream};
use crate::route::{RouteCall, Tally};
use crate::row_block;
use crate::score::{score_row, score_row_before_ln, RowScores};
use crate::simd::Simd;
use crate::source::Logit;
use crate::topk::{block_lower_bound, second_largest, select_top_k, sort8_descending};
use crate::weights::{write_weights, Chosen, TinyWeights};

const LOGIT_HINT: &str = "router logits must be finite or -inf (-inf marks an expert as not eligible)";
const HIDDEN_HINT: &str = "check the hidden states and the router weight for NaN, inf or values so large \
     that the product overflows";

/// The error for an active row whose z-loss term `logsumexp^2` overflows float64:
/// `|logsumexp|` above `sqrt(f64::MAX)`, about 1.34e154 (only float64 logits get there).
pub(crate) fn z_term_overflow(ctx: &RowContext, token: usize) -> RouterError {
    RouterError::BadValue {
        argument: ctx.argument,
        problem: if ctx.argument == "hidden" {
            "gives router logits whose logsumexp squared (the z-loss term) overflows float64"
        } else {
            "has a logsumexp whose square (the z-loss term) overflows float64"
        },
        token,
        hint: "|logsumexp(logits)| must be below 1.34e154, the square root of the float64 maximum; \
               rescale the logits",
    }
}

/// Below this `|max logit|` a row's z-loss term is finite (`lse <= max + ln E`
/// and `lse^2` stays far below `f64::MAX`), so its logarithm may wait to be
/// taken with other rows' (`LossSums::add_token_pending_lse`); larger maxima
/// take it at once, where the overflow is reported for its token.
const PENDING_LSE_MAX: f64 = 1e150;

/// The float32 row of which `RowRouter::logits` is the exact widening, for the
/// top-k's candidate test (`topk::select_top_k`'s `narrow`): none under
/// training noise, which changes the logits, or for probability rows, whose
/// zeros become `-inf`.
#[inline(always)]
fn narrow_logits<'r, F: Logit>(ctx: &RowContext, raw: &'r [F]) -> Option<&'r [f32]> {
    if ctx.noise || ctx.options.score_function == ScoreFunction::Probabilities {
        None
    } else {
        F::as_f32(raw)
    }
}

/// What every token of one call shares.
pub(crate) struct RowContext<'a> {
    pub options: &'a RouterConfig,
    pub call: &'a RouteCall<'a>,
    pub argument: &'static str,
    /// The kernels' instruction set, chosen once for the call.
    pub simd: Simd,
    noise: bool,
    /// Whether tokens are routed eight at a time (`crate::row_block`).
    pub blocks: bool,
}

impl<'a> RowContext<'a> {
    pub(crate) fn new(options: &'a RouterConfig, call: &'a RouteCall<'a>, argument: &'static str) -> Self {
        let noise = call.training
            && options.score_function != ScoreFunction::Probabilities
            && (options.jitter_eps > 0.0 || options.noise_std > 0.0);
        let mut ctx = RowContext { options, call, argument, simd: Simd::current(), noise, blocks: false };
        ctx.blocks = row_block::applies(&ctx);
        ctx
    }

    /// Whether training noise is added to the logits.
    pub(crate) fn has_noise(&self) -> bool {
        self.noise
    }

    #[inline]
    pub(crate) fn is_active(&self, token: usize) -> bool {
        self.call.token_mask.is_none_or(|m| m[token])
    }
}

/// Per-thread scratch for routing rows of E experts.
pub(crate) struct RowRouter {
    logits: Vec<f64>,
    scores: Vec<f64>,
    keys: Vec<f64>,
    group_keys: Vec<f64>,
    group_scores: Vec<f64>,
    best: Vec<f64>,
    top_n: Vec<f64>,
    plain_experts: Vec<i32>,
    plain_routed: Vec<bool>,
    /// Scratch of the top-k selection for large k.
    candidates: Vec<(f64, u32)>,
    /// k values of scratch for the weights.
    weight_scratch: Vec<f64>,
    /// Score of the last token's first choice (0 if it has none), for batch-prioritized routing.
    pub last_top1: f32,
}

/// Where one token's outputs go: `[k]` slices of the `[T, k]` arrays, and
/// its `[E]` row of `router_probs` (empty when not requested).
pub(crate) struct TokenOut<'o> {
    pub experts: &'o mut [i32],
    pub weights: &'o mut [f32],
    pub routed: &'o mut [bool],
    pub probs: &'o mut [f32],
}

/// Pass 1's per-token bookkeeping once `out` holds the token's choices: its
/// weights and its routed and first-choice counts in `tally` (the caller adds
/// its loss sums, `LossSums::add_token`, in token order). `logits` and `scores`
/// are the row as scored (`row` reads them); returns the score of the first
/// choice (0 if it has none), for batch-prioritized routing.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn record_choices(
    ctx: &RowContext,
    token: usize,
    logits: &[f64],
    scores: &[f64],
    row: RowScores,
    out: &mut TokenOut,
    weight_scratch: &mut [f64],
    tally: &mut Tally,
) -> f32 {
    let options = ctx.options;
    let chosen = Chosen {
        function: options.score_function,
        logits,
        buffer: scores,
        scale: row.scale,
        experts: out.experts,
        routed: out.routed,
    };
    record_weights(options, token, &chosen, out.weights, weight_scratch, &mut tally.tiny_weights);
    let e = options.num_experts;
    let per_rank = tally.counts.len() > e;
    for (j, (&x, &r)) in out.experts.iter().zip(out.routed.iter()).enumerate() {
        if r {
            tally.counts[if per_rank { j * e } else { 0 } + x as usize] += 1;
        }
    }
    if out.routed[0] {
        tally.first_choice[out.experts[0] as usize] += 1;
        (scores[out.experts[0] as usize] * row.scale) as f32
    } else {
        0.0
    }
}

/// The weights of a token's `chosen` experts into `weights` (`record_choices`
/// without the counts), recording imprecise ones in `tiny`.
#[inline(always)]
pub(crate) fn record_weights(
    options: &RouterConfig,
    token: usize,
    chosen: &Chosen,
    weights: &mut [f32],
    weight_scratch: &mut [f64],
    tiny: &mut TinyWeights,
) {
    if float32::applies(options) {
        float32::write_weights(options, chosen, weights);
    } else {
        write_weights(options, token, chosen, weights, weight_scratch, tiny);
    }
}

impl RowRouter {
    pub(crate) fn new(options: &RouterConfig) -> Self {
        let e = options.num_experts;
        RowRouter {
            logits: vec![0.0; e],
            scores: vec![0.0; e],
            keys: vec![0.0; e],
            group_keys: vec![0.0; e],
            group_scores: vec![0.0; options.groups().map_or(0, |g| g.num_groups)],
            best: vec![0.0; options.top_k],
            top_n: Vec::new(),
            plain_experts: vec![0; options.top_k],
            plain_routed: vec![false; options.top_k],
            candidates: Vec::new(),
            weight_scratch: vec![0.0; options.top_k],
            last_top1: 0.0,
        }
    }

    /// Route token `token` whose logits are `raw` (length E). Writes its
    /// choices (and score row, if asked) into `out` and adds it to the chunk's
    /// `tally`: routed counts (per expert, or per rank and expert when
    /// `tally.counts` has k * E entries), first choices, plain top-k counts
    /// (when `tally.plain` is not empty) and the loss sums.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn route_token<F: Logit>(
        &mut self,
        ctx: &RowContext,
        token: usize,
        raw: &[F],
        z_squared: Option<f64>,
        mut out: TokenOut,
        tally: &mut Tally,
        seq: Option<&mut SequenceLoss>,
    ) -> Result<()> {
        let options = ctx.options;
        if !ctx.is_active(token) {
            // Padding: not read, not routed; valid expert ids keep gathers safe.
            for (j, x) in out.experts.iter_mut().enumerate() {
                *x = j as i32;
            }
            out.weights.fill(0.0);
            out.routed.fill(false);
            out.probs.fill(0.0);
            self.last_top1 = 0.0;
            if let Some(seq) = seq {
                seq.end_token(token, &mut tally.losses);
            }
            return Ok(());
        }

        let read = self.read_row(ctx, token, raw)?;
        let mut max = read.max;
        if ctx.noise {
            max = self.add_noise(options, ctx.call.step, token);
            if !(max.is_finite() || max == f64::NEG_INFINITY) || self.logits.iter().any(|v| v.is_nan()) {
                return Err(RouterError::BadValue {
                    argument: ctx.argument,
                    problem: "overflows float64 under the training noise",
                    token,
                    hint: "logits near the float64 limit cannot be jittered; rescale them",
                });
            }
        }
        let simd = ctx.simd;
        if float32::applies(options) && !(max as f32).is_finite() {
            return Err(RouterError::BadValue {
                argument: ctx.argument,
                problem: "has a logit beyond the float32 range, which score_precision float32 cannot score",
                token,
                hint: "the presets score in float32 as the frameworks do; pass score_precision='float64' for \
                       larger logits",
            });
        }
        let (mut row, exp_sum) = self.score(ctx, max);
        // Where the z-loss term is surely finite, its `ln` waits for seven more tokens'.
        let mut pending_lse = None;
        if let Some(z) = z_squared {
            row.z_term = z;
        } else if let Some(sum) = exp_sum {
            if max.abs() < PENDING_LSE_MAX {
                pending_lse = Some(sum);
            } else {
                let lse = max + ln_one(simd, sum);
                row.z_term = lse * lse;
            }
        }
        if !row.z_term.is_finite() {
            return Err(z_term_overflow(ctx, token));
        }
        for (p, &s) in out.probs.iter_mut().zip(&self.scores) {
            *p = (s * row.scale) as f32;
        }

        // A replayed selection has no keys: its plain top-k (below) is computed afresh.
        let keys_are_logits = ctx.call.replay.is_none() && self.compute_keys(ctx, row.scale);
        if let Some(replay) = &ctx.call.replay {
            replay.choices(token, &self.logits, out.experts, out.routed);
        } else {
            let bound = if keys_are_logits {
                self.logit_bound(ctx, &read)
            } else {
                block_lower_bound(&self.keys, options.top_k, &mut self.best)
            };
            let (keys, narrow): (&[f64], _) =
                if keys_are_logits { (&self.logits, narrow_logits(ctx, raw)) } else { (&self.keys, None) };
            select_top_k(simd, keys, narrow, out.experts, out.routed, &mut self.best, bound, &mut self.candidates);
        }
        self.last_top1 =
            record_choices(ctx, token, &self.logits, &self.scores, row, &mut out, &mut self.weight_scratch, tally);
        match pending_lse {
            Some(sum) => tally.losses.add_token_pending_lse(simd, &self.scores, row, max, sum),
            None => tally.losses.add_token(simd, &self.scores, row),
        }
        if !tally.plain.is_empty() {
            // The plain top-k: the same scores and order, without bias and groups.
            let (experts, routed): (&[i32], &[bool]) = if keys_are_logits {
                (out.experts, out.routed)
            } else {
                let bound = self.logit_bound(ctx, &read);
                let (px, pr) = (&mut self.plain_experts, &mut self.plain_routed);
                let narrow = narrow_logits(ctx, raw);
                select_top_k(simd, &self.logits, narrow, px, pr, &mut self.best, bound, &mut self.candidates);
                (px, pr)
            };
            tally.count_plain(experts, routed);
        }
        if let Some(seq) = seq {
            let routed_experts =
                out.experts.iter().zip(out.routed.iter()).filter(|(_, &r)| r).map(|(&x, _)| x as usize);
            seq.add_token(simd, routed_experts, &self.scores, row);
            seq.end_token(token, &mut tally.losses);
        }
        Ok(())
    }

    /// A lower bound of the k-th largest logit of the row in `self.logits`.
    /// Without noise the read pass's lane maxima are elements of the row: the
    /// k-th largest of them bounds the k-th largest logit from below.
    #[inline(always)]
    fn logit_bound(&mut self, ctx: &RowContext, read: &RowRead) -> f64 {
        let options = ctx.options;
        let k = options.top_k;
        if ctx.noise || options.score_function == ScoreFunction::Probabilities {
            block_lower_bound(&self.logits, k, &mut self.best)
        } else if options.num_experts <= 2 * LANES {
            f64::NEG_INFINITY // every key is a candidate anyway
        } else if k == 1 {
            read.max
        } else if k == 2 {
            second_largest(&read.lane_max)
        } else if k == LANES {
            read.lane_max.iter().copied().fold(f64::INFINITY, f64::min)
        } else if k < LANES {
            sort8_descending(read.lane_max)[k - 1]
        } else {
            block_lower_bound(&self.logits, k, &mut self.best)
        }
    }

    /// The row's scores: float64 (`score_row`), or the peers' float32 arithmetic
    /// in its place (`float32`), whose softmax also gives the z-loss term (from its
    /// float32 max and sum); the element-wise scores' z-loss term is the float64 one.
    /// The float64 scores leave the z-loss term's logarithm to the caller: the
    /// second value is the sum whose `ln` it needs (`score_row_before_ln`).
    #[inline(always)]
    fn score(&mut self, ctx: &RowContext, max: f64) -> (RowScores, Option<f64>) {
        let function = ctx.options.score_function;
        if !float32::applies(ctx.options) {
            return score_row_before_ln(ctx.simd, function, &self.logits, max, &mut self.scores);
        }
        // Softmax: the float32 pass gives the logsumexp too; the element-wise scores need the float64 one.
        let z_term = if function.is_elementwise() {
            score_row(ctx.simd, function, &self.logits, max, &mut self.scores).z_term
        } else {
            f64::NAN // unused: the float32 softmax computes its own
        };
        // `keys` is scratch until the selection fills it.
        (float32::score_row(ctx.simd, function, &self.logits, &mut self.scores, &mut self.keys, z_term), None)
    }

    /// Selection keys: the logits when there is no bias and no group limit (the
    /// same order as the exact scores, immune to ties that rounding of the scores
    /// would create; returns true), otherwise scores plus bias with the rejected
    /// groups at `-inf`, in `self.keys` (returns false). `scale` reads the scores.
    /// With `score_precision = "float32"` the keys are the float32 scores plus bias
    /// (added in float32), so saturated scores tie as the peers' do.
    #[inline(always)]
    fn compute_keys(&mut self, ctx: &RowContext, scale: f64) -> bool {
        let options = ctx.options;
        let bias = ctx.call.expert_bias;
        let on_scores32 = float32::ranks_scores(options);
        if bias.is_none() && options.groups().is_none() {
            if !on_scores32 {
                return true;
            }
            // Float32 scores alone: the keys are the scores, in a loop LLVM vectorizes.
            let e = options.num_experts;
            for ((key, &z), &s) in self.keys[..e].iter_mut().zip(&self.logits[..e]).zip(&self.scores[..e]) {
                *key = if z > f64::NEG_INFINITY { s * scale } else { f64::NEG_INFINITY };
            }
            return false;
        }
        for i in 0..options.num_experts {
            let z = self.logits[i];
            let eligible = z > f64::NEG_INFINITY;
            let b = bias.map(|b| b[i]);
            let score = self.scores[i] * scale;
            let scored = if on_scores32 { float32::biased(score, b) } else { score + b.unwrap_or(0.0) };
            let base = match options.group_score_input {
                GroupScoreInput::Scores => scored,
                GroupScoreInput::Logits => z + b.unwrap_or(0.0),
            };
            self.group_keys[i] = if eligible { base } else { f64::NEG_INFINITY };
            self.keys[i] = if !eligible {
                f64::NEG_INFINITY
            } else if b.is_some() || on_scores32 {
                scored
            } else {
                z
            };
        }
        if let Some(limit) = &options.groups() {
            limit_to_best_groups(limit, &self.group_keys, &mut self.keys, &mut self.group_scores, &mut self.top_n);
        }
        false
    }

    /// Which experts token `token` may be routed to at all (finite logit, inside
    /// its allowed groups): the candidates of an overflow reroute. The row is
    /// scored exactly as in the routing pass (same noise draws), so the answer
    /// matches the selection; `raw` was validated by that pass.
    pub(crate) fn eligible_experts<F: Logit>(&mut self, ctx: &RowContext, token: usize, raw: &[F], out: &mut [bool]) {
        let Ok(read) = self.read_row(ctx, token, raw) else {
            out.fill(false);
            return;
        };
        let mut max = read.max;
        if ctx.noise {
            max = self.add_noise(ctx.options, ctx.call.step, token);
        }
        let (row, _) = self.score(ctx, max);
        let keys_are_logits = self.compute_keys(ctx, row.scale);
        let keys = if keys_are_logits { &self.logits } else { &self.keys };
        for (o, &key) in out.iter_mut().zip(keys) {
            *o = key > f64::NEG_INFINITY;
        }
    }

    /// Copy the row into float64, rejecting NaN, +inf and rows with no finite logit.
    /// Returns what the read pass learned about the row. Inlined into each
    /// caller (a token's fixed cost), its rare paths out of line.
    #[inline(always)]
    fn read_row<F: Logit>(&mut self, ctx: &RowContext, token: usize, raw: &[F]) -> Result<RowRead> {
        let mut read = read_row(ctx.simd, raw, &mut self.logits);
        if ctx.options.score_function == ScoreFunction::Probabilities && !read.bad {
            self.probabilities_as_logits(ctx, token, &mut read)?;
        }
        if read.bad || read.max == f64::NEG_INFINITY {
            return Err(self.unroutable_row(ctx, token, read.bad));
        }
        Ok(read)
    }

    /// Probabilities: 0 means "not eligible" (-inf from here on); negative values are refused.
    #[inline(never)]
    fn probabilities_as_logits(&mut self, ctx: &RowContext, token: usize, read: &mut RowRead) -> Result<()> {
        if self.logits.iter().any(|&p| p < 0.0) {
            return Err(RouterError::BadValue {
                argument: ctx.argument,
                problem: "contains a negative probability",
                token,
                hint: "gate probabilities must be >= 0",
            });
        }
        for p in self.logits.iter_mut() {
            if *p == 0.0 {
                *p = f64::NEG_INFINITY;
            }
        }
        read.max = self.logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        read.lane_max = [f64::NEG_INFINITY; LANES];
        Ok(())
    }

    /// The error for a row read into `self.logits` that holds NaN or +inf
    /// (`bad`), or no eligible expert.
    #[cold]
    #[inline(never)]
    fn unroutable_row(&self, ctx: &RowContext, token: usize, bad: bool) -> RouterError {
        // The hidden-state path reports the logits it computed, not the hidden states.
        let from_hidden = ctx.argument == "hidden";
        if bad {
            let nan = self.logits.iter().any(|v| v.is_nan());
            let (problem, hint) = match (from_hidden, nan) {
                (false, true) => ("contains NaN", LOGIT_HINT),
                (false, false) => ("contains +inf", LOGIT_HINT),
                (true, true) => ("gives a NaN router logit (hidden @ weight + bias)", HIDDEN_HINT),
                (true, false) => ("gives a +inf router logit (hidden @ weight + bias)", HIDDEN_HINT),
            };
            return RouterError::BadValue { argument: ctx.argument, problem, token, hint };
        }
        RouterError::BadValue {
            argument: ctx.argument,
            problem: if from_hidden {
                "gives every expert a -inf router logit (hidden @ weight + bias)"
            } else {
                "has no eligible expert (every logit is -inf)"
            },
            token,
            hint: if from_hidden { HIDDEN_HINT } else { "mask such tokens out with token_mask instead" },
        }
    }

    /// Training noise: multiplicative jitter U(1-eps, 1+eps) (Switch Transformer)
    /// and additive N(0, std^2) (noisy top-k, Shazeer et al. 2017), keyed by
    /// (seed, step, token, expert). Returns the new largest logit.
    fn add_noise(&mut self, options: &RouterConfig, step: u64, token: usize) -> f64 {
        let mut max = f64::NEG_INFINITY;
        for (x, z) in self.logits.iter_mut().enumerate() {
            if options.jitter_eps > 0.0 {
                let u = rng::uniform(options.seed, Stream::Jitter, step, token as u64, x as u64);
                *z *= 1.0 - options.jitter_eps + 2.0 * options.jitter_eps * u;
            }
            if options.noise_std > 0.0 {
                *z += options.noise_std * rng::normal(options.seed, Stream::Gaussian, step, token as u64, x as u64);
            }
            max = max.max(*z);
        }
        max
    }

    /// Score token `token` again exactly as the routing pass did (validation,
    /// training noise, scores), for the backward; also returns the row's largest
    /// (noisy) logit. `jitter[e]` receives
    /// `d x'_e / d x_e`, the multiplicative jitter factor (1 without jitter).
    pub(crate) fn rescore<F: Logit>(
        &mut self,
        ctx: &RowContext,
        token: usize,
        raw: &[F],
        jitter: &mut [f64],
    ) -> Result<(crate::score::RowScores, f64)> {
        let read = self.read_row(ctx, token, raw)?;
        let mut max = read.max;
        jitter.fill(1.0);
        if ctx.noise {
            let options = ctx.options;
            if options.jitter_eps > 0.0 {
                for (x, f) in jitter.iter_mut().enumerate() {
                    let u = rng::uniform(options.seed, Stream::Jitter, ctx.call.step, token as u64, x as u64);
                    *f = 1.0 - options.jitter_eps + 2.0 * options.jitter_eps * u;
                }
            }
            max = self.add_noise(options, ctx.call.step, token);
        }
        Ok((score_row(ctx.simd, ctx.options.score_function, &self.logits, max, &mut self.scores), max))
    }

    /// The (noisy) logits of the last [`RowRouter::rescore`].
    pub(crate) fn logits(&self) -> &[f64] {
        &self.logits
    }

    /// The score buffer of the last [`RowRouter::rescore`] (`score_e = buffer[e] * scale`).
    pub(crate) fn scores(&self) -> &[f64] {
        &self.scores
    }

    /// `out = softmax` of the last rescored logits (0 for ineligible experts); returns their logsumexp.
    pub(crate) fn softmax_into(&self, out: &mut [f64]) -> f64 {
        let max = self.logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for (o, &z) in out.iter_mut().zip(&self.logits) {
            *o = (z - max).exp();
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
        max + sum.ln()
    }
}

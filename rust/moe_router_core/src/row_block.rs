//! Routing of eight tokens of eight experts at once (E = 8, Mixtral's shape):
//! the tokens sit across the lanes, so the largest logit, the shifted `exp`,
//! its sum and the top-k are vertical operations on 8-lane arrays instead of
//! short horizontal ones per row.
//!
//! Every value is computed by the same operations in the same order as the
//! per-token path (`RowRouter::route_token`): the `exp` kernel of the call's
//! SIMD level, the read pass's fold for the maximum, `lane_sum` for the sum of
//! the scores, insertion by key with ties to the lower index for the top-k
//! (the spec's order, `crate::block_lanes`), `write_weights`'s quotient and
//! `record_choices`'s counts across the lanes (its per-token path where a
//! token needs logarithms or records imprecise weights), then the loss sums
//! of the eight in token order. So the results are the same bits; only the
//! work is shared.

use crate::block_lanes::{shift_by_lane_max, top_k_lanes, LaneRank};
use crate::config::RouterConfig;
use crate::config::ScoreFunction;
use crate::math::{dispatch, exp_shifted, lane_sum_by, ln_lanes};
use crate::route::Tally;
use crate::row::{record_weights, RowContext};
use crate::score::RowScores;
use crate::simd::SimdLevel;
use crate::source::Logit;
use crate::weights::{plain_factor, records_tiny_weights, Chosen};

/// Tokens (and experts) per block.
pub(crate) const BLOCK: usize = 8;

/// Whether a call routes blocks: E = 8, k <= 8, a float64 softmax of the logits
/// as they are (no training noise), selected by logit (no bias, no group
/// limit, no replay), without the sequence-level loss.
pub(crate) fn applies(ctx: &RowContext) -> bool {
    let (options, call) = (ctx.options, ctx.call);
    options.num_experts == BLOCK
        && options.top_k <= BLOCK
        && options.score_function == ScoreFunction::Softmax
        && !crate::float32::applies(options)
        && !ctx.has_noise()
        && call.expert_bias.is_none()
        && options.groups().is_none()
        && call.replay.is_none()
        && call.sequence_length.is_none()
}

/// Where a block's outputs go: `[8, k]` choices, weights and routed flags,
/// `[8, 8]` scores (or empty), `[8]` first-choice scores (or empty).
pub(crate) struct BlockOut<'o> {
    pub experts: &'o mut [i32],
    pub weights: &'o mut [f32],
    pub routed: &'o mut [bool],
    pub probs: &'o mut [f32],
    pub top1: &'o mut [f32],
}

/// Route the 8 active tokens `start..start + 8` whose logits are `raw`
/// (`[8, 8]` row-major), as `route_token` would, and add them to `tally`.
/// Returns false, having written nothing, when a row needs the per-token path:
/// a logit that is not finite (`-inf` experts, or a row to reject) or a
/// z-loss term that overflows.
pub(crate) fn route_block<F: Logit>(
    ctx: &RowContext,
    start: usize,
    raw: &[F],
    out: BlockOut,
    tally: &mut Tally,
) -> bool {
    dispatch!(ctx.simd, route_block(ctx, start, raw, out, tally))
}

/// The block body compiled with `$feature` in module `$level`: the lane loops
/// are only vectorized as wide as the build allows, and they do not change
/// any value (no contraction into FMA; the same selects and comparisons).
macro_rules! build {
    ($level:ident $(, $feature:literal)?) => {
        mod $level {
            use super::*;

            $(#[target_feature(enable = $feature)])?
            pub(super) fn route_block<F: Logit>(
                ctx: &RowContext,
                start: usize,
                raw: &[F],
                out: BlockOut,
                tally: &mut Tally,
            ) -> bool {
                block(ctx, start, raw, out, tally)
            }
        }
    };
}

build!(portable);
#[cfg(target_arch = "x86_64")]
build!(avx2, "avx2,fma");
#[cfg(target_arch = "x86_64")]
build!(avx512, "avx512f");

// The lane loops index token-major arrays by expert (a transpose): ranges read clearer.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn block<F: Logit>(ctx: &RowContext, start: usize, raw: &[F], out: BlockOut, tally: &mut Tally) -> bool {
    debug_assert!(applies(ctx) && raw.len() == BLOCK * BLOCK);
    let k = ctx.options.top_k;
    // zt[e][t]: token t's logit of expert e, the lanes of the vertical passes.
    let mut zt = [[0.0f64; BLOCK]; BLOCK];
    let mut finite = true;
    for (t, values) in raw.chunks_exact(BLOCK).enumerate() {
        for (column, r) in zt.iter_mut().zip(values) {
            let v = r.to_f64();
            column[t] = v;
            finite &= v.is_finite();
        }
    }
    if !finite {
        return false;
    }
    // The largest logit, folded over the experts in order as the read pass does.
    let (max, shifted) = shift_by_lane_max(ctx.simd, &zt);
    // One call of the level's `exp` for the block (`x - 0.0` is `x`); its sum is not a row's.
    let mut st = [[0.0f64; BLOCK]; BLOCK];
    exp_shifted(ctx.simd, shifted.as_flattened(), 0.0, st.as_flattened_mut());
    // Each token's `lane_sum` of its scores, taken vertically (whole columns) in its pairing.
    let sum = lane_sum_by(&st, |a, b| -> [f64; BLOCK] { std::array::from_fn(|t| a[t] + b[t]) });
    let mut rows = [RowScores { z_term: 0.0, scale: 0.0, prob_scale: 0.0 }; BLOCK];
    // The eight tokens' logarithms in one call: `ln_f64`'s bits, as the per-token path takes them.
    let ln_sum = ln_lanes(ctx.simd, &sum);
    for (row, ((&s, &m), &ln_s)) in rows.iter_mut().zip(sum.iter().zip(&max).zip(&ln_sum)) {
        let lse = m + ln_s;
        *row = RowScores { z_term: lse * lse, scale: 1.0 / s, prob_scale: 1.0 / s };
    }
    if rows.iter().any(|r| !r.z_term.is_finite()) {
        return false;
    }
    let scored = Scored { raw, zt: &zt, st: &st, rows: &rows };
    // `k` as a constant keeps the insertion's lanes in registers and the stores' stride fixed.
    match k {
        1 => emit::<1, F>(ctx, start, &scored, out, tally),
        2 => emit::<2, F>(ctx, start, &scored, out, tally),
        3 => emit::<3, F>(ctx, start, &scored, out, tally),
        4 => emit::<4, F>(ctx, start, &scored, out, tally),
        5 => emit::<5, F>(ctx, start, &scored, out, tally),
        6 => emit::<6, F>(ctx, start, &scored, out, tally),
        7 => emit::<7, F>(ctx, start, &scored, out, tally),
        _ => emit::<BLOCK, F>(ctx, start, &scored, out, tally),
    }
    // The scale of each is 1 / sum with sum in [1, 8]: positive.
    tally.losses.add_block(ctx.simd, &st, &rows);
    true
}

/// A block as scored: the raw logits (`[8, 8]` row-major), the logits and the
/// buffer values across lanes (`[expert][token]`), and each token's scale and
/// z-loss term.
struct Scored<'a, F> {
    raw: &'a [F],
    zt: &'a [[f64; BLOCK]; BLOCK],
    st: &'a [[f64; BLOCK]; BLOCK],
    rows: &'a [RowScores; BLOCK],
}

/// Select each token's top `K` and write the block's choices, weights,
/// routed flags, scores and counts.
#[inline(always)]
fn emit<const K: usize, F: Logit>(ctx: &RowContext, start: usize, b: &Scored<F>, out: BlockOut, tally: &mut Tally) {
    let ranks = top_k_lanes::<K>(ctx.simd, b.zt, b.st);
    let chosen: [[i32; BLOCK]; K] = ranks.map(|r| r.expert);
    let BlockOut { experts, weights, routed, probs, top1 } = out;
    for (t, x) in experts.as_chunks_mut::<K>().0.iter_mut().enumerate() {
        *x = std::array::from_fn(|j| chosen[j][t]);
    }
    routed.fill(true); // every logit is finite

    // Token-major scores, made once if the probs or the per-token weights need them.
    let mut scores = None;
    if !probs.is_empty() {
        for (p, (s, row)) in
            probs.chunks_exact_mut(BLOCK).zip(scores.get_or_insert_with(|| by_token(b.st)).iter().zip(b.rows))
        {
            for (p, &s) in p.iter_mut().zip(s) {
                *p = (s * row.scale) as f32;
            }
        }
    }
    if !write_weights_lanes::<K>(ctx.options, &ranks, b.rows, weights) {
        // The per-token weights (logarithms for tiny scores, recorded imprecise weights).
        let mut weight_scratch = [0.0f64; K];
        let scores = scores.get_or_insert_with(|| by_token(b.st));
        for (t, values) in b.raw.chunks_exact(BLOCK).enumerate() {
            let z: [f64; BLOCK] = std::array::from_fn(|e| values[e].to_f64());
            let span = t * K..(t + 1) * K;
            let chosen = Chosen {
                function: ctx.options.score_function,
                logits: &z,
                buffer: &scores[t],
                scale: b.rows[t].scale,
                experts: &experts[span.clone()],
                routed: &routed[span.clone()],
            };
            let options = ctx.options;
            record_weights(
                options,
                start + t,
                &chosen,
                &mut weights[span],
                &mut weight_scratch,
                &mut tally.tiny_weights,
            );
        }
    }
    record_counts::<K>(ctx.options.num_experts, &chosen, tally);
    for (slot, (&s, row)) in top1.iter_mut().zip(ranks[0].value.iter().zip(b.rows)) {
        *slot = (s * row.scale) as f32;
    }
    if !tally.plain.is_empty() {
        for x in &chosen {
            for &x in x {
                tally.plain[x as usize] += 1;
            }
        }
    }
}

/// Token-major buffer values (`[token][expert]`) from expert-major ones.
fn by_token(st: &[[f64; BLOCK]; BLOCK]) -> [[f64; BLOCK]; BLOCK] {
    std::array::from_fn(|t| std::array::from_fn(|e| st[e][t]))
}

/// The eight tokens' weights, rank by rank (`weights` is `[8, k]`), as
/// `write_weights` computes them, when no token needs its per-token path: no
/// step that reads recorded tiny weights, and each token's largest chosen score
/// normal enough for the plain quotient. Returns false, having written
/// nothing, otherwise. Every chosen expert is routed (the logits are finite).
#[inline(always)]
fn write_weights_lanes<const K: usize>(
    options: &RouterConfig,
    ranks: &[LaneRank; K],
    rows: &[RowScores; BLOCK],
    weights: &mut [f32],
) -> bool {
    if records_tiny_weights(options) {
        return false;
    }
    // The routed buffer values' sum and largest, in rank order as `write_weights` folds them.
    let (mut sum, mut top) = ([0.0f64; BLOCK], [0.0f64; BLOCK]);
    for r in ranks {
        for t in 0..BLOCK {
            sum[t] += r.value[t];
            top[t] = top[t].max(r.value[t]);
        }
    }
    let mut factor = [0.0f64; BLOCK];
    for t in 0..BLOCK {
        match plain_factor(options, sum[t], top[t], rows[t].scale) {
            Some(f) => factor[t] = f,
            None => return false,
        }
    }
    let lanes: [[f32; BLOCK]; K] =
        std::array::from_fn(|j| std::array::from_fn(|t| (ranks[j].value[t] * factor[t]) as f32));
    for (t, w) in weights.as_chunks_mut::<K>().0.iter_mut().enumerate() {
        *w = std::array::from_fn(|j| lanes[j][t]);
    }
    true
}

/// The routed counts (per expert, or per rank and expert) and first-choice
/// counts of eight tokens whose every choice is routed, as `record_choices`
/// adds them. Experts are below 8, so `x % BLOCK` is `x` (and no bounds check).
#[inline(always)]
fn record_counts<const K: usize>(num_experts: usize, chosen: &[[i32; BLOCK]; K], tally: &mut Tally) {
    fn histogram(counts: &mut [u32], experts: &[i32; BLOCK]) {
        if let Some(counts) = counts.first_chunk_mut::<BLOCK>() {
            for &x in experts {
                counts[x as usize % BLOCK] += 1;
            }
        }
    }
    let per_rank = tally.counts.len() > num_experts;
    for (j, x) in chosen.iter().enumerate() {
        histogram(&mut tally.counts[if per_rank { j * num_experts } else { 0 }..], x);
    }
    histogram(&mut tally.first_choice, &chosen[0]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DropPolicy, RouterConfig};
    use crate::route::{route_logits, RouteCall};
    use crate::row::{RowRouter, TokenOut};
    use crate::simd::Simd;
    use ndarray::ArrayView2;

    /// Deterministic values: a mix of spread-out logits, repeats (ties), signed zeros and large ones.
    fn logits(seed: u64, n: usize, kind: usize) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
                match kind {
                    0 => 8.0 * u - 4.0,
                    1 => [-1.0, 0.0, -0.0, 1.0][(u * 4.0) as usize], // ties everywhere
                    2 => 1e30 * (2.0 * u - 1.0),
                    _ => 700.0 * (2.0 * u - 1.0),
                }
            })
            .collect()
    }

    struct Outputs {
        experts: Vec<i32>,
        weights: Vec<f32>,
        routed: Vec<bool>,
        probs: Vec<f32>,
        top1: Vec<f32>,
        tally: Tally,
    }

    impl Outputs {
        fn new(k: usize, ranks: usize, plain: bool) -> Self {
            Outputs {
                experts: vec![-7; BLOCK * k],
                weights: vec![-7.0; BLOCK * k],
                routed: vec![false; BLOCK * k],
                probs: vec![-7.0; BLOCK * BLOCK],
                top1: vec![-7.0; BLOCK],
                tally: Tally::new(BLOCK, ranks, plain),
            }
        }

        fn same(&self, other: &Outputs) -> bool {
            self.experts == other.experts
                && self.weights.iter().map(|w| w.to_bits()).eq(other.weights.iter().map(|w| w.to_bits()))
                && self.routed == other.routed
                && self.probs.iter().map(|w| w.to_bits()).eq(other.probs.iter().map(|w| w.to_bits()))
                && self.top1.iter().map(|w| w.to_bits()).eq(other.top1.iter().map(|w| w.to_bits()))
                && self.tally.counts == other.tally.counts
                && self.tally.first_choice == other.tally.first_choice
                && self.tally.plain == other.tally.plain
                && format!("{:?}", self.tally.losses) == format!("{:?}", other.tally.losses)
                && format!("{:?}", self.tally.tiny_weights) == format!("{:?}", other.tally.tiny_weights)
        }
    }

    /// The block kernel against `route_token` on each token, at every SIMD level.
    fn check<F: Logit>(options: &RouterConfig, call: &RouteCall, raw: &[F], plain: bool) -> bool {
        let k = options.top_k;
        let ranks = if options.drop_policy == DropPolicy::Rank { k } else { 1 };
        let mut accepted = None;
        for simd in Simd::all() {
            let mut ctx = RowContext::new(options, call, "logits");
            assert!(ctx.blocks);
            ctx.simd = simd;
            let mut block = Outputs::new(k, ranks, plain);
            let out = BlockOut {
                experts: &mut block.experts,
                weights: &mut block.weights,
                routed: &mut block.routed,
                probs: &mut block.probs,
                top1: &mut block.top1,
            };
            let ok = route_block(&ctx, 3, raw, out, &mut block.tally);
            let mut single = Outputs::new(k, ranks, plain);
            if !ok {
                // Nothing written: the per-token path takes the block.
                assert!(block.same(&single), "{simd:?} wrote a refused block");
                assert!(accepted != Some(true));
                accepted = Some(false);
                continue;
            }
            let mut router = RowRouter::new(options);
            for t in 0..BLOCK {
                let out = TokenOut {
                    experts: &mut single.experts[t * k..(t + 1) * k],
                    weights: &mut single.weights[t * k..(t + 1) * k],
                    routed: &mut single.routed[t * k..(t + 1) * k],
                    probs: &mut single.probs[t * BLOCK..(t + 1) * BLOCK],
                };
                let row = &raw[t * BLOCK..(t + 1) * BLOCK];
                router.route_token(&ctx, 3 + t, row, None, out, &mut single.tally, None).expect("a valid row");
                single.top1[t] = router.last_top1;
            }
            single.tally.losses.finish(simd);
            assert!(block.same(&single), "{simd:?}: block and per-token routing differ");
            assert!(accepted != Some(false));
            accepted = Some(true);
        }
        accepted == Some(true)
    }

    #[test]
    fn blocks_route_as_single_tokens_at_every_level() {
        for k in 1..=BLOCK {
            for (case, policy) in [DropPolicy::Position, DropPolicy::Rank, DropPolicy::Probs].into_iter().enumerate() {
                let mut options = RouterConfig::new(BLOCK, k);
                options.drop_policy = policy;
                options.normalize_weights = case != 1;
                options.renormalize_after_drop = case == 2;
                options.weight_scale = if case == 2 { 2.5 } else { 1.0 };
                let call = RouteCall::default();
                for kind in 0..4 {
                    let z = logits((k * 10 + kind) as u64, BLOCK * BLOCK, kind);
                    assert!(check(&options, &call, &z, case == 0), "k={k} kind={kind}");
                    let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
                    assert!(check(&options, &call, &z32, false), "k={k} kind={kind} (float32)");
                }
            }
        }
    }

    #[test]
    fn rows_that_are_not_all_finite_go_to_the_per_token_path() {
        let options = RouterConfig::new(BLOCK, 2);
        let call = RouteCall::default();
        for bad in [f64::NEG_INFINITY, f64::INFINITY, f64::NAN, 1e200] {
            let mut z = logits(5, BLOCK * BLOCK, 0);
            z[BLOCK * 5 + 3] = bad;
            // 1e200: finite, but its z-loss term overflows float64.
            assert!(!check(&options, &call, &z, false), "{bad}");
        }
    }

    #[test]
    fn calls_that_block_route_as_before_across_the_tail_and_fallbacks() {
        // T = 1003: two chunks, blocks, a tail of 3, -inf and masked rows inside blocks.
        let t = 1003;
        let mut z = logits(9, t * BLOCK, 0);
        for i in (0..t).step_by(37) {
            z[i * BLOCK + i % BLOCK] = f64::NEG_INFINITY;
        }
        let mask: Vec<bool> = (0..t).map(|i| i % 101 != 7).collect();
        let options = RouterConfig::new(BLOCK, 2);
        let call = RouteCall { token_mask: Some(&mask), return_probs: true, ..RouteCall::default() };
        let view = ArrayView2::from_shape((t, BLOCK), &z).expect("shape");
        let all = route_logits(view, &options, &call).expect("valid");
        for i in [0usize, 5, 37, 74, 700, 1000, 1002] {
            let one = ArrayView2::from_shape((1, BLOCK), &z[i * BLOCK..(i + 1) * BLOCK]).expect("shape");
            let single =
                route_logits(one, &options, &RouteCall { return_probs: true, ..RouteCall::default() }).expect("valid");
            if mask[i] {
                assert_eq!(all.expert_indices[i * 2..i * 2 + 2], single.expert_indices[..], "token {i}");
                assert_eq!(all.expert_weights[i * 2..i * 2 + 2], single.expert_weights[..], "token {i}");
                assert_eq!(all.router_probs[i * BLOCK..(i + 1) * BLOCK], single.router_probs[..], "token {i}");
            }
        }
    }
}

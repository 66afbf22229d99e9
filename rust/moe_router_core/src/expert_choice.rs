//! Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert
//! Choice Routing"; flaxformer `ExpertsChooseMaskedRouter`): every expert takes
//! the C tokens that score highest for it, so a token gets 0..E experts; and
//! EC-CAP, the same with at most `expert_choice_cap` experts per token.
//!
//! Three passes:
//! 1. per token, in parallel over the shape's fixed chunks: validate and score
//!    the row exactly as token choice does (training noise included), and the
//!    loss sums;
//! 2. per expert, in parallel over experts: its eligible tokens in its order
//!    (score descending, then token ascending) and the first C of them. EC-CAP
//!    runs expert-proposing deferred acceptance over those orders instead
//!    (sequential; its result, the expert-optimal stable assignment, does not
//!    depend on the order in which proposals are processed);
//! 3. per token: its experts as `[T, k]` columns, by weight descending, then
//!    expert ascending; unused columns are not-routed fillers.
//!
//! Not causal: a token's experts depend on every other token of the call, so
//! it must not route a decoder's tokens one step at a time.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::capacity::expert_capacity;
use crate::config::{
    CapacityFactor, DropPolicy, Overflow, RouterConfig, RoutingAlgorithm, ScoreFunction, ScorePrecision,
};
use crate::error::{Result, RouterError};
use crate::losses::{self, LossSums};
use crate::route::{check_call, chunk_tokens, RouteCall, Routing};
use crate::row::{z_term_overflow, RowContext, RowRouter};
use crate::source::{ChunkBuf, Logit, LogitSource};

/// The token-choice options that expert choice has no use for must keep their
/// defaults, and `expert_choice_cap` needs expert choice and lies in `1..=E`.
pub(crate) fn check_config(options: &RouterConfig) -> Result<()> {
    if options.routing != RoutingAlgorithm::ExpertChoice {
        return Ok(());
    }
    let e = options.num_experts;
    if let Some(cap) = options.expert_choice_cap.filter(|&c| c > e) {
        return Err(RouterError::config(
            "expert_choice_cap",
            cap,
            format!("must satisfy 1 <= expert_choice_cap <= num_experts = {e}"),
        ));
    }
    let refuse = |field: &'static str, value: &str, why: &str| {
        Err(RouterError::config(field, value, format!("{why} with routing='expert_choice'")))
    };
    if options.normalize_weights {
        return refuse("normalize_weights", "True", "must be False (a weight is the token's score for the expert)");
    }
    if options.renormalize_after_drop {
        return refuse(
            "renormalize_after_drop",
            "True",
            "must be False (a weight is the token's score for the expert)",
        );
    }
    if options.overflow == Overflow::Reroute {
        return refuse("overflow", "'reroute'", "must be 'drop' (an expert never overflows)");
    }
    if options.drop_policy != DropPolicy::Position {
        let policy = format!("'{}'", options.drop_policy);
        return refuse("drop_policy", &policy, "must be 'position', the default (each expert orders tokens by score)");
    }
    if let Some(g) = options.num_groups {
        return refuse("num_groups", &g.to_string(), "must be None (group limits are a token-choice rule)");
    }
    if options.score_precision != ScorePrecision::Float64 {
        let precision = format!("'{}'", options.score_precision);
        return refuse("score_precision", &precision, "must be 'float64' (the peers' float32 mode is token choice's)");
    }
    if let Some(p) = options.peer {
        return refuse("peer", &format!("'{p}'"), "must be None (no framework loss to reproduce)");
    }
    if options.expert_capacity.is_none() {
        if options.capacity_factor == CapacityFactor::Dropless {
            return refuse("capacity_factor", "None", "must be a number > 0 (each expert takes C tokens)");
        }
        if options.eval_capacity_factor == Some(CapacityFactor::Dropless) {
            return refuse(
                "eval_capacity_factor",
                "'dropless'",
                "must be a number > 0 or None (each expert takes C tokens)",
            );
        }
    }
    Ok(())
}

/// An expert's order of tokens (score descending, then token ascending) as one
/// integer, larger first: the score's bits (a score is >= 0, so its bits order
/// as its value), then the complement of the token.
fn order_key(score: f64, token: u32) -> u128 {
    (u128::from(score.to_bits()) << 32) | u128::from(u32::MAX - token)
}

/// The `(score, token)` of an [`order_key`].
fn from_order_key(key: u128) -> (f64, u32) {
    (f64::from_bits((key >> 32) as u64), u32::MAX - key as u32)
}

/// A token's order of offers `(key, expert)`: key descending, then expert ascending.
fn prefers(a: (f64, u32), b: (f64, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// Route every token of `source` by expert choice (`options.routing` is
/// `ExpertChoice`); see `crate::route::route_into` for `probs_out`.
pub(crate) fn route_expert_choice<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    probs_out: Option<&mut [f32]>,
) -> Result<Routing> {
    let expert_bias = call.expert_bias.or(options.expert_bias.as_deref());
    let call = &RouteCall { expert_bias, ..*call };
    check_call(source, options, call)?;
    let (t, e) = (source.num_tokens(), options.num_experts);
    let probs_out = probs_out.filter(|_| call.return_probs);
    if let Some(out) = &probs_out {
        if out.len() != t * e {
            return Err(RouterError::shape("probs_out", format!("[{t}, {e}]"), format!("{} values", out.len())));
        }
    }

    // Pass 1: scores (>= 0 where eligible, -1 elsewhere), score distributions, loss sums.
    let chunk = chunk_tokens(t, e);
    let mut scores = vec![-1f64; t * e];
    let layout = Blocked { tokens: t, experts: e, chunk };
    let mut prob_factor = vec![0f64; t];
    let mut probs = crate::huge_pages::zeroed_f32(if call.return_probs { t * e } else { 0 });
    let sums = score_tokens(source, options, call, chunk, &mut scores, &mut prob_factor, &mut probs)?;
    let active = sums.active as usize;

    // Pass 2: each expert's tokens in slot order.
    let factor = options.capacity_factor_for(call.training);
    let limit = expert_capacity(&factor, options.capacity_rounding, options.min_capacity, active, options.top_k, e);
    let capacity = limit.unwrap_or(usize::MAX);
    // Expert x's eligible tokens into `v` as order keys (scratch reused across experts).
    let column = |x: usize, v: &mut Vec<u128>| {
        v.clear();
        for start in (0..t).step_by(chunk) {
            let run = layout.run(&scores, start, x);
            v.extend(run.iter().zip(start as u32..).filter(|(&s, _)| s >= 0.0).map(|(&s, tok)| order_key(s, tok)));
        }
    };
    let chosen: Vec<Vec<(f64, u32)>> = match options.expert_choice_cap {
        None => (0..e)
            .into_par_iter()
            .map_init(Vec::new, |v, x| {
                column(x, v);
                if v.len() > capacity {
                    v.select_nth_unstable_by(capacity, |a, b| b.cmp(a));
                    v.truncate(capacity);
                }
                v.sort_unstable_by(|a, b| b.cmp(a));
                v.iter().map(|&key| from_order_key(key)).collect()
            })
            .collect(),
        Some(cap) => {
            let orders: Vec<Vec<(f64, u32)>> = (0..e)
                .into_par_iter()
                .map_init(Vec::new, |v, x| {
                    column(x, v);
                    v.sort_unstable_by(|a, b| b.cmp(a));
                    v.iter().map(|&key| from_order_key(key)).collect()
                })
                .collect();
            deferred_acceptance(&orders, capacity, cap, expert_bias, t)
        }
    };

    // Pass 3: per token, its experts as columns.
    let mut offsets = vec![0usize; t + 1];
    for &(_, tok) in chosen.iter().flatten() {
        offsets[tok as usize + 1] += 1;
    }
    let most = offsets.iter().copied().max().unwrap_or(0);
    for i in 0..t {
        offsets[i + 1] += offsets[i];
    }
    let k = options.expert_choice_cap.unwrap_or(most).max(1);
    if t.checked_mul(k).is_none_or(|n| n > i32::MAX as usize) {
        return Err(RouterError::shape(
            source.argument(),
            format!("at most {} tokens for {k} experts per token", i32::MAX as usize / k),
            format!("{t} tokens"),
        ));
    }
    let ws = options.weight_scale;
    let mut entries = vec![(0u32, 0i32, 0f32); offsets[t]];
    let mut fill = offsets[..t].to_vec();
    for (x, list) in chosen.iter().enumerate() {
        for (slot, &(s, tok)) in list.iter().enumerate() {
            entries[fill[tok as usize]] = (x as u32, slot as i32, (s * ws) as f32);
            fill[tok as usize] += 1;
        }
    }
    let n = t * k;
    let (mut expert_indices, mut expert_weights) = (vec![0i32; n], vec![0f32; n]);
    let (mut expert_slots, mut kept) = (vec![-1i32; n], vec![false; n]);
    let step = chunk * k;
    expert_indices
        .par_chunks_mut(step)
        .zip(expert_weights.par_chunks_mut(step))
        .zip(expert_slots.par_chunks_mut(step))
        .zip(kept.par_chunks_mut(step))
        .enumerate()
        .for_each(|(c, (((idx, w), slots), kp))| {
            let mut mine: Vec<(u32, i32, f32)> = Vec::new();
            for i in 0..idx.len() / k {
                let tok = c * chunk + i;
                mine.clear();
                mine.extend_from_slice(&entries[offsets[tok]..offsets[tok + 1]]);
                mine.sort_unstable_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
                let row = i * k..(i + 1) * k;
                write_columns(&mine, &mut idx[row.clone()], &mut w[row.clone()], &mut slots[row.clone()], &mut kp[row]);
            }
        });

    let tokens_per_expert: Vec<i64> = chosen.iter().map(|l| l.len() as i64).collect();
    let mut first_choice = vec![0i64; e];
    for (x, kp) in expert_indices.chunks(k).zip(kept.chunks(k)) {
        if kp[0] {
            first_choice[x[0] as usize] += 1;
        }
    }
    let kept_assignments = offsets[t];
    let tokens_dropped = (0..t).filter(|&tok| offsets[tok] == offsets[tok + 1] && is_active(call, tok)).count();
    let counts: Vec<u64> = tokens_per_expert.iter().map(|&c| c as u64).collect();
    let seq_load_balance_loss = call.sequence_length.map(|len| {
        let csr = TokenLists { offsets: &offsets, entries: &entries };
        sequence_loss(call, len, k, (&layout, &scores), &prob_factor, &csr)
    });
    let router_probs = match probs_out {
        Some(out) => {
            out.copy_from_slice(&probs);
            Vec::new()
        }
        None => probs,
    };
    let mut routing = Routing {
        num_tokens: t,
        num_experts: e,
        top_k: k,
        routed: kept.clone(),
        expert_indices,
        expert_weights,
        expert_slots,
        kept,
        rerouted: Vec::new(),
        original_expert_indices: Vec::new(),
        pre_drop_tokens_per_expert: tokens_per_expert.clone(),
        capacity: limit.unwrap_or_else(|| tokens_per_expert.iter().copied().max().unwrap_or(0) as usize),
        tokens_per_expert,
        first_choice_tokens_per_expert: first_choice,
        plain_tokens_per_expert: Vec::new(),
        router_probs,
        expert_prob_mean: sums.prob_mean(),
        dropless: limit.is_none(),
        active_tokens: active,
        kept_assignments,
        dropped_assignments: active * k - kept_assignments,
        tokens_dropped,
        load_balance_loss: losses::load_balance_loss(&counts, &sums.prob_sum, sums.active, k),
        router_z_loss: losses::router_z_loss(&sums),
        seq_load_balance_loss,
        auxiliary_loss: 0.0,
        peer_load_balance_loss: None,
        sinkhorn_iterations: None,
        sinkhorn_converged: None,
    };
    routing.set_auxiliary_loss(options);
    Ok(routing)
}

fn is_active(call: &RouteCall, token: usize) -> bool {
    call.token_mask.is_none_or(|m| m[token])
}

/// One token's `[k]` columns from its assignments `(expert, slot, weight)`
/// (already in column order); the columns past them are fillers: the
/// lowest-index experts the token does not have, weight 0, slot -1, not kept.
fn write_columns(mine: &[(u32, i32, f32)], idx: &mut [i32], w: &mut [f32], slots: &mut [i32], kp: &mut [bool]) {
    for (j, &(x, slot, weight)) in mine.iter().enumerate() {
        (idx[j], w[j], slots[j], kp[j]) = (x as i32, weight, slot, true);
    }
    let mut filler = (0u32..).filter(|x| mine.iter().all(|m| m.0 != *x));
    for x in idx.iter_mut().skip(mine.len()) {
        *x = filler.next().unwrap_or(0) as i32;
    }
}

/// The score buffer's layout: chunk by chunk (the pass-1 chunks), each chunk
/// expert-major (`[E, chunk length]`), so that an expert's scores for a
/// chunk's tokens are contiguous: pass 2 reads them as runs.
struct Blocked {
    tokens: usize,
    experts: usize,
    chunk: usize,
}

impl Blocked {
    /// Index of (token, expert) in the buffer.
    fn at(&self, token: usize, expert: usize) -> usize {
        let start = token - token % self.chunk;
        let len = self.chunk.min(self.tokens - start);
        start * self.experts + expert * len + token - start
    }

    /// The expert's scores for the chunk that starts at `start`.
    fn run<'s>(&self, scores: &'s [f64], start: usize, expert: usize) -> &'s [f64] {
        let len = self.chunk.min(self.tokens - start);
        let base = start * self.experts + expert * len;
        &scores[base..base + len]
    }
}

/// Pass 1 over all chunks: `scores` (laid out as [`Blocked`]) = the token's float64 score for the
/// expert where eligible (finite logit, or a positive gate probability; -1
/// elsewhere and on masked rows), `prob_factor[t]` turns a score into the
/// token's score distribution, `probs` (if not empty) the float32 scores.
/// Returns the loss sums, added in chunk order.
fn score_tokens<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    chunk: usize,
    scores: &mut [f64],
    prob_factor: &mut [f64],
    probs: &mut [f32],
) -> Result<LossSums> {
    let (t, e) = (source.num_tokens(), options.num_experts);
    let ctx = RowContext::new(options, call, source.argument());
    let gate = options.score_function == ScoreFunction::Probabilities;
    let chunks = t.div_ceil(chunk);
    let mut prob_parts: Vec<&mut [f32]> = probs.chunks_mut(chunk * e).collect();
    prob_parts.resize_with(chunks, Default::default);
    let parts: Vec<_> = scores.chunks_mut(chunk * e).zip(prob_factor.chunks_mut(chunk)).zip(prob_parts).collect();
    let init = || (RowRouter::new(options), ChunkBuf::default(), vec![1.0; e]);
    let results: Vec<Result<LossSums>> = parts
        .into_par_iter()
        .enumerate()
        .map_init(init, |(router, buf, jitter), (c, ((s, f), p))| {
            if call.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(RouterError::Cancelled);
            }
            let start = c * chunk;
            let rows = source.chunk(start, (start + chunk).min(t), buf);
            let rows_in_chunk = f.len();
            let mut sums = LossSums::new(e);
            for (i, f) in f.iter_mut().enumerate() {
                let tok = start + i;
                if !ctx.is_active(tok) {
                    continue;
                }
                let raw = &rows.rows[i * e..(i + 1) * e];
                let (mut row, max) = router.rescore(&ctx, tok, raw, jitter)?;
                if let Some(z) = rows.z_squared {
                    row.z_term = z[i];
                }
                if !row.z_term.is_finite() {
                    return Err(z_term_overflow(&ctx, tok));
                }
                let buffer = router.scores();
                if max == f64::INFINITY || buffer.iter().any(|v| v.is_nan()) {
                    return Err(RouterError::BadValue {
                        argument: ctx.argument,
                        problem: "overflows float64 under the training noise",
                        token: tok,
                        hint: "logits near the float64 limit cannot be jittered; rescale them",
                    });
                }
                for (x, (&b, &z)) in buffer.iter().zip(raw).enumerate() {
                    let z = z.to_f64();
                    let eligible = if gate { z > 0.0 } else { z > f64::NEG_INFINITY };
                    if eligible {
                        s[x * rows_in_chunk + i] = b * row.scale;
                    }
                    if !p.is_empty() {
                        p[i * e + x] = (b * row.scale) as f32;
                    }
                }
                *f = row.prob_scale / row.scale;
                sums.add_token(ctx.simd, buffer, row);
            }
            Ok(sums)
        })
        .collect();
    let mut sums = LossSums::new(e);
    for part in results {
        sums.merge(&part?);
    }
    Ok(sums)
}

/// Expert-proposing deferred acceptance (Gale and Shapley 1962, many-to-many
/// with capacities): each expert offers its free slots to the tokens next in
/// its `orders` list; a token holds its `cap` best offers by key (score plus
/// the expert's selection bias, descending; ties to the lower expert) and
/// rejects the rest, which frees the rejected expert's slot for its next
/// token; until no expert has both a free slot and a token left to ask. The
/// result is the expert-optimal stable assignment: no expert and token both
/// prefer each other to what they hold. Returns each expert's tokens in its
/// order.
fn deferred_acceptance(
    orders: &[Vec<(f64, u32)>],
    capacity: usize,
    cap: usize,
    bias: Option<&[f64]>,
    tokens: usize,
) -> Vec<Vec<(f64, u32)>> {
    let e = orders.len();
    let mut held = vec![(0f64, 0u32); tokens * cap];
    let mut held_len = vec![0usize; tokens];
    let mut next = vec![0usize; e];
    let mut free: Vec<usize> = orders.iter().map(|o| capacity.min(o.len())).collect();
    let mut pending: Vec<usize> = (0..e).rev().collect();
    while let Some(x) = pending.pop() {
        while free[x] > 0 && next[x] < orders[x].len() {
            let (s, tok) = orders[x][next[x]];
            next[x] += 1;
            let offer = (s + bias.map_or(0.0, |b| b[x]), x as u32);
            let tok = tok as usize;
            let slots = &mut held[tok * cap..(tok + 1) * cap];
            if held_len[tok] < cap {
                slots[held_len[tok]] = offer;
                held_len[tok] += 1;
                free[x] -= 1;
                continue;
            }
            let worst = (1..cap).fold(0, |w, i| if prefers(slots[w], slots[i]) { i } else { w });
            if prefers(offer, slots[worst]) {
                let loser = slots[worst].1 as usize;
                slots[worst] = offer;
                free[x] -= 1;
                free[loser] += 1;
                pending.push(loser);
            }
        }
    }
    let holds = |tok: u32, x: usize| {
        let tok = tok as usize;
        held[tok * cap..tok * cap + held_len[tok]].iter().any(|h| h.1 as usize == x)
    };
    (0..e)
        .into_par_iter()
        .map(|x| orders[x][..next[x]].iter().copied().filter(|&(_, tok)| holds(tok, x)).collect())
        .collect()
}

/// Each token's assignments `(expert, slot, weight)`: token t's are
/// `entries[offsets[t]..offsets[t + 1]]`.
struct TokenLists<'a> {
    offsets: &'a [usize],
    entries: &'a [(u32, i32, f32)],
}

/// The sequence-level balance loss (DeepSeek-V3) of `[B, S, E]` input: the
/// mean, over sequences with an active token, of the load-balance loss of the
/// sequence alone, counted on the assignments with the decision's `k`.
fn sequence_loss(
    call: &RouteCall,
    length: usize,
    k: usize,
    (layout, scores): (&Blocked, &[f64]),
    prob_factor: &[f64],
    lists: &TokenLists,
) -> f64 {
    let e = layout.experts;
    let t = prob_factor.len();
    if length == 0 || t == 0 {
        return 0.0;
    }
    let per_sequence: Vec<Option<f64>> = (0..t / length)
        .into_par_iter()
        .map(|q| {
            let (mut prob_sum, mut counts, mut active) = (vec![0f64; e], vec![0u64; e], 0u64);
            for tok in q * length..(q + 1) * length {
                if !is_active(call, tok) {
                    continue;
                }
                active += 1;
                for (x, p) in prob_sum.iter_mut().enumerate() {
                    *p += scores[layout.at(tok, x)].max(0.0) * prob_factor[tok];
                }
                for &(x, _, _) in &lists.entries[lists.offsets[tok]..lists.offsets[tok + 1]] {
                    counts[x as usize] += 1;
                }
            }
            (active > 0).then(|| losses::load_balance_loss(&counts, &prob_sum, active, k))
        })
        .collect();
    let (sum, n) = per_sequence.iter().flatten().fold((0.0, 0usize), |(s, n), &l| (s + l, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FieldValue;
    use crate::route::route_logits;
    use ndarray::Array2;

    fn config(e: usize, k: usize, cap: Option<usize>, fixed: Option<usize>) -> RouterConfig {
        let mut fields = vec![
            ("num_experts", FieldValue::Int(e as i128)),
            ("top_k", FieldValue::Int(k as i128)),
            ("routing", FieldValue::Text("expert_choice".into())),
        ];
        if let Some(c) = cap {
            fields.push(("expert_choice_cap", FieldValue::Int(c as i128)));
        }
        if let Some(c) = fixed {
            fields.push(("expert_capacity", FieldValue::Int(c as i128)));
        }
        RouterConfig::from_fields(fields).expect("valid config")
    }

    fn logits(t: usize, e: usize, seed: u64) -> Array2<f64> {
        let mut next = crate::rng::xorshift(seed);
        Array2::from_shape_fn((t, e), |_| (next() >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0)
    }

    #[test]
    fn each_expert_takes_its_best_tokens_in_score_order() {
        // Expert 0 prefers tokens 2, 0, 1, expert 1 prefers 1, 0, 2 (softmax over 2 experts).
        let x = ndarray::array![[0.5f64, 0.0], [-1.0, 1.0], [2.0, 0.0]];
        let r = route_logits(x.view(), &config(2, 1, None, Some(2)), &RouteCall::default()).expect("routes");
        assert_eq!(r.capacity, 2);
        assert_eq!(r.tokens_per_expert, vec![2, 2]);
        assert_eq!(r.top_k, 2); // token 0 got both experts
        assert_eq!(r.expert_indices, vec![0, 1, 1, 0, 0, 1]);
        assert_eq!(r.kept, vec![true, true, true, false, true, false]);
        assert_eq!(r.expert_slots, vec![1, 1, 0, -1, 0, -1]);
        assert_eq!(r.tokens_dropped, 0);
    }

    #[test]
    fn the_cap_frees_slots_for_the_next_tokens() {
        // Sigmoid scores: both experts like token 0 best; capped at 1 it keeps expert 0, and
        // expert 1 takes its next token, 2.
        let x = ndarray::array![[3.0f64, 2.9], [0.0, 0.0], [-1.0, 0.5]];
        let sigmoid =
            config(2, 1, Some(1), Some(1)).with_fields([("score_function", FieldValue::Text("sigmoid".into()))]);
        let r = route_logits(x.view(), &sigmoid.expect("valid"), &RouteCall::default()).expect("routes");
        assert_eq!(r.top_k, 1);
        assert_eq!(r.expert_indices, vec![0, 0, 1]);
        assert_eq!(r.kept, vec![true, false, true]);
    }

    #[test]
    fn deferred_acceptance_is_stable_and_respects_both_limits() {
        let (t, e, cap, c) = (40, 6, 2, 9);
        let x = logits(t, e, 7);
        let r = route_logits(x.view(), &config(e, 2, Some(cap), Some(c)), &RouteCall::default()).expect("routes");
        let k = r.top_k;
        let score = |tok: usize, ex: usize| {
            let row = x.row(tok);
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (row[ex] - m).exp() / row.iter().map(|z| (z - m).exp()).sum::<f64>()
        };
        let has =
            |tok: usize, ex: usize| (0..k).any(|j| r.kept[tok * k + j] && r.expert_indices[tok * k + j] == ex as i32);
        for ex in 0..e {
            assert!(r.tokens_per_expert[ex] as usize <= c);
        }
        for tok in 0..t {
            let mine: Vec<usize> = (0..e).filter(|&ex| has(tok, ex)).collect();
            assert!(mine.len() <= cap);
            for ex in (0..e).filter(|&ex| !has(tok, ex)) {
                // The expert would rather have tok than one of its tokens (or has room) ...
                let expert_wants = (r.tokens_per_expert[ex] as usize) < c
                    || (0..t).any(|u| has(u, ex) && score(u, ex) < score(tok, ex));
                // ... and tok would rather have ex than one of its experts (or has room): unstable.
                let token_wants = mine.len() < cap || mine.iter().any(|&y| score(tok, y) < score(tok, ex));
                assert!(!(expert_wants && token_wants), "token {tok} and expert {ex} block");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let x = logits(3000, 8, 11);
        let options = config(8, 2, None, None);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
        let a = one.install(|| route_logits(x.view(), &options, &RouteCall::default())).expect("routes");
        let b = route_logits(x.view(), &options, &RouteCall::default()).expect("routes");
        assert_eq!(a, b);
        let capped = config(8, 2, Some(2), None);
        let a = one.install(|| route_logits(x.view(), &capped, &RouteCall::default())).expect("routes");
        let b = route_logits(x.view(), &capped, &RouteCall::default()).expect("routes");
        assert_eq!(a, b);
    }

    #[test]
    fn options_it_cannot_honour_are_refused() {
        let with = |name: &'static str, v: FieldValue| {
            RouterConfig::from_fields([
                ("num_experts", FieldValue::Int(4)),
                ("routing", FieldValue::Text("expert_choice".into())),
                (name, v),
            ])
            .unwrap_err()
            .to_string()
        };
        assert!(with("expert_choice_cap", FieldValue::Int(5)).contains("expert_choice_cap"));
        assert!(with("expert_choice_cap", FieldValue::Int(0)).contains("expert_choice_cap"));
        assert!(with("normalize_weights", FieldValue::Bool(true)).contains("normalize_weights"));
        assert!(with("capacity_factor", FieldValue::None).contains("capacity_factor"));
        let token_choice = RouterConfig::from_fields([("expert_choice_cap", FieldValue::Int(1))]).unwrap_err();
        assert!(token_choice.to_string().contains("expert_choice_cap"));
    }
}

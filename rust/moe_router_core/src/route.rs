//! The routing pipeline: logits in, a complete routing decision out.
//!
//! Three passes, each parallel over fixed chunks of `CHUNK_TOKENS` tokens (the
//! chunking depends only on T, never on the thread count, so every float sum is
//! added in the same order and results are bit-identical for any pool size):
//!
//! 1. per token: validate, score, select the top k, weigh; per chunk: routed
//!    counts per expert, the loss sums (`tally`);
//! 2. capacity from the active-token count, then slots and drops in the order of
//!    the drop policy (`crate::assign`);
//! 3. per token: zero dropped weights, optional renormalization (`crate::weights`),
//!    drop counts.
//!
//! Extra memory beyond the outputs is O(E * chunks), plus O(T * k) for `bpr`
//! (its priority order and slots), for `probs` (the assignments of over-full
//! experts) and for rerouting (the routed flags before capacity).

use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::assign::{self, Assignments};
use crate::capacity::capacity_limit;
use crate::config::{DropPolicy, Overflow, Peer, RouterConfig, RoutingAlgorithm};
use crate::error::{Result, RouterError};
use crate::expert_choice;
use crate::filled::{copied, filled};
use crate::float32;
use crate::losses::{self, LossSums, SequenceLoss, SequencePart};
use crate::peer_loss;
use crate::replay::Replay;
use crate::reroute;
use crate::row::{RowContext, RowRouter, TokenOut};
use crate::row_block::{route_block, BlockOut, BLOCK};
use crate::source::{ChunkBuf, Logit, LogitSource, SliceLogits};
use crate::weights::{renormalize_kept, Recorded, TinyWeights};

/// Tokens per parallel work item.
pub const CHUNK_TOKENS: usize = 512;

/// Logits in a batch of at most `CHUNK_TOKENS` tokens above which it is split
/// in two chunks, so a decode-sized batch with wide rows uses two threads.
pub(crate) const SPLIT_LOGITS: usize = 8192;

/// Tokens per chunk for an input of `tokens` x `experts`. It depends on the
/// shape only, never on the thread count, so float sums are added in the same
/// order on any pool.
pub fn chunk_tokens(tokens: usize, experts: usize) -> usize {
    if tokens <= CHUNK_TOKENS && tokens.saturating_mul(experts) >= SPLIT_LOGITS {
        tokens.div_ceil(2)
    } else {
        CHUNK_TOKENS
    }
}

/// Per-call arguments besides the logits.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteCall<'a> {
    /// Training mode: noise, reroute draws and the training capacity factor apply.
    pub training: bool,
    /// `true` = route this token; `false` = padding, counted nowhere. Length T.
    pub token_mask: Option<&'a [bool]>,
    /// Per-expert selection bias (length E), added to the scores for selection only.
    pub expert_bias: Option<&'a [f64]>,
    /// Training step, part of the RNG key of noise and reroute draws.
    pub step: u64,
    /// Tokens per sequence, for the sequence-level balance loss (T must divide by it).
    pub sequence_length: Option<usize>,
    /// Also return each token's score distribution (`Routing::router_probs`).
    pub return_probs: bool,
    /// Also count each expert's tokens under the plain top-k
    /// (`Routing::plain_tokens_per_expert`).
    pub plain_topk_counts: bool,
    /// Set by another thread to stop the call: each chunk of the scoring pass
    /// (the long one: GEMM, scores, top-k) reads it before it starts, and the
    /// call then returns [`RouterError::Cancelled`], so a caller's interrupt
    /// takes effect within one chunk per thread. Never set: the same result as None.
    pub cancel: Option<&'a AtomicBool>,
    /// Route with these recorded experts instead of a fresh top-k (router
    /// replay): the scores, weights and losses come from the logits, the
    /// selection from the recording; capacity applies as usual.
    pub replay: Option<Replay<'a>>,
}

/// The result of routing T tokens to E experts with k choices each.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// T.
    pub num_tokens: usize,
    /// E.
    pub num_experts: usize,
    /// k.
    pub top_k: usize,
    /// `[T, k]` chosen experts by rank (row-major).
    pub expert_indices: Vec<i32>,
    /// `[T, k]` combine weights; 0 where the assignment is not kept.
    pub expert_weights: Vec<f32>,
    /// `[T, k]` slot in the expert's buffer, `-1` where not kept.
    pub expert_slots: Vec<i32>,
    /// `[T, k]` whether the assignment survived capacity.
    pub kept: Vec<bool>,
    /// `[T, k]` whether the assignment was routed (before capacity): not a
    /// filler choice of a token with too few eligible experts, not masked.
    pub routed: Vec<bool>,
    /// `[T, k]` the experts before overflow reroutes (whose scores make the
    /// weights); empty when no reroute could happen (then `expert_indices`).
    pub original_expert_indices: Vec<i32>,
    /// `[T, k]` whether the assignment was moved to another expert on overflow;
    /// empty when no reroute could happen (`overflow = Drop`, or dropless).
    pub rerouted: Vec<bool>,
    /// `[E]` kept assignments per expert.
    pub tokens_per_expert: Vec<i64>,
    /// `[E]` routed assignments per expert before capacity (after groups and bias).
    pub pre_drop_tokens_per_expert: Vec<i64>,
    /// `[E]` active tokens whose rank-0 choice is the expert (before capacity;
    /// after groups and bias).
    pub first_choice_tokens_per_expert: Vec<i64>,
    /// `[E]` active tokens whose plain top-k contains the expert: the same
    /// scores and tie order, but without `expert_bias` and group limits.
    /// Empty unless `RouteCall::plain_topk_counts`.
    pub plain_tokens_per_expert: Vec<i64>,
    /// `[T, E]` row-major float32: each token's score distribution as the
    /// router computed it (softmax over all E of the logits, with training
    /// noise if it applies; or their sigmoid; or the gate's probabilities for
    /// `ScoreFunction::Probabilities`). Masked tokens' rows are 0. Empty unless
    /// `RouteCall::return_probs`.
    pub router_probs: Vec<f32>,
    /// `[E]` mean over active tokens of each expert's share of the token's score
    /// distribution (`P_e` of the load-balance loss).
    pub expert_prob_mean: Vec<f64>,
    /// Per-expert capacity; for dropless routing, the largest kept count.
    pub capacity: usize,
    /// True when no capacity limit applied.
    pub dropless: bool,
    /// Tokens not masked out.
    pub active_tokens: usize,
    /// Kept assignments.
    pub kept_assignments: usize,
    /// `active_tokens * k - kept_assignments`.
    pub dropped_assignments: usize,
    /// Active tokens with no kept assignment at all.
    pub tokens_dropped: usize,
    /// `E * sum_e f_e * P_e` (Switch / GShard / Megatron normalization: 1.0 when balanced).
    pub load_balance_loss: f64,
    /// Mean over active tokens of `logsumexp(logits)^2` (ST-MoE).
    pub router_z_loss: f64,
    /// Mean over sequences of the per-sequence balance loss (DeepSeek-V3), if requested.
    pub seq_load_balance_loss: Option<f64>,
    /// `load_balance_loss_coeff * load_balance_loss + router_z_loss_coeff * router_z_loss
    /// (+ seq_load_balance_loss_coeff * seq_load_balance_loss)`.
    pub auxiliary_loss: f64,
    /// The load-balance loss as `config.peer` computes it, when a peer is set.
    pub peer_load_balance_loss: Option<f64>,
    /// Sinkhorn iterations run (`routing = Sinkhorn` in training), else None.
    pub sinkhorn_iterations: Option<usize>,
    /// Whether Sinkhorn met its tolerance before its iteration cap, else None.
    pub sinkhorn_converged: Option<bool>,
}

/// Route an `[T, E]` array of logits. Non-standard layouts are copied once.
pub fn route_logits<F: Logit>(logits: ArrayView2<F>, options: &RouterConfig, call: &RouteCall) -> Result<Routing> {
    let (tokens, experts) = logits.dim();
    match logits.as_slice() {
        Some(data) => route(&SliceLogits::new(data, tokens, experts)?, options, call),
        None => {
            let owned = logits.as_standard_layout().into_owned();
            let data = owned.as_slice().unwrap_or(&[]);
            route(&SliceLogits::new(data, tokens, experts)?, options, call)
        }
    }
}

/// Route every token of `source`.
pub fn route<S: LogitSource>(source: &S, options: &RouterConfig, call: &RouteCall) -> Result<Routing> {
    route_into(source, options, call, None)
}

/// Route every token of `source`, writing the score distributions (when
/// `call.return_probs`) into `probs_out`, a zero-filled `[T, E]` buffer of the
/// caller's (e.g. memory the caller's allocator maps with huge pages); then
/// `Routing::router_probs` stays empty. With `None`, the core allocates them.
pub fn route_into<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    probs_out: Option<&mut [f32]>,
) -> Result<Routing> {
    options.validate()?;
    // A replay replaces a per-token top-k: token choice's, or Sinkhorn's (its weights
    // come from the activation); the other algorithms have none.
    if call.replay.is_some() && !matches!(options.routing, RoutingAlgorithm::TokenChoice | RoutingAlgorithm::Sinkhorn) {
        return Err(RouterError::config(
            "routing",
            format!("'{}'", options.routing),
            "must be 'token_choice' or 'sinkhorn' to replay a recording (a replay replaces their per-token top-k)",
        ));
    }
    match options.routing {
        RoutingAlgorithm::TokenChoice => {}
        RoutingAlgorithm::ExpertChoice => return expert_choice::route_expert_choice(source, options, call, probs_out),
        RoutingAlgorithm::Sinkhorn => return crate::sinkhorn::route_sinkhorn(source, options, call, probs_out),
        RoutingAlgorithm::Balanced => return crate::balanced::route_balanced(source, options, call, probs_out),
    }
    // A call without a selection bias uses the configuration's fixed one.
    let expert_bias = call.expert_bias.or(options.expert_bias.as_deref());
    // Megatron-Core counts a plain top-k in its loss; it differs from the routing
    // used only under a bias or a group limit.
    let megatron_counts = options.peer == Some(Peer::Megatron) && (expert_bias.is_some() || options.groups().is_some());
    let call = &RouteCall { expert_bias, plain_topk_counts: call.plain_topk_counts || megatron_counts, ..*call };
    check_call(source, options, call)?;
    let t = source.num_tokens();
    let (e, k) = (options.num_experts, options.top_k);
    let policy = options.drop_policy;
    let reroute = options.overflow == Overflow::Reroute;

    let n = t * k;
    let mut expert_indices = filled(n, 0i32);
    let mut expert_weights = filled(n, 0f32);
    let mut kept = filled(n, false);
    let mut expert_slots = filled(n, -1i32);
    let prioritized = matches!(policy, DropPolicy::Bpr | DropPolicy::BprRank);
    let mut top1 = vec![0f32; if prioritized || reroute { t } else { 0 }];
    // Zeroed (lazily, page by page, by the allocator); pass 1 writes every active row.
    let wanted = if call.return_probs { t * e } else { 0 };
    let mut router_probs = Vec::new();
    let probs: &mut [f32] = match probs_out {
        Some(out) if call.return_probs => {
            if out.len() != wanted {
                return Err(RouterError::shape("probs_out", format!("[{t}, {e}]"), format!("{} values", out.len())));
            }
            out
        }
        _ => {
            router_probs = crate::huge_pages::zeroed_f32(wanted);
            &mut router_probs
        }
    };

    // Pass 1: score and select; every later pass uses the same chunks.
    let chunk = chunk_tokens(t, e);
    let ranks = if policy == DropPolicy::Rank { k } else { 1 };
    let outputs = PassOne {
        experts: &mut expert_indices,
        weights: &mut expert_weights,
        routed: &mut kept,
        top1: &mut top1,
        probs,
    };
    let tallies = score_and_select(source, options, call, chunk, ranks, outputs)?;
    let mut sums = LossSums::new(e);
    let mut routed_counts = vec![0u64; e];
    let mut first_choice = vec![0i64; e];
    let mut plain = vec![0i64; if call.plain_topk_counts { e } else { 0 }];
    for tally in &tallies {
        sums.merge(&tally.losses);
        for (i, &c) in tally.counts.iter().enumerate() {
            routed_counts[i % e] += u64::from(c);
        }
        for (a, &c) in first_choice.iter_mut().zip(&tally.first_choice) {
            *a += i64::from(c);
        }
        for (a, &c) in plain.iter_mut().zip(&tally.plain) {
            *a += i64::from(c);
        }
    }
    losses::merge_sequence_parts(tallies.iter().flat_map(|t| &t.sequence_parts), k, &mut sums);
    let active = sums.active as usize;

    // Pass 2: capacity and slots.
    let limit = capacity_limit(options, call.training, active);
    let capacity = limit.unwrap_or(usize::MAX);
    let (counts, tiny): (Vec<Vec<u32>>, Vec<TinyWeights>) =
        tallies.into_iter().map(|t| (t.counts, t.tiny_weights)).unzip();
    let reroute_now = reroute && limit.is_some();
    // Pass 1's routed flags, before capacity: what the backward differentiates.
    let routed = copied(&kept);
    {
        let a = Assignments {
            chunk,
            top_k: k,
            num_experts: e,
            experts: &expert_indices,
            kept: &mut kept,
            slots: &mut expert_slots,
        };
        match policy {
            DropPolicy::Position => assign::assign_in_token_order(a, capacity, &counts, false),
            DropPolicy::Rank => assign::assign_in_token_order(a, capacity, &counts, true),
            DropPolicy::Bpr => assign::assign_batch_prioritized(a, capacity, &top1, false),
            DropPolicy::BprRank => assign::assign_batch_prioritized(a, capacity, &top1, true),
            DropPolicy::Probs => assign::assign_by_weight(a, capacity, &expert_weights, &counts),
        }
    }
    let mut rerouted = if reroute_now { vec![false; n] } else { Vec::new() };
    let original_expert_indices = if reroute_now { expert_indices.clone() } else { Vec::new() };
    if reroute_now {
        let overflow = reroute::Overflowed { routed: &routed, top1: &top1, tiny: &tiny, chunk };
        let out = reroute::Placement {
            experts: &mut expert_indices,
            kept: &mut kept,
            slots: &mut expert_slots,
            weights: &mut expert_weights,
            rerouted: &mut rerouted,
        };
        // Reroute candidates must be experts the token may use: score its row again.
        let ctx = RowContext::new(options, call, source.argument());
        let (mut router, mut buf) = (RowRouter::new(options), ChunkBuf::default());
        let eligible = |tok: usize, allowed: &mut [bool]| {
            let rows = source.chunk(tok, tok + 1, &mut buf);
            router.eligible_experts(&ctx, tok, rows.rows, allowed);
        };
        reroute::reroute_overflow(options, call, capacity, overflow, out, eligible);
    }

    // Pass 3: weights of dropped assignments, renormalization, counts.
    let finish = Finish { chunk, kept: &kept, rerouted: &rerouted, tiny: &tiny };
    let (kept_assignments, tokens_dropped) = finish_tokens(options, call, finish, &mut expert_weights);
    // Every policy keeps min(routed, capacity) per expert; reroutes add to that.
    let mut tokens_per_expert: Vec<i64> = routed_counts.iter().map(|&n| n.min(capacity as u64) as i64).collect();
    if reroute_now {
        tokens_per_expert.fill(0);
        for (&x, &kp) in expert_indices.iter().zip(&kept) {
            if kp {
                tokens_per_expert[x as usize] += 1;
            }
        }
    }
    let reported_capacity = match limit {
        Some(c) => c,
        None => tokens_per_expert.iter().copied().max().unwrap_or(0) as usize,
    };

    let mut routing = Routing {
        num_tokens: t,
        num_experts: e,
        top_k: k,
        expert_indices,
        expert_weights,
        expert_slots,
        kept,
        routed,
        rerouted,
        original_expert_indices,
        tokens_per_expert,
        pre_drop_tokens_per_expert: routed_counts.iter().map(|&c| c as i64).collect(),
        first_choice_tokens_per_expert: first_choice,
        plain_tokens_per_expert: plain,
        router_probs,
        expert_prob_mean: sums.prob_mean(),
        capacity: reported_capacity,
        dropless: limit.is_none(),
        active_tokens: active,
        kept_assignments,
        dropped_assignments: active * k - kept_assignments,
        tokens_dropped,
        load_balance_loss: losses::load_balance_loss(&routed_counts, &sums.prob_sum, sums.active, k),
        router_z_loss: losses::router_z_loss(&sums),
        seq_load_balance_loss: call.sequence_length.map(|_| {
            if sums.sequences == 0 {
                0.0
            } else {
                sums.seq_loss_sum / sums.sequences as f64
            }
        }),
        auxiliary_loss: 0.0,
        peer_load_balance_loss: None,
        sinkhorn_iterations: None,
        sinkhorn_converged: None,
    };
    routing.set_auxiliary_loss(options);
    routing.peer_load_balance_loss =
        options.peer.map(|peer| peer_loss::peer_load_balance_loss(peer, &routing.loss_inputs()));
    Ok(routing)
}

impl Routing {
    /// `auxiliary_loss` from the losses and the configuration's coefficients.
    pub(crate) fn set_auxiliary_loss(&mut self, options: &RouterConfig) {
        self.auxiliary_loss = options.load_balance_loss_coeff * self.load_balance_loss
            + options.router_z_loss_coeff * self.router_z_loss
            + self.seq_load_balance_loss.map_or(0.0, |s| options.seq_load_balance_loss_coeff * s);
    }

    /// What the peers' load-balance losses read from this result.
    pub fn loss_inputs(&self) -> peer_loss::LossInputs<'_> {
        peer_loss::LossInputs {
            num_experts: self.num_experts,
            top_k: self.top_k,
            active_tokens: self.active_tokens,
            load_balance_loss: self.load_balance_loss,
            expert_prob_mean: &self.expert_prob_mean,
            first_choice_tokens_per_expert: &self.first_choice_tokens_per_expert,
            plain_tokens_per_expert: &self.plain_tokens_per_expert,
        }
    }
}

/// The arrays pass 1 writes, for all tokens or for one chunk: `[T, k]`
/// choices, weights and routed flags, `[T]` top-1 scores (or empty), `[T, E]`
/// probabilities (or empty).
struct PassOne<'a> {
    experts: &'a mut [i32],
    weights: &'a mut [f32],
    routed: &'a mut [bool],
    top1: &'a mut [f32],
    probs: &'a mut [f32],
}

/// `slice` in `chunks` parts of `len` (the last ones may be short or empty).
fn split_parts<T>(slice: &mut [T], len: usize, chunks: usize) -> Vec<&mut [T]> {
    let mut v: Vec<&mut [T]> = slice.chunks_mut(len.max(1)).collect();
    v.resize_with(chunks, Default::default);
    v
}

/// Pass 1 over all chunks; returns each chunk's tally, in chunk order, or the
/// error of the first offending token.
fn score_and_select<S: LogitSource>(
    source: &S,
    options: &RouterConfig,
    call: &RouteCall,
    chunk: usize,
    ranks: usize,
    out: PassOne,
) -> Result<Vec<Tally>> {
    let t = source.num_tokens();
    let (e, k) = (options.num_experts, options.top_k);
    let ctx = RowContext::new(options, call, source.argument());
    let chunks = t.div_ceil(chunk);
    let one_chunk = |c: usize, part: PassOne, state: &mut (RowRouter, ChunkBuf<S::Elem>)| -> Result<Tally> {
        if call.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(RouterError::Cancelled);
        }
        let PassOne { experts: idx, weights: w, routed: r, top1, probs } = part;
        let (router, scratch) = state;
        let start = c * chunk;
        let end = (start + chunk).min(t);
        let chunk_rows = source.chunk(start, end, scratch);
        let rows = chunk_rows.rows;
        let mut tally = Tally::new(e, ranks, call.plain_topk_counts);
        let mut seq = call.sequence_length.map(|s| SequenceLoss::new(s, e, k, start));
        let tokens = end - start;
        for group in (0..tokens).step_by(BLOCK) {
            let stop = (group + BLOCK).min(tokens);
            if ctx.blocks
                && stop - group == BLOCK
                && chunk_rows.z_squared.is_none()
                && (start + group..start + stop).all(|token| ctx.is_active(token))
            {
                let out = BlockOut {
                    experts: &mut idx[group * k..stop * k],
                    weights: &mut w[group * k..stop * k],
                    routed: &mut r[group * k..stop * k],
                    probs: if probs.is_empty() { &mut [] } else { &mut probs[group * e..stop * e] },
                    top1: if top1.is_empty() { &mut [] } else { &mut top1[group..stop] },
                };
                if route_block(&ctx, start + group, &rows[group * e..stop * e], out, &mut tally) {
                    continue;
                }
            }
            for i in group..stop {
                let out = TokenOut {
                    experts: &mut idx[i * k..(i + 1) * k],
                    weights: &mut w[i * k..(i + 1) * k],
                    routed: &mut r[i * k..(i + 1) * k],
                    probs: if probs.is_empty() { &mut [] } else { &mut probs[i * e..(i + 1) * e] },
                };
                let z_squared = chunk_rows.z_squared.map(|z| z[i]);
                let raw = &rows[i * e..(i + 1) * e];
                router.route_token(&ctx, start + i, raw, z_squared, out, &mut tally, seq.as_mut())?;
                if !top1.is_empty() {
                    top1[i] = router.last_top1;
                }
            }
        }
        tally.losses.finish(ctx.simd);
        if let Some(mut seq) = seq {
            seq.finish_chunk(end);
            tally.sequence_parts = seq.parts;
        }
        Ok(tally)
    };
    let init = || (RowRouter::new(options), ChunkBuf::default());
    if chunks == 1 {
        // Decode-sized batches: the whole output is the chunk, routed on the
        // calling thread (no split, no thread-pool round trip).
        return Ok(vec![one_chunk(0, out, &mut init())?]);
    }

    let (step, probs_step) = (chunk * k, chunk * e);
    let parts: Vec<PassOne> = split_parts(out.experts, step, chunks)
        .into_iter()
        .zip(split_parts(out.weights, step, chunks))
        .zip(split_parts(out.routed, step, chunks))
        .zip(split_parts(out.top1, chunk, chunks))
        .zip(split_parts(out.probs, probs_step, chunks))
        .map(|((((experts, weights), routed), top1), probs)| PassOne { experts, weights, routed, top1, probs })
        .collect();
    let results: Vec<Result<Tally>> =
        parts.into_par_iter().enumerate().map_init(init, |state, (c, part)| one_chunk(c, part, state)).collect();
    results.into_iter().collect()
}

/// What pass 3 reads besides the weights: the chunk size, the `[T, k]` kept
/// and rerouted flags (empty when nothing could be rerouted), and each chunk's
/// recorded log-weights.
struct Finish<'a> {
    chunk: usize,
    kept: &'a [bool],
    rerouted: &'a [bool],
    tiny: &'a [TinyWeights],
}

/// Pass 3: zero the weights of assignments that were not kept, renormalize the
/// kept ones if asked, and count kept assignments and fully dropped tokens.
fn finish_tokens(options: &RouterConfig, call: &RouteCall, finish: Finish, weights: &mut [f32]) -> (usize, usize) {
    let k = options.top_k;
    let Finish { chunk, kept, rerouted, tiny } = finish;
    let renormalize = options.renormalize_after_drop;
    let step = chunk * k;
    weights
        .par_chunks_mut(step)
        .zip(kept.par_chunks(step))
        .enumerate()
        .with_min_len(assign::light_pass_min_chunks(chunk))
        .map(|(c, (w, kp))| {
            if !renormalize {
                return zero_dropped(call, c * chunk, k, w, kp);
            }
            let (mut kept_total, mut dropped_tokens) = (0usize, 0usize);
            let no_record = TinyWeights::default();
            let mut recorded = Recorded::new(tiny.get(c).unwrap_or(&no_record));
            let mut logs = vec![0.0; if renormalize { k } else { 0 }];
            for (i, (w, kp)) in w.chunks_mut(k).zip(kp.chunks(k)).enumerate() {
                let token = c * chunk + i;
                let mut n = 0;
                for (x, &keep) in w.iter_mut().zip(kp) {
                    if keep {
                        n += 1;
                    } else {
                        *x = 0.0;
                    }
                }
                if renormalize && n > 0 {
                    let moved = rerouted.get(token * k..(token + 1) * k).unwrap_or(&[]);
                    if float32::applies(options) {
                        float32::renormalize_kept(options, w, kp);
                    } else {
                        renormalize_kept(options, token, w, kp, moved, &mut recorded, &mut logs);
                    }
                }
                kept_total += n;
                if n == 0 && call.token_mask.is_none_or(|m| m[token]) {
                    dropped_tokens += 1;
                }
            }
            (kept_total, dropped_tokens)
        })
        .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Pass 3 without renormalization for the tokens from `first` on: zero the
/// weights `w` of assignments not kept (`kp`); returns the kept assignments
/// and the active tokens with none kept. Whole-slice loops (they vectorize);
/// the tokens are visited one by one only where something was dropped.
fn zero_dropped(call: &RouteCall, first: usize, k: usize, w: &mut [f32], kp: &[bool]) -> (usize, usize) {
    let kept_total = kp.iter().map(|&keep| usize::from(keep)).sum::<usize>();
    if kept_total == kp.len() {
        return (kept_total, 0);
    }
    for (x, &keep) in w.iter_mut().zip(kp) {
        *x = if keep { *x } else { 0.0 };
    }
    let dropped_tokens = kp
        .chunks(k)
        .enumerate()
        .filter(|&(i, token)| !token.contains(&true) && call.token_mask.is_none_or(|m| m[first + i]))
        .count();
    (kept_total, dropped_tokens)
}

/// Validate the per-call arguments against the source and options.
pub(crate) fn check_call<S: LogitSource>(source: &S, options: &RouterConfig, call: &RouteCall) -> Result<()> {
    let t = source.num_tokens();
    let e = options.num_experts;
    if source.num_experts() != e {
        return Err(RouterError::shape(
            source.argument(),
            format!("[T, {e}] (num_experts = {e})"),
            format!("[{t}, {}]", source.num_experts()),
        ));
    }
    if t.checked_mul(options.top_k).is_none_or(|n| n > i32::MAX as usize) {
        return Err(RouterError::shape(
            source.argument(),
            format!("at most {} tokens for top_k = {}", i32::MAX as usize / options.top_k, options.top_k),
            format!("{t} tokens"),
        ));
    }
    if let Some(mask) = call.token_mask {
        if mask.len() != t {
            return Err(RouterError::shape(
                "token_mask",
                format!("[{t}] (one flag per token)"),
                format!("[{}]", mask.len()),
            ));
        }
    }
    if let Some(bias) = call.expert_bias {
        if bias.len() != e {
            return Err(RouterError::shape(
                "expert_bias",
                format!("[{e}] (one value per expert)"),
                format!("[{}]", bias.len()),
            ));
        }
        if let Some((i, v)) = bias.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(RouterError::NonFiniteParameter { argument: "expert_bias", index: i, value: v.to_string() });
        }
    }
    if let Some(replay) = &call.replay {
        replay.check(t, e, options.top_k, call.token_mask)?;
    }
    if let Some(s) = call.sequence_length {
        if (s == 0 && t != 0) || (s != 0 && !t.is_multiple_of(s)) {
            return Err(RouterError::shape(
                "logits",
                format!("T divisible by the sequence length {s}"),
                format!("T = {t}"),
            ));
        }
    }
    Ok(())
}

/// Per-chunk sums of pass 1.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    /// Routed assignments per expert (per rank and expert when the policy is rank-major: `j * E + e`).
    pub counts: Vec<u32>,
    /// Active tokens per expert of their rank-0 choice.
    pub first_choice: Vec<u32>,
    /// Plain top-k assignments per expert; empty when not requested.
    pub plain: Vec<u32>,
    /// Loss sums.
    pub losses: LossSums,
    /// Parts of sequences that cross this chunk's boundaries.
    pub sequence_parts: Vec<SequencePart>,
    /// Log-weights of the tokens whose renormalization needs them.
    pub tiny_weights: TinyWeights,
}

impl Tally {
    /// Count a token's plain top-k choices (`experts`, with their `routed` flags).
    pub(crate) fn count_plain(&mut self, experts: &[i32], routed: &[bool]) {
        for (&x, &r) in experts.iter().zip(routed) {
            if r {
                self.plain[x as usize] += 1;
            }
        }
    }

    pub(crate) fn new(experts: usize, ranks: usize, plain: bool) -> Self {
        Tally {
            counts: vec![0; experts * ranks],
            first_choice: vec![0; experts],
            plain: vec![0; if plain { experts } else { 0 }],
            losses: LossSums::new(experts),
            sequence_parts: Vec::new(),
            tiny_weights: TinyWeights::default(),
        }
    }
}

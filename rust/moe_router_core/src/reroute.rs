//! Overflow rerouting (`overflow = "reroute"`).
//!
//! After the drop policy has placed every assignment it can, the assignments
//! it dropped are visited in the policy's order; each tries, with probability
//! `expert_dropout` in training (always in evaluation), to move to the
//! least-loaded expert that still has room and that the token has not chosen
//! (ties to the lower index). A moved assignment takes the next slot of its new
//! expert and its weight is multiplied by `reroute_weight_scale` (`crate::weights`).
//!
//! Reroutes only use capacity left over by first-choice placement, so they never
//! displace an assignment the policy kept. The coin is keyed by
//! (seed, step, token, rank), so the result does not depend on thread count.
//! This pass is sequential (each move changes the loads the next one sees);
//! it costs O(dropped * E).

use crate::config::{DropPolicy, RouterConfig};
use crate::rng::{self, Stream};
use crate::route::RouteCall;
use crate::weights::{rerouted_weight, TinyWeights};

/// What the first placement saw: routed flags before capacity, the top-1
/// scores that order tokens under batch-prioritized routing, and each chunk's
/// record of pre-drop weights that float32 holds only approximately.
pub(crate) struct Overflowed<'a> {
    pub routed: &'a [bool],
    pub top1: &'a [f32],
    pub tiny: &'a [TinyWeights],
    /// Tokens per chunk (of `tiny`).
    pub chunk: usize,
}

/// The `[T, k]` arrays a reroute updates.
pub(crate) struct Placement<'a> {
    pub experts: &'a mut [i32],
    pub kept: &'a mut [bool],
    pub slots: &'a mut [i32],
    pub weights: &'a mut [f32],
    pub rerouted: &'a mut [bool],
}

/// `eligible(token, out)` writes which experts the token may be routed to.
pub(crate) fn reroute_overflow(
    options: &RouterConfig,
    call: &RouteCall,
    capacity: usize,
    before: Overflowed,
    out: Placement,
    mut eligible: impl FnMut(usize, &mut [bool]),
) {
    let (e, k) = (options.num_experts, options.top_k);
    let t = out.experts.len() / k.max(1);
    let mut load = vec![0usize; e];
    for (&x, &kp) in out.experts.iter().zip(out.kept.iter()) {
        if kp {
            load[x as usize] += 1;
        }
    }
    let probability = if call.training { options.expert_dropout } else { 1.0 };
    let mut allowed = vec![false; e];
    let mut allowed_token = usize::MAX;
    let mut visit = |tok: usize, j: usize| {
        let i = tok * k + j;
        if !before.routed[i] || out.kept[i] {
            return;
        }
        if probability < 1.0 {
            let u = rng::uniform(options.seed, Stream::Reroute, call.step, tok as u64, j as u64);
            if u >= probability {
                return;
            }
        }
        if allowed_token != tok {
            eligible(tok, &mut allowed);
            allowed_token = tok;
        }
        let chosen = &out.experts[tok * k..(tok + 1) * k];
        let target = (0..e)
            .filter(|&x| load[x] < capacity && allowed[x] && !chosen.contains(&(x as i32)))
            .min_by_key(|&x| (load[x], x));
        if let Some(x) = target {
            out.experts[i] = x as i32;
            out.slots[i] = load[x] as i32;
            out.kept[i] = true;
            out.rerouted[i] = true;
            let unrounded = before.tiny.get(tok / before.chunk.max(1)).and_then(|t| t.unrounded(tok, j, k));
            out.weights[i] = rerouted_weight(options, out.weights[i], unrounded);
            load[x] += 1;
        }
    };
    match options.drop_policy {
        DropPolicy::Position | DropPolicy::Probs => {
            for tok in 0..t {
                for j in 0..k {
                    visit(tok, j);
                }
            }
        }
        DropPolicy::Rank => {
            for j in 0..k {
                for tok in 0..t {
                    visit(tok, j);
                }
            }
        }
        DropPolicy::Bpr | DropPolicy::BprRank => {
            let mut order: Vec<usize> = (0..t).collect();
            order.sort_by(|&x, &y| before.top1[y].total_cmp(&before.top1[x]).then(x.cmp(&y)));
            if options.drop_policy == DropPolicy::BprRank {
                for j in 0..k {
                    for &tok in &order {
                        visit(tok, j);
                    }
                }
            } else {
                for &tok in &order {
                    for j in 0..k {
                        visit(tok, j);
                    }
                }
            }
        }
    }
}

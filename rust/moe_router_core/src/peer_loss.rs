//! The load-balance loss as each peer framework normalizes it.
//!
//! Every framework computes `sum_e f_e * P_e` times a constant, but counts
//! `f_e` differently (see docs/semantics.md, "Peer losses"):
//! - Switch, DeepSeek-V3, DeepSpeed top-k: `E * sum_e f_e P_e`, `f_e` the share of
//!   the T*k routed choices (our `load_balance_loss`);
//! - Hugging Face Mixtral / Qwen-MoE: k times that (their `f_e` sums to k);
//! - DeepSpeed top-1 / top-2: `E * sum_e f1_e P_e` with `f1_e` the share of tokens
//!   whose first choice is e (DeepSpeed `top1gating`/`top2gating`, `me * ce`); Tutel
//!   `losses.gshard_loss` and fairseq `top1gating`/`top2gating` `l_aux` have the same
//!   normalization (fairseq's means include padding tokens; ours count active tokens);
//! - Megatron-Core: `E / (k*T) * sum_e n_e P_e` with `n_e` counted by a plain
//!   top-k that ignores the expert bias and the group limit
//!   (`switch_load_balancing_loss_func` on `tokens_per_expert` of the unbiased top-k).

use crate::config::{CapacityFactor, Peer, RouterConfig};
use crate::error::Result;
use crate::route::{route, RouteCall};
use crate::source::LogitSource;

/// What a peer's loss reads from a routing result.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// E.
    pub num_experts: usize,
    /// k.
    pub top_k: usize,
    /// Active (unmasked) tokens.
    pub active_tokens: usize,
    /// Our `load_balance_loss` (`E * sum_e f_e P_e`).
    pub load_balance_loss: f64,
    /// `P_e`, `[E]`.
    pub expert_prob_mean: &'a [f64],
    /// Tokens whose first choice is e, `[E]`.
    pub first_choice_tokens_per_expert: &'a [i64],
    /// Plain top-k counts (no bias, no groups), `[E]`; empty when the routing used neither.
    pub plain_tokens_per_expert: &'a [i64],
}

/// The load-balance loss of `peer`, coefficient 1.
pub fn peer_load_balance_loss(peer: Peer, x: &LossInputs) -> f64 {
    let (e, k, t) = (x.num_experts as f64, x.top_k as f64, x.active_tokens as f64);
    if x.active_tokens == 0 {
        return 0.0;
    }
    let dot = |counts: &[i64]| -> f64 { counts.iter().zip(x.expert_prob_mean).map(|(&n, &p)| n as f64 * p).sum() };
    match peer {
        Peer::Mixtral | Peer::QwenMoe => k * x.load_balance_loss,
        Peer::DeepSpeedTop1 | Peer::DeepSpeedTop2 | Peer::Tutel | Peer::Fairseq => {
            e * dot(x.first_choice_tokens_per_expert) / t
        }
        Peer::Megatron if !x.plain_tokens_per_expert.is_empty() => e / (k * t) * dot(x.plain_tokens_per_expert),
        Peer::Megatron | Peer::DeepSpeedTopK | Peer::DeepSeekV3 | Peer::Switch => x.load_balance_loss,
    }
}

/// Megatron-Core's `n_e`: per expert, the active tokens whose plain top-k of
/// `source` (no bias, no groups, no capacity; ties to the lower index) contains it.
pub fn plain_topk_counts<S: LogitSource>(source: &S, top_k: usize, token_mask: Option<&[bool]>) -> Result<Vec<i64>> {
    let plain =
        RouterConfig { capacity_factor: CapacityFactor::Dropless, ..RouterConfig::new(source.num_experts(), top_k) };
    let call = RouteCall { token_mask, ..RouteCall::default() };
    Ok(route(source, &plain, &call)?.pre_drop_tokens_per_expert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizations_at_balance() {
        // 4 experts, k=2, 8 tokens, perfectly balanced: P_e = 1/4, 4 choices per expert.
        let p = [0.25; 4];
        let first = [2i64; 4];
        let plain = [4i64; 4];
        let x = LossInputs {
            num_experts: 4,
            top_k: 2,
            active_tokens: 8,
            load_balance_loss: 1.0,
            expert_prob_mean: &p,
            first_choice_tokens_per_expert: &first,
            plain_tokens_per_expert: &plain,
        };
        assert_eq!(peer_load_balance_loss(Peer::Mixtral, &x), 2.0);
        assert_eq!(peer_load_balance_loss(Peer::DeepSpeedTop2, &x), 1.0);
        assert_eq!(peer_load_balance_loss(Peer::Megatron, &x), 1.0);
        assert_eq!(peer_load_balance_loss(Peer::Switch, &x), 1.0);
        let empty = LossInputs { active_tokens: 0, ..x };
        assert_eq!(peer_load_balance_loss(Peer::Mixtral, &empty), 0.0);
    }
}

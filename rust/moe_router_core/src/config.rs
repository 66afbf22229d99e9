//! Router options and their validation.
//!
//! `RouterOptions` is the core's view of the Python `RouterConfig`: every field
//! the routing engine reads, already typed. `validate` is the single place where
//! combinations are checked; the Python layer relies on it.

use crate::capacity::Decimal;
use crate::error::{Result, RouterError};

/// How a token's scores are derived from its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Softmax over all E experts (Switch, GShard, Mixtral, Megatron default).
    Softmax,
    /// Element-wise logistic sigmoid (DeepSeek-V3).
    Sigmoid,
    /// The rows already hold non-negative scores (a gate's probabilities); 0 marks
    /// an expert as not eligible. Used by the hierarchical gate.
    Probabilities,
}

/// Which assignments survive when an expert receives more than `capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Tokens in order, within a token by rank (seed order; Megatron "position").
    Position,
    /// Every token's first choice before any token's second choice (GShard, DeepSpeed top-2).
    Rank,
    /// Each expert keeps its highest-weight assignments; ties by token order (Megatron "probs").
    Probs,
    /// Batch-prioritized routing: tokens by top-1 score, highest first (stable), then as `Position`.
    Bpr,
}

/// How `capacity_factor * T * k / E` is rounded to an integer capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityRounding {
    /// Exact rational arithmetic on the decimal the factor prints as, then ceil.
    Exact,
    /// Megatron-Core: `ceil((T*k / E) * cf)` in float64.
    Megatron,
    /// DeepSpeed: `ceil(f32(T / E) * f32(cf * k))` in float32.
    DeepSpeed,
}

/// How a group of experts is scored in group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's best expert score (DeepSeek-V2, DeepSeek-V3 without bias).
    Max,
    /// The sum of the group's two best expert scores (DeepSeek-V3 with bias).
    Top2Sum,
    /// The sum of the group's n best expert scores (Megatron-Core: n = top_k / group_top_k).
    TopSum(usize),
}

/// What a group is scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScoreInput {
    /// Scores plus selection bias (DeepSeek-V2/V3, vLLM, Megatron with pre-softmax or sigmoid).
    Scores,
    /// Raw logits plus selection bias (Megatron-Core's post-softmax routing).
    Logits,
}

/// What happens to an assignment whose expert is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The assignment is dropped (weight 0, no slot).
    Drop,
    /// The assignment moves to the least-loaded expert with room that the token has not chosen.
    Reroute,
}

/// Group-limited routing: `num_groups` contiguous groups, only the best `group_top_k` are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of equal contiguous expert groups (must divide E).
    pub num_groups: usize,
    /// Number of groups each token may route into.
    pub group_top_k: usize,
    /// How a group is scored.
    pub group_score: GroupScore,
}

/// Capacity of each expert: a factor of the fair share, or no limit.
#[derive(Debug, Clone, PartialEq)]
pub enum CapacityFactor {
    /// No limit: every routed assignment is kept.
    Dropless,
    /// `capacity = max(min_capacity, round(factor * T * k / E))`.
    Factor(Decimal),
    /// A fixed capacity per expert, whatever T (Hugging Face Switch `expert_capacity`).
    Fixed(usize),
}

/// Everything the routing engine reads from a router configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterOptions {
    /// E, the number of experts (>= 1).
    pub num_experts: usize,
    /// k, the number of experts per token (1 <= k <= E).
    pub top_k: usize,
    /// Softmax or sigmoid scores.
    pub score_function: ScoreFunction,
    /// Divide the k chosen scores by their sum.
    pub normalize_weights: bool,
    /// Multiplies every weight (DeepSeek `routed_scaling_factor`).
    pub weight_scale: f64,
    /// Capacity factor in training (and in evaluation unless `eval_capacity_factor` is set).
    pub capacity_factor: CapacityFactor,
    /// Capacity factor in evaluation; `None` means "same as `capacity_factor`".
    pub eval_capacity_factor: Option<CapacityFactor>,
    /// Lower bound on the capacity.
    pub min_capacity: usize,
    /// Rounding of the capacity formula.
    pub capacity_rounding: CapacityRounding,
    /// Order in which assignments claim capacity.
    pub drop_policy: DropPolicy,
    /// After drops, rescale each token's kept weights to sum to `weight_scale` (DeepSpeed, fairseq).
    pub renormalize_after_drop: bool,
    /// Optional group-limited routing.
    pub groups: Option<GroupLimit>,
    /// What groups are scored on.
    pub group_score_input: GroupScoreInput,
    /// Drop or reroute overflowing assignments.
    pub overflow: Overflow,
    /// Weight multiplier of a rerouted assignment (seed: 0.5).
    pub reroute_weight_scale: f64,
    /// Probability, in training, that an overflowing assignment tries a reroute (the seed's `expert_dropout`).
    pub reroute_probability: f64,
    /// Multiplicative jitter half-width: training logits are multiplied by U(1-eps, 1+eps).
    pub jitter_eps: f64,
    /// Standard deviation of additive Gaussian noise on training logits.
    pub noise_std: f64,
    /// Seed of the counter-based RNG used for noise and reroute draws.
    pub seed: u64,
}

impl RouterOptions {
    /// Options with the seed's defaults for `num_experts` experts and `top_k` per token.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        RouterOptions {
            num_experts,
            top_k,
            score_function: ScoreFunction::Softmax,
            normalize_weights: false,
            weight_scale: 1.0,
            capacity_factor: CapacityFactor::Factor(Decimal::from_parts(125, -2)),
            eval_capacity_factor: None,
            min_capacity: 0,
            capacity_rounding: CapacityRounding::Exact,
            drop_policy: DropPolicy::Position,
            renormalize_after_drop: false,
            groups: None,
            group_score_input: GroupScoreInput::Scores,
            overflow: Overflow::Drop,
            reroute_weight_scale: 0.5,
            reroute_probability: 1.0,
            jitter_eps: 0.0,
            noise_std: 0.0,
            seed: 0,
        }
    }

    /// The capacity factor that applies in training or in evaluation.
    pub fn capacity_factor_for(&self, training: bool) -> &CapacityFactor {
        match (&self.eval_capacity_factor, training) {
            (Some(eval), false) => eval,
            _ => &self.capacity_factor,
        }
    }

    /// Check every field and every combination; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 {
            return Err(RouterError::config("num_experts", e, "must be at least 1"));
        }
        if e > i32::MAX as usize {
            return Err(RouterError::config("num_experts", e, format!("must be at most {}", i32::MAX)));
        }
        if self.top_k == 0 || self.top_k > e {
            return Err(RouterError::config(
                "top_k",
                self.top_k,
                format!("must satisfy 1 <= top_k <= num_experts = {e}"),
            ));
        }
        if !(self.weight_scale.is_finite() && self.weight_scale > 0.0) {
            return Err(RouterError::config("weight_scale", self.weight_scale, "must be a finite number > 0"));
        }
        for (field, factor) in [
            ("capacity_factor", Some(&self.capacity_factor)),
            ("eval_capacity_factor", self.eval_capacity_factor.as_ref()),
        ] {
            if let Some(CapacityFactor::Factor(d)) = factor {
                if d.is_zero() {
                    return Err(RouterError::config(
                        field,
                        d,
                        "must be > 0; use None for dropless routing (no capacity limit)",
                    ));
                }
            }
        }
        if let Some(g) = self.groups {
            if g.num_groups == 0 || g.num_groups > e || !e.is_multiple_of(g.num_groups) {
                return Err(RouterError::config(
                    "num_groups",
                    g.num_groups,
                    format!("must be >= 1 and divide num_experts = {e}"),
                ));
            }
            if g.group_top_k == 0 || g.group_top_k > g.num_groups {
                return Err(RouterError::config(
                    "group_top_k",
                    g.group_top_k,
                    format!("must satisfy 1 <= group_top_k <= num_groups = {}", g.num_groups),
                ));
            }
            if let GroupScore::TopSum(n) = g.group_score {
                if n == 0 || n > e / g.num_groups {
                    return Err(RouterError::config(
                        "group_score",
                        format!("top{n}_sum"),
                        format!("n must satisfy 1 <= n <= experts per group = {}", e / g.num_groups),
                    ));
                }
            }
            let reachable = g.group_top_k * (e / g.num_groups);
            if self.top_k > reachable {
                return Err(RouterError::config(
                    "top_k",
                    self.top_k,
                    format!(
                        "must be <= group_top_k * num_experts / num_groups = {} * {} = {reachable}, the experts a token can reach",
                        g.group_top_k,
                        e / g.num_groups
                    ),
                ));
            }
        }
        if !(self.reroute_weight_scale.is_finite() && self.reroute_weight_scale >= 0.0) {
            return Err(RouterError::config(
                "reroute_weight_scale",
                self.reroute_weight_scale,
                "must be finite and >= 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.reroute_probability) {
            return Err(RouterError::config("expert_dropout", self.reroute_probability, "must be in [0, 1]"));
        }
        if self.score_function == ScoreFunction::Probabilities && (self.jitter_eps > 0.0 || self.noise_std > 0.0) {
            return Err(RouterError::config(
                "jitter_eps",
                self.jitter_eps.max(self.noise_std),
                "noise applies to logits; it is not available when routing a gate's probabilities",
            ));
        }
        if !(self.jitter_eps.is_finite() && (0.0..1.0).contains(&self.jitter_eps)) {
            return Err(RouterError::config("jitter_eps", self.jitter_eps, "must be in [0, 1)"));
        }
        if !(self.noise_std.is_finite() && self.noise_std >= 0.0) {
            return Err(RouterError::config("noise_std", self.noise_std, "must be finite and >= 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(RouterOptions::new(8, 2).validate().is_ok());
    }

    #[test]
    fn top_k_above_experts_names_the_field() {
        let err = RouterOptions::new(4, 5).validate().unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }

    #[test]
    fn groups_must_divide_experts_and_reach_k() {
        let mut o = RouterOptions::new(6, 2);
        o.groups = Some(GroupLimit { num_groups: 4, group_top_k: 1, group_score: GroupScore::Max });
        assert!(o.validate().unwrap_err().to_string().contains("num_groups"));
        let mut o = RouterOptions::new(8, 3);
        o.groups = Some(GroupLimit { num_groups: 4, group_top_k: 1, group_score: GroupScore::Max });
        assert!(o.validate().unwrap_err().to_string().contains("top_k"));
    }
}

//! `RouterConfig`: every configuration field, its default, its spelling and
//! its range, in one place.
//!
//! The Python class `moe_router.RouterConfig` is this struct: the bindings set
//! and read fields by name through [`RouterConfig::set_field`] and
//! [`RouterConfig::field`], so a field exists here and nowhere else (the type
//! stub lists it for type checkers, and a test checks the stub against
//! [`RouterConfig::FIELDS`]).

use std::fmt;
use std::str::FromStr;

use crate::decimal::Decimal;
use crate::error::{Result, RouterError};

/// A keyword spelling table shared by `FromStr` and `Display` of an enum.
trait Spelled: Copy + PartialEq + 'static {
    /// Field name, for error messages.
    const FIELD: &'static str;
    /// Every value with its spelling.
    const SPELLINGS: &'static [(&'static str, Self)];

    fn spelling(self) -> &'static str {
        Self::SPELLINGS.iter().find(|(_, v)| *v == self).map_or("?", |(s, _)| s)
    }

    fn parse_spelling(text: &str) -> Result<Self> {
        Self::SPELLINGS.iter().find(|(s, _)| *s == text).map(|(_, v)| *v).ok_or_else(|| {
            let allowed: Vec<String> = Self::SPELLINGS.iter().map(|(s, _)| format!("'{s}'")).collect();
            RouterError::config(Self::FIELD, format!("'{text}'"), format!("must be one of {}", allowed.join(", ")))
        })
    }
}

macro_rules! spelled_enum {
    ($ty:ident, $field:literal, [$($text:literal => $variant:ident),+ $(,)?]) => {
        impl Spelled for $ty {
            const FIELD: &'static str = $field;
            const SPELLINGS: &'static [(&'static str, Self)] = &[$(($text, $ty::$variant)),+];
        }
        impl FromStr for $ty {
            type Err = RouterError;
            fn from_str(text: &str) -> Result<Self> {
                Self::parse_spelling(text)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.spelling())
            }
        }
    };
}

/// How a token's scores are derived from its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Softmax over all E experts (Switch, GShard, Mixtral, Megatron default).
    Softmax,
    /// Element-wise logistic sigmoid (DeepSeek-V3).
    Sigmoid,
    /// Element-wise `sqrt(softplus(z))` (Megatron-Core `sqrtsoftplus`), handled as sigmoid.
    SqrtSoftplus,
    /// The rows already hold non-negative scores (a gate's probabilities); 0 marks
    /// an expert as not eligible. Set by the hierarchical gate, not by users.
    Probabilities,
}
spelled_enum!(ScoreFunction, "score_function", [
    "softmax" => Softmax, "sigmoid" => Sigmoid, "sqrtsoftplus" => SqrtSoftplus,
]);

impl ScoreFunction {
    /// Whether each score depends on its own logit only (sigmoid, sqrtsoftplus).
    pub fn is_elementwise(self) -> bool {
        matches!(self, ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus)
    }
}

/// Which routing algorithm assigns tokens to experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingAlgorithm {
    /// Each token picks its top-k experts; capacity then drops overflow (Switch, GShard, Mixtral).
    TokenChoice,
    /// Each expert picks its top-C tokens; a token gets 0..E experts (Zhou et al. 2022, flaxformer).
    ExpertChoice,
    /// Top-k of a Sinkhorn-balanced score matrix in training (Megatron-Core S-BASE, `crate::sinkhorn`).
    Sinkhorn,
    /// Training: every expert gets exactly `T_active * k / E` tokens, maximizing the
    /// total logit (BASE layers); evaluation: top-k without capacity.
    Balanced,
}
spelled_enum!(RoutingAlgorithm, "routing", [
    "token_choice" => TokenChoice, "expert_choice" => ExpertChoice, "sinkhorn" => Sinkhorn, "balanced" => Balanced,
]);

/// How `routing = "balanced"` solves its assignment problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalancedSolver {
    /// The exact optimum (successive shortest augmenting paths).
    Exact,
    /// fairseq's approximate auction (`balanced_assignment.cpp`), reproduced step for step.
    FairseqAuction,
}
spelled_enum!(BalancedSolver, "balanced_solver", ["exact" => Exact, "fairseq_auction" => FairseqAuction]);

/// Which assignments survive when an expert receives more than `capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Tokens in order, within a token by rank (Megatron "position").
    Position,
    /// Every token's first choice before any token's second choice (GShard, DeepSpeed top-2).
    Rank,
    /// Each expert keeps its highest-weight assignments; ties by token order (Megatron "probs").
    Probs,
    /// Batch-prioritized routing: tokens by top-1 score, highest first (stable), then as `Position`.
    Bpr,
    /// Rank-major batch-prioritized routing: tokens ordered as `Bpr`, then as `Rank` in that
    /// order (Tutel `extract_critical`, fairseq `top2gating` with `batch_prioritized_routing`).
    BprRank,
}
spelled_enum!(DropPolicy, "drop_policy", [
    "position" => Position, "rank" => Rank, "probs" => Probs, "bpr" => Bpr, "bpr_rank" => BprRank,
]);

/// How `capacity_factor * T * k / E` is rounded to an integer capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityRounding {
    /// Exact rational arithmetic on the decimal the factor prints as, then ceil.
    Exact,
    /// Megatron-Core: `ceil((T*k / E) * cf)` in float64.
    Megatron,
    /// DeepSpeed: `ceil(f32(T / E) * f32(cf * k))` in float32.
    DeepSpeed,
    /// Tutel: `k * floor(cf * ceil(T / E))`, exact on the decimal factor.
    Tutel,
    /// fairseq: `floor(cf * ceil(T / E))` for k = 1, `2 * ceil(T / E)` (no factor) for k = 2.
    Fairseq,
    /// flaxformer expert choice: `round_half_even(cf * T / E)`, exact, no k factor.
    Flaxformer,
}
spelled_enum!(CapacityRounding, "capacity_rounding", [
    "exact" => Exact, "megatron" => Megatron, "deepspeed" => DeepSpeed, "tutel" => Tutel, "fairseq" => Fairseq,
    "flaxformer" => Flaxformer,
]);

/// What a group is scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScoreInput {
    /// Scores plus selection bias (DeepSeek-V2/V3, vLLM, Megatron with pre-softmax or sigmoid).
    Scores,
    /// Raw logits plus selection bias (Megatron-Core's post-softmax routing).
    Logits,
}
spelled_enum!(GroupScoreInput, "group_score_input", ["scores" => Scores, "logits" => Logits]);

/// What happens to an assignment whose expert is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The assignment is dropped (weight 0, no slot).
    Drop,
    /// The assignment moves to the least-loaded expert with room that the token has not chosen.
    Reroute,
}
spelled_enum!(Overflow, "overflow", ["drop" => Drop, "reroute" => Reroute]);

/// The arithmetic of the scores, the selection and the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorePrecision {
    /// Float64 throughout; experts ranked by their exact scores (the native semantics).
    Float64,
    /// The peers' float32 arithmetic (softmax: max-subtract, exp, sum, multiply by the
    /// reciprocal; sigmoid `1 / (1 + exp(-z))`), experts ranked by those float32 scores plus
    /// bias, so saturated scores (exactly 0 or 1) tie and go to the lower index
    /// (Hugging Face routers, DeepSpeed top-k, Megatron-Core pre-softmax and sigmoid).
    Float32,
    /// The float32 arithmetic of `Float32`, experts ranked by the logits (Megatron-Core's
    /// top-k-then-softmax, whose weights are a float32 softmax over the chosen logits;
    /// DeepSpeed's top-1/top-2 and Switch's argmax).
    Float32Logits,
}
spelled_enum!(ScorePrecision, "score_precision", [
    "float64" => Float64, "float32" => Float32, "float32_logits" => Float32Logits,
]);

/// The framework whose load-balance loss normalization `peer_load_balance_loss` reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Megatron-Core: `E / (k*T) * sum_e n_e P_e`, `n_e` from a plain top-k (no bias, no groups).
    Megatron,
    /// DeepSpeed top-1 gate: first choices only.
    DeepSpeedTop1,
    /// DeepSpeed top-2 gate: first choices only.
    DeepSpeedTop2,
    /// DeepSpeed top-k gate: the Switch normalization.
    DeepSpeedTopK,
    /// Hugging Face Mixtral: k times the Switch normalization.
    Mixtral,
    /// Hugging Face Qwen-MoE: k times the Switch normalization.
    QwenMoe,
    /// Hugging Face DeepSeek-V3: the Switch normalization.
    DeepSeekV3,
    /// Hugging Face Switch Transformers: the Switch normalization.
    Switch,
    /// Tutel `gshard_loss`: first choices only, as DeepSpeed top-1/top-2.
    Tutel,
    /// fairseq `top1gating`/`top2gating` `l_aux`: first choices only, as DeepSpeed top-1/top-2.
    Fairseq,
}
spelled_enum!(Peer, "peer", [
    "megatron" => Megatron, "deepspeed_top1" => DeepSpeedTop1, "deepspeed_top2" => DeepSpeedTop2,
    "deepspeed_topk" => DeepSpeedTopK, "mixtral" => Mixtral, "qwen_moe" => QwenMoe,
    "deepseek_v3" => DeepSeekV3, "switch" => Switch, "tutel" => Tutel, "fairseq" => Fairseq,
]);

impl Peer {
    /// Every spelling, in declaration order.
    pub fn spellings() -> impl Iterator<Item = &'static str> {
        Self::SPELLINGS.iter().map(|(s, _)| *s)
    }
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

impl FromStr for GroupScore {
    type Err = RouterError;
    /// `"max"`, `"top2_sum"` or `"top<n>_sum"` with n >= 1.
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "max" => Ok(GroupScore::Max),
            "top2_sum" => Ok(GroupScore::Top2Sum),
            _ => text
                .strip_prefix("top")
                .and_then(|r| r.strip_suffix("_sum"))
                .filter(|n| !n.starts_with(['0', '+']))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .map(GroupScore::TopSum)
                .ok_or_else(|| {
                    RouterError::config(
                        "group_score",
                        format!("'{text}'"),
                        "must be 'max', 'top2_sum' or 'top<n>_sum' (n >= 1)",
                    )
                }),
        }
    }
}

impl fmt::Display for GroupScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupScore::Max => f.write_str("max"),
            GroupScore::Top2Sum => f.write_str("top2_sum"),
            GroupScore::TopSum(n) => write!(f, "top{n}_sum"),
        }
    }
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

/// A configuration value as the bindings pass it: the Python object's kind,
/// without Python types.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// Python `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits in an `i128`.
    Int(i128),
    /// An integer beyond the `i128` range (Python ints are unbounded), as its
    /// decimal text: out of range for every integer field.
    BigInt(String),
    /// A float or decimal: its value and its exact decimal text (`repr(float)` or `str(Decimal)`).
    Real {
        /// The nearest float64.
        value: f64,
        /// The decimal it prints as; `exact` on the way out says whether `value` is that decimal.
        text: String,
        /// True when `value` prints as `text` (a float suffices to carry it).
        exact: bool,
    },
    /// A string.
    Text(String),
    /// A sequence of reals.
    Reals(Vec<f64>),
    /// Any other object (a list of strings, a dict, ...): the wrong type for every field.
    Other {
        /// The object as Python's `repr` prints it.
        repr: String,
        /// Its type's name.
        type_name: String,
    },
}

impl FieldValue {
    /// The kind of value, as error messages name it (`int`, `float`, `str`, ...).
    pub fn kind(&self) -> &str {
        match self {
            FieldValue::None => "None",
            FieldValue::Bool(_) => "bool",
            FieldValue::Int(_) | FieldValue::BigInt(_) => "int",
            FieldValue::Real { exact: true, .. } => "float",
            FieldValue::Real { .. } => "Decimal",
            FieldValue::Text(_) => "str",
            FieldValue::Reals(_) => "sequence of reals",
            FieldValue::Other { type_name, .. } => type_name,
        }
    }
}

impl fmt::Display for FieldValue {
    /// The value as Python's `repr` would print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::None => f.write_str("None"),
            FieldValue::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            FieldValue::Int(i) => write!(f, "{i}"),
            FieldValue::BigInt(text) => f.write_str(text),
            FieldValue::Real { text, .. } => f.write_str(text),
            FieldValue::Text(s) => write!(f, "'{s}'"),
            FieldValue::Reals(v) => {
                let items: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
                write!(f, "({})", items.join(", "))
            }
            FieldValue::Other { repr, .. } => f.write_str(repr),
        }
    }
}

/// Everything that configures a router: routing, capacity, losses, balancing.
///
/// Defaults: `num_experts=8, top_k=2, capacity_factor=1.25,
/// load_balance_loss_coeff=0.01, router_z_loss_coeff=0.001` and the
/// specification's native semantics elsewhere ([`RouterConfig::default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// E, the number of experts (>= 1).
    pub num_experts: usize,
    /// k, the number of experts per token (1 <= k <= E).
    pub top_k: usize,
    /// Capacity factor in training (and in evaluation unless `eval_capacity_factor` is set).
    pub capacity_factor: CapacityFactor,
    /// Capacity factor in evaluation; `None` means "same as `capacity_factor`".
    pub eval_capacity_factor: Option<CapacityFactor>,
    /// Lower bound on the capacity.
    pub min_capacity: usize,
    /// A fixed per-expert capacity replacing the formula (Hugging Face Switch), if set.
    pub expert_capacity: Option<usize>,
    /// Rounding of the capacity formula.
    pub capacity_rounding: CapacityRounding,
    /// Order in which assignments claim capacity.
    pub drop_policy: DropPolicy,
    /// After drops, rescale each token's kept weights to sum to `weight_scale` (DeepSpeed, fairseq).
    pub renormalize_after_drop: bool,
    /// Softmax or sigmoid scores.
    pub score_function: ScoreFunction,
    /// Divide the k chosen scores by their sum.
    pub normalize_weights: bool,
    /// Multiplies every weight (DeepSeek `routed_scaling_factor`).
    pub weight_scale: f64,
    /// Coefficient of `load_balance_loss` in `auxiliary_loss`.
    pub load_balance_loss_coeff: f64,
    /// Coefficient of `router_z_loss` in `auxiliary_loss`.
    pub router_z_loss_coeff: f64,
    /// Coefficient of the sequence-level balance loss in `auxiliary_loss`.
    pub seq_load_balance_loss_coeff: f64,
    /// Probability, in training, that an overflowing assignment tries a reroute.
    pub expert_dropout: f64,
    /// Whether an `ExpertRouter` feeds its load balancer in training.
    pub enable_load_balancing: bool,
    /// Drop or reroute overflowing assignments.
    pub overflow: Overflow,
    /// Weight multiplier of a rerouted assignment.
    pub reroute_weight_scale: f64,
    /// Number of contiguous expert groups of group-limited routing (with `group_top_k`).
    pub num_groups: Option<usize>,
    /// Groups each token may route into (with `num_groups`).
    pub group_top_k: Option<usize>,
    /// How a group is scored.
    pub group_score: GroupScore,
    /// What groups are scored on.
    pub group_score_input: GroupScoreInput,
    /// Multiplicative jitter half-width: training logits are multiplied by U(1-eps, 1+eps).
    pub jitter_eps: f64,
    /// Standard deviation of additive Gaussian noise on training logits.
    pub noise_std: f64,
    /// Seed of the counter-based RNG used for noise and reroute draws.
    pub seed: u64,
    /// A fixed per-expert selection bias, used when a call passes none.
    pub expert_bias: Option<Vec<f64>>,
    /// The framework whose loss normalization `peer_load_balance_loss` follows (set by presets).
    pub peer: Option<Peer>,
    /// The routing algorithm.
    pub routing: RoutingAlgorithm,
    /// The capacity is rounded up to a multiple of this (Tutel's `alignment`); 1 = as computed.
    pub capacity_alignment: usize,
    /// In evaluation, `capacity = ceil(fraction * T)` instead of the factor's formula (fairseq
    /// `moe_eval_capacity_token_fraction`), if set.
    pub eval_capacity_token_fraction: Option<Decimal>,
    /// Expert choice with a per-token cap (EC-CAP): each token keeps at most this many experts.
    pub expert_choice_cap: Option<usize>,
    /// Float64 scores (native) or the peers' float32 arithmetic (set by the presets).
    pub score_precision: ScorePrecision,
    /// Sinkhorn stops once the mean change of the expert scaling is at most this (> 0).
    pub sinkhorn_tolerance: f64,
    /// Sinkhorn stops after this many iterations even if not converged (>= 1).
    pub sinkhorn_max_iterations: usize,
    /// The solver of `routing = "balanced"`.
    pub balanced_solver: BalancedSolver,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            num_experts: 8,
            top_k: 2,
            capacity_factor: CapacityFactor::Factor(Decimal::from_parts(125, -2)),
            eval_capacity_factor: None,
            min_capacity: 0,
            expert_capacity: None,
            capacity_rounding: CapacityRounding::Exact,
            drop_policy: DropPolicy::Position,
            renormalize_after_drop: false,
            score_function: ScoreFunction::Softmax,
            normalize_weights: false,
            weight_scale: 1.0,
            load_balance_loss_coeff: 0.01,
            router_z_loss_coeff: 0.001,
            seq_load_balance_loss_coeff: 0.0,
            expert_dropout: 0.0,
            enable_load_balancing: true,
            overflow: Overflow::Drop,
            reroute_weight_scale: 0.5,
            num_groups: None,
            group_top_k: None,
            group_score: GroupScore::Max,
            group_score_input: GroupScoreInput::Scores,
            jitter_eps: 0.0,
            noise_std: 0.0,
            seed: 0,
            expert_bias: None,
            peer: None,
            routing: RoutingAlgorithm::TokenChoice,
            capacity_alignment: 1,
            eval_capacity_token_fraction: None,
            expert_choice_cap: None,
            score_precision: ScorePrecision::Float64,
            sinkhorn_tolerance: 1e-4,
            sinkhorn_max_iterations: 1000,
            balanced_solver: BalancedSolver::Exact,
        }
    }
}

/// The accepted alias of `top_k` (`num_experts_per_token`, a common name for k).
pub const TOP_K_ALIAS: &str = "num_experts_per_token";

/// The largest weight the float32 output holds.
const WEIGHT_MAX: f64 = f32::MAX as f64;

impl RouterConfig {
    /// Every field's name, in declaration order (the Python class's keyword arguments).
    pub const FIELDS: &'static [&'static str] = &[
        "num_experts",
        "top_k",
        "capacity_factor",
        "eval_capacity_factor",
        "min_capacity",
        "expert_capacity",
        "capacity_rounding",
        "drop_policy",
        "renormalize_after_drop",
        "score_function",
        "normalize_weights",
        "weight_scale",
        "load_balance_loss_coeff",
        "router_z_loss_coeff",
        "seq_load_balance_loss_coeff",
        "expert_dropout",
        "enable_load_balancing",
        "overflow",
        "reroute_weight_scale",
        "num_groups",
        "group_top_k",
        "group_score",
        "group_score_input",
        "jitter_eps",
        "noise_std",
        "seed",
        "expert_bias",
        "peer",
        "routing",
        "capacity_alignment",
        "eval_capacity_token_fraction",
        "expert_choice_cap",
        "score_precision",
        "sinkhorn_tolerance",
        "sinkhorn_max_iterations",
        "balanced_solver",
    ];

    /// The defaults with `num_experts` experts and `top_k` per token.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        RouterConfig { num_experts, top_k, ..RouterConfig::default() }
    }

    /// Build from `(name, value)` pairs over the defaults, then validate.
    ///
    /// `num_experts_per_token` is accepted as an alias of `top_k` (they must agree
    /// when both are given). Errors: [`RouterError::UnknownField`] for a name that
    /// is not a field, [`RouterError::InvalidConfig`] for a bad value.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, FieldValue)>) -> Result<Self> {
        RouterConfig::default().with_fields(fields)
    }

    /// A copy with `(name, value)` changes applied, validated again.
    pub fn with_fields<'a>(&self, fields: impl IntoIterator<Item = (&'a str, FieldValue)>) -> Result<Self> {
        let mut config = self.clone();
        let mut top_k: Option<FieldValue> = None;
        let mut alias: Option<FieldValue> = None;
        for (name, value) in fields {
            match name {
                "top_k" => top_k = Some(value),
                TOP_K_ALIAS => alias = Some(value),
                _ => config.set_field(name, value)?,
            }
        }
        match (top_k, alias) {
            (Some(FieldValue::None), None) => {} // `top_k=None`: the default
            (Some(k), None) | (None, Some(k)) => config.set_field("top_k", k)?,
            (Some(k), Some(a)) => {
                if !matches!(k, FieldValue::None) && k != a {
                    return Err(RouterError::config(
                        TOP_K_ALIAS,
                        &a,
                        format!("is an alias of top_k and must agree with top_k = {k}"),
                    ));
                }
                config.set_field("top_k", a)?;
            }
            (None, None) => {}
        }
        config.validate()?;
        Ok(config)
    }

    /// Set one field from a value, checking its type and its own range; combinations
    /// are checked by [`RouterConfig::validate`].
    pub fn set_field(&mut self, name: &str, value: FieldValue) -> Result<()> {
        let v = &value;
        match name {
            "routing" => self.routing = spelled(v)?,
            "num_experts" => self.num_experts = count("num_experts", v, 1, MAX_EXPERTS)?,
            "top_k" => self.top_k = count("top_k", v, 1, MAX_EXPERTS)?,
            "capacity_factor" => self.capacity_factor = factor("capacity_factor", v)?,
            "eval_capacity_factor" => {
                self.eval_capacity_factor = match v {
                    FieldValue::None => None,
                    FieldValue::Text(t) if t == "dropless" => Some(CapacityFactor::Dropless),
                    FieldValue::Text(_) => {
                        return Err(RouterError::config(
                            "eval_capacity_factor",
                            v,
                            "must be a number > 0, 'dropless', or None (same as capacity_factor)",
                        ))
                    }
                    FieldValue::Bool(_) | FieldValue::Reals(_) | FieldValue::Other { .. } => {
                        return Err(RouterError::wrong_type(
                            "eval_capacity_factor",
                            v,
                            "must be a number > 0, 'dropless', or None (same as capacity_factor)",
                        ))
                    }
                    _ => Some(factor("eval_capacity_factor", v)?),
                }
            }
            "min_capacity" => self.min_capacity = count("min_capacity", v, 0, usize::MAX)?,
            "expert_capacity" => self.expert_capacity = optional(v, |v| count("expert_capacity", v, 1, usize::MAX))?,
            "capacity_rounding" => self.capacity_rounding = spelled(v)?,
            "drop_policy" => self.drop_policy = spelled(v)?,
            "renormalize_after_drop" => self.renormalize_after_drop = boolean("renormalize_after_drop", v)?,
            "score_function" => self.score_function = spelled(v)?,
            "normalize_weights" => self.normalize_weights = boolean("normalize_weights", v)?,
            "weight_scale" => self.weight_scale = real("weight_scale", v)?,
            "load_balance_loss_coeff" => self.load_balance_loss_coeff = real("load_balance_loss_coeff", v)?,
            "router_z_loss_coeff" => self.router_z_loss_coeff = real("router_z_loss_coeff", v)?,
            "seq_load_balance_loss_coeff" => self.seq_load_balance_loss_coeff = real("seq_load_balance_loss_coeff", v)?,
            "expert_dropout" => self.expert_dropout = real("expert_dropout", v)?,
            "enable_load_balancing" => self.enable_load_balancing = boolean("enable_load_balancing", v)?,
            "overflow" => self.overflow = spelled(v)?,
            "reroute_weight_scale" => self.reroute_weight_scale = real("reroute_weight_scale", v)?,
            "num_groups" => self.num_groups = optional(v, |v| count("num_groups", v, 1, MAX_EXPERTS))?,
            "group_top_k" => self.group_top_k = optional(v, |v| count("group_top_k", v, 1, MAX_EXPERTS))?,
            "group_score" => self.group_score = text("group_score", v)?.parse()?,
            "group_score_input" => self.group_score_input = spelled(v)?,
            "jitter_eps" => self.jitter_eps = real("jitter_eps", v)?,
            "noise_std" => self.noise_std = real("noise_std", v)?,
            "seed" => self.seed = integer("seed", v, 0, u64::MAX.into())?,
            "expert_bias" => {
                self.expert_bias = match v {
                    FieldValue::None => None,
                    FieldValue::Reals(b) => Some(b.clone()),
                    _ => {
                        let e = self.num_experts;
                        return Err(RouterError::wrong_type(
                            "expert_bias",
                            v,
                            &format!("must be None or a sequence of {e} real numbers"),
                        ));
                    }
                }
            }
            "peer" => self.peer = optional(v, spelled)?,
            "capacity_alignment" => self.capacity_alignment = count("capacity_alignment", v, 1, usize::MAX)?,
            "eval_capacity_token_fraction" => {
                self.eval_capacity_token_fraction = optional(v, |v| token_fraction("eval_capacity_token_fraction", v))?
            }
            "expert_choice_cap" => {
                self.expert_choice_cap = optional(v, |v| count("expert_choice_cap", v, 1, MAX_EXPERTS))?
            }
            "score_precision" => self.score_precision = spelled(v)?,
            "sinkhorn_tolerance" => self.sinkhorn_tolerance = real("sinkhorn_tolerance", v)?,
            "sinkhorn_max_iterations" => {
                self.sinkhorn_max_iterations = count("sinkhorn_max_iterations", v, 1, usize::MAX)?
            }
            "balanced_solver" => self.balanced_solver = spelled(v)?,
            _ => return Err(RouterError::UnknownField { name: name.to_string() }),
        }
        Ok(())
    }

    /// The value of field `name` (one of [`RouterConfig::FIELDS`] or the `top_k` alias).
    pub fn field(&self, name: &str) -> Option<FieldValue> {
        let int = |n: usize| FieldValue::Int(n as i128);
        let opt_int = |n: Option<usize>| n.map_or(FieldValue::None, int);
        let word = |s: String| FieldValue::Text(s);
        Some(match name {
            "routing" => word(self.routing.to_string()),
            "num_experts" => int(self.num_experts),
            "top_k" | TOP_K_ALIAS => int(self.top_k),
            "capacity_factor" => factor_value(&self.capacity_factor),
            "eval_capacity_factor" => match &self.eval_capacity_factor {
                None => FieldValue::None,
                Some(CapacityFactor::Dropless) => word("dropless".into()),
                Some(f) => factor_value(f),
            },
            "min_capacity" => int(self.min_capacity),
            "expert_capacity" => opt_int(self.expert_capacity),
            "capacity_rounding" => word(self.capacity_rounding.to_string()),
            "drop_policy" => word(self.drop_policy.to_string()),
            "renormalize_after_drop" => FieldValue::Bool(self.renormalize_after_drop),
            "score_function" => word(self.score_function.to_string()),
            "normalize_weights" => FieldValue::Bool(self.normalize_weights),
            "weight_scale" => float_value(self.weight_scale),
            "load_balance_loss_coeff" => float_value(self.load_balance_loss_coeff),
            "router_z_loss_coeff" => float_value(self.router_z_loss_coeff),
            "seq_load_balance_loss_coeff" => float_value(self.seq_load_balance_loss_coeff),
            "expert_dropout" => float_value(self.expert_dropout),
            "enable_load_balancing" => FieldValue::Bool(self.enable_load_balancing),
            "overflow" => word(self.overflow.to_string()),
            "reroute_weight_scale" => float_value(self.reroute_weight_scale),
            "num_groups" => opt_int(self.num_groups),
            "group_top_k" => opt_int(self.group_top_k),
            "group_score" => word(self.group_score.to_string()),
            "group_score_input" => word(self.group_score_input.to_string()),
            "jitter_eps" => float_value(self.jitter_eps),
            "noise_std" => float_value(self.noise_std),
            "seed" => FieldValue::Int(i128::from(self.seed)),
            "expert_bias" => self.expert_bias.clone().map_or(FieldValue::None, FieldValue::Reals),
            "peer" => self.peer.map_or(FieldValue::None, |p| word(p.to_string())),
            "capacity_alignment" => int(self.capacity_alignment),
            "eval_capacity_token_fraction" => {
                self.eval_capacity_token_fraction.map_or(FieldValue::None, |d| factor_value(&CapacityFactor::Factor(d)))
            }
            "expert_choice_cap" => opt_int(self.expert_choice_cap),
            "score_precision" => word(self.score_precision.to_string()),
            "sinkhorn_tolerance" => float_value(self.sinkhorn_tolerance),
            "sinkhorn_max_iterations" => int(self.sinkhorn_max_iterations),
            "balanced_solver" => word(self.balanced_solver.to_string()),
            _ => return None,
        })
    }

    /// This configuration for routing a gate's probabilities: the rows are the
    /// scores, and noise (which applies to logits) is off.
    pub fn for_gate(&self) -> RouterConfig {
        RouterConfig { score_function: ScoreFunction::Probabilities, jitter_eps: 0.0, noise_std: 0.0, ..self.clone() }
    }

    /// Set (or clear) group-limited routing as one value.
    pub fn set_groups(&mut self, groups: Option<GroupLimit>) {
        self.num_groups = groups.map(|g| g.num_groups);
        self.group_top_k = groups.map(|g| g.group_top_k);
        self.group_score = groups.map_or(GroupScore::Max, |g| g.group_score);
    }

    /// Group-limited routing, when `num_groups` and `group_top_k` are set.
    pub fn groups(&self) -> Option<GroupLimit> {
        match (self.num_groups, self.group_top_k) {
            (Some(num_groups), Some(group_top_k)) => {
                Some(GroupLimit { num_groups, group_top_k, group_score: self.group_score })
            }
            _ => None,
        }
    }

    /// The capacity rule that applies in training or in evaluation.
    pub fn capacity_factor_for(&self, training: bool) -> CapacityFactor {
        if let Some(n) = self.expert_capacity {
            return CapacityFactor::Fixed(n);
        }
        match (&self.eval_capacity_factor, training) {
            (Some(eval), false) => eval.clone(),
            _ => self.capacity_factor.clone(),
        }
    }

    /// Per-expert capacity for `tokens` active tokens, as routing applies it: the
    /// formula of [`crate::expert_capacity`], or for `routing = "balanced"` the share
    /// `ceil(tokens * k / E)` in training (routing requires it exact) and no limit in evaluation.
    pub fn capacity_for(&self, tokens: usize, training: bool) -> Option<usize> {
        if self.routing == RoutingAlgorithm::Balanced {
            return training.then(|| tokens.saturating_mul(self.top_k).div_ceil(self.num_experts));
        }
        crate::capacity::capacity_limit(self, training, tokens)
    }

    /// Check every range and every combination; the error names the field.
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
        self.check_weight_factors()?;
        crate::expert_choice::check_config(self)?;
        for (field, value) in [
            ("load_balance_loss_coeff", self.load_balance_loss_coeff),
            ("router_z_loss_coeff", self.router_z_loss_coeff),
            ("seq_load_balance_loss_coeff", self.seq_load_balance_loss_coeff),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(RouterError::config(field, value, "must be a finite number >= 0"));
            }
        }
        for (field, factor) in [
            ("capacity_factor", Some(&self.capacity_factor)),
            ("eval_capacity_factor", self.eval_capacity_factor.as_ref()),
        ] {
            if let Some(CapacityFactor::Factor(d)) = factor {
                if d.is_zero() {
                    return Err(RouterError::config(field, d, format!("must be > 0; {}", dropless_hint(field))));
                }
            }
        }
        match (self.num_groups, self.group_top_k) {
            (Some(_), None) => {
                return Err(RouterError::config("group_top_k", "None", "must be set when num_groups is set"))
            }
            (None, Some(m)) => {
                return Err(RouterError::config(
                    "num_groups",
                    "None",
                    format!("must be set when group_top_k = {m} is set"),
                ))
            }
            _ => {}
        }
        if let Some(g) = self.groups() {
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
        self.check_peer_capacity()?;
        if !(0.0..=1.0).contains(&self.expert_dropout) {
            return Err(RouterError::config("expert_dropout", self.expert_dropout, "must be in [0, 1]"));
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
        if let Some(bias) = &self.expert_bias {
            if bias.len() != e {
                return Err(RouterError::config(
                    "expert_bias",
                    format!("{} values", bias.len()),
                    format!("must be a sequence of {e} real numbers (one per expert)"),
                ));
            }
            if let Some((i, v)) = bias.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(RouterError::config(
                    "expert_bias",
                    format!("{v}"),
                    format!("must be finite; expert_bias[{i}] = {v}"),
                ));
            }
        }
        self.check_sinkhorn()?;
        self.check_algorithm_fields()?;
        self.check_balanced()
    }

    /// This configuration as token choice, with every other algorithm's own
    /// fields at their defaults: how Sinkhorn and balanced routing hand their
    /// selection to the token-choice pipeline.
    pub(crate) fn as_token_choice(&self) -> RouterConfig {
        let default = RouterConfig::default();
        RouterConfig {
            routing: RoutingAlgorithm::TokenChoice,
            expert_choice_cap: default.expert_choice_cap,
            sinkhorn_tolerance: default.sinkhorn_tolerance,
            sinkhorn_max_iterations: default.sinkhorn_max_iterations,
            balanced_solver: default.balanced_solver,
            ..self.clone()
        }
    }

    /// A field of one routing algorithm set under another is a mistake, not a
    /// no-op: it must keep its default there (the fields [`Self::as_token_choice`] resets).
    fn check_algorithm_fields(&self) -> Result<()> {
        let default = RouterConfig::default();
        let owned = [
            ("expert_choice_cap", RoutingAlgorithm::ExpertChoice, self.expert_choice_cap != default.expert_choice_cap),
            ("sinkhorn_tolerance", RoutingAlgorithm::Sinkhorn, self.sinkhorn_tolerance != default.sinkhorn_tolerance),
            (
                "sinkhorn_max_iterations",
                RoutingAlgorithm::Sinkhorn,
                self.sinkhorn_max_iterations != default.sinkhorn_max_iterations,
            ),
            ("balanced_solver", RoutingAlgorithm::Balanced, self.balanced_solver != default.balanced_solver),
        ];
        for (field, owner, set) in owned {
            if set && self.routing != owner {
                let value = self.field(field).map_or_else(String::new, |v| v.to_string());
                return Err(RouterError::config(
                    field,
                    value,
                    format!("applies to routing='{owner}' only; leave the default with routing='{}'", self.routing),
                ));
            }
        }
        Ok(())
    }

    /// `routing = "balanced"`: fairseq's auction only for k = 1, all experts, the logits as given.
    fn check_balanced(&self) -> Result<()> {
        if self.routing != RoutingAlgorithm::Balanced {
            return Ok(());
        }
        if self.top_k != 1 && self.balanced_solver == BalancedSolver::FairseqAuction {
            return Err(RouterError::config(
                "top_k",
                self.top_k,
                "must be 1 with balanced_solver='fairseq_auction' (fairseq's auction gives one expert per token; \
                 balanced_solver='exact' takes any top_k)",
            ));
        }
        if let Some(g) = self.num_groups {
            return Err(RouterError::config(
                "num_groups",
                g,
                "must be None: routing='balanced' assigns from all experts",
            ));
        }
        if self.seq_load_balance_loss_coeff != 0.0 {
            return Err(RouterError::config(
                "seq_load_balance_loss_coeff",
                self.seq_load_balance_loss_coeff,
                "must be 0: routing='balanced' fixes every expert's load in training (no sequence-level loss)",
            ));
        }
        if self.jitter_eps > 0.0 || self.noise_std > 0.0 {
            let field = if self.jitter_eps > 0.0 { "jitter_eps" } else { "noise_std" };
            return Err(RouterError::config(
                field,
                self.jitter_eps.max(self.noise_std),
                "must be 0: routing='balanced' assigns by the logits as given",
            ));
        }
        Ok(())
    }

    /// `weight_scale` in (0, float32 max], `reroute_weight_scale` in [0, float32 max],
    /// and `weight_scale * max(1, reroute_weight_scale) <= float32 max`: a weight is
    /// at most 1 before scaling, so every weight the configuration can produce
    /// (rerouted ones included) is a finite float32.
    fn check_weight_factors(&self) -> Result<()> {
        let (scale, reroute) = (self.weight_scale, self.reroute_weight_scale);
        if !(scale.is_finite() && scale > 0.0 && scale <= WEIGHT_MAX) {
            return Err(RouterError::config(
                "weight_scale",
                format!("{scale:?}"),
                format!("must be a number > 0 and <= {WEIGHT_MAX:e} (the float32 maximum: weights are float32)"),
            ));
        }
        if !(reroute.is_finite() && (0.0..=WEIGHT_MAX).contains(&reroute)) {
            return Err(RouterError::config(
                "reroute_weight_scale",
                format!("{reroute:?}"),
                format!("must be a number >= 0 and <= {WEIGHT_MAX:e} (the float32 maximum: weights are float32)"),
            ));
        }
        if scale * reroute.max(1.0) > WEIGHT_MAX {
            return Err(RouterError::config(
                "reroute_weight_scale",
                format!("{reroute:?}"),
                format!(
                    "weight_scale * reroute_weight_scale = {scale:e} * {reroute:e} must be <= {WEIGHT_MAX:e} \
                     (the float32 maximum): a rerouted weight can be that large"
                ),
            ));
        }
        Ok(())
    }
}

impl RouterConfig {
    /// The combinations of the peers' capacity rules that have no meaning: fairseq's
    /// formula exists for k <= 2 only, and an evaluation token fraction replaces the
    /// evaluation factor and the fixed capacity, so it cannot be given with them.
    fn check_peer_capacity(&self) -> Result<()> {
        if self.capacity_rounding == CapacityRounding::Fairseq && self.top_k > 2 {
            return Err(RouterError::config(
                "capacity_rounding",
                "'fairseq'",
                format!("fairseq's capacity formulas are for top-1 and top-2 gating; top_k = {}", self.top_k),
            ));
        }
        if let Some(fraction) = &self.eval_capacity_token_fraction {
            let other = match (&self.eval_capacity_factor, self.expert_capacity) {
                (Some(_), _) => Some("eval_capacity_factor"),
                (None, Some(_)) => Some("expert_capacity"),
                (None, None) => None,
            };
            if let Some(other) = other {
                return Err(RouterError::config(
                    "eval_capacity_token_fraction",
                    fraction.to_f64(),
                    format!("sets the evaluation capacity, and so does {other}: give one of them"),
                ));
            }
        }
        Ok(())
    }
}

/// Largest `num_experts` (and so `top_k` and group counts): expert ids are int32.
const MAX_EXPERTS: usize = i32::MAX as usize;

/// An integer field in `[minimum, maximum]`: an `int` (never a bool or a float,
/// which are the wrong type); one outside the range is a bad value.
pub(crate) fn integer<T: TryFrom<i128>>(
    field: &'static str,
    value: &FieldValue,
    minimum: i128,
    maximum: i128,
) -> Result<T> {
    let range =
        || RouterError::config(field, value, format!("must be an integer in {}", integer_range(minimum, maximum)));
    match value {
        FieldValue::Int(i) if (minimum..=maximum).contains(i) => T::try_from(*i).map_err(|_| range()),
        FieldValue::Int(_) | FieldValue::BigInt(_) => Err(range()),
        _ => Err(RouterError::wrong_type(field, value, "must be an int (not a float or a bool)")),
    }
}

/// A `usize` field in `[minimum, maximum]` (see [`integer`]).
fn count(field: &'static str, value: &FieldValue, minimum: usize, maximum: usize) -> Result<usize> {
    let wide = |n: usize| i128::try_from(n).unwrap_or(i128::MAX);
    integer(field, value, wide(minimum), wide(maximum))
}

/// `[minimum, maximum]` as messages print it, with the powers of two a user
/// recognizes spelled as such (`2**64 - 1`).
pub fn integer_range(minimum: i128, maximum: i128) -> String {
    let show = |n: i128| match (1..=127).find(|&p| n == (1i128 << p) - 1) {
        Some(p) if p >= 31 => format!("2**{p} - 1"),
        _ => n.to_string(),
    };
    format!("[{}, {}]", show(minimum), show(maximum))
}

pub(crate) fn boolean(field: &'static str, value: &FieldValue) -> Result<bool> {
    match value {
        FieldValue::Bool(b) => Ok(*b),
        _ => Err(RouterError::wrong_type(field, value, "must be True or False (a bool)")),
    }
}

pub(crate) fn real(field: &'static str, value: &FieldValue) -> Result<f64> {
    match value {
        FieldValue::Real { value, .. } => Ok(*value),
        FieldValue::Int(i) => Ok(*i as f64),
        FieldValue::BigInt(_) => Err(RouterError::config(field, value, "must be a finite real number")),
        _ => Err(RouterError::wrong_type(field, value, "must be a real number (an int or a float)")),
    }
}

fn text<'v>(field: &'static str, value: &'v FieldValue) -> Result<&'v str> {
    match value {
        FieldValue::Text(t) => Ok(t),
        _ => Err(RouterError::wrong_type(field, value, "must be a string")),
    }
}

fn spelled<T: Spelled>(value: &FieldValue) -> Result<T> {
    match value {
        FieldValue::Text(t) => T::parse_spelling(t),
        _ => {
            let allowed: Vec<String> = T::SPELLINGS.iter().map(|(s, _)| format!("'{s}'")).collect();
            Err(RouterError::wrong_type(T::FIELD, value, &format!("must be one of {}", allowed.join(", "))))
        }
    }
}

fn optional<T>(value: &FieldValue, parse: impl FnOnce(&FieldValue) -> Result<T>) -> Result<Option<T>> {
    match value {
        FieldValue::None => Ok(None),
        v => parse(v).map(Some),
    }
}

/// A capacity factor: a finite number > 0 (exact decimal), or None for dropless.
///
/// `+inf` is refused, not taken as dropless: the message names the spelling that
/// is (`None`, or `'dropless'` for `eval_capacity_factor`, where None means "as
/// `capacity_factor`"). A finite factor so large that the capacity exceeds
/// 2^64 - 1 is accepted and means no limit (`crate::capacity`).
fn factor(field: &'static str, value: &FieldValue) -> Result<CapacityFactor> {
    let refuse = |why: &str| RouterError::config(field, value, format!("{why}; {}", dropless_hint(field)));
    match value {
        FieldValue::None => Ok(CapacityFactor::Dropless),
        FieldValue::Real { value: v, .. } if !(v.is_finite() && *v > 0.0) => Err(refuse("must be a finite number > 0")),
        FieldValue::Real { text, .. } => Decimal::parse_factor(field, text).map(CapacityFactor::Factor),
        FieldValue::Int(i) if *i > 0 => Decimal::parse_factor(field, &i.to_string()).map(CapacityFactor::Factor),
        FieldValue::BigInt(t) if !t.starts_with('-') => Decimal::parse_factor(field, t).map(CapacityFactor::Factor),
        FieldValue::Int(_) | FieldValue::BigInt(_) => Err(refuse("must be > 0")),
        _ => Err(RouterError::wrong_type(field, value, &format!("must be a number > 0; {}", dropless_hint(field)))),
    }
}

/// A share of the tokens: a finite number > 0, exact as the decimal it prints as.
fn token_fraction(field: &'static str, value: &FieldValue) -> Result<Decimal> {
    let refuse = || RouterError::config(field, value, "must be a finite number > 0 (a share of the tokens), or None");
    match value {
        FieldValue::Real { value: v, .. } if !(v.is_finite() && *v > 0.0) => Err(refuse()),
        FieldValue::Real { text, .. } | FieldValue::BigInt(text) if !text.starts_with('-') => {
            Decimal::from_decimal_str(text).filter(|d| !d.is_zero()).ok_or_else(refuse)
        }
        FieldValue::Int(i) if *i > 0 => Ok(Decimal::from_parts(i.unsigned_abs(), 0)),
        FieldValue::Real { .. } | FieldValue::Int(_) | FieldValue::BigInt(_) => Err(refuse()),
        _ => Err(RouterError::wrong_type(field, value, "must be a number > 0 (a share of the tokens), or None")),
    }
}

/// How to ask for dropless routing through `field`.
fn dropless_hint(field: &str) -> &'static str {
    if field == "eval_capacity_factor" {
        "use eval_capacity_factor='dropless' for dropless evaluation (None means: as capacity_factor)"
    } else {
        "use capacity_factor=None for dropless routing (no capacity limit)"
    }
}

fn factor_value(factor: &CapacityFactor) -> FieldValue {
    match factor {
        CapacityFactor::Factor(d) => {
            let value = d.to_f64();
            // Shortest round-trip text of the float; if it is the same decimal, a float carries it.
            let exact = Decimal::from_decimal_str(&format!("{value}")) == Some(*d);
            FieldValue::Real { value, text: d.to_string(), exact }
        }
        CapacityFactor::Fixed(n) => FieldValue::Int(*n as i128),
        CapacityFactor::Dropless => FieldValue::None,
    }
}

fn float_value(value: f64) -> FieldValue {
    FieldValue::Real { value, text: format!("{value:?}"), exact: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(i: i128) -> FieldValue {
        FieldValue::Int(i)
    }

    #[test]
    fn defaults_are_valid() {
        assert!(RouterConfig::default().validate().is_ok());
        assert!(RouterConfig::new(8, 2).validate().is_ok());
    }

    #[test]
    fn top_k_above_experts_names_the_field() {
        let err = RouterConfig::new(4, 5).validate().unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }

    #[test]
    fn groups_must_divide_experts_and_reach_k() {
        let err = RouterConfig::from_fields([("num_experts", int(6)), ("num_groups", int(4)), ("group_top_k", int(1))])
            .unwrap_err();
        assert!(err.to_string().contains("num_groups"), "{err}");
        let err = RouterConfig::from_fields([
            ("num_experts", int(8)),
            ("top_k", int(3)),
            ("num_groups", int(4)),
            ("group_top_k", int(1)),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }

    #[test]
    fn every_field_reads_back_what_was_set() {
        let defaults = RouterConfig::default();
        for name in RouterConfig::FIELDS {
            let value = defaults.field(name).unwrap_or_else(|| panic!("no getter for {name}"));
            let again = RouterConfig::from_fields([(*name, value.clone())]).expect(name);
            assert_eq!(again, defaults, "{name} = {value}");
        }
    }

    #[test]
    fn spellings_round_trip() {
        for p in Peer::spellings() {
            assert_eq!(p.parse::<Peer>().map(|x| x.to_string()).as_deref(), Ok(p));
        }
        for s in ["max", "top2_sum", "top3_sum"] {
            assert_eq!(s.parse::<GroupScore>().map(|x| x.to_string()).as_deref(), Ok(s));
        }
        assert!("top0_sum".parse::<GroupScore>().is_err() && "Position".parse::<DropPolicy>().is_err());
    }

    #[test]
    fn alias_of_top_k() {
        let c = RouterConfig::from_fields([(TOP_K_ALIAS, int(3))]).expect("alias");
        assert_eq!(c.top_k, 3);
        let err = RouterConfig::from_fields([("top_k", int(2)), (TOP_K_ALIAS, int(3))]).unwrap_err();
        assert!(err.to_string().contains(TOP_K_ALIAS) && err.to_string().contains("top_k"));
    }
}

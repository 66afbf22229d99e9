//! `moe_router_core`: Mixture-of-Experts token routing in pure Rust.
//!
//! Given router logits `[T, E]` (or a hidden-state GEMM that produces them chunk
//! by chunk), [`route`] decides for every token its k experts, their combine
//! weights, which assignments survive the per-expert capacity and in which
//! slot, and the auxiliary losses. The semantics are those of the project's
//! SPEC.md; every parallel pass gives exactly the sequential result, whatever
//! the thread count (rayon's current pool is used) and whatever the vector
//! instruction set (`MOE_ROUTER_SIMD` caps it; see [`SimdLevel`]).
//!
//! Inside, one concept per (private) module: `source` (where logits come
//! from), `linear` and `gate` (sources computed from hidden states), `route`
//! (the pipeline), `expert_choice` (the other routing algorithm), `row` (one token), `score`, `topk`, `groups`, `assign`
//! (capacity slots), `weights` (normalization and renormalization), `replay` (a recorded selection), `reroute`,
//! `capacity` and `decimal` (the capacity formula and its exact factor), `losses`, `global_balance` (statistics of a global batch and the balancing updates made from them), `math` and `simd` (row kernels and
//! their instruction set), `rng`, `config`, `error`; after routing, `token_experts` (each token's experts, CSR), `dispatch` (the expert-major
//! row plan and its gathers/scatters), `payload` (the element types it moves)
//! `layouts` (the frameworks' own dispatch formats), and for expert
//! parallelism `placement` (experts on ranks), `eplb` (placement advice from
//! expert loads, DeepSeek's EPLB) and `exchange` (the all-to-all plan); for
//! bookkeeping over many calls, `routing_stats` (totals, utilization, latencies),
//! `load_balancer` (load EMA and the aux-loss-free bias) and `reductions` (the
//! float64 sums, moments and percentiles they report, with NumPy's bits).
//!
//! ```
//! use moe_router_core::{route_logits, RouteCall, RouterConfig};
//! use ndarray::array;
//! let logits = array![[2.0f32, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]];
//! let options = RouterConfig::new(4, 2);
//! let r = route_logits(logits.view(), &options, &RouteCall::default()).unwrap();
//! assert_eq!(r.expert_indices, vec![0, 1, 1, 2]);
//! ```

#![deny(missing_docs)]

mod array_arg;
mod assign;
mod backward;
mod balanced;
mod balanced_auction;
mod balanced_exact;
mod block_lanes;
mod capacity;
mod combine_kernel;
mod config;
mod decimal;
mod dispatch;
mod eplb;
mod error;
mod exchange;
mod exp32;
mod expert_choice;
mod filled;
mod float32;
mod gate;
mod gate_backward;
mod global_balance;
mod groups;
pub mod huge_pages;
mod layouts;
mod linear;
mod linear_backward;
mod load_balancer;
mod losses;
mod math;
mod payload;
mod peer_loss;
mod placement;
mod presets;
mod reductions;
mod replay;
mod reroute;
mod rng;
mod route;
mod routing_stats;
mod row;
mod row_block;
mod row_moves;
mod score;
mod simd;
mod sinkhorn;
mod source;
mod token_experts;
mod topk;
mod weights;

pub use array_arg::ArrayArg;
pub use backward::{backward_logits, Cotangents, SavedRouting, WeightGrads};
pub use capacity::{capacity_limit, expert_capacity};
pub use config::{
    integer_range, BalancedSolver, CapacityFactor, CapacityRounding, DropPolicy, FieldValue, GroupLimit, GroupScore,
    GroupScoreInput, Overflow, Peer, RouterConfig, RoutingAlgorithm, ScoreFunction, ScorePrecision, TOP_K_ALIAS,
};
pub use decimal::Decimal;
pub use dispatch::{gather_rows, Assignments, DispatchPlan, PlanLayout};
pub use eplb::{imbalance, plan_placement, total_load, PlacementPlan, PlacementRequest, MAX_PHYSICAL_SLOTS};
pub use error::{Result, RouterError};
pub use exchange::{ReceivePlan, SendPlan};
pub use gate::{gate_probabilities, GateShape, HierarchicalGate};
pub use gate_backward::{backward_gate, GateGrads};
pub use global_balance::{expert_quantiles, sign_bias_update, GlobalBalance};
pub use layouts::{dense_masks, megatron_routing_map, moe_align_block_size, BlockAlignment};
pub use linear::{GemmScalar, LinearLogits};
pub use linear_backward::{backward_linear, LinearGrads};
pub use load_balancer::{
    default_bias_update_rate, BalanceSnapshot, BalancerSettings, LoadBalancer, DEFAULT_EMA_DECAY,
    DEFAULT_IMBALANCE_THRESHOLD, DEFAULT_LOAD_HISTORY, DEFAULT_RELATIVE_BIAS_RATE, DEFAULT_WARMUP_STEPS,
    WELL_BALANCED_CV,
};
pub use payload::Payload;
pub use peer_loss::{peer_load_balance_loss, plain_topk_counts, LossInputs};
pub use placement::ExpertPlacement;
pub use presets::{accepted_names, preset, PRESETS};
pub use replay::{differing_tokens, Replay};
pub use rng::{normal as keyed_normal, uniform as keyed_uniform, Stream as RngStream};
pub use route::{chunk_tokens, route, route_into, route_logits, RouteCall, Routing, CHUNK_TOKENS};
pub use routing_stats::{Averaged, CallRecord, Latencies, RoutingStats, Totals, UtilizationSummary};
pub use simd::{simd_level, SimdLevel};
pub use sinkhorn::{sinkhorn_balance, SinkhornBalance};
pub use source::{ChunkBuf, ChunkRows, Logit, LogitSource, SliceLogits};
pub use token_experts::{token_experts, TokenExperts};

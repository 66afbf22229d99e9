//! `moe_router_core`: Mixture-of-Experts token routing in pure Rust.
//!
//! Given router logits `[T, E]` (or a hidden-state GEMM that produces them chunk
//! by chunk), [`route`] decides for every token its k experts, their combine
//! weights, which assignments survive the per-expert capacity and in which
//! slot, and the auxiliary losses. The semantics are those of the project's
//! SPEC.md; every parallel pass gives exactly the sequential result, whatever
//! the thread count (rayon's current pool is used).
//!
//! ```
//! use moe_router_core::{route_logits, RouteCall, RouterOptions};
//! use ndarray::array;
//! let logits = array![[2.0f32, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]];
//! let options = RouterOptions::new(4, 2);
//! let r = route_logits(logits.view(), &options, &RouteCall::default()).unwrap();
//! assert_eq!(r.expert_indices, vec![0, 1, 1, 2]);
//! ```

mod array_arg;
mod assign;
pub mod capacity;
pub mod config;
pub mod error;
pub mod gate;
pub mod linear;
pub mod losses;
mod math;
mod peer_loss;
mod reroute;
pub mod rng;
pub mod route;
mod row;
pub mod score;
pub mod topk;

pub use array_arg::ArrayArg;
pub use capacity::{expert_capacity, Decimal};
pub use config::RouterOptions;
pub use config::{
    CapacityFactor, CapacityRounding, DropPolicy, FieldValue, GroupLimit, GroupScore, GroupScoreInput, Overflow, Peer,
    RouterConfig, ScoreFunction, TOP_K_ALIAS,
};
pub use error::{Result, RouterError};
pub use gate::{gate_probabilities, GateShape, HierarchicalGate};
pub use linear::{GemmScalar, LinearLogits};
pub use peer_loss::{peer_load_balance_loss, LossInputs};
pub use route::{
    chunk_tokens, route, route_logits, ChunkBuf, ChunkRows, Logit, LogitSource, RouteCall, Routing, SliceLogits,
    CHUNK_TOKENS,
};

//! `RouteOptions`: the validated, typed form of a Python `RouterConfig`.

use moe_router_core::{
    CapacityFactor, CapacityRounding, Decimal, DropPolicy, GroupLimit, GroupScore, GroupScoreInput, Overflow,
    RouterError as CoreError, RouterOptions, ScoreFunction,
};
use pyo3::prelude::*;

use crate::errors::to_py;

/// Routing options checked by the core; built by `RouterConfig`, not by users.
#[pyclass(frozen, name = "RouteOptions", module = "moe_router._core")]
pub struct PyRouteOptions {
    pub inner: RouterOptions,
}

fn choice<T: Copy>(field: &'static str, value: &str, table: &[(&str, T)]) -> PyResult<T> {
    table.iter().find(|(name, _)| *name == value).map(|(_, v)| *v).ok_or_else(|| {
        let allowed: Vec<String> = table.iter().map(|(n, _)| format!("{n:?}")).collect();
        to_py(CoreError::InvalidConfig {
            field,
            value: format!("{value:?}"),
            allowed: format!("must be one of {}", allowed.join(", ")),
        })
    })
}

/// "max", "top2_sum" or "top{n}_sum".
fn parse_group_score(text: &str) -> PyResult<GroupScore> {
    match text {
        "max" => Ok(GroupScore::Max),
        "top2_sum" => Ok(GroupScore::Top2Sum),
        _ => text
            .strip_prefix("top")
            .and_then(|r| r.strip_suffix("_sum"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n >= 1)
            .map(GroupScore::TopSum)
            .ok_or_else(|| {
                to_py(CoreError::InvalidConfig {
                    field: "group_score",
                    value: format!("{text:?}"),
                    allowed: "must be \"max\", \"top2_sum\" or \"top<n>_sum\" (n >= 1)".into(),
                })
            }),
    }
}

fn factor(field: &'static str, text: Option<&str>) -> PyResult<CapacityFactor> {
    match text {
        None => Ok(CapacityFactor::Dropless),
        Some(t) => Decimal::parse_factor(field, t).map(CapacityFactor::Factor).map_err(to_py),
    }
}

#[pymethods]
impl PyRouteOptions {
    /// Capacity factors are passed as their decimal text (`repr(float)`), None for dropless;
    /// `eval_capacity_factor` is None for "same as capacity_factor" or "dropless".
    #[new]
    #[pyo3(signature = (*, num_experts, top_k, score_function, normalize_weights, weight_scale, capacity_factor,
        eval_capacity_factor, min_capacity, capacity_rounding, drop_policy, renormalize_after_drop, num_groups,
        group_top_k, group_score, overflow, reroute_weight_scale, expert_dropout, jitter_eps, noise_std, seed,
        expert_capacity=None, group_score_input="scores"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_experts: usize,
        top_k: usize,
        score_function: &str,
        normalize_weights: bool,
        weight_scale: f64,
        capacity_factor: Option<&str>,
        eval_capacity_factor: Option<&str>,
        min_capacity: usize,
        capacity_rounding: &str,
        drop_policy: &str,
        renormalize_after_drop: bool,
        num_groups: Option<usize>,
        group_top_k: Option<usize>,
        group_score: &str,
        overflow: &str,
        reroute_weight_scale: f64,
        expert_dropout: f64,
        jitter_eps: f64,
        noise_std: f64,
        seed: u64,
        expert_capacity: Option<usize>,
        group_score_input: &str,
    ) -> PyResult<Self> {
        let score_function = choice(
            "score_function",
            score_function,
            &[("softmax", ScoreFunction::Softmax), ("sigmoid", ScoreFunction::Sigmoid)],
        )?;
        let capacity_rounding = choice(
            "capacity_rounding",
            capacity_rounding,
            &[
                ("exact", CapacityRounding::Exact),
                ("megatron", CapacityRounding::Megatron),
                ("deepspeed", CapacityRounding::DeepSpeed),
            ],
        )?;
        let drop_policy = choice(
            "drop_policy",
            drop_policy,
            &[
                ("position", DropPolicy::Position),
                ("rank", DropPolicy::Rank),
                ("probs", DropPolicy::Probs),
                ("bpr", DropPolicy::Bpr),
            ],
        )?;
        let group_score = parse_group_score(group_score)?;
        let group_score_input = choice(
            "group_score_input",
            group_score_input,
            &[("scores", GroupScoreInput::Scores), ("logits", GroupScoreInput::Logits)],
        )?;
        let overflow = choice("overflow", overflow, &[("drop", Overflow::Drop), ("reroute", Overflow::Reroute)])?;
        let groups = match (num_groups, group_top_k) {
            (None, None) => None,
            (Some(n), Some(m)) => Some(GroupLimit { num_groups: n, group_top_k: m, group_score }),
            (Some(_), None) => {
                return Err(to_py(CoreError::InvalidConfig {
                    field: "group_top_k",
                    value: "None".into(),
                    allowed: "must be set when num_groups is set".into(),
                }))
            }
            (None, Some(m)) => {
                return Err(to_py(CoreError::InvalidConfig {
                    field: "num_groups",
                    value: "None".into(),
                    allowed: format!("must be set when group_top_k = {m} is set"),
                }))
            }
        };
        let eval_capacity_factor = match eval_capacity_factor {
            None => None,
            Some("dropless") => Some(CapacityFactor::Dropless),
            Some(t) => Some(factor("eval_capacity_factor", Some(t))?),
        };
        let inner = RouterOptions {
            num_experts,
            top_k,
            score_function,
            normalize_weights,
            weight_scale,
            capacity_factor: match expert_capacity {
                Some(n) => CapacityFactor::Fixed(n),
                None => factor("capacity_factor", capacity_factor)?,
            },
            eval_capacity_factor,
            min_capacity,
            capacity_rounding,
            drop_policy,
            renormalize_after_drop,
            groups,
            group_score_input,
            overflow,
            reroute_weight_scale,
            reroute_probability: expert_dropout,
            jitter_eps,
            noise_std,
            seed,
        };
        inner.validate().map_err(to_py)?;
        Ok(PyRouteOptions { inner })
    }

    /// Capacity for `active_tokens` tokens in training or evaluation mode (None when dropless).
    #[pyo3(signature = (active_tokens, training=false))]
    fn capacity(&self, active_tokens: usize, training: bool) -> Option<usize> {
        let o = &self.inner;
        moe_router_core::expert_capacity(
            o.capacity_factor_for(training),
            o.capacity_rounding,
            o.min_capacity,
            active_tokens,
            o.top_k,
            o.num_experts,
        )
    }

    fn __repr__(&self) -> String {
        format!("RouteOptions({:?})", self.inner)
    }
}

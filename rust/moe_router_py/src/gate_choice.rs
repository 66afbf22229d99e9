//! Which router an `ExpertRouter` builds: the linear router or the hierarchical gate.

use moe_router_core::{RoutingAlgorithm, ScoreFunction};
use pyo3::prelude::*;

use crate::args::py::check_choice;
use crate::errors::config_error;
use crate::inputs;

/// Whether ``ExpertRouter(config, gate=gate, ...)`` uses the hierarchical gate.
///
/// ``gate`` is ``"auto"``, ``"linear"`` or ``"hierarchical"``; "auto" picks the
/// hierarchical gate when E > 32, no ``weight`` is given and the routing is not
/// Sinkhorn (which balances logits, which the gate does not produce). The
/// ``given_*`` flags say whether the caller passed ``weight``, ``bias`` and
/// ``group_top_k``. Raises ``ConfigError`` for a combination the chosen router
/// cannot honour, ``ConfigTypeError`` for ``config`` or ``gate`` of the wrong type.
#[pyfunction]
pub fn hierarchical_gate(
    config: &Bound<'_, PyAny>,
    gate: &Bound<'_, PyAny>,
    given_weight: bool,
    given_bias: bool,
    given_group_top_k: bool,
) -> PyResult<bool> {
    let config = &inputs::config(config)?.get().inner;
    let allowed = ("auto", "linear", "hierarchical").into_pyobject(gate.py())?;
    let gate: String = check_choice(gate, "gate", allowed.as_any(), None)?.extract()?;
    let logits_only = config.routing == RoutingAlgorithm::Sinkhorn;
    let auto = gate == "auto" && !given_weight && config.num_experts > 32 && !logits_only;
    if !(gate == "hierarchical" || auto) {
        if given_group_top_k {
            return Err(config_error(
                "invalid group_top_k: only the hierarchical gate computes groups (use num_groups/group_top_k in \
                 RouterConfig for group-limited routing)"
                    .into(),
            ));
        }
        return Ok(false);
    }
    let refused = if logits_only {
        "routing='sinkhorn' balances logits, and the hierarchical gate gives probabilities; use gate='linear'"
            .to_string()
    } else if given_weight || given_bias {
        "'hierarchical' has its own weights; weight and bias apply to the linear router (gate='linear')".into()
    } else if config.score_function != ScoreFunction::Softmax {
        format!(
            "the hierarchical gate computes its own probabilities (softmax of groups times softmax within groups); \
             score_function='{}' applies to the linear router (gate='linear')",
            config.score_function
        )
    } else if config.jitter_eps > 0.0 || config.noise_std > 0.0 {
        "jitter_eps and noise_std perturb logits; the hierarchical gate routes probabilities (use gate='linear' \
         for noisy routing)"
            .into()
    } else {
        return Ok(true);
    };
    Err(config_error(format!("invalid gate: {refused}")))
}

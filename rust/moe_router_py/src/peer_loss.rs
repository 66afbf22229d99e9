//! `peer_load_balance_loss`: a decision's load-balance loss as a peer framework
//! computes it (`moe_router_core::peer_load_balance_loss`), with Megatron-Core's
//! plain top-k counted by the core from the logits when they are given.

use moe_router_core::{self as core, Peer, SliceLogits};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::config::PyRouterConfig;
use crate::decision::RoutingDecision;
use crate::errors::{config_error, to_py, type_error, unreadable, wrong_scalar, Family};
use crate::{arg, borrow, threads, FLOAT_ARRAY};

/// The load-balance loss of ``decision`` as framework ``config_or_preset_name``
/// computes it (coefficient 1): a preset's ``RouterConfig``, a ``RouterConfig.peer``
/// value, or ``"deepspeed"`` for the DeepSpeed gate of the decision's k.
/// Megatron-Core's ``n_e`` come from ``logits`` (``[T, E]`` C-contiguous
/// float32/float64, ``batch_shape`` the input's leading shape, ``token_mask``
/// bool ``[T]``) when given, else from the plain top-k counts the decision kept.
/// Raises ``ConfigError`` for an unknown peer or a configuration without one,
/// ``InputError`` for logits that do not match the decision.
#[pyfunction]
#[pyo3(signature = (decision, config_or_preset_name, logits=None, batch_shape=None, token_mask=None))]
pub fn peer_load_balance_loss(
    py: Python<'_>,
    decision: &Bound<'_, PyAny>,
    config_or_preset_name: &Bound<'_, PyAny>,
    logits: Option<&Bound<'_, PyAny>>,
    batch_shape: Option<Vec<usize>>,
    token_mask: Option<&Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let Ok(routed) = decision.cast::<RoutingDecision>() else {
        let kind = decision.get_type().name()?;
        return Err(type_error(Family::Input, format!("decision must be a RoutingDecision, got {kind}")));
    };
    let routed = routed.get();
    let peer = peer_of(config_or_preset_name, routed.top_k())?;
    let plain = match (peer, logits) {
        (Peer::Megatron, Some(logits)) => {
            let ours = routed.batch_shape_vec(py)?;
            if let Some(shape) = batch_shape.filter(|s| *s != ours) {
                return Err(crate::errors::InputError::new_err(format!(
                    "logits have batch shape {shape:?}, the decision {ours:?}"
                )));
            }
            plain_counts(py, logits, routed.num_experts(), routed.top_k(), token_mask)?
        }
        _ => Vec::new(),
    };
    Ok(core::peer_load_balance_loss(peer, &routed.loss_inputs(&plain)))
}

/// The peer `value` names: a preset's configuration or a peer name (`"deepspeed"`: the gate of k).
fn peer_of(value: &Bound<'_, PyAny>, top_k: usize) -> PyResult<Peer> {
    let name = if let Ok(config) = value.cast::<PyRouterConfig>() {
        match config.get().inner.peer {
            Some(peer) => return Ok(peer),
            None => {
                return Err(config_error(
                    "the configuration has no peer (it was not made by a preset); pass a preset name, e.g. \
                     peer_load_balance_loss(decision, 'mixtral')"
                        .into(),
                ))
            }
        }
    } else if value.is_instance_of::<PyString>() {
        value.extract::<String>()?
    } else {
        let expected = "must be a RouterConfig made by a preset, or a preset or peer name";
        return Err(wrong_scalar(Family::Config, "config_or_preset_name", expected, value));
    };
    let spelled = match (name.as_str(), top_k) {
        ("deepspeed", 1) => "deepspeed_top1",
        ("deepspeed", 2) => "deepspeed_top2",
        ("deepspeed", _) => "deepspeed_topk",
        (other, _) => other,
    };
    spelled.parse().map_err(|_| {
        let known: Vec<String> = Peer::spellings().map(|p| format!("'{p}'")).collect();
        config_error(format!(
            "unknown peer '{name}'; expected 'deepspeed' or a RouterConfig.peer value ({})",
            known.join(", ")
        ))
    })
}

/// Megatron-Core's plain top-k counts of the `[T, E]` logits, computed by the core in the pool.
fn plain_counts(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    num_experts: usize,
    top_k: usize,
    token_mask: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<i64>> {
    let mask = token_mask.map(|m| borrow::<bool>(m, "token_mask", None)).transpose()?;
    let mask = mask.as_ref().map(|m| m.as_slice().map_err(|_| unreadable("token_mask", "it must be C-contiguous")));
    let mask = mask.transpose()?;
    with_dtype!(logits, "logits", FLOAT_ARRAY, [f32, f64], T => {
        let view = borrow::<T>(logits, "logits", None)?;
        let x = arg(&view, "logits")?;
        x.check_shape(&[None, Some(num_experts)], &format!("[T, {num_experts}]")).map_err(to_py)?;
        let t = view.shape()[0];
        let source = SliceLogits::new(x.data, t, num_experts).map_err(to_py)?;
        py.detach(|| threads::install(t, num_experts, || core::plain_topk_counts(&source, top_k, mask)))
            .map_err(to_py)
    })
}

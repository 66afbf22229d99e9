//! `RoutingDecision.backward`: the cotangents from Python, the saved call,
//! and the core's closed-form gradient, with the GIL released.

use moe_router_core::{self as core, Cotangents, RouteCall, SavedRouting, SliceLogits};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::decision::RoutingDecision;
use crate::errors::{config_error, to_py, unreadable, wrong_type};
use crate::plan::as_numpy;
use crate::threads;

const FLOAT_ARRAY: &str = "a C-contiguous float32 or float64 NumPy array";

/// The values of a real-valued array of `rows x width` (any leading shape
/// whose last axis is `width`), converted to `T`; finite values only.
fn cotangent<T: Element + Copy>(
    x: &Bound<'_, PyAny>,
    name: &'static str,
    rows: usize,
    width: usize,
    dtype: &str,
) -> PyResult<Vec<T>> {
    let array = as_numpy(x, name)?;
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "f" | "i" | "u") {
        return Err(wrong_type(name, "a real-valued array", &array));
    }
    let shape: Vec<usize> = array.getattr("shape")?.extract()?;
    if shape.last().copied() != Some(width) || shape.iter().product::<usize>() != rows * width {
        return Err(to_py(core::RouterError::shape(
            name,
            format!("[{rows}, {width}] (or the batch shape + [{width}])"),
            format!("{shape:?}"),
        )));
    }
    let finite: bool =
        array.py().import("numpy")?.getattr("isfinite")?.call1((&array,))?.call_method0("all")?.extract()?;
    if !finite {
        return Err(to_py(core::RouterError::NonFiniteParameter {
            argument: name,
            index: 0,
            value: "NaN or inf somewhere".into(),
        }));
    }
    let flat = array.call_method1("astype", (dtype,))?.call_method0("ravel")?;
    let view = flat.cast::<PyArrayDyn<T>>()?.readonly();
    Ok(view.as_slice().map_err(|e| unreadable(name, e))?.to_vec())
}

fn readonly<'py, T: Element>(a: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let typed = a.cast::<PyArrayDyn<T>>().map_err(|_| wrong_type(name, std::any::type_name::<T>(), a))?;
    typed.try_readonly().map_err(|e| unreadable(name, e))
}

/// See `RoutingDecision.backward`.
pub fn decision_backward<'py>(
    d: &RoutingDecision,
    py: Python<'py>,
    grad_expert_weights: Option<&Bound<'py, PyAny>>,
    grad_auxiliary_loss: f64,
    grad_router_probs: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (inputs, routed, original) = d.backward_parts();
    let inputs = inputs.ok_or_else(|| {
        config_error(
            "invalid backward: this decision was not routed from logits; for hidden states use \
             ExpertRouter.backward(decision)"
                .into(),
        )
    })?;
    if !grad_auxiliary_loss.is_finite() {
        return Err(config_error(format!("invalid grad_auxiliary_loss: got {grad_auxiliary_loss}; must be finite")));
    }
    let (t, k, e) = (d.total_tokens(), d.top_k(), d.num_experts());
    let gw = grad_expert_weights.map(|g| cotangent::<f64>(g, "grad_expert_weights", t, k, "float64")).transpose()?;
    let gp = grad_router_probs.map(|g| cotangent::<f32>(g, "grad_router_probs", t, e, "float32")).transpose()?;
    let (experts, kept, rerouted) = d.choice_arrays(py);
    let experts = readonly::<i32>(&experts, "expert_indices")?;
    let kept = readonly::<bool>(&kept, "kept")?;
    let rerouted = readonly::<bool>(&rerouted, "rerouted")?;
    let pre_drop = d.pre_drop_counts(py);
    let pre_drop = readonly::<i64>(&pre_drop, "pre_drop_tokens_per_expert")?;
    let mask = inputs.token_mask.as_ref().map(|m| readonly::<bool>(m.bind(py), "token_mask")).transpose()?;
    let experts = experts.as_slice().map_err(|e| unreadable("expert_indices", e))?;
    let saved = SavedRouting {
        expert_indices: experts,
        original_experts: if original.is_empty() { experts } else { original },
        routed,
        kept: kept.as_slice().map_err(|e| unreadable("kept", e))?,
        rerouted: rerouted.as_slice().map_err(|e| unreadable("rerouted", e))?,
        pre_drop_tokens_per_expert: pre_drop.as_slice().map_err(|e| unreadable("pre_drop_tokens_per_expert", e))?,
        active_tokens: d.active(),
    };
    let call = RouteCall {
        training: inputs.training,
        token_mask: mask.as_ref().map(|m| m.as_slice()).transpose().map_err(|e| unreadable("token_mask", e))?,
        step: inputs.step,
        sequence_length: inputs.sequence_length,
        ..RouteCall::default()
    };
    let cot =
        Cotangents { expert_weights: gw.as_deref(), auxiliary_loss: grad_auxiliary_loss, router_probs: gp.as_deref() };
    let mut shape = d.batch_shape_vec(py)?;
    shape.push(e);
    let logits = inputs.logits.bind(py);
    with_dtype!(logits, "logits", FLOAT_ARRAY, [f32, f64], F => {
        let view = readonly::<F>(logits, "logits")?;
        let data = view.as_slice().map_err(|e| unreadable("logits", e))?;
        let source = SliceLogits::new(data, t, e).map_err(to_py)?;
        let out = PyArrayDyn::<F>::zeros(py, &shape[..], false);
        {
            let mut guard = out.try_readwrite().map_err(|e| unreadable("out", e))?;
            let target = guard.as_slice_mut().map_err(|e| unreadable("out", e))?;
            py.detach(|| threads::install(t, e, || core::backward_logits(&source, &inputs.config, &call, &saved, &cot, target)))
                .map_err(to_py)?;
        }
        Ok(out.into_any())
    })
}

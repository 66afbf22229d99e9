//! `moe_router._core`: the bindings. One thin wrapper per core function: take
//! NumPy views, release the GIL, call the core in the configured thread pool,
//! move the results into NumPy arrays.

mod arrays;
mod errors;
mod options;
mod threads;

use moe_router_core::{
    self as core, gate_probabilities, route_logits as core_route, GemmScalar, HierarchicalGate, LinearLogits,
    LogitSource, RouteCall, RouterError as CoreError, Routing, ScoreFunction,
};
use numpy::{PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;
use crate::options::PyRouteOptions;

/// Route `[T, E]` logits (C-contiguous float32 or float64 NumPy array).
///
/// Returns a dict of arrays and scalars (see `moe_router.RoutingDecision`).
/// Raises `TypeError` for another dtype or rank, `InputError` / `ConfigError`
/// (both `ValueError`) for bad values.
#[pyfunction]
#[pyo3(signature = (logits, options, training=false, token_mask=None, expert_bias=None, step=0, sequence_length=None))]
#[allow(clippy::too_many_arguments)]
fn route_logits<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    options: &PyRouteOptions,
    training: bool,
    token_mask: Option<PyReadonlyArray1<'py, bool>>,
    expert_bias: Option<PyReadonlyArray1<'py, f64>>,
    step: u64,
    sequence_length: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let (mask, bias) = (contiguous(&token_mask, "token_mask")?, contiguous(&expert_bias, "expert_bias")?);
    let call =
        RouteCall { training, token_mask: mask, expert_bias: bias, step, sequence_length, ..RouteCall::default() };
    let opts = &options.inner;
    let routing = if let Ok(a) = logits.cast::<PyArray2<f32>>() {
        let view = readonly(a, "logits")?;
        let view = view.as_array();
        py.detach(|| threads::install(view.nrows(), view.ncols(), || core_route(view, opts, &call)))
    } else if let Ok(a) = logits.cast::<PyArray2<f64>>() {
        let view = readonly(a, "logits")?;
        let view = view.as_array();
        py.detach(|| threads::install(view.nrows(), view.ncols(), || core_route(view, opts, &call)))
    } else {
        return Err(PyTypeError::new_err(format!(
            "logits must be a 2-D float32 or float64 NumPy array, got {}",
            logits.get_type().name()?
        )));
    };
    decision_dict(py, routing.map_err(to_py)?)
}

/// Route `[T, D]` hidden states through the linear router `hidden @ weight + bias`
/// (weight `[D, E]`, bias `[E]` or None, all of the hidden states' dtype). The
/// product is computed chunk by chunk inside the routing pass.
#[pyfunction]
#[pyo3(signature = (hidden, weight, bias, options, training=false, token_mask=None, expert_bias=None, step=0, sequence_length=None))]
#[allow(clippy::too_many_arguments)]
fn route_hidden<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    options: &PyRouteOptions,
    training: bool,
    token_mask: Option<PyReadonlyArray1<'py, bool>>,
    expert_bias: Option<PyReadonlyArray1<'py, f64>>,
    step: u64,
    sequence_length: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let (mask, ebias) = (contiguous(&token_mask, "token_mask")?, contiguous(&expert_bias, "expert_bias")?);
    let call =
        RouteCall { training, token_mask: mask, expert_bias: ebias, step, sequence_length, ..RouteCall::default() };
    let opts = &options.inner;
    macro_rules! typed {
        ($t:ty) => {{
            let h = readonly(hidden.cast::<PyArray2<$t>>()?, "hidden")?;
            let w = readonly(weight.cast::<PyArray2<$t>>().map_err(|_| same_dtype("weight"))?, "weight")?;
            let b = match bias {
                Some(b) => Some(readonly(b.cast::<PyArray1<$t>>().map_err(|_| same_dtype("bias"))?, "bias")?),
                None => None,
            };
            let (t, d) = (h.shape()[0], h.shape()[1]);
            let (wd, e) = (w.shape()[0], w.shape()[1]);
            if wd != d {
                return Err(to_py(CoreError::Shape {
                    argument: "weight",
                    expected: format!("[{d}, E] (input_dim = {d} rows, one per hidden feature)"),
                    actual: format!("[{wd}, {e}]"),
                }));
            }
            let hs = h.as_slice().map_err(|_| PyValueError::new_err("hidden must be C-contiguous"))?;
            let ws = w.as_slice().map_err(|_| PyValueError::new_err("weight must be C-contiguous"))?;
            let bs = match &b {
                Some(b) => Some(b.as_slice().map_err(|_| PyValueError::new_err("bias must be C-contiguous"))?),
                None => None,
            };
            let source = LinearLogits::new(hs, t, d, ws, e, bs).map_err(to_py)?;
            py.detach(|| threads::install(t, e, || core::route(&source, opts, &call)))
        }};
    }
    let routing = if hidden.cast::<PyArray2<f32>>().is_ok() {
        typed!(f32)
    } else if hidden.cast::<PyArray2<f64>>().is_ok() {
        typed!(f64)
    } else {
        return Err(PyTypeError::new_err(format!(
            "hidden must be a 2-D float32 or float64 NumPy array, got {}",
            hidden.get_type().name()?
        )));
    };
    decision_dict(py, routing.map_err(to_py)?)
}

/// Route `[T, D]` hidden states through the hierarchical gate (group weight
/// `[D, G]`, expert weights `[G, D, P]`); `group_top_k` None is the dense gate.
/// The routing treats the gate's probabilities as the scores; the z-loss is the
/// group router's.
#[pyfunction]
#[pyo3(signature = (hidden, group_weight, expert_weight, group_top_k, options, training=false, token_mask=None, expert_bias=None, step=0, sequence_length=None))]
#[allow(clippy::too_many_arguments)]
fn route_gate<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    group_top_k: Option<usize>,
    options: &PyRouteOptions,
    training: bool,
    token_mask: Option<PyReadonlyArray1<'py, bool>>,
    expert_bias: Option<PyReadonlyArray1<'py, f64>>,
    step: u64,
    sequence_length: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let (mask, ebias) = (contiguous(&token_mask, "token_mask")?, contiguous(&expert_bias, "expert_bias")?);
    let call =
        RouteCall { training, token_mask: mask, expert_bias: ebias, step, sequence_length, ..RouteCall::default() };
    let mut opts = options.inner.clone();
    opts.score_function = ScoreFunction::Probabilities;
    opts.jitter_eps = 0.0;
    opts.noise_std = 0.0;
    let e = opts.num_experts;
    let routing = if hidden.cast::<PyArray2<f32>>().is_ok() {
        with_gate::<f32, _>(hidden, group_weight, expert_weight, e, group_top_k, |gate| {
            Ok(py
                .detach(|| threads::install(gate.num_tokens(), gate.num_experts(), || core::route(gate, &opts, &call))))
        })?
    } else if hidden.cast::<PyArray2<f64>>().is_ok() {
        with_gate::<f64, _>(hidden, group_weight, expert_weight, e, group_top_k, |gate| {
            Ok(py
                .detach(|| threads::install(gate.num_tokens(), gate.num_experts(), || core::route(gate, &opts, &call))))
        })?
    } else {
        return Err(PyTypeError::new_err("hidden must be a 2-D float32 or float64 NumPy array"));
    };
    decision_dict(py, routing.map_err(to_py)?)
}

/// Borrow the gate's arrays as `T` (the hidden states' dtype) and run `f` on the gate.
fn with_gate<'py, T: GemmScalar + numpy::Element, R>(
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    num_experts: usize,
    group_top_k: Option<usize>,
    f: impl FnOnce(&HierarchicalGate<'_, T>) -> PyResult<R>,
) -> PyResult<R> {
    let h = readonly(hidden.cast::<PyArray2<T>>()?, "hidden")?;
    let gw = readonly(group_weight.cast::<PyArray2<T>>().map_err(|_| same_dtype("group_weight"))?, "group_weight")?;
    let ew = readonly(expert_weight.cast::<PyArray3<T>>().map_err(|_| same_dtype("expert_weight"))?, "expert_weight")?;
    let (t, d) = (h.shape()[0], h.shape()[1]);
    let hs = h.as_slice().map_err(|_| PyValueError::new_err("hidden must be C-contiguous"))?;
    let gs = gw.as_slice().map_err(|_| PyValueError::new_err("group_weight must be C-contiguous"))?;
    let es = ew.as_slice().map_err(|_| PyValueError::new_err("expert_weight must be C-contiguous"))?;
    let gate = HierarchicalGate::new(hs, t, d, gs, es, num_experts, group_top_k).map_err(to_py)?;
    f(&gate)
}

/// The hierarchical gate's probabilities `[T, E]` and per-token z-loss terms `[T]`.
#[pyfunction]
#[pyo3(signature = (hidden, group_weight, expert_weight, num_experts, group_top_k=None))]
fn gate_forward<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    num_experts: usize,
    group_top_k: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    macro_rules! forward {
        ($t:ty) => {
            with_gate::<$t, _>(hidden, group_weight, expert_weight, num_experts, group_top_k, |gate| {
                let (probs, z) =
                    py.detach(|| threads::install(gate.num_tokens(), gate.num_experts(), || gate_probabilities(gate)));
                let t = z.len();
                Ok((arrays::matrix(py, probs, t, num_experts)?.into_any(), arrays::vector(py, z).into_any()))
            })
        };
    }
    if hidden.cast::<PyArray2<f32>>().is_ok() {
        forward!(f32)
    } else if hidden.cast::<PyArray2<f64>>().is_ok() {
        forward!(f64)
    } else {
        Err(PyTypeError::new_err("hidden must be a 2-D float32 or float64 NumPy array"))
    }
}

fn same_dtype(argument: &str) -> PyErr {
    PyTypeError::new_err(format!("{argument} must be a C-contiguous NumPy array of the hidden states' dtype"))
}

fn readonly<'py, T: numpy::Element, D: ndarray::Dimension>(
    a: &Bound<'py, numpy::PyArray<T, D>>,
    argument: &str,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    a.try_readonly().map_err(|e| PyValueError::new_err(format!("{argument} cannot be read: {e}")))
}

fn contiguous<'a, T: numpy::Element>(
    a: &'a Option<PyReadonlyArray1<'_, T>>,
    argument: &str,
) -> PyResult<Option<&'a [T]>> {
    a.as_ref()
        .map(|m| m.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err(format!("{argument} must be C-contiguous")))
}

fn decision_dict(py: Python<'_>, r: Routing) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let (t, k) = (r.num_tokens, r.top_k);
    d.set_item("expert_indices", arrays::matrix(py, r.expert_indices, t, k)?)?;
    d.set_item("expert_weights", arrays::matrix(py, r.expert_weights, t, k)?)?;
    d.set_item("expert_slots", arrays::matrix(py, r.expert_slots, t, k)?)?;
    d.set_item("kept", arrays::matrix(py, r.kept, t, k)?)?;
    // Empty when no reroute can happen: the Python layer fills in a lazily zeroed array.
    if !r.rerouted.is_empty() {
        d.set_item("rerouted", arrays::matrix(py, r.rerouted, t, k)?)?;
    }
    d.set_item("tokens_per_expert", arrays::vector(py, r.tokens_per_expert))?;
    d.set_item("pre_drop_tokens_per_expert", arrays::vector(py, r.pre_drop_tokens_per_expert))?;
    d.set_item("expert_prob_mean", arrays::vector(py, r.expert_prob_mean))?;
    d.set_item("capacity", r.capacity)?;
    d.set_item("dropless", r.dropless)?;
    d.set_item("active_tokens", r.active_tokens)?;
    d.set_item("kept_assignments", r.kept_assignments)?;
    d.set_item("dropped_assignments", r.dropped_assignments)?;
    d.set_item("tokens_dropped", r.tokens_dropped)?;
    d.set_item("load_balance_loss", r.load_balance_loss)?;
    d.set_item("router_z_loss", r.router_z_loss)?;
    d.set_item("seq_load_balance_loss", r.seq_load_balance_loss)?;
    Ok(d)
}

/// Use `n` threads for routing from now on (0: rayon's default, one per core).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    threads::set_num_threads(n).map_err(PyValueError::new_err)
}

/// Threads the next routing call will use.
#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRouteOptions>()?;
    m.add_function(wrap_pyfunction!(route_logits, m)?)?;
    m.add_function(wrap_pyfunction!(route_hidden, m)?)?;
    m.add_function(wrap_pyfunction!(route_gate, m)?)?;
    m.add_function(wrap_pyfunction!(gate_forward, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add("RouterError", m.py().get_type::<errors::RouterError>())?;
    m.add("ConfigError", m.py().get_type::<errors::ConfigError>())?;
    m.add("InputError", m.py().get_type::<errors::InputError>())?;
    m.add("CHUNK_TOKENS", moe_router_core::CHUNK_TOKENS)?;
    Ok(())
}

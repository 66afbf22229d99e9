//! `moe_router._core`: the bindings. One thin wrapper per core function: take
//! NumPy views, release the GIL, call the core in the configured thread pool,
//! move the results into NumPy arrays.

mod arrays;
mod errors;
mod options;
mod threads;

use moe_router_core::{route_logits as core_route, RouteCall, Routing};
use numpy::{PyArray2, PyArrayMethods, PyReadonlyArray1};
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
    let mask = token_mask
        .as_ref()
        .map(|m| m.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err("token_mask must be C-contiguous"))?;
    let bias = expert_bias
        .as_ref()
        .map(|b| b.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err("expert_bias must be C-contiguous"))?;
    let call = RouteCall { training, token_mask: mask, expert_bias: bias, step, sequence_length };
    let opts = &options.inner;
    let routing = if let Ok(a) = logits.cast::<PyArray2<f32>>() {
        let view = a.try_readonly().map_err(|e| PyValueError::new_err(format!("logits cannot be read: {e}")))?;
        let view = view.as_array();
        py.detach(|| threads::install(|| core_route(view, opts, &call)))
    } else if let Ok(a) = logits.cast::<PyArray2<f64>>() {
        let view = a.try_readonly().map_err(|e| PyValueError::new_err(format!("logits cannot be read: {e}")))?;
        let view = view.as_array();
        py.detach(|| threads::install(|| core_route(view, opts, &call)))
    } else {
        return Err(PyTypeError::new_err(format!(
            "logits must be a 2-D float32 or float64 NumPy array, got {}",
            logits.get_type().name()?
        )));
    };
    decision_dict(py, routing.map_err(to_py)?)
}

fn decision_dict(py: Python<'_>, r: Routing) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let (t, k) = (r.num_tokens, r.top_k);
    d.set_item("expert_indices", arrays::matrix(py, r.expert_indices, t, k)?)?;
    d.set_item("expert_weights", arrays::matrix(py, r.expert_weights, t, k)?)?;
    d.set_item("expert_slots", arrays::matrix(py, r.expert_slots, t, k)?)?;
    d.set_item("kept", arrays::matrix(py, r.kept, t, k)?)?;
    d.set_item("rerouted", arrays::matrix(py, r.rerouted, t, k)?)?;
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
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add("RouterError", m.py().get_type::<errors::RouterError>())?;
    m.add("ConfigError", m.py().get_type::<errors::ConfigError>())?;
    m.add("InputError", m.py().get_type::<errors::InputError>())?;
    m.add("CHUNK_TOKENS", moe_router_core::CHUNK_TOKENS)?;
    Ok(())
}

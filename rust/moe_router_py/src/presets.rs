//! Compatibility presets: Python values classified as the core's `FieldValue`
//! and handed to `moe_router_core::preset`, which holds every table, rule and
//! message (see `moe_router.presets` for the documentation of each preset).

use moe_router_core::{self as core, FieldValue};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::config::{fields_of, to_field, PyRouterConfig};
use crate::errors::to_py;

/// A ``RouterConfig`` that routes like preset ``name`` (``moe_router.presets.preset``).
#[pyfunction]
#[pyo3(signature = (name, num_experts, top_k=None, **overrides))]
pub fn preset_config(
    name: &Bound<'_, PyAny>,
    num_experts: &Bound<'_, PyAny>,
    top_k: Option<&Bound<'_, PyAny>>,
    overrides: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyRouterConfig> {
    let top_k = top_k.map(to_field).transpose()?.unwrap_or(FieldValue::None);
    let inner = core::preset(&to_field(name)?, &to_field(num_experts)?, &top_k, fields_of(overrides)?);
    Ok(PyRouterConfig { inner: inner.map_err(to_py)? })
}

/// Every override name ``preset_config`` accepts for preset ``name``: the framework's, then ours.
#[pyfunction]
pub fn preset_accepted_names(name: &Bound<'_, PyAny>) -> PyResult<Vec<&'static str>> {
    core::accepted_names(&to_field(name)?).map_err(to_py)
}

/// Add the preset functions and ``PRESETS`` (the names) to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(preset_config, m)?)?;
    m.add_function(wrap_pyfunction!(preset_accepted_names, m)?)?;
    m.add("PRESETS", PyTuple::new(m.py(), core::PRESETS)?)
}

//! Values as the statistics' reports show them: JSON-ready floats for the
//! `to_dict` methods built in Rust (a float that is not finite becomes None, as
//! JSON has no NaN or infinity: the rule of `moe_router._json.json_ready`,
//! applied without walking the dict in Python), and Python's `%g` formatting
//! for the reprs.

use pyo3::prelude::*;

/// `x`, or None when it is NaN or infinite.
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// [`finite`] of every value.
pub fn finite_all(xs: &[f64]) -> Vec<Option<f64>> {
    xs.iter().map(|&x| finite(x)).collect()
}

/// Python's ``format(x, spec)`` (``".4g"``, ...).
pub fn format_float(py: Python<'_>, x: f64, spec: &str) -> PyResult<String> {
    py.import("builtins")?.getattr("format")?.call1((x, spec))?.extract()
}

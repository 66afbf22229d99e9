//! JSON-ready floats for the `to_dict` methods built in Rust: a float that is
//! not finite becomes None (JSON has no NaN or infinity), the rule of
//! `moe_router._json.json_ready`, applied without walking the dict in Python.

/// `x`, or None when it is NaN or infinite.
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// [`finite`] of every value.
pub fn finite_all(xs: &[f64]) -> Vec<Option<f64>> {
    xs.iter().map(|&x| finite(x)).collect()
}

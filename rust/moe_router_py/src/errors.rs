//! The one place where errors become Python exceptions.
//!
//! `RouterError(ValueError)` is the package's base exception; `ConfigError`
//! (bad configuration) and `InputError` (bad arrays or values) derive from it,
//! so `except ValueError` still catches everything. A wrong Python type is a
//! `TypeError`, as for any Python function.

use moe_router_core::RouterError as CoreError;
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::PyErr;

create_exception!(
    moe_router,
    RouterError,
    PyValueError,
    "Base class of every error moe_router raises on bad configuration or input."
);
create_exception!(
    moe_router,
    ConfigError,
    RouterError,
    "A RouterConfig field, or a combination of fields, is invalid."
);
create_exception!(
    moe_router,
    InputError,
    RouterError,
    "An input array has the wrong shape, or holds a forbidden value (NaN, +inf, ...)."
);

/// Map a core error to the matching Python exception, message unchanged.
pub fn to_py(err: CoreError) -> PyErr {
    let message = err.to_string();
    match err {
        CoreError::InvalidConfig { .. } => ConfigError::new_err(message),
        CoreError::UnknownField { .. } => PyTypeError::new_err(message),
        CoreError::Shape { .. }
        | CoreError::BadValue { .. }
        | CoreError::NonFiniteParameter { .. }
        | CoreError::InvalidEntry { .. }
        | CoreError::Inconsistent { .. } => InputError::new_err(message),
    }
}

/// `argument` is not of the type the call takes (`expected`, e.g. "a 2-D float32 or float64 NumPy array").
pub fn wrong_type(argument: &str, expected: &str, got: &Bound<'_, PyAny>) -> PyErr {
    let kind = got.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    let described = match got.getattr("dtype") {
        Ok(dtype) => format!("{kind} of dtype {dtype}"),
        Err(_) => kind,
    };
    PyTypeError::new_err(format!("{argument} must be {expected}, got {described}"))
}

/// `argument` cannot be read as it is (not C-contiguous, or borrowed mutably elsewhere).
pub fn unreadable(argument: &str, why: impl std::fmt::Display) -> PyErr {
    InputError::new_err(format!("{argument} cannot be read: {why}"))
}

/// A configuration error the core does not know about (a binding-level argument).
pub fn config_error(message: String) -> PyErr {
    ConfigError::new_err(message)
}

/// A thread-count request out of range.
pub fn bad_threads(message: String) -> PyErr {
    ConfigError::new_err(message)
}

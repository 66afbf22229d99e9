//! The one place where core errors become Python exceptions.
//!
//! `RouterError(ValueError)` is the package's base exception; `ConfigError`
//! (bad configuration) and `InputError` (bad arrays or values) derive from it,
//! so `except ValueError` still catches everything.

use moe_router_core::RouterError as CoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
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
        CoreError::Shape { .. } | CoreError::BadValue { .. } | CoreError::NonFiniteParameter { .. } => {
            InputError::new_err(message)
        }
    }
}

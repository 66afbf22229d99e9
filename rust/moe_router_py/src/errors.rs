//! The one place where errors become Python exceptions.
//!
//! `RouterError(ValueError)` is the package's base exception; `ConfigError`
//! (bad configuration) and `InputError` (bad arrays or per-call values) derive
//! from it, so `except ValueError` still catches everything. An argument of the
//! wrong type raises `ConfigTypeError(ConfigError, TypeError)` or
//! `InputTypeError(InputError, TypeError)`: a `TypeError`, as for any Python
//! function, that `except ConfigError` / `except InputError` also catch.

use moe_router_core::RouterError as CoreError;
use numpy::{BorrowError, Element};
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyboardInterrupt, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
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

/// Which argument family a failure belongs to: configuration (RouterConfig fields,
/// presets, constructor settings, the thread count) or per-call input (arrays, flags, step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Config,
    Input,
}

static CONFIG_TYPE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INPUT_TYPE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `class name(base, TypeError)` in module `moe_router`, with docstring `doc`.
fn both(py: Python<'_>, name: &str, base: Bound<'_, PyType>, doc: &str) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", "moe_router")?;
    namespace.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, [base.into_any(), py.get_type::<PyTypeError>().into_any()])?;
    let made = py.get_type::<PyType>().call1((name, bases, namespace))?;
    Ok(made.cast_into::<PyType>()?.unbind())
}

/// The type of wrong-type errors of `family` (created on first use).
pub fn type_error_class(py: Python<'_>, family: Family) -> PyResult<&Bound<'_, PyType>> {
    let cell = match family {
        Family::Config => &CONFIG_TYPE_ERROR,
        Family::Input => &INPUT_TYPE_ERROR,
    };
    let ty = cell.get_or_try_init(py, || match family {
        Family::Config => both(
            py,
            "ConfigTypeError",
            py.get_type::<ConfigError>(),
            "A configuration value of the wrong type (a float for an integer field, an int for a flag, ...).\n\n\
             Both a ConfigError and a TypeError.",
        ),
        Family::Input => both(
            py,
            "InputTypeError",
            py.get_type::<InputError>(),
            "An input of the wrong type (a non-array, a bool or string array, an int for a flag, ...).\n\n\
             Both an InputError and a TypeError.",
        ),
    })?;
    Ok(ty.bind(py))
}

/// A wrong-type error of `family` with `message`.
pub fn type_error(family: Family, message: String) -> PyErr {
    Python::attach(|py| match type_error_class(py, family) {
        Ok(ty) => PyErr::from_type(ty.clone(), message),
        Err(e) => e,
    })
}

/// A bad value of `family` with `message`.
pub fn value_error(family: Family, message: String) -> PyErr {
    match family {
        Family::Config => ConfigError::new_err(message),
        Family::Input => InputError::new_err(message),
    }
}

/// Map a core error to the matching Python exception, message unchanged.
pub fn to_py(err: CoreError) -> PyErr {
    let message = err.to_string();
    match err {
        CoreError::InvalidConfig { .. } => ConfigError::new_err(message),
        CoreError::WrongType { .. } | CoreError::UnknownField { .. } | CoreError::Preset { wrong_type: true, .. } => {
            type_error(Family::Config, message)
        }
        CoreError::Preset { .. } => ConfigError::new_err(message),
        CoreError::Shape { .. }
        | CoreError::BadValue { .. }
        | CoreError::NonFiniteParameter { .. }
        | CoreError::InvalidEntry { .. }
        | CoreError::Inconsistent { .. }
        | CoreError::TooLarge { .. } => InputError::new_err(message),
        // The bindings cancel only on a signal, and raise the handler's own exception
        // then; this is for a handler that set the flag without raising.
        CoreError::Cancelled => PyKeyboardInterrupt::new_err(message),
    }
}

/// The type name of `value` and, for arrays, its dtype: "ndarray of dtype int32".
fn describe(value: &Bound<'_, PyAny>) -> String {
    let kind = value.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    match value.getattr("dtype") {
        Ok(dtype) => format!("{kind} of dtype {dtype}"),
        Err(_) => kind,
    }
}

/// Array `argument` is not of the type the call takes (`expected`, e.g. "a 2-D float32 or float64 NumPy array").
pub fn wrong_type(argument: &str, expected: &str, got: &Bound<'_, PyAny>) -> PyErr {
    type_error(Family::Input, format!("{argument} must be {expected}, got {}", describe(got)))
}

/// Scalar `argument` of `family` has the wrong type; `expected` reads "must be ...".
pub fn wrong_scalar(family: Family, argument: &str, expected: &str, got: &Bound<'_, PyAny>) -> PyErr {
    let shown = got.repr().map(|r| r.to_string()).unwrap_or_default();
    type_error(family, format!("invalid {argument}: got {shown} ({}); {expected}", describe(got)))
}

/// Scalar `argument` of `family` has the right type but a value outside `allowed` ("must be ...").
pub fn bad_scalar(family: Family, argument: &str, allowed: &str, got: &Bound<'_, PyAny>) -> PyErr {
    let shown = got.repr().map(|r| r.to_string()).unwrap_or_default();
    value_error(family, format!("invalid {argument}: got {shown}; {allowed}"))
}

/// `argument` cannot be read as it is (not C-contiguous, say).
pub fn unreadable(argument: &str, why: impl std::fmt::Display) -> PyErr {
    InputError::new_err(format!("{argument} cannot be read: {why}"))
}

/// An `out=` array that is not C-contiguous: results are written in place, row-major.
pub fn out_not_contiguous() -> PyErr {
    InputError::new_err("out must be C-contiguous: results are written into it in place, row-major (got a strided or Fortran-ordered array)")
}

/// NumPy's name of the dtype of `T` ("float32", "float16", "int64"), for messages:
/// the caller knows NumPy's names, not Rust's.
pub fn dtype_name<T: Element>(py: Python<'_>) -> String {
    numpy::dtype::<T>(py).to_string()
}

/// Input `argument` could not be borrowed for reading. Within one call the
/// inputs are borrowed before `out`, so the writer holding it is another call
/// (its `out=`), running in another thread while the GIL is released.
pub fn unborrowable(argument: &str, err: BorrowError) -> PyErr {
    match err {
        BorrowError::AlreadyBorrowed => InputError::new_err(format!(
            "{argument} cannot be read: another call running now writes it (as its out=); pass an array no \
             running call writes"
        )),
        other => unreadable(argument, other),
    }
}

/// `out` could not be borrowed for writing: read-only, or sharing memory with
/// one of `inputs` (name, array), the arrays the call reads, already borrowed.
pub fn unwritable_out(out: &Bound<'_, PyAny>, err: BorrowError, inputs: &[(&str, &Bound<'_, PyAny>)]) -> PyErr {
    if matches!(err, BorrowError::NotWriteable) {
        return InputError::new_err(
            "out is read-only (not writeable: its flags.writeable is False); pass a writeable array, e.g. \
             np.empty_like(...)",
        );
    }
    // The borrow only says that some borrowed array overlaps `out`; NumPy's bounds
    // test (the same approximation) names which input it is.
    let shares = |a: &Bound<'_, PyAny>| {
        let numpy = out.py().import("numpy")?;
        numpy.getattr("may_share_memory")?.call1((out, a))?.is_truthy()
    };
    match inputs.iter().find(|(_, a)| shares(a).unwrap_or(false)) {
        Some((name, _)) => InputError::new_err(format!(
            "out overlaps {name}, an input of this call: the output would overwrite {name} while it is read; \
             pass an out that shares no memory with {name}"
        )),
        None => InputError::new_err(
            "out cannot be written: another call running now uses it (as an input or its out=); pass an array \
             no running call uses",
        ),
    }
}

/// A configuration error the core does not know about (a binding-level argument).
pub fn config_error(message: String) -> PyErr {
    ConfigError::new_err(message)
}

/// A thread-count request the pool could not satisfy.
pub fn bad_threads(message: String) -> PyErr {
    ConfigError::new_err(message)
}

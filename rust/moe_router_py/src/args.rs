//! Scalar arguments (flags, integers, reals) read from Python objects by one
//! rule: a flag is a `bool`, an integer an `int` (not a bool, not a float), a
//! real an `int` or a `float` (not a bool, not a string). NumPy scalars of
//! those kinds count as such. A wrong type is a `TypeError` of the argument's
//! family, a value out of range a `ConfigError`/`InputError`; both name the argument.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};

use crate::errors::{bad_scalar, wrong_scalar, Family};

/// True when `value` is a NumPy scalar (or 0-d array) whose dtype kind is one of `kinds`.
pub fn is_numpy_kind(value: &Bound<'_, PyAny>, kinds: &str) -> PyResult<bool> {
    match value.getattr("dtype") {
        Ok(dtype) if value.getattr("ndim").and_then(|n| n.extract::<usize>()).ok() == Some(0) => {
            let kind: String = dtype.getattr("kind")?.extract()?;
            Ok(kinds.contains(kind.as_str()))
        }
        _ => Ok(false),
    }
}

/// True for the built-in scalars, which are never NumPy scalars: the common
/// case is answered without a failing attribute lookup (an exception costs
/// microseconds on every routing call).
fn is_builtin_scalar(value: &Bound<'_, PyAny>) -> bool {
    value.is_instance_of::<PyBool>() || value.is_instance_of::<PyInt>() || value.is_exact_instance_of::<PyFloat>()
}

/// A Python `bool` (or `numpy.bool_`).
pub fn is_bool(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    if is_builtin_scalar(value) {
        return Ok(value.is_instance_of::<PyBool>());
    }
    is_numpy_kind(value, "b")
}

/// A Python `int` or NumPy integer, not a bool.
pub fn is_int(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    if is_builtin_scalar(value) {
        return Ok(value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>());
    }
    is_numpy_kind(value, "iu")
}

/// `value` as a flag: `True` or `False` only (1 and 0 are the wrong type).
pub fn flag(value: &Bound<'_, PyAny>, name: &str, family: Family) -> PyResult<bool> {
    if !is_bool(value)? {
        return Err(wrong_scalar(family, name, "must be True or False (a bool)", value));
    }
    value.is_truthy()
}

/// `value` as an integer in `[minimum, maximum]`.
pub fn integer<T: TryFrom<i128>>(
    value: &Bound<'_, PyAny>,
    name: &str,
    minimum: i128,
    maximum: i128,
    family: Family,
) -> PyResult<T> {
    if !is_int(value)? {
        return Err(wrong_scalar(family, name, "must be an int (not a float or a bool)", value));
    }
    let out_of_range = || {
        let range = moe_router_core::integer_range(minimum, maximum);
        bad_scalar(family, name, &format!("must be an integer in {range}"), value)
    };
    // A Python int beyond i128 fails to extract: out of range for every argument.
    match value.extract::<i128>() {
        Ok(i) if (minimum..=maximum).contains(&i) => T::try_from(i).map_err(|_| out_of_range()),
        _ => Err(out_of_range()),
    }
}

/// `value` as a `usize` in `[minimum, usize::MAX]`.
pub fn count(value: &Bound<'_, PyAny>, name: &str, minimum: usize, family: Family) -> PyResult<usize> {
    let wide = |n: usize| i128::try_from(n).unwrap_or(i128::MAX);
    integer(value, name, wide(minimum), wide(usize::MAX), family)
}

/// `value` as a real number (an `int` or a `float`; its float64 value).
pub fn real(value: &Bound<'_, PyAny>, name: &str, family: Family) -> PyResult<f64> {
    let numeric = is_int(value)? || value.is_instance_of::<PyFloat>() || is_numpy_kind(value, "f")?;
    if !numeric {
        return Err(wrong_scalar(family, name, "must be a real number (an int or a float)", value));
    }
    // An int too large for a float64 is a value out of range.
    value.extract::<f64>().map_err(|_| bad_scalar(family, name, "must be a finite real number", value))
}

/// An optional argument as the caller gave it: `Given(None)` when left out,
/// `Given(Some(obj))` otherwise, an explicit `None` included, so that None
/// can be refused as the wrong type while the default applies to omission.
pub struct Given<'py>(pub Option<Bound<'py, PyAny>>);

impl<'a, 'py> FromPyObject<'a, 'py> for Given<'py> {
    type Error = std::convert::Infallible;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> Result<Self, Self::Error> {
        Ok(Given(Some(obj.to_owned())))
    }
}

impl<'py> Given<'py> {
    /// `read` of the given value, or `default` when the argument was left out.
    pub fn or<T>(&self, default: T, read: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>) -> PyResult<T> {
        self.0.as_ref().map_or(Ok(default), read)
    }
}

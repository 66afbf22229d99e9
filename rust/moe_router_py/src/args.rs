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

    /// The given value as a flag, `default` when left out: every optional flag is
    /// read here, so an explicit None (or 1, "yes") is the wrong type, not the default.
    pub fn flag(&self, name: &str, default: bool, family: Family) -> PyResult<bool> {
        self.or(default, |v| flag(v, name, family))
    }
}

/// The Python face of these rules, for the package's Python code (presets,
/// statistics, the balancer): ``error`` is the family's exception class
/// (``ConfigError`` or ``InputError``; the default is ``InputError`` for a
/// flag, ``ConfigError`` otherwise).
pub mod py {
    use pyo3::prelude::*;
    use pyo3::types::{PyString, PyTuple, PyType};

    use crate::errors::{bad_scalar, type_error, wrong_scalar, Family};
    use crate::inputs::family_of;

    /// ``value`` as a flag (``True``/``False`` or ``numpy.bool_``); 1 and 0 are the wrong type.
    #[pyfunction]
    #[pyo3(signature = (value, name, error=None))]
    pub fn check_flag(value: &Bound<'_, PyAny>, name: &str, error: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        super::flag(value, name, family_of(error, Family::Input))
    }

    /// ``value`` as an int in ``[minimum, maximum]``.
    #[pyfunction]
    #[pyo3(signature = (value, name, minimum=0, maximum=u64::MAX as i128, error=None))]
    pub fn check_integer(
        value: &Bound<'_, PyAny>,
        name: &str,
        minimum: i128,
        maximum: i128,
        error: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i128> {
        super::integer(value, name, minimum, maximum, family_of(error, Family::Config))
    }

    /// ``value`` as a float64: an int or a float (range checks are the caller's).
    #[pyfunction]
    #[pyo3(signature = (value, name, error=None))]
    pub fn check_real(value: &Bound<'_, PyAny>, name: &str, error: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
        super::real(value, name, family_of(error, Family::Config))
    }

    /// ``value`` if it is one of ``allowed`` (strings, maybe None); a non-string is the wrong type.
    #[pyfunction]
    #[pyo3(signature = (value, name, allowed, error=None))]
    pub fn check_choice<'py>(
        value: &Bound<'py, PyAny>,
        name: &str,
        allowed: &Bound<'py, PyAny>,
        error: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let family = family_of(error, Family::Config);
        let allowed = PyTuple::new(value.py(), allowed.try_iter()?.collect::<PyResult<Vec<_>>>()?)?;
        let shown: Vec<String> = allowed.iter().map(|a| a.repr().map(|r| r.to_string())).collect::<PyResult<_>>()?;
        let spelled = format!("must be one of {}", shown.join(", "));
        if !(value.is_instance_of::<PyString>() || (value.is_none() && allowed.contains(value)?)) {
            return Err(wrong_scalar(family, name, &spelled, value));
        }
        if !allowed.contains(value)? {
            return Err(bad_scalar(family, name, &spelled, value));
        }
        Ok(value.clone())
    }

    /// ``value`` if it is a ``cls``, else the TypeError of family ``error``.
    #[pyfunction]
    #[pyo3(signature = (value, name, cls, error=None))]
    pub fn check_instance<'py>(
        value: &Bound<'py, PyAny>,
        name: &str,
        cls: &Bound<'py, PyType>,
        error: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if value.is_instance(cls)? {
            return Ok(value.clone());
        }
        let got = value.get_type().name()?;
        Err(type_error(family_of(error, Family::Config), format!("{name} must be a {}, got {got}", cls.name()?)))
    }

    /// The TypeError of family ``error`` for ``value`` given as ``name``; ``expected`` reads "must be ...".
    #[pyfunction]
    #[pyo3(signature = (name, value, expected, error=None))]
    pub fn wrong_type_error<'py>(
        py: Python<'py>,
        name: &str,
        value: &Bound<'py, PyAny>,
        expected: &str,
        error: Option<&Bound<'py, PyAny>>,
    ) -> Bound<'py, PyAny> {
        wrong_scalar(family_of(error, Family::Config), name, expected, value).into_value(py).into_bound(py).into_any()
    }

    /// An ``int`` or NumPy integer, not a bool.
    #[pyfunction]
    pub fn is_int(value: &Bound<'_, PyAny>) -> PyResult<bool> {
        super::is_int(value)
    }

    /// An ``int``, ``float`` or NumPy real, not a bool.
    #[pyfunction]
    pub fn is_real(value: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(super::is_int(value)? || value.is_instance_of::<pyo3::types::PyFloat>() || super::is_numpy_kind(value, "f")?)
    }
}

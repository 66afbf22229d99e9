//! `RouterConfig`: the core's configuration as a frozen Python class.
//!
//! Fields are set and read by name through the core (`set_field`/`field`), so
//! the field list, the defaults, the enum spellings and the range checks exist
//! only in `moe_router_core::config`. This file converts Python values to the
//! core's `FieldValue` and back, nothing more.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use moe_router_core::{FieldValue, RouterConfig as CoreConfig};
use pyo3::exceptions::{PyAttributeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyString, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::args;
use crate::errors::{to_py, Family};

/// Configuration of a token router, validated on construction; immutable.
///
/// ``RouterConfig(num_experts=8, top_k=2, *, capacity_factor=1.25, ...)``: every
/// field is a keyword argument (``num_experts`` and ``top_k`` may also be given by
/// position); ``num_experts_per_token`` is accepted as an alias of ``top_k``. The
/// fields, their defaults and ranges are listed in ``RouterConfig.FIELDS`` and
/// documented in the type stub and in docs/semantics.md; the formulas follow
/// the Switch Transformer (capacity, load-balance loss), ST-MoE (z-loss),
/// DeepSeek-V3 (groups, sigmoid scores, expert bias) and the peers named by
/// ``peer``. ``routing='expert_choice'`` lets each expert take its top-C tokens
/// (Zhou et al. 2022; ``expert_choice_cap`` caps the experts per token, EC-CAP);
/// it is not causal (a token's experts depend on later tokens), so it must not
/// route a decoder step by step.
///
/// Raises
/// ------
/// ConfigError
///     (a ``ValueError``) naming the field, the value and what is allowed.
/// ConfigTypeError
///     (a ``ConfigError`` and a ``TypeError``) a value of the wrong type: an
///     int field given a float or a bool, a flag given 0/1, a number field
///     given a string, ...; or an unknown keyword.
/// TypeError
///     More than two positional arguments.
///
/// Examples
/// --------
/// >>> import moe_router as mr
/// >>> cfg = mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.1)
/// >>> cfg.capacity(200), cfg.replace(top_k=1).top_k
/// (7, 1)
#[pyclass(frozen, name = "RouterConfig", module = "moe_router")]
pub struct PyRouterConfig {
    pub inner: CoreConfig,
}

/// A Python value as the core's `FieldValue`: its kind decides what the core
/// accepts (the type checks and the messages are the core's).
pub(crate) fn to_field(value: &Bound<'_, PyAny>) -> PyResult<FieldValue> {
    let py = value.py();
    if value.is_none() {
        return Ok(FieldValue::None);
    }
    if args::is_bool(value)? {
        return Ok(FieldValue::Bool(value.is_truthy()?));
    }
    if args::is_int(value)? {
        return Ok(match value.extract::<i128>() {
            Ok(i) => FieldValue::Int(i),
            Err(_) => FieldValue::BigInt(value.str()?.to_string()),
        });
    }
    if value.is_instance_of::<PyString>() {
        return Ok(FieldValue::Text(value.extract()?));
    }
    let decimal = py.import("decimal")?.getattr("Decimal")?;
    if value.is_instance(&decimal)? {
        let f: f64 = value.call_method0("__float__")?.extract()?;
        return Ok(FieldValue::Real { value: f, text: value.str()?.to_string(), exact: false });
    }
    let real = value.is_instance_of::<PyFloat>()
        || args::is_numpy_kind(value, "f")?
        || (value.hasattr("__float__")? && !value.hasattr("__len__")? && !args::is_numpy_kind(value, "c")?);
    if real {
        let f: f64 = value.call_method0("__float__")?.extract()?;
        let text = PyFloat::new(py, f).repr()?.to_string();
        return Ok(FieldValue::Real { value: f, text, exact: true });
    }
    if value.hasattr("__len__")? {
        if let Ok(items) = value.try_iter() {
            let items: PyResult<Vec<f64>> = items.map(|x| x.and_then(|x| real_item(&x))).collect();
            if let Ok(items) = items {
                return Ok(FieldValue::Reals(items));
            }
        }
    }
    let type_name = value.get_type().name()?.to_string();
    Ok(FieldValue::Other { repr: value.repr()?.to_string(), type_name })
}

/// One entry of a sequence of reals (bools and strings are not reals).
fn real_item(x: &Bound<'_, PyAny>) -> PyResult<f64> {
    args::real(x, "item", Family::Config)
}

/// The core's `FieldValue` as a Python value.
fn from_field<'py>(py: Python<'py>, value: FieldValue) -> PyResult<Bound<'py, PyAny>> {
    match value {
        FieldValue::None => Ok(py.None().into_bound(py)),
        FieldValue::Bool(b) => b.into_bound_py_any(py),
        FieldValue::Int(i) => i.into_bound_py_any(py),
        FieldValue::Real { value, exact: true, .. } => value.into_bound_py_any(py),
        FieldValue::Real { text, .. } => py.import("decimal")?.getattr("Decimal")?.call1((text,)),
        FieldValue::Text(s) => s.into_bound_py_any(py),
        FieldValue::Reals(v) => Ok(PyTuple::new(py, v)?.into_any()),
        // The core stores neither (no field holds them); shown as their text.
        FieldValue::BigInt(text) | FieldValue::Other { repr: text, .. } => text.into_bound_py_any(py),
    }
}

pub(crate) fn fields_of<'py>(kwargs: Option<&Bound<'py, PyDict>>) -> PyResult<Vec<(String, FieldValue)>> {
    let mut out = Vec::new();
    if let Some(kwargs) = kwargs {
        for (key, value) in kwargs.iter() {
            out.push((key.extract::<String>()?, to_field(&value)?));
        }
    }
    Ok(out)
}

impl PyRouterConfig {
    fn value<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.inner.field(name).map(|v| from_field(py, v)).transpose()
    }

    fn dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for name in CoreConfig::FIELDS {
            d.set_item(*name, self.value(py, name)?)?;
        }
        Ok(d)
    }
}

#[pymethods]
impl PyRouterConfig {
    /// Every field name, in order (the keyword arguments).
    #[classattr]
    const FIELDS: &'static [&'static str] = CoreConfig::FIELDS;

    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut fields = fields_of(kwargs)?;
        if args.len() > 2 {
            return Err(PyTypeError::new_err(format!(
                "RouterConfig takes at most 2 positional arguments (num_experts, top_k), got {}",
                args.len()
            )));
        }
        for (name, value) in ["num_experts", "top_k"].iter().zip(args.iter()) {
            if fields.iter().any(|(n, _)| n == name) {
                return Err(PyTypeError::new_err(format!("RouterConfig got multiple values for argument '{name}'")));
            }
            fields.push((name.to_string(), to_field(&value)?));
        }
        let inner = CoreConfig::from_fields(fields.iter().map(|(n, v)| (n.as_str(), v.clone())));
        Ok(PyRouterConfig { inner: inner.map_err(to_py)? })
    }

    fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        self.value(py, name)?
            .ok_or_else(|| PyAttributeError::new_err(format!("'RouterConfig' object has no attribute '{name}'")))
    }

    fn __setattr__(&self, name: &str, _value: &Bound<'_, PyAny>) -> PyResult<()> {
        Err(PyAttributeError::new_err(format!("RouterConfig is immutable; use config.replace({name}=...)")))
    }

    fn __dir__(slf: &Bound<'_, Self>) -> PyResult<Vec<String>> {
        let py = slf.py();
        let mut names: Vec<String> =
            py.import("builtins")?.getattr("object")?.call_method1("__dir__", (slf,))?.extract()?;
        names.extend(CoreConfig::FIELDS.iter().map(|s| s.to_string()));
        names.push(moe_router_core::TOP_K_ALIAS.to_string());
        names.sort();
        Ok(names)
    }

    /// Per-expert capacity for ``num_tokens`` active tokens (None when there is no limit).
    ///
    /// Parameters
    /// ----------
    /// num_tokens : int
    ///     Unmasked tokens in the batch (T_active), >= 0.
    /// training : bool, optional
    ///     Use ``capacity_factor`` (True, the default, also for None) or
    ///     ``eval_capacity_factor`` (False).
    ///
    /// Returns
    /// -------
    /// int or None
    ///     ``max(min_capacity, ceil(cf * T * k / E))`` with the configured rounding
    ///     (exact decimal by default; GShard/Switch capacity), or ``expert_capacity``,
    ///     or in evaluation ``max(min_capacity, ceil(eval_capacity_token_fraction * T))``
    ///     (fairseq); then rounded up to a multiple of ``capacity_alignment`` (Tutel).
    ///     None for dropless routing, and when that value exceeds ``2**64 - 1``
    ///     (it could not bind: routing is then dropless). With
    ///     ``routing="balanced"``: ``T / E`` in training, None in evaluation.
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     ``num_tokens`` is an integer outside ``[0, 2**64 - 1]``.
    /// ConfigTypeError
    ///     ``num_tokens`` is not an int, or ``training`` not a bool.
    #[pyo3(signature = (num_tokens, training=args::Given(None)), text_signature = "($self, num_tokens, training=True)")]
    fn capacity(&self, num_tokens: &Bound<'_, PyAny>, training: args::Given<'_>) -> PyResult<Option<usize>> {
        let tokens = args::count(num_tokens, "num_tokens", 0, Family::Config)?;
        let training = training.flag("training", true, Family::Config)?;
        Ok(self.inner.capacity_for(tokens, training))
    }

    /// The configuration as a dict of constructor arguments (``RouterConfig(**d)`` rebuilds it).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.dict(py)
    }

    /// A copy with ``changes`` applied, validated again.
    ///
    /// Raises
    /// ------
    /// ConfigTypeError
    ///     A name that is not a field, or a value of the wrong type.
    /// ConfigError
    ///     A changed value is invalid.
    #[pyo3(signature = (**changes))]
    fn replace(&self, changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let fields = fields_of(changes)?;
        let inner = self.inner.with_fields(fields.iter().map(|(n, v)| (n.as_str(), v.clone())));
        Ok(PyRouterConfig { inner: inner.map_err(to_py)? })
    }

    /// A configuration that routes like Megatron-Core, DeepSpeed or a Hugging Face model.
    ///
    /// Shorthand for :func:`moe_router.presets.preset` (see there for names,
    /// overrides and errors).
    ///
    /// Examples
    /// --------
    /// >>> import moe_router as mr
    /// >>> cfg = mr.RouterConfig.preset("mixtral", num_experts=8, top_k=2)
    /// >>> cfg.normalize_weights, cfg.capacity_factor, cfg.peer
    /// (True, None, 'mixtral')
    #[classmethod]
    #[pyo3(signature = (name, num_experts, top_k=None, **overrides))]
    fn preset<'py>(
        _cls: &Bound<'py, pyo3::types::PyType>,
        name: &Bound<'py, PyAny>,
        num_experts: &Bound<'py, PyAny>,
        top_k: Option<&Bound<'py, PyAny>>,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Self> {
        crate::presets::preset_config(name, num_experts, top_k, overrides)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<PyRouterConfig>().is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __hash__(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for name in CoreConfig::FIELDS {
            self.inner.field(name).map(|v| v.to_string()).hash(&mut h);
        }
        h.finish()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let defaults = CoreConfig::default();
        let mut shown = Vec::new();
        for name in CoreConfig::FIELDS {
            let value = self.inner.field(name);
            if matches!(*name, "num_experts" | "top_k") || value != defaults.field(name) {
                if let Some(v) = self.value(py, name)? {
                    shown.push(format!("{name}={}", v.repr()?));
                }
            }
        }
        Ok(format!("RouterConfig({})", shown.join(", ")))
    }

    /// Pickling rebuilds the configuration from its fields.
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
        Ok((PyTuple::empty(py), self.dict(py)?))
    }

    fn __copy__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __deepcopy__(slf: Py<Self>, _memo: &Bound<'_, PyAny>) -> Py<Self> {
        slf
    }
}

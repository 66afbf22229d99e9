//! Loose Python input made into the arrays the core reads: one reader per
//! argument kind (rows of logits or hidden states, the token mask, the
//! per-expert bias, router weights).
//!
//! A C-contiguous float32/float64 NumPy array passes through untouched, without
//! calling into Python. Everything else is read once through NumPy: NumPy views
//! and subclasses, torch CPU tensors through `__array__` (a tensor that requires
//! grad through `detach()`, which shares its memory; bfloat16 widened to
//! float32), `__dlpack__` producers and lists. Other float dtypes become float32
//! (float16) or float64 (longdouble), integer arrays float64, and only if the
//! float dtype holds every value exactly (a rounded logit can lose the argmax);
//! other layouts are copied C-contiguous; an empty 1-D input is zero tokens.
//! Anything else is refused with an exception that names the argument.

use numpy::{PyArrayDescr, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyList, PyTuple, PyType};
use pyo3::PyTypeInfo;

use crate::config::PyRouterConfig;
use crate::errors::{type_error, unreadable, value_error, wrong_scalar, ConfigError, Family};

static NUMPY: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
static MASKED_ARRAY: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn numpy(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    Ok(NUMPY.get_or_try_init(py, || py.import("numpy").map(Bound::unbind))?.bind(py))
}

fn is_masked_array(x: &Bound<'_, PyAny>) -> PyResult<bool> {
    x.is_instance(MASKED_ARRAY.import(x.py(), "numpy.ma", "MaskedArray")?)
}

/// The two dtypes the core reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Float {
    F32,
    F64,
}

impl Float {
    /// The float dtype of `dtype`, if it is float32 or float64 (native byte order).
    pub fn of(dtype: &Bound<'_, PyArrayDescr>) -> Option<Float> {
        let py = dtype.py();
        if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
            Some(Float::F32)
        } else if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
            Some(Float::F64)
        } else {
            None
        }
    }

    fn descr(self, py: Python<'_>) -> Bound<'_, PyArrayDescr> {
        match self {
            Float::F32 => numpy::dtype::<f32>(py),
            Float::F64 => numpy::dtype::<f64>(py),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Float::F32 => "float32",
            Float::F64 => "float64",
        }
    }

    /// Whether the integer `v` converts to this dtype exactly.
    fn holds(self, v: i128) -> bool {
        match self {
            Float::F32 => (v as f32) as i128 == v,
            Float::F64 => (v as f64) as i128 == v,
        }
    }

    /// The dtype a caller names (anything `numpy.dtype` reads), which must be
    /// float32 or float64; otherwise the TypeError of `family` naming `name`.
    pub fn from_spec(spec: &Bound<'_, PyAny>, name: &str, family: Family) -> PyResult<Float> {
        let dtype = numpy(spec.py())?.call_method1("dtype", (spec,)).ok();
        dtype
            .as_ref()
            .and_then(|d| d.cast::<PyArrayDescr>().ok())
            .and_then(Float::of)
            .ok_or_else(|| wrong_scalar(family, name, "must be float32 or float64", spec))
    }
}

/// The dtype kinds an array argument accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kinds {
    /// Floating point or integer (logits, biases): integers become float64.
    Real,
    /// Floating point only (hidden states, router weights).
    Float,
}

impl Kinds {
    /// From NumPy's kind letters, as the Python layer spells them ("fiu" or "f").
    pub fn parse(kinds: &str) -> Kinds {
        if kinds.contains('i') {
            Kinds::Real
        } else {
            Kinds::Float
        }
    }

    fn accepts(self, kind: u8) -> bool {
        kind == b'f' || (self == Kinds::Real && (kind == b'i' || kind == b'u'))
    }

    fn text(self) -> &'static str {
        match self {
            Kinds::Real => "floating-point or integer",
            Kinds::Float => "floating-point",
        }
    }
}

fn input_type(message: String) -> PyErr {
    type_error(Family::Input, message)
}

fn input(message: String) -> PyErr {
    value_error(Family::Input, message)
}

/// A shape as messages print it: `[2, 3]`.
fn dims(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn message_of(py: Python<'_>, err: &PyErr) -> String {
    err.value(py).str().map(|s| s.to_string()).unwrap_or_default()
}

fn ndarray(a: Bound<'_, PyAny>) -> PyResult<Bound<'_, PyUntypedArray>> {
    Ok(a.cast_into::<PyUntypedArray>()?)
}

fn is_exact_ndarray(a: &Bound<'_, PyUntypedArray>) -> bool {
    a.get_type().is(PyUntypedArray::type_object(a.py()))
}

fn astype<'py>(a: &Bound<'py, PyUntypedArray>, to: Bound<'py, PyArrayDescr>) -> PyResult<Bound<'py, PyUntypedArray>> {
    ndarray(a.call_method1("astype", (to,))?)
}

/// `a` as a C-contiguous array of `shape` (a view when it already is contiguous).
fn contiguous<'py>(a: &Bound<'py, PyUntypedArray>, shape: &[usize]) -> PyResult<Bound<'py, PyUntypedArray>> {
    let np = numpy(a.py())?;
    let c = np.call_method1("ascontiguousarray", (a,))?;
    ndarray(c.call_method1("reshape", (PyTuple::new(a.py(), shape)?,))?)
}

/// `x` as a NumPy array, without a copy where the protocol allows.
pub fn as_array<'py>(x: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(a) = x.cast::<PyUntypedArray>() {
        return Ok(a.clone());
    }
    let py = x.py();
    let np = numpy(py)?;
    let mut x = x.clone();
    let requires_grad = x.getattr("requires_grad").is_ok_and(|v| v.is(&*PyBool::new(py, true)));
    if requires_grad && x.getattr("detach").is_ok_and(|d| d.is_callable()) {
        // torch refuses to export a tensor in an autograd graph; the router reads values only.
        py.import("moe_router._inputs")?.call_method1("_warn_no_gradient", (name,))?;
        x = x.call_method0("detach")?;
    }
    let dtype = x.getattr("dtype").ok().and_then(|d| d.str().ok()).map(|s| s.to_string()).unwrap_or_default();
    if dtype.contains("bfloat16") && x.getattr("float").is_ok_and(|f| f.is_callable()) {
        // NumPy has no bfloat16: widen once to float32 (exact), as float16 is.
        x = x.call_method0("float")?;
    }
    let dlpack = x.hasattr("__dlpack__")?;
    if x.hasattr("__array__")? || x.is_instance_of::<PyList>() || x.is_instance_of::<PyTuple>() {
        return match np.call_method1("asarray", (&x,)) {
            Ok(a) => ndarray(a),
            Err(exc) => {
                // e.g. a CUDA tensor
                if let Some(a) = dlpack.then(|| np.call_method1("from_dlpack", (&x,)).ok()).flatten() {
                    return ndarray(a);
                }
                let err = input_type(format!("{name} cannot be read as a CPU array: {}", message_of(py, &exc)));
                err.set_cause(py, Some(exc));
                Err(err)
            }
        };
    }
    if dlpack {
        return match np.call_method1("from_dlpack", (&x,)) {
            Ok(a) => ndarray(a),
            Err(exc) => {
                let err = input_type(format!("{name} cannot be read through __dlpack__: {}", message_of(py, &exc)));
                err.set_cause(py, Some(exc));
                Err(err)
            }
        };
    }
    let kind = x.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    Err(input_type(format!(
        "{name} must be an array (NumPy, torch CPU tensor, or anything with __array__ or __dlpack__), got {kind}"
    )))
}

/// The values of an integer array, in C order.
type Values<'a> = Box<dyn Iterator<Item = i128> + 'a>;

/// Run `f` on the values of the integer array `a` (the argument `name`) in C order (as `i128`).
fn with_ints<R>(a: &Bound<'_, PyUntypedArray>, name: &str, f: impl FnOnce(Values<'_>) -> R) -> PyResult<R> {
    macro_rules! each {
        ($($t:ty),+) => {
            $(
                if let Ok(typed) = a.cast::<PyArrayDyn<$t>>() {
                    let view = typed.try_readonly().map_err(|e| unreadable(name, e))?;
                    return Ok(f(Box::new(view.as_array().iter().map(|&v| v as i128))));
                }
            )+
        };
    }
    each!(i64, i32, i16, i8, u64, u32, u16, u8);
    // Another byte order: read it in the native one.
    let wide = if a.dtype().kind() == b'u' { numpy::dtype::<u64>(a.py()) } else { numpy::dtype::<i64>(a.py()) };
    let native = astype(a, wide)?;
    if let Ok(typed) = native.cast::<PyArrayDyn<i64>>() {
        let view = typed.try_readonly().map_err(|e| unreadable(name, e))?;
        return Ok(f(Box::new(view.as_array().iter().map(|&v| v as i128))));
    }
    let typed = native.cast::<PyArrayDyn<u64>>()?;
    let view = typed.try_readonly().map_err(|e| unreadable(name, e))?;
    Ok(f(Box::new(view.as_array().iter().map(|&v| v as i128))))
}

/// The InputError for the first integer of `ints` (C order) that `float` would round,
/// `place` naming where it is from its flat index; Ok when every value converts exactly.
fn exact_integers(
    ints: &Bound<'_, PyUntypedArray>,
    float: Float,
    name: &str,
    place: impl Fn(usize) -> String,
) -> PyResult<()> {
    match with_ints(ints, name, |values| values.enumerate().find(|&(_, v)| !float.holds(v)))? {
        None => Ok(()),
        Some((at, value)) => {
            let bits = if float == Float::F32 { 24 } else { 53 };
            Err(input(format!(
                "{name} holds the integer {value} at {}, which {} cannot represent exactly (integers are exact \
                 only up to 2**{bits} in magnitude); rounding could change the routing, so convert to floating \
                 point yourself if that is acceptable",
                place(at),
                float.name()
            )))
        }
    }
}

/// Rows of an argument and the mask of its tokens.
pub struct Rows<'py> {
    /// C-contiguous float32/float64 `[T, width]`.
    pub array: Bound<'py, PyUntypedArray>,
    /// The input's leading shape (`[T]` or `[B, S]`).
    pub batch_shape: Vec<usize>,
    /// Bool `[T]`, None when every token is routed.
    pub mask: Option<Bound<'py, PyUntypedArray>>,
}

/// `x` as C-contiguous float32/float64 `[T, width]` rows plus its batch shape.
///
/// Accepts `[T, width]` and `[B, S, width]` of the dtype `kinds`. `dtype` forces
/// float32 or float64 (a converted copy when it differs); by default
/// float32/float64 stay as they are, float16 becomes float32, longdouble and
/// integers float64. A NumPy masked array gives its values (its mask is the
/// caller's, see [`rows_and_mask`]).
pub fn float_rows<'py>(
    x: &Bound<'py, PyAny>,
    name: &str,
    width: usize,
    width_name: &str,
    dtype: Option<Float>,
    kinds: Kinds,
) -> PyResult<(Bound<'py, PyUntypedArray>, Vec<usize>)> {
    if let Ok(a) = x.cast::<PyUntypedArray>() {
        let float = Float::of(&a.dtype());
        let wanted = float.is_some() && (dtype.is_none() || dtype == float);
        if wanted && is_exact_ndarray(a) && a.is_c_contiguous() && a.ndim() == 2 && a.shape()[1] == width {
            return Ok((a.clone(), vec![a.shape()[0]]));
        }
    }
    let py = x.py();
    let mut a = as_array(x, name)?;
    if is_masked_array(&a)? {
        a = ndarray(a.getattr("data")?)?;
    }
    if a.ndim() == 1 && a.len() == 0 {
        a = contiguous(&a, &[0, width])?;
    }
    let mut ints = None;
    let mut float = Float::of(&a.dtype());
    if float.is_none() {
        let descr = a.dtype();
        let kind = descr.kind();
        if !kinds.accepts(kind) {
            let accepted =
                if kinds == Kinds::Real { "float16 and integers are converted" } else { "float16 is converted" };
            return Err(input_type(format!(
                "{name} must be a {} array (float32 or float64 are read in place; {accepted}), got dtype {descr}",
                kinds.text()
            )));
        }
        let integral = kind == b'i' || kind == b'u';
        let to = if integral || descr.itemsize() > 8 { Float::F64 } else { Float::F32 };
        if integral {
            ints = Some(a.clone());
        }
        a = astype(&a, to.descr(py))?;
        float = Some(to);
    }
    let mut float = float.unwrap_or(Float::F64);
    if let Some(forced) = dtype.filter(|&d| d != float) {
        a = astype(&a, forced.descr(py))?;
        float = forced;
    }
    let shape = a.shape().to_vec();
    if shape.len() != 2 && shape.len() != 3 {
        return Err(input(format!(
            "{name} has shape {}, expected [T, {width}] or [B, S, {width}] ({width_name} = {width})",
            dims(&shape)
        )));
    }
    if shape[shape.len() - 1] != width {
        return Err(input(format!(
            "{name} has shape {}, expected last dimension {width} ({width_name} = {width})",
            dims(&shape)
        )));
    }
    if let Some(ints) = ints {
        exact_integers(&ints, float, name, |at| format!("token {} (the first offending token)", at / width))?;
    }
    let batch_shape = shape[..shape.len() - 1].to_vec();
    let tokens = batch_shape.iter().product();
    Ok((contiguous(&a, &[tokens, width])?, batch_shape))
}

/// `mask` as a C-contiguous bool `[T]` array, for input of `batch_shape`.
///
/// Accepts shape `[T]` or the batch shape (`[B, S]`); integer arrays holding
/// only 0 and 1 count as booleans; a masked entry of a NumPy masked array is False.
pub fn token_mask<'py>(mask: &Bound<'py, PyAny>, batch_shape: &[usize]) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = mask.py();
    let tokens: usize = batch_shape.iter().product();
    let boolean = numpy::dtype::<bool>(py);
    if let Ok(m) = mask.cast::<PyUntypedArray>() {
        if is_exact_ndarray(m) && m.is_c_contiguous() && m.shape() == [tokens] && m.dtype().is_equiv_to(&boolean) {
            return Ok(m.clone());
        }
    }
    let mut m = as_array(mask, "token_mask")?;
    if is_masked_array(&m)? {
        m = ndarray(m.call_method1("filled", (0,))?)?; // a masked flag routes nothing
    }
    let descr = m.dtype();
    if !descr.is_equiv_to(&boolean) {
        let integral = descr.kind() == b'i' || descr.kind() == b'u';
        if !integral
            || (m.len() > 0 && !with_ints(&m, "token_mask", |values| values.into_iter().all(|v| v == 0 || v == 1))?)
        {
            let values = if integral { " with values other than 0 and 1" } else { "" };
            return Err(input_type(format!(
                "token_mask must be a bool array, or integers 0/1 (True = route the token), got dtype {descr}{values}"
            )));
        }
        m = astype(&m, boolean)?;
    }
    if m.shape() != [tokens] && m.shape() != batch_shape {
        let wanted = if batch_shape == [tokens] {
            format!("[{tokens}]")
        } else {
            format!("[{tokens}] or {}", dims(batch_shape))
        };
        return Err(input(format!("token_mask has shape {}, expected {wanted} (one flag per token)", dims(m.shape()))));
    }
    contiguous(&m, &[tokens])
}

/// [`float_rows`] of `x` and the token mask of the call.
///
/// A NumPy masked array `x` marks its padding itself: a token (a row along the
/// last axis) with any masked entry is not routed, as if `mask` were False there
/// (its values are never read, so they may be NaN). With an explicit `mask`
/// too, a token is routed only when both say so.
pub fn rows_and_mask<'py>(
    x: &Bound<'py, PyAny>,
    name: &str,
    width: usize,
    width_name: &str,
    mask: Option<&Bound<'py, PyAny>>,
    dtype: Option<Float>,
    kinds: Kinds,
) -> PyResult<Rows<'py>> {
    let (array, batch_shape) = float_rows(x, name, width, width_name, dtype, kinds)?;
    let mut mask = mask.map(|m| token_mask(m, &batch_shape)).transpose()?;
    if !x.is(&array) && has_masked_entries(x)? {
        let py = x.py();
        let ma = py.import("numpy.ma")?;
        {
            let np = numpy(py)?;
            let hidden = ma.call_method1("getmaskarray", (x,))?.call_method1("reshape", ((-1i64, width),))?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("axis", 1)?;
            let unmasked = np.call_method1("logical_not", (hidden.call_method("any", (), Some(&kwargs))?,))?;
            let active = match mask {
                None => unmasked,
                Some(m) => np.call_method1("logical_and", (m, unmasked))?,
            };
            mask = Some(ndarray(np.call_method1("ascontiguousarray", (active,))?)?);
        }
    }
    Ok(Rows { array, batch_shape, mask })
}

/// Whether `x` is a NumPy masked array with at least one masked entry.
pub fn has_masked_entries(x: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(is_masked_array(x)? && x.py().import("numpy.ma")?.call_method1("is_masked", (x,))?.is_truthy()?)
}

/// `bias` as a C-contiguous float64 `[E]` array (integers only if float64 holds them).
pub fn expert_bias<'py>(bias: &Bound<'py, PyAny>, num_experts: usize) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(b) = bias.cast::<PyUntypedArray>() {
        let in_place = is_exact_ndarray(b) && b.is_c_contiguous() && Float::of(&b.dtype()) == Some(Float::F64);
        if in_place && b.shape() == [num_experts] {
            return Ok(b.clone());
        }
    }
    let b = as_array(bias, "expert_bias")?;
    let descr = b.dtype();
    if !Kinds::Real.accepts(descr.kind()) {
        return Err(input_type(format!("expert_bias must be a real-valued array, got dtype {descr}")));
    }
    if b.shape() != [num_experts] {
        return Err(input(format!(
            "expert_bias has shape {}, expected [{num_experts}] (one value per expert)",
            dims(b.shape())
        )));
    }
    if descr.kind() != b'f' {
        exact_integers(&b, Float::F64, "expert_bias", |at| format!("expert_bias[{at}]"))?;
    }
    let b = if Float::of(&descr) == Some(Float::F64) { b } else { astype(&b, Float::F64.descr(bias.py()))? };
    contiguous(&b, &[num_experts])
}

/// A private, read-only, C-contiguous copy of a router weight.
///
/// Private so that later changes to the caller's array cannot make a cached
/// conversion go stale. `dtype` None keeps float32/float64 and makes other
/// floats float32; `what` explains the expected `shape` in the message.
pub fn weight<'py>(
    value: &Bound<'py, PyAny>,
    name: &str,
    shape: &[usize],
    what: &str,
    dtype: Option<Float>,
    kinds: Kinds,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = value.py();
    let np = numpy(py)?;
    let a = as_array(value, name)?;
    let descr = a.dtype();
    if !kinds.accepts(descr.kind()) {
        return Err(input_type(format!("{name} must be a {} array, got dtype {descr}", kinds.text())));
    }
    if a.shape() != shape {
        return Err(input(format!("{name} has shape {}, expected {}{what}", dims(a.shape()), dims(shape))));
    }
    if !np.call_method1("isfinite", (&a,))?.call_method0("all")?.is_truthy()? {
        return Err(input(format!("{name} contains NaN or infinite values")));
    }
    let float = dtype.or_else(|| Float::of(&descr)).unwrap_or(Float::F32);
    if descr.kind() != b'f' {
        exact_integers(&a, float, name, |at| format!("{name}[{at}]"))?;
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", float.descr(py))?;
    kwargs.set_item("order", "C")?;
    let copy = np.call_method("array", (&a,), Some(&kwargs))?;
    let flags = PyDict::new(py);
    flags.set_item("write", false)?;
    copy.call_method("setflags", (), Some(&flags))?;
    ndarray(copy)
}

/// `arrays` (None stays None) as C-contiguous `float`, each converted once:
/// the conversions are kept in `casts` (keyed by the NumPy dtype).
pub fn cast<'py>(
    py: Python<'py>,
    casts: Option<&Bound<'py, PyDict>>,
    arrays: &[Option<&Bound<'py, PyAny>>],
    float: Float,
) -> PyResult<Vec<Option<Bound<'py, PyAny>>>> {
    let same = |a: &Bound<'py, PyAny>| a.cast::<PyUntypedArray>().is_ok_and(|a| Float::of(&a.dtype()) == Some(float));
    if arrays.iter().flatten().all(|a| same(a)) {
        return Ok(arrays.iter().map(|a| a.cloned()).collect());
    }
    let key = float.descr(py);
    if let Some(hit) = casts.map(|c| c.get_item(&key)).transpose()?.flatten() {
        return hit.try_iter()?.map(|a| a.map(|a| (!a.is_none()).then_some(a))).collect();
    }
    let np = numpy(py)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", &key)?;
    let made: Vec<Option<Bound<'py, PyAny>>> = arrays
        .iter()
        .map(|a| a.map(|a| np.call_method("ascontiguousarray", (a,), Some(&kwargs))).transpose())
        .collect::<PyResult<_>>()?;
    if let Some(c) = casts {
        let items: Vec<Bound<'py, PyAny>> =
            made.iter().map(|a| a.clone().unwrap_or_else(|| py.None().into_bound(py))).collect();
        c.set_item(&key, PyTuple::new(py, items)?)?;
    }
    Ok(made)
}

/// `config` as a RouterConfig, else a `ConfigTypeError` naming it.
pub fn config<'a, 'py>(config: &'a Bound<'py, PyAny>) -> PyResult<&'a Bound<'py, PyRouterConfig>> {
    config.cast::<PyRouterConfig>().map_err(|_| {
        let kind = config.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        type_error(Family::Config, format!("config must be a RouterConfig, got {kind}"))
    })
}

/// The float dtype the caller names (None: decided by the input).
pub fn dtype_arg(spec: Option<&Bound<'_, PyAny>>, name: &str, family: Family) -> PyResult<Option<Float>> {
    spec.filter(|s| !s.is_none()).map(|s| Float::from_spec(s, name, family)).transpose()
}

/// What [`read_rows`] returns to Python.
type ReadRows<'py> = (Bound<'py, PyUntypedArray>, Bound<'py, PyTuple>, Option<Bound<'py, PyUntypedArray>>);

/// ``(rows, batch_shape, mask)``: ``x`` as C-contiguous float32/float64
/// ``[T, width]`` rows (read in place when it already is), the input's leading
/// shape, and the bool ``[T]`` token mask (None when every token is routed).
///
/// The reader every routing entry point uses on its logits or hidden states;
/// ``kinds`` is ``"fiu"`` (integers accepted, converted to float64 when exact) or
/// ``"f"``. Raises ``InputTypeError``/``InputError`` naming ``name`` or ``token_mask``.
#[pyfunction]
#[pyo3(signature = (x, name, width, width_name, token_mask=None, dtype=None, kinds="f"))]
pub fn read_rows<'py>(
    x: &Bound<'py, PyAny>,
    name: &str,
    width: usize,
    width_name: &str,
    token_mask: Option<&Bound<'py, PyAny>>,
    dtype: Option<&Bound<'py, PyAny>>,
    kinds: &str,
) -> PyResult<ReadRows<'py>> {
    let dtype = dtype_arg(dtype, "dtype", Family::Input)?;
    let mask = token_mask.filter(|m| !m.is_none());
    let rows = rows_and_mask(x, name, width, width_name, mask, dtype, Kinds::parse(kinds))?;
    Ok((rows.array, PyTuple::new(x.py(), rows.batch_shape)?, rows.mask))
}

/// A private, read-only, C-contiguous copy of router weight ``value`` of ``shape``.
///
/// ``dtype`` None keeps float32/float64 and makes other floats float32; ``what``
/// explains the shape in the message. Raises ``InputTypeError`` (a dtype outside
/// ``kinds``, or ``dtype`` not float32/float64) or ``InputError`` (another shape,
/// NaN/inf, or an integer that the dtype would round), naming ``name``.
#[pyfunction]
#[pyo3(signature = (value, name, shape, what="", dtype=None, kinds="f"))]
pub fn read_weight<'py>(
    value: &Bound<'py, PyAny>,
    name: &str,
    shape: Vec<usize>,
    what: &str,
    dtype: Option<&Bound<'py, PyAny>>,
    kinds: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let dtype = dtype_arg(dtype, name, Family::Input)?;
    weight(value, name, &shape, what, dtype, Kinds::parse(kinds))
}

/// ``spec`` as a NumPy dtype, which must be float32 or float64; otherwise the
/// TypeError of family ``error`` (``ConfigError`` or ``InputError``) naming ``name``.
#[pyfunction]
#[pyo3(signature = (spec, name, error=None))]
pub fn float_dtype<'py>(
    spec: &Bound<'py, PyAny>,
    name: &str,
    error: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDescr>> {
    Ok(Float::from_spec(spec, name, family_of(error, Family::Input))?.descr(spec.py()))
}

/// ``arrays`` (None stays None) as C-contiguous ``dtype`` (float32 or float64),
/// each converted once and kept in ``casts``, a dict keyed by the dtype.
#[pyfunction]
pub fn cast_arrays<'py>(
    casts: &Bound<'py, PyDict>,
    dtype: &Bound<'py, PyAny>,
    arrays: Vec<Option<Bound<'py, PyAny>>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let float = Float::from_spec(dtype, "dtype", Family::Input)?;
    let refs: Vec<Option<&Bound<'py, PyAny>>> = arrays.iter().map(|a| a.as_ref()).collect();
    PyTuple::new(dtype.py(), cast(dtype.py(), Some(casts), &refs, float)?)
}

/// The argument family of a Python exception class (`ConfigError` or `InputError`), `default` if None.
pub fn family_of(error: Option<&Bound<'_, PyAny>>, default: Family) -> Family {
    match error {
        None => default,
        Some(e) if e.is(e.py().get_type::<ConfigError>()) => Family::Config,
        Some(_) => Family::Input,
    }
}

//! Router replay records: `RecordedRoute` (one layer's selection),
//! `RecordedRoutes` (the layers of a model), and their `.npz` file (written
//! and read with NumPy's `savez_compressed` / `load`; the format is in
//! docs/replay.md).

use moe_router_core::{differing_tokens, Replay};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::args::count;
use crate::arrays;
use crate::decision::RoutingDecision;
use crate::errors::{to_py, value_error, wrong_type, Family};
use crate::plan::int_array;

/// Version of the `.npz` layout this build writes and reads.
const FORMAT_VERSION: i64 = 1;

/// One layer's routing selection, recorded for replay (Megatron-Core
/// ``router_replay``; Rollout Routing Replay, R3).
///
/// Holds which experts every token chose, by rank, before capacity (not the
/// weights: a replay recomputes them from its own logits), which tokens were
/// routed, the batch shape, E and k. Made by :meth:`RoutingDecision.record`,
/// from arrays (an inference engine's returned experts, vLLM/sglang), or read
/// by :meth:`load`; passed as ``replay=`` to :func:`moe_router.route_logits`.
///
/// Parameters
/// ----------
/// expert_indices : array_like of int, shape [T, k]
///     Each token's experts by rank, in ``[0, num_experts)``, distinct within a token.
/// num_experts : int
///     E (>= 1).
/// token_mask : array_like of bool, shape [T], optional
///     False marks padding (not routed when recorded). Default: every token routed.
/// batch_shape : tuple of int, optional
///     Leading shape of the routed input (``(T,)`` or ``(B, S)``; product T). Default ``(T,)``.
///
/// Attributes
/// ----------
/// expert_indices : numpy.ndarray
///     ``[T, k]``, int8 when E <= 127, int16 when E <= 32767, else int32 (read-only).
/// token_mask : numpy.ndarray
///     bool ``[T]`` (read-only).
/// batch_shape : tuple of int
/// num_experts, top_k, num_tokens : int
///
/// Raises
/// ------
/// InputError
///     Not 2-D, k = 0, an id out of range or repeated within a token (naming
///     ``expert_indices``), a mask of the wrong length, a batch shape whose
///     product is not T.
/// InputTypeError
///     Non-integer ids, a non-bool mask.
#[pyclass(frozen, module = "moe_router")]
pub struct RecordedRoute {
    #[pyo3(get)]
    expert_indices: Py<PyAny>,
    #[pyo3(get)]
    token_mask: Py<PyAny>,
    #[pyo3(get)]
    batch_shape: Py<PyTuple>,
    #[pyo3(get)]
    num_experts: usize,
    #[pyo3(get)]
    top_k: usize,
    experts: Vec<i32>,
    active: Vec<bool>,
}

/// The NumPy dtype of the expert ids of a recording of `num_experts` experts.
fn compact_dtype(num_experts: usize) -> &'static str {
    if num_experts <= i8::MAX as usize {
        "int8"
    } else if num_experts <= i16::MAX as usize {
        "int16"
    } else {
        "int32"
    }
}

/// The names under which a layer's parts are reported (arguments, or file keys).
struct Names {
    experts: String,
    mask: String,
    shape: String,
}

impl Names {
    /// The constructor's argument names.
    fn arguments() -> Self {
        Names { experts: "expert_indices".into(), mask: "token_mask".into(), shape: "batch_shape".into() }
    }
}

impl RecordedRoute {
    /// A record from its parts; `names` says what errors call them.
    fn build(
        py: Python<'_>,
        experts: Vec<i32>,
        [t, k]: [usize; 2],
        num_experts: usize,
        active: Vec<bool>,
        batch_shape: Vec<usize>,
        names: &Names,
    ) -> PyResult<Self> {
        let bad = |name: &str, message: String| value_error(Family::Input, format!("{name}: {message}"));
        if k == 0 {
            return Err(bad(&names.experts, format!("shape [{t}, 0]; k must be at least 1")));
        }
        if active.len() != t {
            return Err(bad(&names.mask, format!("{} flags, expected {t} (one per token)", active.len())));
        }
        if batch_shape.iter().product::<usize>() != t || batch_shape.is_empty() {
            return Err(bad(&names.shape, format!("{batch_shape:?} does not hold the {t} tokens")));
        }
        let replay = Replay { experts: &experts, active: &active, num_experts, top_k: k };
        replay.check(t, num_experts, k, Some(&active)).map_err(|e| bad(&names.experts, e.to_string()))?;
        let ids = arrays::matrix(py, experts.clone(), t, k)?.call_method1("astype", (compact_dtype(num_experts),))?;
        let mask = arrays::vector(py, active.clone()).into_any();
        crate::plan::read_only(&ids)?;
        crate::plan::read_only(&mask)?;
        Ok(RecordedRoute {
            expert_indices: ids.unbind(),
            token_mask: mask.unbind(),
            batch_shape: PyTuple::new(py, &batch_shape)?.unbind(),
            num_experts,
            top_k: k,
            experts,
            active,
        })
    }

    /// The record of `decision`: its experts before capacity and reroutes, its routed tokens.
    pub fn of_decision(py: Python<'_>, decision: &RoutingDecision) -> PyResult<Self> {
        let (t, k) = (decision.total_tokens(), decision.top_k());
        let experts = decision.selected_experts();
        let active = decision.active_mask(py)?;
        Self::build(
            py,
            experts,
            [t, k],
            decision.num_experts(),
            active,
            decision.batch_shape_vec(py)?,
            &Names::arguments(),
        )
    }

    /// The core's view of this record.
    pub fn as_replay(&self) -> Replay<'_> {
        Replay { experts: &self.experts, active: &self.active, num_experts: self.num_experts, top_k: self.top_k }
    }

    /// The bool `[T]` token mask array.
    pub fn token_mask_array<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.token_mask.bind(py)
    }

    /// Whether any token is padding.
    pub fn has_padding(&self) -> bool {
        self.active.contains(&false)
    }

    /// This layer's arrays under the file keys of layer `layer`.
    fn write_into(&self, py: Python<'_>, layer: usize, out: &Bound<'_, PyDict>) -> PyResult<()> {
        let numpy = py.import("numpy")?;
        let p = format!("layer_{layer:03}");
        out.set_item(format!("{p}_experts"), self.expert_indices.bind(py))?;
        out.set_item(format!("{p}_token_mask"), self.token_mask.bind(py))?;
        let shape: Vec<i64> = self.batch_shape.bind(py).extract()?;
        out.set_item(format!("{p}_batch_shape"), numpy.getattr("asarray")?.call1((shape, "int64"))?)?;
        out.set_item(format!("{p}_num_experts"), numpy.getattr("int64")?.call1((self.num_experts,))?)?;
        Ok(())
    }
}

#[pymethods]
impl RecordedRoute {
    #[new]
    #[pyo3(signature = (expert_indices, num_experts, token_mask=None, batch_shape=None))]
    fn new(
        py: Python<'_>,
        expert_indices: &Bound<'_, PyAny>,
        num_experts: &Bound<'_, PyAny>,
        token_mask: Option<&Bound<'_, PyAny>>,
        batch_shape: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let e = crate::args::integer(num_experts, "num_experts", 1, i32::MAX.into(), Family::Input)?;
        let (wide, shape) = int_array(expert_indices, "expert_indices")?;
        let [t, k] = shape[..] else {
            let message = format!("expert_indices: shape {shape:?}; expected [T, k]");
            return Err(value_error(Family::Input, message));
        };
        // Anything outside i32 is out of range anyway; the check below names it.
        let experts = wide.iter().map(|&x| i32::try_from(x).unwrap_or(-1)).collect();
        let active = match token_mask {
            None => vec![true; t],
            Some(m) => bool_vector(m, "token_mask")?,
        };
        let dims = match batch_shape {
            None => vec![t],
            Some(s) => s.try_iter()?.map(|d| count(&d?, "batch_shape", 0, Family::Input)).collect::<PyResult<_>>()?,
        };
        Self::build(py, experts, [t, k], e, active, dims, &Names::arguments())
    }

    /// T.
    #[getter]
    fn num_tokens(&self) -> usize {
        self.active.len()
    }

    /// Write this layer as a one-layer replay file (see :meth:`RecordedRoutes.save`).
    ///
    /// Parameters
    /// ----------
    /// path : str or os.PathLike
    ///     Destination; NumPy adds ``.npz`` when the name lacks it.
    ///
    /// Raises
    /// ------
    /// OSError
    ///     The file cannot be written.
    fn save(slf: &Bound<'_, Self>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        save_layers(slf.py(), path, &[slf.clone().unbind()])
    }

    /// Read a one-layer replay file (written by :meth:`save`, or a
    /// :class:`RecordedRoutes` file of one layer).
    ///
    /// Parameters
    /// ----------
    /// path : str or os.PathLike
    ///
    /// Returns
    /// -------
    /// RecordedRoute
    ///
    /// Raises
    /// ------
    /// InputError
    ///     Not a replay file, or a file of several layers (use
    ///     :meth:`RecordedRoutes.load`); see :meth:`RecordedRoutes.load`.
    /// OSError
    ///     The file cannot be opened.
    #[staticmethod]
    fn load(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Py<RecordedRoute>> {
        let mut layers = load_layers(py, path)?;
        match layers.len() {
            1 => Ok(layers.remove(0)),
            n => Err(value_error(
                Family::Input,
                format!(
                    "{}: num_layers is {n}; RecordedRoute.load reads a file of one layer, use RecordedRoutes.load",
                    path.str()?
                ),
            )),
        }
    }

    /// Which tokens' expert sets differ from ``other``'s.
    ///
    /// A token differs when it is routed in both recordings and its k experts,
    /// as a set (rank order ignored), differ; or when it is routed in only one.
    ///
    /// Parameters
    /// ----------
    /// other : RecordedRoute
    ///     A recording of the same T, k and E.
    ///
    /// Returns
    /// -------
    /// numpy.ndarray
    ///     bool ``[T]``.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     The recordings' T, k or E differ (naming ``replay``).
    fn differing_tokens<'py>(&self, py: Python<'py>, other: &RecordedRoute) -> PyResult<Bound<'py, PyAny>> {
        let flags = differing_tokens(self.as_replay(), other.as_replay()).map_err(to_py)?;
        Ok(arrays::vector(py, flags).into_any())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "RecordedRoute(num_tokens={}, top_k={}, num_experts={}, batch_shape={})",
            self.active.len(),
            self.top_k,
            self.num_experts,
            self.batch_shape.bind(py).repr()?
        ))
    }
}

/// The recorded routes of a model's MoE layers, in layer order (one
/// :class:`RecordedRoute` per router), saved to and read from one ``.npz`` file.
///
/// Parameters
/// ----------
/// layers : iterable of RecordedRoute or RoutingDecision
///     One entry per layer; a decision is recorded (:meth:`RoutingDecision.record`).
///
/// Attributes
/// ----------
/// layers : list of RecordedRoute
///
/// Raises
/// ------
/// InputTypeError
///     An entry that is neither.
#[pyclass(frozen, sequence, module = "moe_router")]
pub struct RecordedRoutes {
    layers: Vec<Py<RecordedRoute>>,
}

#[pymethods]
impl RecordedRoutes {
    #[new]
    fn new(py: Python<'_>, layers: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut out = Vec::new();
        for item in layers.try_iter()? {
            let item = item?;
            if let Ok(r) = item.cast::<RecordedRoute>() {
                out.push(r.clone().unbind());
            } else if let Ok(d) = item.cast::<RoutingDecision>() {
                out.push(Py::new(py, RecordedRoute::of_decision(py, d.get())?)?);
            } else {
                return Err(wrong_type("layers", "an iterable of RecordedRoute or RoutingDecision", &item));
            }
        }
        Ok(RecordedRoutes { layers: out })
    }

    #[getter]
    fn layers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, &self.layers)
    }

    fn __len__(&self) -> usize {
        self.layers.len()
    }

    fn __getitem__(&self, py: Python<'_>, index: isize) -> PyResult<Py<RecordedRoute>> {
        let n = self.layers.len() as isize;
        let i = if index < 0 { index + n } else { index };
        if !(0..n).contains(&i) {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("layer {index} of {n}")));
        }
        Ok(self.layers[i as usize].clone_ref(py))
    }

    /// Write the layers to one ``.npz`` file (``numpy.savez_compressed``; format in docs/replay.md).
    ///
    /// Keys: ``version`` (int64, 1), ``num_layers`` (int64), and per layer
    /// ``i`` (three digits, ``layer_000_...``): ``layer_000_experts`` (``[T, k]``
    /// int8/int16/int32 by E), ``layer_000_token_mask`` (bool ``[T]``),
    /// ``layer_000_batch_shape`` (int64 ``[ndim]``), ``layer_000_num_experts`` (int64).
    ///
    /// Parameters
    /// ----------
    /// path : str or os.PathLike
    ///     Destination; NumPy adds ``.npz`` when the name lacks it.
    ///
    /// Raises
    /// ------
    /// OSError
    ///     The file cannot be written.
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        save_layers(py, path, &self.layers)
    }

    /// Read a replay file written by :meth:`save` (or :meth:`RecordedRoute.save`).
    ///
    /// Every key is checked: the version, the presence of every layer's four
    /// keys and no others, their dtypes (experts exactly the compact dtype of
    /// E), shapes (mask ``[T]``, batch shape of product T), ids in ``[0, E)``
    /// and distinct within a token.
    ///
    /// Parameters
    /// ----------
    /// path : str or os.PathLike
    ///
    /// Returns
    /// -------
    /// RecordedRoutes
    ///
    /// Raises
    /// ------
    /// InputError
    ///     Not an ``.npz`` file, or a key missing, unknown or invalid (the message names the key).
    /// OSError
    ///     The file cannot be opened.
    #[staticmethod]
    fn load(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<RecordedRoutes> {
        Ok(RecordedRoutes { layers: load_layers(py, path)? })
    }

    fn __repr__(&self) -> String {
        format!("RecordedRoutes({} layers)", self.layers.len())
    }
}

/// `x` as a 1-D NumPy bool array's values; `TypeError` naming `name` otherwise.
fn bool_vector(x: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<bool>> {
    let array = crate::plan::as_numpy(x, name)?;
    let typed = array.cast::<PyArrayDyn<bool>>().map_err(|_| wrong_type(name, "a bool array", &array))?;
    let view = typed.try_readonly().map_err(|e| crate::errors::unborrowable(name, e))?;
    if view.ndim() != 1 {
        return Err(value_error(Family::Input, format!("{name}: shape {:?}; expected [T]", view.shape())));
    }
    Ok(view.as_array().iter().copied().collect())
}

fn save_layers(py: Python<'_>, path: &Bound<'_, PyAny>, layers: &[Py<RecordedRoute>]) -> PyResult<()> {
    let numpy = py.import("numpy")?;
    let out = PyDict::new(py);
    out.set_item("version", numpy.getattr("int64")?.call1((FORMAT_VERSION,))?)?;
    out.set_item("num_layers", numpy.getattr("int64")?.call1((layers.len(),))?)?;
    for (i, layer) in layers.iter().enumerate() {
        layer.get().write_into(py, i, &out)?;
    }
    numpy.getattr("savez_compressed")?.call((path,), Some(&out))?;
    Ok(())
}

/// One open `.npz` file, whose reads report errors under the file's name.
struct NpzReader<'py> {
    file: Bound<'py, PyAny>,
    label: String,
    keys: Vec<String>,
}

impl<'py> NpzReader<'py> {
    fn error(&self, key: &str, message: impl std::fmt::Display) -> PyErr {
        value_error(Family::Input, format!("{}: {key}: {message}", self.label))
    }

    /// The array under `key`, with its dtype name and shape.
    fn get(&self, key: &str) -> PyResult<(Bound<'py, PyAny>, String, Vec<usize>)> {
        if !self.keys.iter().any(|k| k == key) {
            return Err(self.error(key, "missing"));
        }
        let array = self.file.get_item(key).map_err(|e| self.error(key, format!("unreadable ({e})")))?;
        let dtype: String = array.getattr("dtype")?.getattr("name")?.extract()?;
        let shape: Vec<usize> = array.getattr("shape")?.extract()?;
        Ok((array, dtype, shape))
    }

    /// The integer scalar under `key`, at least `minimum`.
    fn scalar(&self, key: &str, minimum: i64) -> PyResult<i64> {
        let (array, dtype, shape) = self.get(key)?;
        if !shape.is_empty() || dtype != "int64" {
            return Err(self.error(key, format!("{dtype} of shape {shape:?}; expected an int64 scalar")));
        }
        let v: i64 = array.call_method0("item")?.extract()?;
        if v < minimum {
            return Err(self.error(key, format!("{v}; expected at least {minimum}")));
        }
        Ok(v)
    }

    /// The 1-D array under `key` of dtype `want` (NumPy's name of `T`), as `T`.
    fn vector<T: numpy::Element + Copy>(&self, key: &str, want: &str) -> PyResult<Vec<T>> {
        let (array, dtype, shape) = self.get(key)?;
        if shape.len() != 1 || dtype != want {
            return Err(self.error(key, format!("{dtype} of shape {shape:?}; expected a 1-D {want} array")));
        }
        let typed = array.cast::<PyArrayDyn<T>>().map_err(|_| self.error(key, "not a NumPy array"))?;
        Ok(typed.readonly().as_array().iter().copied().collect())
    }
}

fn load_layers(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Vec<Py<RecordedRoute>>> {
    let numpy = py.import("numpy")?;
    let label = path.str()?.to_string();
    let kwargs = PyDict::new(py);
    kwargs.set_item("allow_pickle", false)?;
    let not_npz = |why: String| value_error(Family::Input, format!("{label} is not a replay .npz file ({why})"));
    let file = match numpy.getattr("load")?.call((path,), Some(&kwargs)) {
        Ok(f) => f,
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyOSError>(py) => return Err(e),
        // NumPy reads a file that is not an archive as a pickle, which it refuses with
        // advice to load it unsafely: not advice to repeat.
        Err(e) if e.to_string().contains("allow_pickle") => return Err(not_npz("not a NumPy .npy/.npz file".into())),
        Err(e) => return Err(not_npz(e.to_string())),
    };
    let Ok(files) = file.getattr("files") else {
        return Err(not_npz("a single array, not an archive".into()));
    };
    let reader = NpzReader { keys: files.extract()?, file, label };
    let result = read_layers(py, &reader);
    reader.file.call_method0("close")?;
    result
}

fn read_layers(py: Python<'_>, r: &NpzReader<'_>) -> PyResult<Vec<Py<RecordedRoute>>> {
    let version = r.scalar("version", i64::MIN)?;
    if version != FORMAT_VERSION {
        return Err(r.error("version", format!("{version}; this build reads version {FORMAT_VERSION}")));
    }
    let n = r.scalar("num_layers", 0)? as usize;
    let mut expected = vec!["version".to_string(), "num_layers".to_string()];
    let mut layers = Vec::with_capacity(n.min(1 << 16));
    for i in 0..n {
        let p = format!("layer_{i:03}");
        let names = Names {
            experts: format!("{p}_experts"),
            mask: format!("{p}_token_mask"),
            shape: format!("{p}_batch_shape"),
        };
        let e_key = format!("{p}_num_experts");
        let e = r.scalar(&e_key, 1)? as usize;
        let compact = compact_dtype(e);
        let (array, dtype, shape) = r.get(&names.experts)?;
        let [t, k] = shape[..] else {
            return Err(r.error(&names.experts, format!("shape {shape:?}; expected [T, k]")));
        };
        if dtype != compact {
            return Err(r.error(&names.experts, format!("dtype {dtype}; expected {compact} for {e} experts")));
        }
        let experts = int_array(&array, &names.experts)?.0.into_iter().map(|x| x as i32).collect();
        let active: Vec<bool> = r.vector(&names.mask, "bool")?;
        let dims: Vec<i64> = r.vector(&names.shape, "int64")?;
        if dims.iter().any(|&d| d < 0) {
            return Err(r.error(&names.shape, format!("{dims:?} has a negative dimension")));
        }
        let dims = dims.into_iter().map(|d| d as usize).collect();
        let layer = RecordedRoute::build(py, experts, [t, k], e, active, dims, &names)
            .map_err(|err| value_error(Family::Input, format!("{}: {}", r.label, err.value(py))))?;
        layers.push(Py::new(py, layer)?);
        expected.extend([names.experts, names.mask, names.shape, e_key]);
    }
    if let Some(extra) = r.keys.iter().find(|k| !expected.contains(k)) {
        return Err(r.error(extra, format!("unexpected key (the file has num_layers = {n})")));
    }
    Ok(layers)
}

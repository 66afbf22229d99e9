//! `DispatchPlan`: the core's expert-major row plan as a Python object, with
//! the gathers and scatters that run on NumPy buffers (GIL released, no copy
//! of the input) and the frameworks' layouts of the same decision.

use std::sync::OnceLock;

use half::f16;
use moe_router_core::{self as core, Assignments, DispatchPlan, Payload, PlanLayout};
use numpy::{
    Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::args::Given;
use crate::arrays;
use crate::decision::RoutingDecision;
use crate::errors::{dtype_name, out_not_contiguous, to_py, unborrowable, unreadable, unwritable_out, wrong_type};
use crate::threads;

pub(crate) const PAYLOAD_ARRAY: &str = "a C-contiguous float32, float64 or float16 array";

/// Rows of an expert-major buffer for one routing decision, and the moves that
/// fill it and read it back.
///
/// Made by :meth:`RoutingDecision.dispatch_plan`. The rows of expert ``e`` are
/// ``expert_offsets[e]:expert_offsets[e+1]``; the assignment in slot ``s`` of
/// expert ``e`` is row ``expert_offsets[e] + s``, so within an expert rows are
/// in token order for ``drop_policy="position"``/``"probs"`` (Megatron-Core's
/// ``permute`` order) and in the policy's order otherwise (rank-major for
/// ``"rank"``, as DeepSpeed and Tutel fill their buffers). Padding rows (to a
/// multiple of ``alignment``, or to the capacity) have token -1 and weight 0.
///
/// Attributes
/// ----------
/// expert_offsets : numpy.ndarray, int64, shape [E + 1]
///     First row of each expert's segment; ``expert_offsets[E] == num_rows``.
/// token_ids : numpy.ndarray, int64, shape [N]
///     Source token of each row (flattened token index), -1 for padding.
/// ranks : numpy.ndarray, int32, shape [N]
///     Which of the token's k choices the row is, -1 for padding.
/// weights : numpy.ndarray, float32, shape [N]
///     Combine weight of each row (the decision's ``expert_weights``), 0 for padding.
/// row_of : numpy.ndarray, int64, shape [T, k]
///     Row of each kept assignment, -1 where it was dropped.
/// tokens_per_expert : numpy.ndarray, int64, shape [E]
///     Real rows per expert (the decision's kept assignments).
/// rows_per_expert : numpy.ndarray, int64, shape [E]
///     Rows per expert, padding included.
/// num_rows : int
///     N, padding included.
/// padding_rows : int
///     ``num_rows - tokens_per_expert.sum()``.
/// num_tokens, num_experts, top_k : int
///     T, E, k of the decision.
/// alignment : int
///     Each segment is a multiple of this many rows.
/// pad_to_capacity : bool
///     Every segment has ``capacity`` rows (rounded up to ``alignment``).
/// capacity : int
///     The decision's per-expert capacity.
/// batch_shape : tuple of int
///     The decision's token shape; ``combine`` returns ``batch_shape + (D,)``.
///
/// Notes
/// -----
/// The arrays are read-only NumPy copies made on first access. Building the
/// plan costs O(T*k + E) time and memory; every move is O(rows * D), runs in
/// parallel with the GIL released and gives the same bits at any thread count.
#[pyclass(frozen, name = "DispatchPlan", module = "moe_router")]
pub struct PyDispatchPlan {
    plan: DispatchPlan,
    decision: Py<RoutingDecision>,
    batch_shape: Vec<usize>,
    layout: PlanLayout,
    capacity: usize,
    cached: [OnceLock<Py<PyAny>>; 7],
}

/// A read-only 1-D NumPy copy of `data`, made once.
pub(crate) fn cached_vector<'py, T: Element + Copy>(
    py: Python<'py>,
    cell: &OnceLock<Py<PyAny>>,
    data: impl FnOnce() -> Vec<T>,
) -> PyResult<Py<PyAny>> {
    if let Some(a) = cell.get() {
        return Ok(a.clone_ref(py));
    }
    let array = arrays::vector(py, data());
    read_only(array.as_any())?;
    Ok(cell.get_or_init(|| array.into_any().unbind()).clone_ref(py))
}

pub(crate) fn read_only(array: &Bound<'_, PyAny>) -> PyResult<()> {
    let kwargs = PyDict::new(array.py());
    kwargs.set_item("write", false)?;
    array.call_method("setflags", (), Some(&kwargs))?;
    Ok(())
}

/// `x` as a NumPy array: NumPy arrays as they are, anything else (torch CPU
/// tensors, lists) through the package's array interop ([`crate::inputs::as_array`]).
pub(crate) fn as_numpy<'py>(x: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    Ok(crate::inputs::as_array(x, name)?.into_any())
}

/// An array-like whose dtype kind is one of `kinds`, as a C-contiguous copy
/// of `dtype` values and its shape; `TypeError` naming `name` otherwise.
pub(crate) fn converted<T: Element + Copy>(
    x: &Bound<'_, PyAny>,
    name: &str,
    kinds: &str,
    dtype: &str,
    expected: &str,
) -> PyResult<(Vec<T>, Vec<usize>)> {
    let array = as_numpy(x, name)?;
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if !kinds.contains(kind.as_str()) {
        return Err(wrong_type(name, expected, &array));
    }
    let numpy = array.py().import("numpy")?;
    let copy = numpy.getattr("ascontiguousarray")?.call1((&array, dtype))?;
    let view = copy.cast::<PyArrayDyn<T>>()?.try_readonly().map_err(|e| unborrowable(name, e))?;
    Ok((view.as_slice().map_err(|e| unreadable(name, e))?.to_vec(), view.shape().to_vec()))
}

/// An integer array-like as int64 values (a C-contiguous copy) and its shape;
/// `TypeError` naming `name` for anything but integers.
pub(crate) fn int_array(x: &Bound<'_, PyAny>, name: &str) -> PyResult<(Vec<i64>, Vec<usize>)> {
    converted(x, name, "iu", "int64", "an integer array")
}

/// A real array-like (integers or floats) as float64 values and its shape;
/// `TypeError` naming `name` for other dtypes.
pub(crate) fn real_array(x: &Bound<'_, PyAny>, name: &str) -> PyResult<(Vec<f64>, Vec<usize>)> {
    converted(x, name, "iuf", "float64", "a real-valued array")
}

/// The read-only, C-contiguous data of `array` as `P`.
pub(crate) fn payload<'py, P: Element>(array: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, P>> {
    let typed = array.cast::<PyArrayDyn<P>>().map_err(|_| wrong_type(name, PAYLOAD_ARRAY, array))?;
    let view = typed.try_readonly().map_err(|e| unborrowable(name, e))?;
    if !view.is_c_contiguous() {
        return Err(unreadable(name, "it must be C-contiguous (pass np.ascontiguousarray(...))"));
    }
    Ok(view)
}

/// D of a `[rows, D]` array, or of `[*lead, D]` when `lead` is given; otherwise an `InputError`.
fn width(shape: &[usize], rows: usize, lead: Option<&[usize]>, name: &str, what: &str) -> PyResult<usize> {
    let fits = |prefix: &[usize]| shape.len() == prefix.len() + 1 && &shape[..prefix.len()] == prefix;
    if fits(&[rows]) || lead.is_some_and(fits) {
        Ok(shape[shape.len() - 1])
    } else {
        Err(to_py(core::RouterError::Shape {
            argument: static_name(name),
            expected: what.to_string(),
            actual: format!("{shape:?}"),
        }))
    }
}

fn static_name(name: &str) -> &'static str {
    match name {
        "hidden" => "hidden",
        "expert_out" => "expert_out",
        _ => "out",
    }
}

/// `out` if given (the dtype of input `dtype_of`, C-contiguous, `shape`), else a new
/// array of `shape` from [`crate::pool::written_output`]: every caller's kernel
/// writes each element of its output (zeros included), so a large one may be the
/// recycled memory of a dropped output. Whether `out` can be written is
/// [`write_target`]'s check.
pub(crate) fn output<'py, P: Element>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    shape: &[usize],
    dtype_of: &str,
) -> PyResult<Bound<'py, PyArrayDyn<P>>> {
    match out {
        None => crate::pool::written_output(py, shape),
        Some(o) => {
            let typed = o.cast::<PyArrayDyn<P>>().map_err(|_| {
                let dtype = dtype_name::<P>(py);
                wrong_type("out", &format!("a C-contiguous {dtype} NumPy array (the dtype of {dtype_of})"), o)
            })?;
            if typed.shape() != shape {
                return Err(to_py(core::RouterError::Shape {
                    argument: "out",
                    expected: format!("{shape:?}"),
                    actual: format!("{:?}", typed.shape()),
                }));
            }
            if !typed.is_c_contiguous() {
                return Err(out_not_contiguous());
            }
            Ok(typed.clone())
        }
    }
}

/// A new zero array of `shape`: `numpy.zeros`, which raises MemoryError when the
/// memory cannot be had (rust-numpy's `zeros` would panic).
pub(crate) fn zeros<'py, P: Element>(py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<P>>> {
    let dtype = numpy::dtype::<P>(py);
    let array = py.import("numpy")?.getattr("zeros")?.call1((shape.to_vec(), dtype))?;
    Ok(array.cast_into::<PyArrayDyn<P>>()?)
}

/// `out` borrowed for writing, after the call's `inputs` (name, array) are borrowed
/// for reading: an `InputError` naming `out` when it is read-only or overlaps one of them.
pub(crate) fn write_target<'py, P: Element>(
    out: &Bound<'py, PyArrayDyn<P>>,
    inputs: &[(&str, &Bound<'py, PyAny>)],
) -> PyResult<PyReadwriteArrayDyn<'py, P>> {
    out.try_readwrite().map_err(|e| unwritable_out(out.as_any(), e, inputs))
}

/// Run a move with the GIL released: `f(input, output)` on the borrowed slices.
pub(crate) fn run_move<'py, P: Payload + Element>(
    py: Python<'py>,
    input: &PyReadonlyArrayDyn<'py, P>,
    out: &Bound<'py, PyArrayDyn<P>>,
    input_name: &str,
    f: impl FnOnce(&[P], &mut [P]) -> core::Result<()> + Send,
) -> PyResult<()> {
    let data = input.as_slice().map_err(|e| unreadable(input_name, e))?;
    let mut guard = write_target(out, &[(input_name, input.as_any())])?;
    let target = guard.as_slice_mut().map_err(|_| out_not_contiguous())?;
    let rows = target.len().max(data.len());
    py.detach(|| threads::install_rows(rows, || f(data, target))).map_err(to_py)
}

/// How expert outputs go back to tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scatter {
    /// Summed per token (`combine`).
    Sum { weighted: bool },
    /// One row per choice (`unpermute`).
    PerChoice,
}

impl PyDispatchPlan {
    /// Build the plan of `decision` (borrowed arrays, GIL released).
    pub fn build(py: Python<'_>, decision: Bound<'_, RoutingDecision>, layout: PlanLayout) -> PyResult<Self> {
        let d = decision.get();
        let capacity = d.capacity();
        let plan = {
            let a = d.assignments();
            py.detach(|| threads::install_rows(a.num_tokens * a.top_k, || DispatchPlan::new(&a, layout)))
                .map_err(to_py)?
        };
        Ok(PyDispatchPlan {
            plan,
            batch_shape: d.batch_shape_vec(py)?,
            decision: decision.unbind(),
            layout,
            capacity,
            cached: Default::default(),
        })
    }

    fn lead(&self) -> Option<&[usize]> {
        (self.batch_shape.len() > 1).then_some(&self.batch_shape[..])
    }

    fn token_shape(&self, d: usize, extra: &[usize]) -> Vec<usize> {
        let mut shape = self.batch_shape.clone();
        shape.extend_from_slice(extra);
        shape.push(d);
        shape
    }

    fn permute_typed<'py, P: Payload + Element>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<P>>> {
        let t = self.plan.num_tokens;
        let input = payload::<P>(hidden, "hidden")?;
        let what = match self.lead() {
            Some(lead) => format!("[{t}, D] or {lead:?} + [D]"),
            None => format!("[{t}, D]"),
        };
        let d = width(input.shape(), t, self.lead(), "hidden", &what)?;
        let target = output::<P>(py, out, &[self.plan.num_rows, d], "hidden")?;
        run_move(py, &input, &target, "hidden", |x, y| self.plan.permute(x, d, y))?;
        Ok(target)
    }

    /// Scatter the `[N, D]` `expert_out` back to tokens: `combine` (`weighted`
    /// or not) into `batch_shape + [D]`, or with `per_choice` `unpermute` into
    /// `batch_shape + [k, D]`.
    fn scatter_typed<'py, P: Payload + Element>(
        &self,
        py: Python<'py>,
        expert_out: &Bound<'py, PyAny>,
        scatter: Scatter,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<P>>> {
        let n = self.plan.num_rows;
        let input = payload::<P>(expert_out, "expert_out")?;
        let d = width(input.shape(), n, None, "expert_out", &format!("[{n}, D] (num_rows, D)"))?;
        let extra: &[usize] = if scatter == Scatter::PerChoice { &[self.plan.top_k] } else { &[] };
        let target = output::<P>(py, out, &self.token_shape(d, extra), "expert_out")?;
        run_move(py, &input, &target, "expert_out", |x, y| match scatter {
            Scatter::PerChoice => self.plan.unpermute(x, d, y),
            Scatter::Sum { weighted } => self.plan.combine(x, d, weighted, y),
        })?;
        Ok(target)
    }

    /// A core view of the decision, for the layouts.
    fn with_assignments<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Assignments<'_>) -> core::Result<R> + Send,
    ) -> PyResult<R> {
        let decision = self.decision.bind(py).get();
        let a = decision.assignments();
        py.detach(|| threads::install_rows(a.num_tokens * a.top_k, || f(&a))).map_err(to_py)
    }
}

#[pymethods]
impl PyDispatchPlan {
    #[getter]
    fn expert_offsets(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        cached_vector(py, &self.cached[0], || self.plan.expert_offsets.clone())
    }
    #[getter]
    fn token_ids(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        cached_vector(py, &self.cached[1], || self.plan.token_ids.clone())
    }
    #[getter]
    fn ranks(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        cached_vector(py, &self.cached[2], || self.plan.ranks.clone())
    }
    #[getter]
    fn weights(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        cached_vector(py, &self.cached[3], || self.plan.weights.clone())
    }
    #[getter]
    fn row_of(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if let Some(a) = self.cached[4].get() {
            return Ok(a.clone_ref(py));
        }
        let array = arrays::matrix(py, self.plan.row_of.clone(), self.plan.num_tokens, self.plan.top_k)?;
        read_only(array.as_any())?;
        Ok(self.cached[4].get_or_init(|| array.into_any().unbind()).clone_ref(py))
    }
    #[getter]
    fn tokens_per_expert(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        cached_vector(py, &self.cached[5], || self.plan.tokens_per_expert.clone())
    }
    #[getter]
    fn rows_per_expert(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        cached_vector(py, &self.cached[6], || self.plan.rows_per_expert())
    }
    #[getter]
    fn num_rows(&self) -> usize {
        self.plan.num_rows
    }
    #[getter]
    fn padding_rows(&self) -> usize {
        self.plan.num_rows - self.plan.tokens_per_expert.iter().sum::<i64>() as usize
    }
    #[getter]
    fn num_tokens(&self) -> usize {
        self.plan.num_tokens
    }
    #[getter]
    fn num_experts(&self) -> usize {
        self.plan.num_experts
    }
    #[getter]
    fn top_k(&self) -> usize {
        self.plan.top_k
    }
    #[getter]
    fn alignment(&self) -> usize {
        self.layout.alignment
    }
    #[getter]
    fn pad_to_capacity(&self) -> bool {
        self.layout.pad_to_capacity
    }
    #[getter]
    fn capacity(&self) -> usize {
        self.capacity
    }
    #[getter]
    fn batch_shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.batch_shape)
    }

    /// Gather the tokens into the expert-major buffer.
    ///
    /// Parameters
    /// ----------
    /// hidden : array, float32/float64/float16, shape [T, D] or batch_shape + [D]
    ///     C-contiguous; read in place (a torch CPU tensor is read through its
    ///     array interface; bfloat16 is widened to float32).
    /// out : numpy.ndarray, optional
    ///     ``[num_rows, D]`` of ``hidden``'s dtype, C-contiguous, to write into.
    ///     Without it, an output of 4 MiB or more reuses the memory of a dropped
    ///     one of the same size where the package holds one (the previous step's:
    ///     no page faults, as with ``out``); the same for :meth:`combine`,
    ///     :meth:`unpermute`, :func:`gather_rows` and ``RoutingDecision.backward``,
    ///     at most 4 freed buffers, a quarter of the physical memory in all, held,
    ///     which the OS may take back when memory runs short (``MADV_FREE``).
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, shape [num_rows, D], hidden's dtype
    ///     Row r is ``hidden[token_ids[r]]``; padding rows are 0. Megatron-Core's
    ///     ``moe_utils.permute`` output for dropless routing.
    ///
    /// Raises
    /// ------
    /// TypeError
    ///     ``hidden`` (or ``out``) has another dtype.
    /// InputError
    ///     Wrong shape, not C-contiguous, or ``out`` is read-only or overlaps ``hidden``.
    #[pyo3(signature = (hidden, out=None))]
    fn permute<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let hidden = as_numpy(hidden, "hidden")?;
        with_dtype!(&hidden, "hidden", PAYLOAD_ARRAY, [f32, f64, f16], P => Ok(self.permute_typed::<P>(py, &hidden, out)?.into_any()))
    }

    /// Weight the experts' outputs and add them back per token.
    ///
    /// ``y[t] = sum over the token's kept choices j, in rank order, of
    /// w[t, j] * expert_out[row_of[t, j]]`` (``weighted=False``: without ``w``,
    /// DeepEP's combine and Megatron's ``unpermute`` without probs), accumulated
    /// in float32 (float64 for float64 input), never with atomics: the same bits
    /// at any thread count. Tokens with no kept choice are 0.
    ///
    /// Parameters
    /// ----------
    /// expert_out : array, float32/float64/float16, shape [num_rows, D]
    ///     C-contiguous; padding rows are ignored.
    /// weighted : bool, default True
    /// out : numpy.ndarray, optional
    ///     ``batch_shape + [D]`` of ``expert_out``'s dtype, to write into.
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, shape batch_shape + [D]
    ///
    /// Raises
    /// ------
    /// TypeError, InputError
    ///     As :meth:`permute`, for ``expert_out`` with the wrong dtype, N or layout.
    #[pyo3(
        signature = (expert_out, weighted=Given(None), out=None),
        text_signature = "($self, expert_out, weighted=True, out=None)"
    )]
    fn combine<'py>(
        &self,
        py: Python<'py>,
        expert_out: &Bound<'py, PyAny>,
        weighted: Given<'py>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let weighted = weighted.flag("weighted", true, crate::errors::Family::Input)?;
        let x = as_numpy(expert_out, "expert_out")?;
        with_dtype!(&x, "expert_out", PAYLOAD_ARRAY, [f32, f64, f16], P => Ok(self.scatter_typed::<P>(py, &x, Scatter::Sum { weighted }, out)?.into_any()))
    }

    /// Each assignment's output in place: ``[*batch_shape, k, D]``, zeros where dropped.
    ///
    /// Parameters
    /// ----------
    /// expert_out : array, float32/float64/float16, shape [num_rows, D]
    /// out : numpy.ndarray, optional
    ///     ``batch_shape + [k, D]``, to write into.
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, shape batch_shape + [k, D]
    ///     ``out[t, j] = expert_out[row_of[t, j]]`` (for weighting later, as vLLM's
    ///     CPU path and Megatron's all-to-all path do).
    ///
    /// Raises
    /// ------
    /// TypeError, InputError
    ///     As :meth:`combine`.
    #[pyo3(signature = (expert_out, out=None))]
    fn unpermute<'py>(
        &self,
        py: Python<'py>,
        expert_out: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let x = as_numpy(expert_out, "expert_out")?;
        with_dtype!(&x, "expert_out", PAYLOAD_ARRAY, [f32, f64, f16], P => Ok(self.scatter_typed::<P>(py, &x, Scatter::PerChoice, out)?.into_any()))
    }

    /// The all-to-all of expert parallelism for this rank's plan.
    ///
    /// Parameters
    /// ----------
    /// placement : ExpertPlacement
    ///     Which ranks hold each expert (its E must be the decision's).
    ///
    /// Returns
    /// -------
    /// AllToAllPlan
    ///     Send counts per rank, the send order, and the per-(rank, local expert)
    ///     counts to exchange first.
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     The placement has another number of experts.
    fn all_to_all(&self, placement: &crate::exchange::PyExpertPlacement) -> PyResult<crate::exchange::PyAllToAllPlan> {
        let send = self.plan.all_to_all(&placement.placement).map_err(to_py)?;
        Ok(crate::exchange::PyAllToAllPlan::new(send, placement.placement.clone()))
    }

    /// Megatron-Core's router outputs ``(routing_map, probs)``.
    ///
    /// Returns
    /// -------
    /// routing_map : numpy.ndarray, bool, shape [T, E]
    ///     True where the token's assignment to the expert is kept.
    /// probs : numpy.ndarray, float32, shape [T, E]
    ///     The combine weight there, 0 elsewhere.
    ///
    /// Notes
    /// -----
    /// As ``TopKRouter.forward`` returns them (``moe_utils.
    /// topk_routing_with_score_function`` then ``apply_router_token_dropping``),
    /// except that with ``drop_and_pad`` Megatron also marks further tokens at
    /// weight 0 to fill each expert's capacity; here only kept assignments are marked.
    fn megatron_routing_map<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (map, probs) = self.with_assignments(py, core::megatron_routing_map)?;
        let (t, e) = (self.plan.num_tokens, self.plan.num_experts);
        Ok((arrays::matrix(py, map, t, e)?.into_any(), arrays::matrix(py, probs, t, e)?.into_any()))
    }

    /// DeepSpeed's dense ``(combine_weights, dispatch_mask)``, each ``[T, E, C]``.
    ///
    /// ``combine_weights[t, e, c]`` is the weight of token t's kept assignment to
    /// expert e in slot c (``C = capacity``); ``dispatch_mask`` is
    /// ``combine_weights != 0`` (DeepSpeed's ``combine_weights.bool()``), as
    /// ``sharded_moe.top1gating``/``top2gating``/``topkgating`` return them.
    /// O(T*E*C) memory: for small inputs and for checking.
    ///
    /// Returns
    /// -------
    /// combine_weights : numpy.ndarray, float32, shape [T, E, C]
    /// dispatch_mask : numpy.ndarray, bool, shape [T, E, C]
    ///
    /// Raises
    /// ------
    /// InputError
    ///     ``T*E*C`` does not fit in memory addresses.
    fn dense_masks<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (weights, mask) = self.with_assignments(py, core::dense_masks)?;
        let shape = [self.plan.num_tokens, self.plan.num_experts, self.capacity];
        let w = arrays::matrix(py, weights, shape[0], shape[1] * shape[2])?.reshape(shape)?;
        let m = arrays::matrix(py, mask, shape[0], shape[1] * shape[2])?.reshape(shape)?;
        Ok((w.into_any(), m.into_any()))
    }

    /// Tutel's ``(indices_s, locations_s, gates_s, capacity)``, k-major lists.
    ///
    /// Returns
    /// -------
    /// indices_s : list of k numpy.ndarray, int32, shape [T]
    ///     The expert of each token's j-th choice.
    /// locations_s : list of k numpy.ndarray, int32, shape [T]
    ///     Its slot; ``capacity`` where the assignment was dropped (Tutel's
    ///     ``fast_encode``/``fast_decode`` skip locations >= capacity).
    /// gates_s : list of k numpy.ndarray, float32, shape [T]
    ///     Its combine weight (0 where dropped).
    /// capacity : int
    fn tutel_encoding<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let decision = self.decision.bind(py).get();
        let a = decision.assignments();
        let (t, k) = (a.num_tokens, a.top_k);
        let c = i32::try_from(self.capacity).unwrap_or(i32::MAX);
        let (indices, locations, gates) = (PyList::empty(py), PyList::empty(py), PyList::empty(py));
        for j in 0..k {
            let column = |flat: usize| flat * k + j;
            indices.append(PyArray1::from_iter(py, (0..t).map(|i| a.expert_indices[column(i)])))?;
            locations.append(PyArray1::from_iter(
                py,
                (0..t).map(|i| if a.kept[column(i)] { a.expert_slots[column(i)] } else { c }),
            ))?;
            gates.append(PyArray1::from_iter(py, (0..t).map(|i| a.expert_weights[column(i)])))?;
        }
        PyTuple::new(
            py,
            [indices.into_any(), locations.into_any(), gates.into_any(), self.capacity.into_pyobject(py)?.into_any()],
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "DispatchPlan(T={}, E={}, k={}, num_rows={}, padding_rows={}, alignment={}, pad_to_capacity={})",
            self.plan.num_tokens,
            self.plan.num_experts,
            self.plan.top_k,
            self.plan.num_rows,
            self.padding_rows(),
            self.layout.alignment,
            if self.layout.pad_to_capacity { "True" } else { "False" }
        )
    }
}

/// vLLM's ``moe_align_block_size``: assignment ids grouped by expert, each group
/// padded to a multiple of ``block_size``.
///
/// Parameters
/// ----------
/// expert_indices : array of int, shape [T, k]
///     Each token's experts (a decision's ``expert_indices``; vLLM's ``topk_ids``).
/// block_size : int
///     Rows per block of the grouped GEMM (>= 1).
/// num_experts : int
///     E; every id must be in ``[0, E)``.
/// pad_sorted_ids : bool, default False
///     Round the length of ``sorted_token_ids`` up to a multiple of ``block_size``.
///
/// Returns
/// -------
/// sorted_token_ids : numpy.ndarray, int32, shape [T*k + E*(block_size-1)]
///     Flattened ids ``t*k + j``, expert-major and ascending within an expert
///     (vLLM leaves that order open; ours is fixed); each group padded, and the
///     unused tail filled, with the sentinel ``T*k``. (When ``T*k < E`` the length
///     is at most ``T*k*block_size``, as in vLLM.)
/// expert_ids : numpy.ndarray, int32, shape [ceil(len(sorted_token_ids) / block_size)]
///     The expert of each block; 0 past ``num_tokens_post_padded`` (consumers stop there).
/// num_tokens_post_padded : numpy.ndarray, int32, shape [1]
///     ``sum_e ceil(count_e / block_size) * block_size``.
///
/// Raises
/// ------
/// TypeError
///     ``expert_indices`` is not an integer array.
/// ConfigError
///     ``block_size`` or ``num_experts`` < 1.
/// InputError
///     ``expert_indices`` is not 2-D, or holds an id outside ``[0, E)`` (the
///     message names the token), or the padded length exceeds int32.
#[pyfunction]
#[pyo3(
    signature = (expert_indices, block_size, num_experts, pad_sorted_ids=Given(None)),
    text_signature = "(expert_indices, block_size, num_experts, pad_sorted_ids=False)"
)]
pub fn moe_align_block_size<'py>(
    py: Python<'py>,
    expert_indices: &Bound<'py, PyAny>,
    block_size: &Bound<'py, PyAny>,
    num_experts: &Bound<'py, PyAny>,
    pad_sorted_ids: Given<'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    use crate::args::count;
    use crate::errors::Family;
    let block_size = count(block_size, "block_size", 1, Family::Config)?;
    let num_experts = count(num_experts, "num_experts", 1, Family::Config)?;
    let pad_sorted_ids = pad_sorted_ids.flag("pad_sorted_ids", false, Family::Config)?;
    let (flat, shape) = int_array(expert_indices, "expert_indices")?;
    if shape.len() != 2 {
        return Err(to_py(core::RouterError::shape("expert_indices", "[T, k]", format!("{shape:?}"))));
    }
    let b = py
        .detach(|| core::moe_align_block_size(&flat, shape[1], num_experts, block_size, pad_sorted_ids))
        .map_err(to_py)?;
    let post = i32::try_from(b.num_tokens_post_padded).unwrap_or(i32::MAX);
    PyTuple::new(
        py,
        [
            arrays::vector(py, b.sorted_token_ids).into_any(),
            arrays::vector(py, b.expert_ids).into_any(),
            PyArray1::from_slice(py, &[post]).into_any(),
        ],
    )
}

//! `moe_router._core`: the bindings. Each entry point borrows its NumPy
//! arrays, then hands the core call to [`run`], which releases the GIL, enters
//! the routing pool, maps errors and wraps the result in a `RoutingDecision`.

/// Run `body` with `$T` bound to the element type of `$array`, the first of
/// the listed types it has; otherwise a `TypeError` naming `$name` and `$expected`.
macro_rules! with_dtype {
    ($array:expr, $name:expr, $expected:expr, [$($ty:ty),+], $T:ident => $body:expr) => {{
        let array = $array;
        'found: {
            $(
                if array.cast::<numpy::PyArrayDyn<$ty>>().is_ok() {
                    type $T = $ty;
                    break 'found ({ $body });
                }
            )+
            Err($crate::errors::wrong_type($name, $expected, array))
        }
    }};
}

mod args;
mod arrays;
mod backward;
mod balancer;
mod config;
mod decision;
mod eplb;
mod errors;
mod exchange;
mod gate_choice;
mod global_balance;
mod guarded;
mod inputs;
mod peer_loss;
mod plan;
mod pool;
mod presets;
mod replay;
mod report;
mod stats;
mod threads;

use moe_router_core::{
    self as core, gate_probabilities, ArrayArg, GateShape, GemmScalar, HierarchicalGate, LinearLogits, Logit,
    LogitSource, Peer, RouteCall, Routing, SliceLogits,
};
use std::sync::atomic::AtomicBool;

use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeWarning;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::args::{count, flag, integer};
use crate::config::PyRouterConfig;
use crate::decision::{BackwardInputs, ExpertAssignment, RoutingDecision, SavedSource};
use crate::errors::{dtype_name, to_py, unborrowable, unreadable, wrong_type, Family};
use crate::replay::{RecordedRoute, RecordedRoutes};

/// The gate's weights and bias take the hidden states' dtype.
const HIDDEN_DTYPE: &str = "the hidden states' dtype";
const FLOAT_ARRAY: &str = "a C-contiguous float32 or float64 NumPy array";

/// A read-only view of `array` as `T`, refused with a `TypeError` naming `argument` otherwise;
/// `dtype_from` says where the expected dtype comes from, when another argument sets it.
fn borrow<'py, T: Element>(
    array: &Bound<'py, PyAny>,
    argument: &str,
    dtype_from: Option<&str>,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let typed = array.cast::<PyArrayDyn<T>>().map_err(|_| {
        let dtype = dtype_name::<T>(array.py());
        let from = dtype_from.map(|f| format!(" ({f})")).unwrap_or_default();
        wrong_type(argument, &format!("a C-contiguous {dtype} NumPy array{from}"), array)
    })?;
    typed.try_readonly().map_err(|e| unborrowable(argument, e))
}

/// The borrowed array as the core's `ArrayArg` (C-contiguous, else an `InputError`).
pub(crate) fn arg<'a, T: Element>(
    array: &'a PyReadonlyArrayDyn<'_, T>,
    name: &'static str,
) -> PyResult<ArrayArg<'a, T>> {
    let data = array.as_slice().map_err(|_| unreadable(name, "it must be C-contiguous"))?;
    Ok(ArrayArg { name, data, shape: array.shape() })
}

/// Per-call arguments shared by the routing entry points, taken as keywords:
/// `training`, `token_mask`, `expert_bias`, `step`, `sequence_length`,
/// `return_probs`, `batch_shape`, `replay` (see `moe_router.route_logits`).
/// A replay without a `token_mask` routes the recording's tokens.
struct CallArgs<'py> {
    training: bool,
    mask_arg: Option<Bound<'py, PyAny>>,
    token_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    expert_bias: Option<PyReadonlyArrayDyn<'py, f64>>,
    step: u64,
    sequence_length: Option<usize>,
    return_probs: bool,
    batch_shape: Option<Vec<usize>>,
    replay: Option<Bound<'py, RecordedRoute>>,
}

impl<'py> CallArgs<'py> {
    /// The keywords of a call on `num_experts` experts (the width of `expert_bias`).
    fn from_kwargs(kwargs: Option<&Bound<'py, PyDict>>, num_experts: usize) -> PyResult<Self> {
        let mut args = CallArgs {
            training: false,
            mask_arg: None,
            token_mask: None,
            expert_bias: None,
            step: 0,
            sequence_length: None,
            return_probs: false,
            batch_shape: None,
            replay: None,
        };
        for (key, value) in kwargs.into_iter().flatten() {
            let key: String = key.extract()?;
            let input = Family::Input;
            match key.as_str() {
                _ if value.is_none() && key != "training" && key != "return_probs" && key != "step" => {}
                "training" => args.training = flag(&value, "training", input)?,
                "return_probs" => args.return_probs = flag(&value, "return_probs", input)?,
                "step" => args.step = integer(&value, "step", 0, u64::MAX.into(), input)?,
                "sequence_length" => args.sequence_length = Some(count(&value, "sequence_length", 0, input)?),
                "batch_shape" => {
                    let dims: PyResult<Vec<usize>> =
                        value.try_iter()?.map(|d| count(&d?, "batch_shape", 0, input)).collect();
                    args.batch_shape = Some(dims?);
                }
                "token_mask" => args.mask_arg = Some(value),
                "expert_bias" => {
                    let bias = inputs::expert_bias(&value, num_experts)?.into_any();
                    args.expert_bias = Some(borrow::<f64>(&bias, "expert_bias", None)?);
                }
                "replay" => {
                    let expected = "a moe_router.RecordedRoute (one layer; index a RecordedRoutes by layer)";
                    args.replay = Some(
                        value.cast::<RecordedRoute>().map_err(|_| wrong_type("replay", expected, &value))?.clone(),
                    );
                }
                _ => return Err(PyTypeError::new_err(format!("unexpected keyword argument '{key}'"))),
            }
        }
        Ok(args)
    }

    /// Read the call's rows (logits or hidden states) and, with them, its token
    /// mask, batch shape and sequence length (see [`inputs::rows_and_mask`]).
    fn read_rows(
        &mut self,
        x: &Bound<'py, PyAny>,
        name: &str,
        width: usize,
        width_name: &str,
        dtype: Option<inputs::Float>,
        kinds: inputs::Kinds,
    ) -> PyResult<Bound<'py, PyAny>> {
        let rows = inputs::rows_and_mask(x, name, width, width_name, self.mask_arg.as_ref(), dtype, kinds)?;
        if let Some(mask) = rows.mask {
            self.token_mask = Some(borrow::<bool>(mask.as_any(), "token_mask", None)?);
        }
        if self.sequence_length.is_none() && rows.batch_shape.len() == 2 {
            self.sequence_length = Some(rows.batch_shape[1]);
        }
        self.batch_shape.get_or_insert(rows.batch_shape);
        if let (Some(r), None) = (&self.replay, &self.token_mask) {
            if r.get().has_padding() {
                self.token_mask = Some(borrow::<bool>(r.get().token_mask_array(r.py()), "replay", None)?);
            }
        }
        Ok(rows.array.into_any())
    }

    fn call<'a>(&'a self, cancel: &'a AtomicBool) -> PyResult<RouteCall<'a>> {
        Ok(RouteCall {
            training: self.training,
            token_mask: contiguous(self.token_mask.as_ref(), "token_mask")?,
            expert_bias: contiguous(self.expert_bias.as_ref(), "expert_bias")?,
            step: self.step,
            sequence_length: self.sequence_length,
            return_probs: self.return_probs,
            cancel: Some(cancel),
            replay: self.replay.as_ref().map(|r| r.get().as_replay()),
            ..RouteCall::default()
        })
    }

    /// What a decision keeps to differentiate this call on `source`.
    fn backward_inputs(&self, source: SavedSource, config: &PyRouterConfig) -> BackwardInputs {
        BackwardInputs {
            source,
            config: config.inner.clone(),
            training: self.training,
            step: self.step,
            sequence_length: self.sequence_length,
            token_mask: self.token_mask.as_ref().map(|m| m.as_any().clone().unbind()),
        }
    }

    /// Release the GIL, run `route` in the pool, and wrap its result. When
    /// `return_probs`, the core allocates the `[T, E]` probabilities with the
    /// rest of the result (a NumPy array allocated here could be made writeable
    /// again by its user; the decision's views of the core's buffer cannot).
    ///
    /// While the pool works, the calling thread checks for a pending signal every
    /// `threads::POLL` (taking the GIL for a moment): on Ctrl-C the core stops at
    /// its next chunk and the call raises the signal handler's exception
    /// (`KeyboardInterrupt`) within about 100 ms, instead of when the call ends.
    fn run(
        &self,
        py: Python<'py>,
        shape: (usize, usize),
        route: impl FnOnce(&RouteCall<'_>, Option<&mut [f32]>) -> core::Result<Routing> + Send,
    ) -> PyResult<RoutingDecision> {
        let cancel = AtomicBool::new(false);
        let call = self.call(&cancel)?;
        let mut signal: Option<PyErr> = None;
        let pending = || match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(err) => {
                signal = Some(err);
                true
            }
        };
        let routing =
            py.detach(|| threads::install_interruptible(shape.0, shape.1, &cancel, || route(&call, None), pending));
        // The handler's exception wins even if the routing finished: the signal was consumed.
        if let Some(err) = signal {
            return Err(err);
        }
        let routing = routing.map_err(to_py)?;
        let batch_shape = self.batch_shape.clone().unwrap_or_else(|| vec![routing.num_tokens]);
        let mask = self.token_mask.as_ref().map(|m| m.as_any().clone().unbind());
        Ok(RoutingDecision::new(py, routing, &batch_shape, None)?.with_token_mask(mask))
    }
}

fn contiguous<'a, T: Element>(a: Option<&'a PyReadonlyArrayDyn<'_, T>>, name: &str) -> PyResult<Option<&'a [T]>> {
    a.map(|a| a.as_slice().map_err(|_| unreadable(name, "it must be C-contiguous"))).transpose()
}

/// Route ``[T, E]`` or ``[B, S, E]`` logits (see :func:`moe_router.route_logits`,
/// which documents the arguments); C-contiguous float32/float64 input is read in place.
/// Raises ``InputTypeError``/``ConfigTypeError`` for wrong types, ``InputError``/``ConfigError``
/// for bad values.
#[pyfunction]
#[pyo3(signature = (logits, config, **call))]
fn route_logits<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    config: &Bound<'py, PyAny>,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<RoutingDecision> {
    let config = inputs::config(config)?.get();
    let e = config.inner.num_experts;
    let mut args = CallArgs::from_kwargs(call, e)?;
    let logits = args.read_rows(logits, "logits", e, "num_experts", None, inputs::Kinds::Real)?;
    with_dtype!(&logits, "logits", FLOAT_ARRAY, [f32, f64], T => {
        let view = borrow::<T>(&logits, "logits", None)?;
        let x = arg(&view, "logits")?;
        let [t, e] = two_d(&x)?;
        let source = SliceLogits::new(x.data, t, e).map_err(to_py)?;
        let decision = args.run(py, (t, e), |call, p| core::route_into(&source, &config.inner, call, p))?;
        Ok(decision.with_backward(args.backward_inputs(SavedSource::Logits(logits.clone().unbind()), config)))
    })
}

/// The first dimension of a weight argument (D), 0 when it has none.
fn leading_dim(weight: &Bound<'_, PyAny>) -> usize {
    weight.cast::<PyUntypedArray>().ok().and_then(|w| w.shape().first().copied()).unwrap_or(0)
}

/// Route ``[T, D]`` or ``[B, S, D]`` hidden states through the linear router
/// ``hidden @ weight + bias`` (weight ``[D, E]``, bias ``[E]`` or None); the product
/// is computed chunk by chunk inside the routing pass. The hidden states are read
/// as ``dtype`` (None: their own float32/float64); weights of another dtype are
/// converted once and kept in the dict ``casts``.
#[pyfunction]
#[pyo3(signature = (hidden, weight, bias, config, *, dtype=None, casts=None, **call))]
#[allow(clippy::too_many_arguments)]
fn route_hidden<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    config: &Bound<'py, PyAny>,
    dtype: Option<&Bound<'py, PyAny>>,
    casts: Option<&Bound<'py, PyDict>>,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<RoutingDecision> {
    let config = inputs::config(config)?.get();
    let mut args = CallArgs::from_kwargs(call, config.inner.num_experts)?;
    let dtype = inputs::dtype_arg(dtype, "dtype", Family::Input)?;
    let hidden = args.read_rows(hidden, "hidden", leading_dim(weight), "input_dim", dtype, inputs::Kinds::Float)?;
    let float = hidden.cast::<PyUntypedArray>().ok().and_then(|h| inputs::Float::of(&h.dtype()));
    let weights = match float {
        Some(f) => inputs::cast(py, casts, &[Some(weight), bias], f)?,
        None => vec![Some(weight.clone()), bias.cloned()],
    };
    let (weight, bias) = (weights[0].as_ref().unwrap_or(weight), weights[1].as_ref());
    with_dtype!(&hidden, "hidden", FLOAT_ARRAY, [f32, f64], T => {
        let (h, w) = (borrow::<T>(&hidden, "hidden", None)?, borrow::<T>(weight, "weight", Some(HIDDEN_DTYPE))?);
        let b = bias.map(|b| borrow::<T>(b, "bias", Some(HIDDEN_DTYPE))).transpose()?;
        let b = b.as_ref().map(|b| arg(b, "bias")).transpose()?;
        let source = LinearLogits::from_arrays(arg(&h, "hidden")?, arg(&w, "weight")?, b).map_err(to_py)?;
        let shape = (source.num_tokens(), source.num_experts());
        let decision = args.run(py, shape, |call, p| core::route_into(&source, &config.inner, call, p))?;
        let saved = SavedSource::Linear {
            hidden: hidden.clone().unbind(),
            weight: weight.clone().unbind(),
            bias: bias.map(|b| b.clone().unbind()),
        };
        Ok(decision.with_backward(args.backward_inputs(saved, config)))
    })
}

/// The gate's weights as the hidden states' dtype (converted once, kept in `casts`).
fn gate_weights<'py>(
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    casts: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let float = hidden.cast::<PyUntypedArray>().ok().and_then(|h| inputs::Float::of(&h.dtype()));
    let Some(float) = float else { return Ok((group_weight.clone(), expert_weight.clone())) };
    let cast = inputs::cast(hidden.py(), casts, &[Some(group_weight), Some(expert_weight)], float)?;
    let mut cast = cast.into_iter().flatten();
    match (cast.next(), cast.next()) {
        (Some(gw), Some(ew)) => Ok((gw, ew)),
        _ => Ok((group_weight.clone(), expert_weight.clone())),
    }
}

/// Route ``[T, D]`` or ``[B, S, D]`` hidden states through the hierarchical gate
/// (group weight ``[D, G]``, expert weights ``[G, D, P]``); ``group_top_k`` None is
/// the dense gate. The routing treats the gate's probabilities as the scores; the
/// z-loss is the group router's. ``dtype`` and ``casts`` as in :func:`route_hidden`.
#[pyfunction]
#[pyo3(signature = (hidden, group_weight, expert_weight, group_top_k, config, *, dtype=None, casts=None, **call))]
#[allow(clippy::too_many_arguments)]
fn route_gate<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    group_top_k: Option<&Bound<'py, PyAny>>,
    config: &Bound<'py, PyAny>,
    dtype: Option<&Bound<'py, PyAny>>,
    casts: Option<&Bound<'py, PyDict>>,
    call: Option<&Bound<'py, PyDict>>,
) -> PyResult<RoutingDecision> {
    let config = inputs::config(config)?.get();
    let mut args = CallArgs::from_kwargs(call, config.inner.num_experts)?;
    let group_top_k = gate_groups(group_top_k)?;
    let dtype = inputs::dtype_arg(dtype, "dtype", Family::Input)?;
    let width = leading_dim(group_weight);
    let hidden = args.read_rows(hidden, "hidden", width, "input_dim", dtype, inputs::Kinds::Float)?;
    let (group_weight, expert_weight) = gate_weights(&hidden, group_weight, expert_weight, casts)?;
    let options = config.inner.for_gate();
    with_dtype!(&hidden, "hidden", FLOAT_ARRAY, [f32, f64], T => {
        let decision = with_gate::<T, _>(&hidden, &group_weight, &expert_weight, options.num_experts, group_top_k, |gate| {
            let shape = (gate.num_tokens(), gate.num_experts());
            args.run(py, shape, |call, p| core::route_into(gate, &options, call, p))
        })?;
        let saved = SavedSource::Gate {
            hidden: hidden.clone().unbind(),
            group_weight: group_weight.clone().unbind(),
            expert_weight: expert_weight.clone().unbind(),
            group_top_k,
        };
        Ok(decision.with_backward(args.backward_inputs(saved, config)))
    })
}

/// Borrow the gate's arrays as `T` (the hidden states' dtype) and run `f` on the gate.
pub(crate) fn with_gate<'py, T: GemmScalar + Element + Logit, R>(
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    num_experts: usize,
    group_top_k: Option<usize>,
    f: impl FnOnce(&HierarchicalGate<'_, T>) -> PyResult<R>,
) -> PyResult<R> {
    let h = borrow::<T>(hidden, "hidden", None)?;
    let gw = borrow::<T>(group_weight, "group_weight", Some(HIDDEN_DTYPE))?;
    let ew = borrow::<T>(expert_weight, "expert_weight", Some(HIDDEN_DTYPE))?;
    let (h, gw, ew) = (arg(&h, "hidden")?, arg(&gw, "group_weight")?, arg(&ew, "expert_weight")?);
    f(&HierarchicalGate::from_arrays(h, gw, ew, num_experts, group_top_k).map_err(to_py)?)
}

/// The hierarchical gate's probabilities (``batch_shape + [E]``, in the hidden
/// states' dtype) and per-token z-loss terms ``[T]``, for ``[T, D]`` or ``[B, S, D]``
/// hidden states without padding. ``casts`` as in :func:`route_hidden`.
#[pyfunction]
#[pyo3(signature = (hidden, group_weight, expert_weight, num_experts, group_top_k=None, *, casts=None))]
fn gate_forward<'py>(
    py: Python<'py>,
    hidden: &Bound<'py, PyAny>,
    group_weight: &Bound<'py, PyAny>,
    expert_weight: &Bound<'py, PyAny>,
    num_experts: &Bound<'py, PyAny>,
    group_top_k: Option<&Bound<'py, PyAny>>,
    casts: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let num_experts = experts_arg(num_experts)?;
    let group_top_k = gate_groups(group_top_k)?;
    if inputs::has_masked_entries(hidden)? {
        return Err(errors::type_error(
            Family::Input,
            "hidden is a masked array with masked entries; forward computes every token's probabilities (route \
             it with ExpertRouter, which treats masked tokens as padding, or pass hidden.filled(0))"
                .into(),
        ));
    }
    let width = leading_dim(group_weight);
    let (hidden, batch_shape) = inputs::float_rows(hidden, "hidden", width, "input_dim", None, inputs::Kinds::Float)?;
    let hidden = hidden.into_any();
    let (group_weight, expert_weight) = gate_weights(&hidden, group_weight, expert_weight, casts)?;
    with_dtype!(&hidden, "hidden", FLOAT_ARRAY, [f32, f64], T => {
        let view = borrow::<T>(&hidden, "hidden", None)?;
        let rows = arg(&view, "hidden")?.data.chunks(width.max(1));
        if let Some(t) = rows.into_iter().position(|row| row.iter().any(|v| !v.is_finite())) {
            return Err(errors::value_error(
                Family::Input,
                format!("hidden contains NaN or infinite values at token {t} (the first offending token)"),
            ));
        }
        with_gate::<T, _>(&hidden, &group_weight, &expert_weight, num_experts, group_top_k, |gate| {
            let (t, e) = (gate.num_tokens(), gate.num_experts());
            let (probs, z) = py.detach(|| threads::install(t, e, || gate_probabilities(gate)));
            let probs = arrays::matrix(py, probs, t, e)?;
            let shape: Vec<usize> = batch_shape.iter().copied().chain([e]).collect();
            let probs = probs.call_method1("reshape", (PyTuple::new(py, shape)?,))?;
            Ok((probs, arrays::vector(py, z).into_any()))
        })
    })
}

/// ``(G, P)``: the hierarchical gate's ``G = ceil(sqrt(E))`` groups of ``P = ceil(E / G)`` experts.
#[pyfunction]
fn gate_layout(num_experts: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let s = GateShape::for_experts(experts_arg(num_experts)?);
    Ok((s.groups, s.per_group))
}

/// The gate's `num_experts` argument: an int in `[1, 2**31 - 1]` (expert ids are int32).
fn experts_arg(value: &Bound<'_, PyAny>) -> PyResult<usize> {
    integer(value, "num_experts", 1, i32::MAX.into(), Family::Config)
}

/// The gate's `group_top_k` argument: None (dense) or an int >= 1 (the gate checks it against G).
fn gate_groups(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    value.filter(|v| !v.is_none()).map(|v| count(v, "group_top_k", 1, Family::Config)).transpose()
}

/// `[T, E]` of a 2-D argument (the Python wrapper flattens `[B, S, E]`).
fn two_d<T>(x: &ArrayArg<'_, T>) -> PyResult<[usize; 2]> {
    x.check_shape(&[None, None], "[T, E]").map_err(to_py)?;
    Ok([x.shape[0], x.shape[1]])
}

/// Route with ``n`` threads from now on (0: one thread per core).
///
/// The same knob as the environment variable ``MOE_ROUTER_NUM_THREADS`` (read at
/// first use). Results are bit-for-bit identical for any thread count.
///
/// Parameters
/// ----------
/// n : int
///     Threads, ``0 <= n <= MAX_THREADS`` (1024).
///
/// Raises
/// ------
/// ConfigError
///     ``n`` is an integer outside that range.
/// ConfigTypeError
///     ``n`` is not an int (a float, a bool, a string, ...).
#[pyfunction]
fn set_num_threads(n: &Bound<'_, PyAny>) -> PyResult<()> {
    let most = i128::try_from(threads::MAX_THREADS).unwrap_or(i128::MAX);
    let count = integer(n, "num_threads", 0, most, Family::Config)?;
    threads::set_num_threads(count).map_err(errors::bad_threads)
}

/// Threads the next routing call will use.
#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

/// A `MOE_ROUTER_SIMD` the core does not know is ignored (the best level runs):
/// say so once, at import, rather than let a mistyped level go unnoticed.
fn warn_unknown_simd_request(py: Python<'_>) -> PyResult<()> {
    let Ok(value) = std::env::var("MOE_ROUTER_SIMD") else { return Ok(()) };
    if value.trim().is_empty() || core::SimdLevel::parse(&value).is_some() {
        return Ok(());
    }
    let message = std::ffi::CString::new(format!(
        "MOE_ROUTER_SIMD={value:?} is not a level (avx512, avx2, off or portable); it is ignored and the best \
         level the CPU supports runs"
    ))
    .unwrap_or_default();
    PyErr::warn(py, &py.get_type::<pyo3::exceptions::PyRuntimeWarning>(), &message, 1)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    warn_unknown_simd_request(py)?;
    m.add_class::<PyRouterConfig>()?;
    m.add_class::<RoutingDecision>()?;
    m.add_class::<ExpertAssignment>()?;
    m.add_class::<RecordedRoute>()?;
    m.add_class::<RecordedRoutes>()?;
    m.add_class::<plan::PyDispatchPlan>()?;
    m.add_class::<global_balance::PyGlobalBalance>()?;
    m.add_class::<stats::PyRoutingStats>()?;
    m.add_class::<balancer::PyLoadBalancer>()?;
    m.add_class::<balancer::PyLoadBalancingStats>()?;
    exchange::register(m)?;
    presets::register(m)?;
    for f in [
        wrap_pyfunction!(route_logits, m)?,
        wrap_pyfunction!(route_hidden, m)?,
        wrap_pyfunction!(route_gate, m)?,
        wrap_pyfunction!(gate_forward, m)?,
        wrap_pyfunction!(peer_loss::peer_load_balance_loss, m)?,
        wrap_pyfunction!(gate_layout, m)?,
        wrap_pyfunction!(backward::router_backward, m)?,
        wrap_pyfunction!(plan::moe_align_block_size, m)?,
        wrap_pyfunction!(pool::release_memory, m)?,
        wrap_pyfunction!(global_balance::sign_bias_update, m)?,
        wrap_pyfunction!(balancer::default_bias_update_rate, m)?,
        wrap_pyfunction!(set_num_threads, m)?,
        wrap_pyfunction!(get_num_threads, m)?,
        wrap_pyfunction!(gate_choice::hierarchical_gate, m)?,
        wrap_pyfunction!(inputs::read_rows, m)?,
        wrap_pyfunction!(inputs::read_weight, m)?,
        wrap_pyfunction!(inputs::float_dtype, m)?,
        wrap_pyfunction!(inputs::cast_arrays, m)?,
        wrap_pyfunction!(args::py::check_flag, m)?,
        wrap_pyfunction!(args::py::check_integer, m)?,
        wrap_pyfunction!(args::py::check_real, m)?,
        wrap_pyfunction!(args::py::check_choice, m)?,
        wrap_pyfunction!(args::py::check_instance, m)?,
        wrap_pyfunction!(args::py::wrong_type_error, m)?,
        wrap_pyfunction!(args::py::is_int, m)?,
        wrap_pyfunction!(args::py::is_real, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add("RouterError", py.get_type::<errors::RouterError>())?;
    m.add("ConfigError", py.get_type::<errors::ConfigError>())?;
    m.add("InputError", py.get_type::<errors::InputError>())?;
    m.add("ConfigTypeError", errors::type_error_class(py, Family::Config)?)?;
    m.add("InputTypeError", errors::type_error_class(py, Family::Input)?)?;
    m.add("CHUNK_TOKENS", core::CHUNK_TOKENS)?;
    m.add("MAX_THREADS", threads::MAX_THREADS)?;
    m.add("DEFAULT_RELATIVE_BIAS_RATE", core::DEFAULT_RELATIVE_BIAS_RATE)?;
    m.add("PEERS", PyTuple::new(py, Peer::spellings().collect::<Vec<_>>())?)?;
    if let Err(text) = threads::from_env() {
        let message = format!(
            "{}={text:?} is not an integer in [0, {}]; using one thread per core",
            threads::ENV_VAR,
            threads::MAX_THREADS
        );
        PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &std::ffi::CString::new(message)?, 1)?;
    }
    Ok(())
}

//! `RoutingDecision.backward`: the cotangents from Python, the saved call,
//! and the core's closed-form gradient, with the GIL released.

use crate::arg;
use moe_router_core::{
    self as core, Cotangents, LinearLogits, Logit, RouteCall, SavedRouting, SliceLogits, WeightGrads,
};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays;
use crate::decision::{BackwardInputs, RoutingDecision, SavedSource};
use crate::errors::{config_error, out_not_contiguous, to_py, unborrowable, unreadable, wrong_type};
use crate::plan::as_numpy;
use crate::threads;

const FLOAT_ARRAY: &str = "a C-contiguous float32 or float64 NumPy array";

/// A real-valued array of `rows x width` (any leading shape whose last axis
/// is `width`) as a C-contiguous `T` array (borrowed when it already is one,
/// converted by NumPy otherwise); finite values only.
fn cotangent<'py, T: Element + Logit>(
    x: &Bound<'py, PyAny>,
    name: &'static str,
    rows: usize,
    width: usize,
    dtype: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let array = as_numpy(x, name)?;
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "f" | "i" | "u") {
        return Err(wrong_type(name, "a real-valued array", &array));
    }
    let shape: Vec<usize> = array.getattr("shape")?.extract()?;
    if shape.last().copied() != Some(width) || shape.iter().product::<usize>() != rows * width {
        return Err(to_py(core::RouterError::shape(
            name,
            format!("[{rows}, {width}] (or the batch shape + [{width}])"),
            format!("{shape:?}"),
        )));
    }
    let flat = array.py().import("numpy")?.getattr("ascontiguousarray")?.call1((&array, dtype))?;
    let view = flat.cast::<PyArrayDyn<T>>()?.try_readonly().map_err(|e| unborrowable(name, e))?;
    let values = view.as_slice().map_err(|e| unreadable(name, e))?;
    // Branch-free, so the check vectorizes; the position is looked up only on failure.
    if !values.iter().fold(true, |all, v| all & v.to_f64().is_finite()) {
        let at = values.iter().position(|v| !v.to_f64().is_finite()).unwrap_or(0);
        return Err(not_finite(&array, name, &shape, width, at, dtype));
    }
    Ok(view)
}

/// The error for cotangent `name` (`array`, as given, of `shape`) whose first
/// non-finite value, once in `dtype`, is at flat position `at`: its index in
/// the given shape, the token row and column, and the value as given (a finite
/// value there overflowed `dtype`).
fn not_finite(
    array: &Bound<'_, PyAny>,
    name: &'static str,
    shape: &[usize],
    width: usize,
    at: usize,
    dtype: &str,
) -> PyErr {
    let mut index = Vec::with_capacity(shape.len());
    let mut rest = at;
    for &n in shape.iter().rev() {
        index.push(rest % n.max(1));
        rest /= n.max(1);
    }
    index.reverse();
    let index: Vec<String> = index.iter().map(|i| i.to_string()).collect();
    // The value as given (a Python float or int), printed by Python.
    let given = array.call_method1("reshape", (-1,)).and_then(|flat| flat.get_item(at)?.call_method0("item"));
    let shown = given.as_ref().ok().and_then(|v| v.repr().ok()).map_or("not finite".into(), |r| r.to_string());
    let overflowed = given.and_then(|v| v.extract::<f64>()).is_ok_and(f64::is_finite);
    let allowed = if overflowed {
        format!("it overflows {dtype}, the dtype {name} is read in; every entry must be finite in {dtype}")
    } else {
        "every entry must be finite".to_string()
    };
    let (token, column) = (at / width.max(1), at % width.max(1));
    to_py(core::RouterError::InvalidEntry {
        argument: name,
        index: format!("[{}]", index.join(", ")),
        value: shown,
        allowed: format!("{allowed} (the first non-finite entry: token {token}, column {column})"),
    })
}

fn readonly<'py, T: Element>(a: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let typed = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| wrong_type(name, &format!("a {} NumPy array", crate::errors::dtype_name::<T>(a.py())), a))?;
    typed.try_readonly().map_err(|e| unborrowable(name, e))
}

/// The decision's saved arrays, borrowed, and the cotangents, checked.
struct Prepared<'py> {
    experts: PyReadonlyArrayDyn<'py, i32>,
    kept: PyReadonlyArrayDyn<'py, bool>,
    rerouted: PyReadonlyArrayDyn<'py, bool>,
    pre_drop: PyReadonlyArrayDyn<'py, i64>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    gw: Option<WeightGradsInput<'py>>,
    gp: Option<PyReadonlyArrayDyn<'py, f32>>,
    balance: Option<Balance>,
}

/// `grad_expert_weights` as given: float32 (the weights' dtype) read in place,
/// any other real dtype as float64.
enum WeightGradsInput<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
}

impl<'py> WeightGradsInput<'py> {
    fn new(g: &Bound<'py, PyAny>, rows: usize, k: usize) -> PyResult<Self> {
        let name = "grad_expert_weights";
        // converted once: a list or a tensor becomes an array here
        let array = as_numpy(g, name)?;
        let dtype: String = array.getattr("dtype")?.getattr("name")?.extract()?;
        Ok(if dtype == "float32" {
            WeightGradsInput::F32(cotangent::<f32>(&array, name, rows, k, "float32")?)
        } else {
            WeightGradsInput::F64(cotangent::<f64>(&array, name, rows, k, "float64")?)
        })
    }

    fn view(&self) -> PyResult<WeightGrads<'_>> {
        let unread = |e| unreadable("grad_expert_weights", e);
        Ok(match self {
            WeightGradsInput::F32(g) => WeightGrads::F32(g.as_slice().map_err(unread)?),
            WeightGradsInput::F64(g) => WeightGrads::F64(g.as_slice().map_err(unread)?),
        })
    }

    fn as_any(&self) -> &Bound<'py, PyAny> {
        match self {
            WeightGradsInput::F32(g) => g.as_any(),
            WeightGradsInput::F64(g) => g.as_any(),
        }
    }
}

/// Counts that replace the decision's own in the balance-loss gradient: a
/// global batch's `[E]` routed assignments and its tokens.
pub struct Balance {
    counts: Vec<i64>,
    tokens: usize,
}

impl Balance {
    /// `tokens_per_expert` and `num_tokens` of `RoutingDecision.backward`: both or neither.
    pub fn from_args(
        counts: Option<&Bound<'_, PyAny>>,
        tokens: Option<&Bound<'_, PyAny>>,
        experts: usize,
    ) -> PyResult<Option<Self>> {
        let (counts, tokens) = match (counts.filter(|c| !c.is_none()), tokens.filter(|t| !t.is_none())) {
            (None, None) => return Ok(None),
            (Some(c), Some(t)) => (c, t),
            _ => {
                return Err(crate::errors::value_error(
                    crate::errors::Family::Input,
                    "tokens_per_expert and num_tokens go together: pass both (a global batch's counts and \
                     tokens, e.g. GlobalBalanceAccumulator.tokens_per_expert and .num_tokens) or neither"
                        .into(),
                ))
            }
        };
        let (counts, shape) = crate::plan::int_array(counts, "tokens_per_expert")?;
        if shape != [experts] {
            let err = core::RouterError::shape(
                "tokens_per_expert",
                format!("[{experts}] (num_experts)"),
                format!("{shape:?}"),
            );
            return Err(to_py(err));
        }
        if let Some(i) = counts.iter().position(|&n| n < 0) {
            return Err(to_py(core::RouterError::InvalidEntry {
                argument: "tokens_per_expert",
                index: format!("[{i}]"),
                value: counts[i].to_string(),
                allowed: "counts must be >= 0".into(),
            }));
        }
        let tokens = crate::args::count(tokens, "num_tokens", 0, crate::errors::Family::Input)?;
        Ok(Some(Balance { counts, tokens }))
    }
}

impl<'py> Prepared<'py> {
    fn new(
        d: &RoutingDecision,
        py: Python<'py>,
        inputs: &BackwardInputs,
        grad_expert_weights: Option<&Bound<'py, PyAny>>,
        grad_auxiliary_loss: f64,
        grad_router_probs: Option<&Bound<'py, PyAny>>,
        balance: Option<Balance>,
    ) -> PyResult<Self> {
        if !grad_auxiliary_loss.is_finite() {
            return Err(crate::errors::value_error(
                crate::errors::Family::Input,
                format!("invalid grad_auxiliary_loss: got {grad_auxiliary_loss}; must be finite"),
            ));
        }
        let (t, k, e) = (d.total_tokens(), d.top_k(), d.num_experts());
        let (experts, kept, rerouted) = d.choice_arrays(py);
        Ok(Prepared {
            gw: grad_expert_weights.map(|g| WeightGradsInput::new(g, t, k)).transpose()?,
            gp: grad_router_probs.map(|g| cotangent::<f32>(g, "grad_router_probs", t, e, "float32")).transpose()?,
            experts: readonly::<i32>(&experts, "expert_indices")?,
            kept: readonly::<bool>(&kept, "kept")?,
            rerouted: readonly::<bool>(&rerouted, "rerouted")?,
            pre_drop: readonly::<i64>(&d.pre_drop_counts(py), "pre_drop_tokens_per_expert")?,
            mask: inputs.token_mask.as_ref().map(|m| readonly::<bool>(m.bind(py), "token_mask")).transpose()?,
            balance,
        })
    }

    /// The core's views: the saved routing, the call, the cotangents.
    fn views<'a>(
        &'a self,
        d: &'a RoutingDecision,
        inputs: &BackwardInputs,
        grad_auxiliary_loss: f64,
    ) -> PyResult<(SavedRouting<'a>, RouteCall<'a>, Cotangents<'a>)> {
        let (_, routed, original) = d.backward_parts();
        let experts = self.experts.as_slice().map_err(|e| unreadable("expert_indices", e))?;
        let saved = SavedRouting {
            expert_indices: experts,
            original_experts: if original.is_empty() { experts } else { original },
            routed,
            kept: self.kept.as_slice().map_err(|e| unreadable("kept", e))?,
            rerouted: self.rerouted.as_slice().map_err(|e| unreadable("rerouted", e))?,
            pre_drop_tokens_per_expert: match &self.balance {
                Some(b) => &b.counts,
                None => self.pre_drop.as_slice().map_err(|e| unreadable("pre_drop_tokens_per_expert", e))?,
            },
            active_tokens: d.active(),
            balance_tokens: self.balance.as_ref().map_or(d.active(), |b| b.tokens),
        };
        let call = RouteCall {
            training: inputs.training,
            token_mask: self
                .mask
                .as_ref()
                .map(|m| m.as_slice())
                .transpose()
                .map_err(|e| unreadable("token_mask", e))?,
            step: inputs.step,
            sequence_length: inputs.sequence_length,
            ..RouteCall::default()
        };
        let cot = Cotangents {
            expert_weights: self.gw.as_ref().map(|g| g.view()).transpose()?,
            auxiliary_loss: grad_auxiliary_loss,
            router_probs: self
                .gp
                .as_ref()
                .map(|g| g.as_slice())
                .transpose()
                .map_err(|e| unreadable("grad_router_probs", e))?,
        };
        Ok((saved, call, cot))
    }
}

/// The decision's saved call (a ConfigError saying `not_routed` when it has
/// none) and the cotangents, checked.
#[allow(clippy::too_many_arguments)]
fn prepare<'d, 'py>(
    py: Python<'py>,
    d: &'d RoutingDecision,
    grad_expert_weights: Option<&Bound<'py, PyAny>>,
    grad_auxiliary_loss: f64,
    grad_router_probs: Option<&Bound<'py, PyAny>>,
    balance: Option<Balance>,
    not_routed: &'static str,
) -> PyResult<(&'d BackwardInputs, Prepared<'py>)> {
    let (inputs, _, _) = d.backward_parts();
    let inputs = inputs.ok_or_else(|| config_error(not_routed.into()))?;
    let prepared = Prepared::new(d, py, inputs, grad_expert_weights, grad_auxiliary_loss, grad_router_probs, balance)?;
    Ok((inputs, prepared))
}

/// `grad_auxiliary_loss`: a real number, 1.0 when None.
pub fn aux_cotangent(value: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
    value
        .map(|v| crate::args::real(v, "grad_auxiliary_loss", crate::errors::Family::Input))
        .transpose()
        .map(|v| v.unwrap_or(1.0))
}

/// See `RoutingDecision.backward`.
#[allow(clippy::too_many_arguments)]
pub fn decision_backward<'py>(
    d: &RoutingDecision,
    py: Python<'py>,
    grad_expert_weights: Option<&Bound<'py, PyAny>>,
    grad_auxiliary_loss: f64,
    grad_router_probs: Option<&Bound<'py, PyAny>>,
    balance: Option<Balance>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    const NOT_LOGITS: &str = "invalid backward: this decision was not routed from logits; for hidden states use \
                              ExpertRouter.backward(decision)";
    let (inputs, prepared) =
        prepare(py, d, grad_expert_weights, grad_auxiliary_loss, grad_router_probs, balance, NOT_LOGITS)?;
    let SavedSource::Logits(logits) = &inputs.source else { return Err(config_error(NOT_LOGITS.into())) };
    let (saved, call, cot) = prepared.views(d, inputs, grad_auxiliary_loss)?;
    let (t, e) = (d.total_tokens(), d.num_experts());
    let mut shape = d.batch_shape_vec(py)?;
    shape.push(e);
    let logits = logits.bind(py);
    with_dtype!(logits, "logits", FLOAT_ARRAY, [f32, f64], F => {
        let view = readonly::<F>(logits, "logits")?;
        let data = view.as_slice().map_err(|e| unreadable("logits", e))?;
        let source = SliceLogits::new(data, t, e).map_err(to_py)?;
        // the backward writes every element, so a fresh output may be recycled memory
        let out = crate::plan::output::<F>(py, out.filter(|o| !o.is_none()), &shape[..], "logits")?;
        {
            let read = [
                Some(("logits", view.as_any())),
                prepared.gw.as_ref().map(|g| ("grad_expert_weights", g.as_any())),
                prepared.gp.as_ref().map(|g| ("grad_router_probs", g.as_any())),
            ];
            let read: Vec<_> = read.into_iter().flatten().collect();
            let mut guard = crate::plan::write_target(&out, &read)?;
            let target = guard.as_slice_mut().map_err(|_| out_not_contiguous())?;
            py.detach(|| threads::install(t, e, || core::backward_logits(&source, &inputs.config, &call, &saved, &cot, target)))
                .map_err(to_py)?;
        }
        Ok(out.into_any())
    })
}

/// The backward of a decision of ``route_hidden`` or ``route_gate`` (see
/// ``ExpertRouter.backward``), in the hidden states' dtype: the linear router's
/// ``(grad_hidden [T, D], grad_weight [D, E], grad_bias [E])``, or the
/// hierarchical gate's ``(grad_hidden [T, D], grad_group_weight [D, G],
/// grad_expert_weight [G, D, P])``.
#[pyfunction]
#[pyo3(signature = (decision, grad_expert_weights=None, grad_auxiliary_loss=None, grad_router_probs=None, tokens_per_expert=None, num_tokens=None))]
#[allow(clippy::too_many_arguments)]
pub fn router_backward<'py>(
    py: Python<'py>,
    decision: &RoutingDecision,
    grad_expert_weights: Option<&Bound<'py, PyAny>>,
    grad_auxiliary_loss: Option<&Bound<'py, PyAny>>,
    grad_router_probs: Option<&Bound<'py, PyAny>>,
    tokens_per_expert: Option<&Bound<'py, PyAny>>,
    num_tokens: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let d = decision;
    let aux = aux_cotangent(grad_auxiliary_loss)?;
    const NOT_HIDDEN: &str = "invalid backward: this decision was not routed from hidden states by an ExpertRouter \
                              (linear router or hierarchical gate)";
    let balance = Balance::from_args(tokens_per_expert, num_tokens, d.num_experts())?;
    let (inputs, prepared) = prepare(py, d, grad_expert_weights, aux, grad_router_probs, balance, NOT_HIDDEN)?;
    let (saved, call, cot) = prepared.views(d, inputs, aux)?;
    let (t, e) = (d.total_tokens(), d.num_experts());
    match &inputs.source {
        SavedSource::Logits(_) => Err(config_error(NOT_HIDDEN.into())),
        SavedSource::Linear { hidden, weight, bias } => {
            let (hidden, weight) = (hidden.bind(py), weight.bind(py));
            with_dtype!(hidden, "hidden", FLOAT_ARRAY, [f32, f64], F => {
                let (h, w) = (readonly::<F>(hidden, "hidden")?, readonly::<F>(weight, "weight")?);
                let b = bias.as_ref().map(|b| readonly::<F>(b.bind(py), "bias")).transpose()?;
                let b = b.as_ref().map(|b| arg(b, "bias")).transpose()?;
                let source = LinearLogits::from_arrays(arg(&h, "hidden")?, arg(&w, "weight")?, b).map_err(to_py)?;
                let dim = h.shape()[1];
                let g = py
                    .detach(|| threads::install(t, e, || core::backward_linear(&source, &inputs.config, &call, &saved, &cot)))
                    .map_err(to_py)?;
                Ok((
                    arrays::matrix(py, g.hidden, t, dim)?.into_any(),
                    arrays::matrix(py, g.weight, dim, e)?.into_any(),
                    arrays::vector(py, g.bias).into_any(),
                ))
            })
        }
        SavedSource::Gate { hidden, group_weight, expert_weight, group_top_k } => {
            let options = inputs.config.for_gate();
            let (hidden, gw, ew) = (hidden.bind(py), group_weight.bind(py), expert_weight.bind(py));
            with_dtype!(hidden, "hidden", FLOAT_ARRAY, [f32, f64], F => {
                crate::with_gate::<F, _>(hidden, gw, ew, options.num_experts, *group_top_k, |gate| {
                    let (shape, dim) = (gate.shape(), gate.dim());
                    let g = py
                        .detach(|| threads::install(t, e, || core::backward_gate(gate, &options, &call, &saved, &cot)))
                        .map_err(to_py)?;
                    Ok((
                        arrays::matrix(py, g.hidden, t, dim)?.into_any(),
                        arrays::matrix(py, g.group_weight, dim, shape.groups)?.into_any(),
                        arrays::vector(py, g.expert_weight).reshape([shape.groups, dim, shape.per_group])?.into_any(),
                    ))
                })
            })
        }
    }
}

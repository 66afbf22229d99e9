//! `RoutingDecision` and `ExpertAssignment`: the core's result as Python objects.
//!
//! The decision keeps the core's `Routing` as it is; each array getter hands out
//! a read-only NumPy view of one of its vectors, made when it is read (arrays
//! nobody reads are never made), whose base is the decision.

use std::sync::OnceLock;

use moe_router_core::{Assignments, LossInputs, Routing};
use numpy::ndarray::{ArrayView, Dimension, IntoDimension};
use numpy::{
    npyffi, Element, PyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::args::{integer, real};
use crate::arrays;
use crate::errors::Family;
use crate::plan::PyDispatchPlan;
use moe_router_core::PlanLayout;

/// One kept (token, expert) assignment.
///
/// Attributes
/// ----------
/// expert_id : int
///     The expert, in ``[0, E)``.
/// probability : float
///     The assignment's combine weight (``expert_weights[token_idx, expert_rank]``).
/// token_idx : int
///     The token, in flattened ``[T]`` order.
/// expert_rank : int
///     0 for the token's best expert, 1 for the next, ...
#[pyclass(frozen, eq, get_all, module = "moe_router")]
#[derive(Clone, PartialEq)]
pub struct ExpertAssignment {
    expert_id: i64,
    probability: f64,
    token_idx: i64,
    expert_rank: i64,
}

#[pymethods]
impl ExpertAssignment {
    /// Raises ``InputTypeError`` for a non-int id, token or rank (or a non-real
    /// probability), ``InputError`` for an int outside int64.
    #[new]
    #[pyo3(signature = (expert_id, probability, token_idx, expert_rank))]
    fn new(
        expert_id: &Bound<'_, PyAny>,
        probability: &Bound<'_, PyAny>,
        token_idx: &Bound<'_, PyAny>,
        expert_rank: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let int = |v: &Bound<'_, PyAny>, name: &str| integer(v, name, i64::MIN.into(), i64::MAX.into(), Family::Input);
        Ok(ExpertAssignment {
            expert_id: int(expert_id, "expert_id")?,
            probability: real(probability, "probability", Family::Input)?,
            token_idx: int(token_idx, "token_idx")?,
            expert_rank: int(expert_rank, "expert_rank")?,
        })
    }

    /// True when ``0 <= probability <= 1`` (a ``weight_scale`` > 1 can exceed it).
    fn is_valid(&self) -> bool {
        (0.0..=1.0).contains(&self.probability)
    }

    /// ``probability / (expert_rank + 1)``: the rank-discounted weight.
    fn weighted_contribution(&self) -> f64 {
        self.probability / (self.expert_rank as f64 + 1.0)
    }

    fn __repr__(&self) -> String {
        format!(
            "ExpertAssignment(expert_id={}, probability={:?}, token_idx={}, expert_rank={})",
            self.expert_id, self.probability, self.token_idx, self.expert_rank
        )
    }
}

/// How a batch of T tokens is routed to E experts, k choices each.
///
/// Produced by :func:`moe_router.route_logits`, ``ExpertRouter.route_tokens``
/// and ``ExpertRouter.route_logits``. Its arrays are read-only NumPy views of
/// the core's result, not copies: each read of an array attribute makes a new
/// view (``writeable=False``, its ``base`` the decision, which it keeps alive);
/// an array never read is never made. Writing into one raises ``ValueError``,
/// so a decision always holds what the router computed. Semantics:
/// docs/semantics.md.
///
/// Attributes
/// ----------
/// expert_indices : numpy.ndarray, int32, shape [T, k]
///     Chosen experts by rank (best first; ties to the lower expert index).
///     Padding tokens and choices beyond the eligible experts hold the
///     lowest-index remaining experts, never kept.
/// expert_weights : numpy.ndarray, float32, shape [T, k]
///     Combine weights; 0 where the assignment is not kept. Not renormalized
///     after drops unless ``renormalize_after_drop``.
/// expert_slots : numpy.ndarray, int32, shape [T, k]
///     Row of the assignment in its expert's buffer, in ``[0, capacity)``; -1 where not kept.
/// kept : numpy.ndarray, bool, shape [T, k]
///     Whether the assignment survived capacity.
/// rerouted : numpy.ndarray, bool, shape [T, k]
///     Whether the assignment was moved to another expert (``overflow="reroute"``).
/// tokens_per_expert : numpy.ndarray, int64, shape [E]
///     Kept assignments per expert (``expert_capacities`` is an alias).
/// pre_drop_tokens_per_expert : numpy.ndarray, int64, shape [E]
///     Routed assignments per expert before capacity (DeepSpeed ``exp_counts``).
/// expert_prob_mean : numpy.ndarray, float64, shape [E]
///     ``P_e``: mean over active tokens of expert e's share of the token's score
///     distribution (softmax probabilities, or sigmoid scores normalized per token).
/// capacity : int
///     Per-expert capacity; for dropless routing, the largest kept count.
/// dropless : bool
///     True when no capacity limit applied.
/// total_tokens : int
///     T, every row including padding.
/// active_tokens : int
///     Tokens not masked out by ``token_mask``.
/// kept_assignments, dropped_assignments : int
///     ``dropped_assignments = active_tokens * k - kept_assignments``.
/// tokens_dropped : int
///     Active tokens left with no expert at all.
/// load_balance_loss : float
///     ``E * sum_e f_e * P_e`` (Switch Transformer eq. 4, GShard, Megatron-Core):
///     1.0 at perfect balance for any k. Hugging Face Mixtral's loss is k times this.
/// router_z_loss : float
///     Mean over active tokens of ``logsumexp(logits)^2`` (ST-MoE eq. 5).
/// seq_load_balance_loss : float or None
///     Mean over sequences of each sequence's load-balance loss (DeepSeek-V3),
///     for ``[B, S, E]`` input; None for ``[T, E]`` input.
/// auxiliary_loss : float
///     ``load_balance_loss_coeff * load_balance_loss + router_z_loss_coeff *
///     router_z_loss`` (+ ``seq_load_balance_loss_coeff * seq_load_balance_loss``).
/// peer_load_balance_loss : float or None
///     For a configuration made by a preset (``config.peer`` set), the load-balance
///     loss as that framework computes it (coefficient 1); see
///     :func:`moe_router.presets.peer_load_balance_loss`. None otherwise.
/// sinkhorn_iterations : int or None
///     Sinkhorn iterations run (``routing="sinkhorn"`` in training); None otherwise.
/// sinkhorn_converged : bool or None
///     Whether Sinkhorn met ``sinkhorn_tolerance`` before ``sinkhorn_max_iterations``
///     (``routing="sinkhorn"`` in training); None otherwise.
/// router_probs : numpy.ndarray or None
///     float32 ``[T, E]`` score distribution of each token as the router computed
///     it (0 for padding), when asked for with ``return_probs=True``.
/// batch_shape : tuple of int
///     Leading shape of the input (``(T,)`` or ``(B, S)``).
#[pyclass(frozen, weakref, module = "moe_router")]
pub struct RoutingDecision {
    /// The core's result. Its vectors are never written after construction
    /// (the class is frozen), so NumPy views of them stay valid while the
    /// decision lives; each view holds the decision as its base.
    r: Routing,
    /// `[T, E]` probabilities the bindings allocated (then `r.router_probs` is empty).
    probs: Option<Py<PyAny>>,
    batch_shape: Py<PyTuple>,
    /// `[T, k]` false, made on first read of `rerouted` when no reroute could happen.
    no_reroutes: OnceLock<Vec<bool>>,
    assignments: OnceLock<Py<PyList>>,
    /// What `backward` scores again: set by the logits entry point.
    backward_inputs: Option<BackwardInputs>,
    /// The call's bool `[T]` token mask, if any (for `record`).
    token_mask: Option<Py<PyAny>>,
}

/// What a decision was routed from (references to the arrays, no copies).
pub enum SavedSource {
    /// The `[T, E]` float32/float64 logits.
    Logits(Py<PyAny>),
    /// The linear router's `[T, D]` hidden states, `[D, E]` weight and `[E]` bias.
    Linear { hidden: Py<PyAny>, weight: Py<PyAny>, bias: Option<Py<PyAny>> },
    /// The hierarchical gate's `[T, D]` hidden states, `[D, G]` group weight,
    /// `[G, D, P]` expert weights and its sparsity.
    Gate { hidden: Py<PyAny>, group_weight: Py<PyAny>, expert_weight: Py<PyAny>, group_top_k: Option<usize> },
}

/// The call a decision came from, kept for its backward: its source arrays,
/// the configuration and the per-call arguments that change how a row is scored.
pub struct BackwardInputs {
    /// What was routed.
    pub source: SavedSource,
    /// The configuration it was routed with.
    pub config: moe_router_core::RouterConfig,
    /// Training mode (noise) and the noise step.
    pub training: bool,
    /// The RNG step of the call.
    pub step: u64,
    /// Sequence length of `[B, S, E]` input.
    pub sequence_length: Option<usize>,
    /// The token mask, if any.
    pub token_mask: Option<Py<PyAny>>,
}

impl RoutingDecision {
    /// Keep a core result (no array is made until it is read); `batch_shape` is
    /// the input's leading shape, `probs` the `[T, E]` probabilities the caller allocated.
    pub fn new(py: Python<'_>, r: Routing, batch_shape: &[usize], probs: Option<Py<PyAny>>) -> PyResult<Self> {
        if let Some(p) = &probs {
            read_only(p.bind(py).cast::<PyUntypedArray>()?);
        }
        Ok(RoutingDecision {
            r,
            probs,
            batch_shape: PyTuple::new(py, batch_shape)?.unbind(),
            no_reroutes: OnceLock::new(),
            assignments: OnceLock::new(),
            backward_inputs: None,
            token_mask: None,
        })
    }

    /// The same decision, knowing the call's bool `[T]` token mask.
    pub fn with_token_mask(mut self, mask: Option<Py<PyAny>>) -> Self {
        self.token_mask = mask;
        self
    }

    /// `[T, k]` the experts as selected, before capacity reroutes (what a replay repeats).
    pub fn selected_experts(&self) -> Vec<i32> {
        if self.r.original_expert_indices.is_empty() {
            self.r.expert_indices.clone()
        } else {
            self.r.original_expert_indices.clone()
        }
    }

    /// `[T]` whether each token was routed (not padding).
    pub fn active_mask(&self, py: Python<'_>) -> PyResult<Vec<bool>> {
        match &self.token_mask {
            None => Ok(vec![true; self.r.num_tokens]),
            Some(m) => Ok(m.bind(py).cast::<PyArrayDyn<bool>>()?.readonly().as_array().iter().copied().collect()),
        }
    }

    /// The same decision, differentiable through `backward`.
    pub fn with_backward(mut self, mut inputs: BackwardInputs) -> Self {
        // The backward reads k from its configuration: expert choice decides its own.
        inputs.config.top_k = self.r.top_k;
        self.backward_inputs = Some(inputs);
        self
    }

    /// What the peers' losses read, with Megatron's plain counts if known
    /// (`plain_tokens_per_expert`, else those the routing counted).
    pub fn loss_inputs<'a>(&'a self, plain_tokens_per_expert: &'a [i64]) -> LossInputs<'a> {
        if plain_tokens_per_expert.is_empty() {
            self.r.loss_inputs()
        } else {
            LossInputs { plain_tokens_per_expert, ..self.r.loss_inputs() }
        }
    }

    /// The input's leading shape.
    pub fn batch_shape_vec(&self, py: Python<'_>) -> PyResult<Vec<usize>> {
        self.batch_shape.bind(py).extract()
    }

    /// What the backward needs besides the cotangents.
    pub fn backward_parts(&self) -> (Option<&BackwardInputs>, &[bool], &[i32]) {
        (self.backward_inputs.as_ref(), &self.r.routed, &self.r.original_expert_indices)
    }

    /// Copies of the `[T, k]` choices, kept flags and reroute flags as NumPy arrays.
    pub fn choice_arrays<'py>(&self, py: Python<'py>) -> (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>) {
        let rerouted = if self.r.rerouted.is_empty() {
            PyArray1::<bool>::zeros(py, self.r.expert_indices.len(), false).into_any()
        } else {
            PyArray1::from_slice(py, &self.r.rerouted).into_any()
        };
        let (experts, kept) =
            (PyArray1::from_slice(py, &self.r.expert_indices), PyArray1::from_slice(py, &self.r.kept));
        (experts.into_any(), kept.into_any(), rerouted)
    }

    /// A copy of the `[E]` routed assignments before capacity.
    pub fn pre_drop_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        PyArray1::from_slice(py, &self.r.pre_drop_tokens_per_expert).into_any()
    }

    /// Active tokens.
    pub fn active(&self) -> usize {
        self.r.active_tokens
    }

    /// The counts and losses `RoutingStats.record` adds up.
    pub fn stats_call(&self) -> crate::stats::Call {
        let r = &self.r;
        let count = |n: usize| n as u64;
        crate::stats::Call {
            kept: r.tokens_per_expert.clone(),
            pre_drop: r.pre_drop_tokens_per_expert.clone(),
            counts: [
                count(r.capacity),
                count(r.num_tokens),
                count(r.active_tokens),
                count(r.kept_assignments),
                count(r.dropped_assignments),
                count(r.tokens_dropped),
            ],
            averaged: [r.load_balance_loss, r.router_z_loss, r.auxiliary_loss, self.efficiency()],
        }
    }

    /// The core's view of the `[T, k]` arrays and counts.
    pub fn assignments(&self) -> Assignments<'_> {
        Assignments {
            num_tokens: self.r.num_tokens,
            num_experts: self.r.num_experts,
            top_k: self.r.top_k,
            expert_indices: &self.r.expert_indices,
            expert_slots: &self.r.expert_slots,
            expert_weights: &self.r.expert_weights,
            kept: &self.r.kept,
            tokens_per_expert: &self.r.tokens_per_expert,
            capacity: self.r.capacity,
            dropless: self.r.dropless,
        }
    }

    /// `[T, k]`.
    fn choices_shape(&self) -> (usize, usize) {
        (self.r.num_tokens, self.r.top_k)
    }

    fn efficiency(&self) -> f64 {
        let total = self.r.active_tokens * self.r.top_k;
        if total == 0 {
            1.0
        } else {
            self.r.kept_assignments as f64 / total as f64
        }
    }

    fn cv(&self) -> f64 {
        let loads = &self.r.tokens_per_expert;
        if loads.is_empty() {
            return 0.0;
        }
        let n = loads.len() as f64;
        let mean = loads.iter().map(|&x| x as f64).sum::<f64>() / n;
        if mean <= 0.0 {
            return 0.0;
        }
        let var = loads.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        var.sqrt() / mean
    }
}

/// Clear `array`'s writeable flag (a decision's arrays are not to be modified).
fn read_only(array: &Bound<'_, PyUntypedArray>) {
    // SAFETY: a flag of a live array; clearing WRITEABLE only forbids writes.
    unsafe { (*npyffi::_PyArray_GET_ITEM_DATA(array.as_array_ptr())).flags &= !npyffi::NPY_ARRAY_WRITEABLE };
}

/// A read-only NumPy view of `data`, one of the vectors of `owner`'s routing,
/// with `shape`; the view keeps `owner` alive.
fn view<'py, T: Element, D: Dimension>(
    owner: &Bound<'py, RoutingDecision>,
    data: &[T],
    shape: impl IntoDimension<Dim = D>,
) -> PyResult<Bound<'py, PyArray<T, D>>> {
    let array = ArrayView::from_shape(shape, data)
        .map_err(|e| PyRuntimeError::new_err(format!("internal shape error: {e}")))?;
    // SAFETY: the decision is frozen and its routing's vectors are never written
    // or reallocated while it lives; the view holds a reference to it.
    let v = unsafe { PyArray::borrow_from_array(&array, owner.clone().into_any()) };
    read_only(v.as_untyped());
    Ok(v)
}

#[pymethods]
impl RoutingDecision {
    #[getter]
    fn expert_indices<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<i32>>> {
        view(slf, &slf.get().r.expert_indices, slf.get().choices_shape())
    }

    #[getter]
    fn expert_weights<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        view(slf, &slf.get().r.expert_weights, slf.get().choices_shape())
    }

    #[getter]
    fn expert_slots<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<i32>>> {
        view(slf, &slf.get().r.expert_slots, slf.get().choices_shape())
    }

    #[getter]
    fn kept<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        view(slf, &slf.get().r.kept, slf.get().choices_shape())
    }

    #[getter]
    fn rerouted<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let d = slf.get();
        let flags = if d.r.rerouted.is_empty() {
            // No reroute could happen: zeros, mapped lazily by the allocator.
            d.no_reroutes.get_or_init(|| vec![false; d.r.expert_indices.len()])
        } else {
            &d.r.rerouted
        };
        view(slf, flags, d.choices_shape())
    }

    #[getter]
    fn tokens_per_expert<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let counts = &slf.get().r.tokens_per_expert;
        view(slf, counts, counts.len())
    }

    /// Alias of :attr:`tokens_per_expert` (kept assignments per expert).
    #[getter]
    fn expert_capacities<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        Self::tokens_per_expert(slf)
    }

    #[getter]
    fn pre_drop_tokens_per_expert<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let counts = &slf.get().r.pre_drop_tokens_per_expert;
        view(slf, counts, counts.len())
    }

    #[getter]
    fn expert_prob_mean<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let means = &slf.get().r.expert_prob_mean;
        view(slf, means, means.len())
    }

    #[getter]
    fn router_probs<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let d = slf.get();
        match &d.probs {
            Some(p) => Ok(Some(p.bind(slf.py()).clone())),
            None if d.r.router_probs.is_empty() => Ok(None),
            None => Ok(Some(view(slf, &d.r.router_probs, (d.r.num_tokens, d.r.num_experts))?.into_any())),
        }
    }

    #[getter]
    fn batch_shape(&self, py: Python<'_>) -> Py<PyTuple> {
        self.batch_shape.clone_ref(py)
    }

    #[getter]
    pub fn capacity(&self) -> usize {
        self.r.capacity
    }

    #[getter]
    pub fn dropless(&self) -> bool {
        self.r.dropless
    }

    #[getter]
    pub fn total_tokens(&self) -> usize {
        self.r.num_tokens
    }

    #[getter]
    fn active_tokens(&self) -> usize {
        self.r.active_tokens
    }

    #[getter]
    fn kept_assignments(&self) -> usize {
        self.r.kept_assignments
    }

    #[getter]
    fn dropped_assignments(&self) -> usize {
        self.r.dropped_assignments
    }

    #[getter]
    fn tokens_dropped(&self) -> usize {
        self.r.tokens_dropped
    }

    #[getter]
    fn load_balance_loss(&self) -> f64 {
        self.r.load_balance_loss
    }

    #[getter]
    fn router_z_loss(&self) -> f64 {
        self.r.router_z_loss
    }

    #[getter]
    fn seq_load_balance_loss(&self) -> Option<f64> {
        self.r.seq_load_balance_loss
    }

    #[getter]
    fn auxiliary_loss(&self) -> f64 {
        self.r.auxiliary_loss
    }

    #[getter]
    fn peer_load_balance_loss(&self) -> Option<f64> {
        self.r.peer_load_balance_loss
    }

    #[getter]
    pub fn num_experts(&self) -> usize {
        self.r.num_experts
    }

    #[getter]
    pub fn top_k(&self) -> usize {
        self.r.top_k
    }

    #[getter]
    fn sinkhorn_iterations(&self) -> Option<usize> {
        self.r.sinkhorn_iterations
    }

    #[getter]
    fn sinkhorn_converged(&self) -> Option<bool> {
        self.r.sinkhorn_converged
    }

    /// Kept assignments over ``active_tokens * k``; 1.0 for an empty batch.
    fn routing_efficiency(&self) -> f64 {
        self.efficiency()
    }

    /// Coefficient of variation (population std / mean) of ``tokens_per_expert``; 0 if no token is kept.
    fn load_balance_cv(&self) -> f64 {
        self.cv()
    }

    /// Buffer use per expert, ``tokens_per_expert / capacity``, summarized.
    ///
    /// Returns
    /// -------
    /// dict
    ///     ``min_utilization``, ``max_utilization``, ``mean_utilization`` (0 when
    ///     the capacity is 0), ``tokens_dropped_rate`` (``tokens_dropped /
    ///     active_tokens``, 0 for an empty batch), ``assignment_drop_rate`` and
    ///     ``routing_efficiency``.
    fn expert_utilization<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let loads = &self.r.tokens_per_expert;
        let (lo, hi, mean) = if self.r.capacity > 0 && !loads.is_empty() {
            let c = self.r.capacity as f64;
            let u = loads.iter().map(|&x| x as f64 / c);
            let lo = u.clone().fold(f64::INFINITY, f64::min);
            let hi = u.clone().fold(f64::NEG_INFINITY, f64::max);
            (lo, hi, u.sum::<f64>() / loads.len() as f64)
        } else {
            (0.0, 0.0, 0.0)
        };
        let active = self.r.active_tokens;
        let d = PyDict::new(py);
        d.set_item("min_utilization", lo)?;
        d.set_item("max_utilization", hi)?;
        d.set_item("mean_utilization", mean)?;
        d.set_item(
            "tokens_dropped_rate",
            if active == 0 { 0.0 } else { self.r.tokens_dropped as f64 / active as f64 },
        )?;
        d.set_item("assignment_drop_rate", 1.0 - self.efficiency())?;
        d.set_item("routing_efficiency", self.efficiency())?;
        Ok(d)
    }

    /// The gradient with respect to the routed logits.
    ///
    /// Of ``sum(grad_expert_weights * expert_weights) + grad_auxiliary_loss *
    /// auxiliary_loss + sum(grad_router_probs * router_probs)``, for the experts
    /// this decision chose (selection, groups, bias, capacity and reroutes are
    /// taken as made; the balance-loss counts ``f_e`` are constants, as in every
    /// peer). Each row is scored again from the logits the decision holds a
    /// reference to (no ``[T, E]`` array is kept by the forward); if that array
    /// was modified since, the gradient is of the new values. Extra memory kept by
    /// the decision: ``routed`` ``[T, k]`` bools (and the pre-reroute experts when
    /// reroutes could happen). Formulas: docs/semantics.md item 21 (TransformerEngine's
    /// fused router backward; Megatron-Core's aux-loss and z-loss gradients).
    ///
    /// Parameters
    /// ----------
    /// grad_expert_weights : array of float, shape [T, k] or batch_shape + [k], optional
    ///     float32 values are used as they are; other real dtypes are converted
    ///     to float64 first.
    /// grad_auxiliary_loss : float, default 1.0 (None means 1.0)
    /// grad_router_probs : array of float, shape [T, E] or batch_shape + [E], optional
    /// tokens_per_expert : array of int, shape [E], optional
    ///     Counts ``n_e`` for the load-balance term instead of this decision's
    ///     ``pre_drop_tokens_per_expert``, held constant: a global batch's
    ///     (``GlobalBalanceAccumulator.tokens_per_expert``, Megatron-Core
    ///     ``global_aux_loss``). Give ``num_tokens`` with it.
    /// num_tokens : int, optional
    ///     The global batch's tokens ``N`` (``GlobalBalanceAccumulator.num_tokens``).
    ///     With both, the load-balance term's gradient is that of
    ///     ``load_balance_loss_coeff * E / (k N^2) * sum_e n_e * sum_t q_te``
    ///     over this decision's tokens: summed over every micro-batch of every
    ///     rank, the gradient of ``GlobalBalanceAccumulator.load_balance_loss()``.
    ///     The z-loss and sequence terms keep their own (local) form.
    /// out : numpy.ndarray, shape batch_shape + [E], dtype of the routed logits, optional
    ///     Written in place and returned (C-contiguous, writable, not one of the
    ///     inputs): a buffer reused across steps spares the page faults of a fresh
    ///     ``[T, E]`` array (first touch of up to ``4 T E`` bytes for float32).
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, shape batch_shape + [E], dtype of the routed logits
    ///     Zero rows for masked tokens; float64 arithmetic throughout. ``out`` when given.
    ///     Without ``out``, an output of 4 MiB or more reuses the memory of a dropped
    ///     earlier one of the same size where one is held (a training loop's previous
    ///     gradient: no page faults, as with ``out``); at most 4 such freed buffers,
    ///     a quarter of the physical memory in all, stay held by the package, and
    ///     the OS may take their pages back when memory runs short (``MADV_FREE``).
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     The decision did not come from logits (use ``ExpertRouter.backward``),
    ///     or came from the hierarchical gate's probabilities.
    /// InputError
    ///     A gradient array of the wrong shape, or NaN or inf in it (the message gives
    ///     the index of the first, its token and column); ``tokens_per_expert``
    ///     not [E] or negative, or given without ``num_tokens`` (or the reverse);
    ///     ``out`` of the wrong shape, not C-contiguous, read-only or overlapping an
    ///     input (the message names it).
    /// TypeError
    ///     A gradient that is not a real array; ``out`` not an array of the logits' dtype.
    #[pyo3(signature = (grad_expert_weights=None, grad_auxiliary_loss=None, grad_router_probs=None, tokens_per_expert=None, num_tokens=None, *, out=None))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        grad_expert_weights: Option<&Bound<'py, PyAny>>,
        grad_auxiliary_loss: Option<&Bound<'py, PyAny>>,
        grad_router_probs: Option<&Bound<'py, PyAny>>,
        tokens_per_expert: Option<&Bound<'py, PyAny>>,
        num_tokens: Option<&Bound<'py, PyAny>>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let g_aux = crate::backward::aux_cotangent(grad_auxiliary_loss)?;
        let balance = crate::backward::Balance::from_args(tokens_per_expert, num_tokens, self.r.num_experts)?;
        crate::backward::decision_backward(self, py, grad_expert_weights, g_aux, grad_router_probs, balance, out)
    }

    /// This decision's selection, recorded for replay (``replay=`` of
    /// :func:`moe_router.route_logits`; Megatron-Core ``router_replay``, R3).
    ///
    /// Returns
    /// -------
    /// RecordedRoute
    ///     The ``[T, k]`` experts by rank as selected (before capacity drops and
    ///     reroutes; not the weights), the routed tokens (``token_mask``), the
    ///     batch shape, E and k.
    fn record(&self, py: Python<'_>) -> PyResult<crate::replay::RecordedRoute> {
        crate::replay::RecordedRoute::of_decision(py, self)
    }

    /// The plan that moves tokens to their experts and back.
    ///
    /// Parameters
    /// ----------
    /// alignment : int, default 1 (None means 1)
    ///     Pad each expert's rows to a multiple of this (vLLM's ``block_size``,
    ///     torchtitan's 8/16/32 for grouped GEMMs); experts without tokens get no rows.
    /// pad_to_capacity : bool, default False
    ///     Give every expert exactly ``capacity`` rows (rounded up to
    ///     ``alignment``): the ``[E, C, D]`` buffer of DeepSpeed, Tutel and
    ///     Megatron-Core ``drop_and_pad``.
    ///
    /// Returns
    /// -------
    /// DispatchPlan
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     ``alignment < 1``, or ``pad_to_capacity`` on a dropless decision.
    #[pyo3(
        signature = (alignment=None, pad_to_capacity=crate::args::Given(None)),
        text_signature = "($self, alignment=None, pad_to_capacity=False)"
    )]
    fn dispatch_plan(
        slf: Bound<'_, Self>,
        alignment: Option<&Bound<'_, PyAny>>,
        pad_to_capacity: crate::args::Given<'_>,
    ) -> PyResult<PyDispatchPlan> {
        let alignment =
            alignment.map(|a| crate::args::count(a, "alignment", 1, Family::Config)).transpose()?.unwrap_or(1);
        let pad_to_capacity = pad_to_capacity.flag("pad_to_capacity", false, Family::Config)?;
        PyDispatchPlan::build(slf.py(), slf, PlanLayout { alignment, pad_to_capacity })
    }

    /// Each token's kept assignments in CSR form, in column order (weight
    /// descending for expert choice, rank order for token choice); dropped and
    /// filler choices are left out.
    ///
    /// Returns
    /// -------
    /// offsets : numpy.ndarray, int64, shape [T + 1]
    ///     Token t's entries are ``offsets[t]:offsets[t + 1]``; ``offsets[T] = N``,
    ///     the kept assignments.
    /// experts : numpy.ndarray, int32, shape [N]
    ///     Expert ids.
    /// weights : numpy.ndarray, float32, shape [N]
    ///     Combine weights.
    fn token_experts<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let r = &self.r;
        let csr = moe_router_core::token_experts(r.top_k, &r.expert_indices, &r.expert_weights, &r.kept)
            .map_err(crate::errors::to_py)?;
        Ok((
            arrays::vector(py, csr.offsets).into_any(),
            arrays::vector(py, csr.experts).into_any(),
            arrays::vector(py, csr.weights).into_any(),
        ))
    }

    /// Per token, its kept assignments as ``ExpertAssignment`` (built on first use).
    #[getter]
    fn expert_assignments(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        if let Some(list) = self.assignments.get() {
            return Ok(list.clone_ref(py));
        }
        let r = &self.r;
        let out = PyList::empty(py);
        for tok in 0..self.r.num_tokens {
            let row = PyList::empty(py);
            for rank in 0..self.r.top_k {
                let at = tok * r.top_k + rank;
                if r.kept[at] {
                    let a = ExpertAssignment {
                        expert_id: i64::from(r.expert_indices[at]),
                        probability: f64::from(r.expert_weights[at]),
                        token_idx: tok as i64,
                        expert_rank: rank as i64,
                    };
                    row.append(Py::new(py, a)?)?;
                }
            }
            out.append(row)?;
        }
        let list = out.unbind();
        Ok(self.assignments.get_or_init(|| list).clone_ref(py))
    }

    /// Scalars and per-expert counts as JSON-ready Python values (no ``[T, k]`` arrays).
    ///
    /// A float that is not finite (a loss that overflowed) is None, as JSON has
    /// no infinity or NaN: ``json.dumps(decision.to_dict(), allow_nan=False)``
    /// accepts the result (the rule of ``moe_router._json.json_ready``).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("total_tokens", self.r.num_tokens)?;
        d.set_item("active_tokens", self.r.active_tokens)?;
        d.set_item("num_experts", self.r.num_experts)?;
        d.set_item("top_k", self.r.top_k)?;
        d.set_item("capacity", self.r.capacity)?;
        d.set_item("dropless", self.r.dropless)?;
        d.set_item("tokens_per_expert", &self.r.tokens_per_expert)?;
        d.set_item("pre_drop_tokens_per_expert", &self.r.pre_drop_tokens_per_expert)?;
        d.set_item("kept_assignments", self.r.kept_assignments)?;
        d.set_item("dropped_assignments", self.r.dropped_assignments)?;
        d.set_item("tokens_dropped", self.r.tokens_dropped)?;
        d.set_item("routing_efficiency", self.efficiency())?;
        d.set_item("load_balance_cv", self.cv())?;
        d.set_item("load_balance_loss", self.r.load_balance_loss)?;
        d.set_item("router_z_loss", self.r.router_z_loss)?;
        d.set_item("seq_load_balance_loss", self.r.seq_load_balance_loss)?;
        d.set_item("auxiliary_loss", self.r.auxiliary_loss)?;
        d.set_item("peer_load_balance_loss", self.r.peer_load_balance_loss)?;
        d.set_item("sinkhorn_iterations", self.r.sinkhorn_iterations)?;
        d.set_item("sinkhorn_converged", self.r.sinkhorn_converged)?;
        let ready = py.import("moe_router._json")?.getattr("json_ready")?.call1((d,))?;
        Ok(ready.cast_into::<PyDict>()?)
    }

    fn __repr__(&self) -> String {
        format!(
            "RoutingDecision(T={}, E={}, k={}, capacity={}, dropped_assignments={}, load_balance_loss={}, router_z_loss={})",
            self.r.num_tokens,
            self.r.num_experts,
            self.r.top_k,
            self.r.capacity,
            self.r.dropped_assignments,
            g6(self.r.load_balance_loss),
            g6(self.r.router_z_loss)
        )
    }
}

/// `format(x, ".6g")` as Python prints it.
fn g6(x: f64) -> String {
    Python::attach(|py| {
        py.import("builtins")
            .and_then(|b| b.getattr("format"))
            .and_then(|f| f.call1((x, ".6g")))
            .and_then(|s| s.extract::<String>())
            .unwrap_or_else(|_| format!("{x}"))
    })
}

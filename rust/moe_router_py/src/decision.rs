//! `RoutingDecision` and `ExpertAssignment`: the core's result as Python objects.
//!
//! The arrays move from Rust into NumPy once, when the decision is built; the
//! getters hand out those arrays, and the summaries read the core's counts.

use std::sync::OnceLock;

use moe_router_core::{LossInputs, Routing};
use numpy::{PyArray2, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::args::{integer, real};
use crate::arrays;
use crate::errors::Family;
use crate::plan::{DecisionArrays, PyDispatchPlan};
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
/// and ``ExpertRouter.route_logits``; the arrays are owned by the decision
/// (moved from Rust, not copied). Semantics: docs/semantics.md.
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
    #[pyo3(get)]
    expert_indices: Py<PyAny>,
    #[pyo3(get)]
    expert_weights: Py<PyAny>,
    #[pyo3(get)]
    expert_slots: Py<PyAny>,
    #[pyo3(get)]
    kept: Py<PyAny>,
    #[pyo3(get)]
    rerouted: Py<PyAny>,
    #[pyo3(get)]
    tokens_per_expert: Py<PyAny>,
    #[pyo3(get)]
    pre_drop_tokens_per_expert: Py<PyAny>,
    #[pyo3(get)]
    expert_prob_mean: Py<PyAny>,
    #[pyo3(get)]
    router_probs: Option<Py<PyAny>>,
    #[pyo3(get)]
    batch_shape: Py<PyTuple>,
    #[pyo3(get)]
    capacity: usize,
    #[pyo3(get)]
    dropless: bool,
    #[pyo3(get)]
    total_tokens: usize,
    #[pyo3(get)]
    active_tokens: usize,
    #[pyo3(get)]
    kept_assignments: usize,
    #[pyo3(get)]
    dropped_assignments: usize,
    #[pyo3(get)]
    tokens_dropped: usize,
    #[pyo3(get)]
    load_balance_loss: f64,
    #[pyo3(get)]
    router_z_loss: f64,
    #[pyo3(get)]
    seq_load_balance_loss: Option<f64>,
    #[pyo3(get)]
    auxiliary_loss: f64,
    #[pyo3(get)]
    peer_load_balance_loss: Option<f64>,
    #[pyo3(get)]
    num_experts: usize,
    #[pyo3(get)]
    top_k: usize,
    #[pyo3(get)]
    sinkhorn_iterations: Option<usize>,
    #[pyo3(get)]
    sinkhorn_converged: Option<bool>,
    /// Summaries kept in Rust for the peer losses and the per-expert views.
    tokens_per_expert_counts: Vec<i64>,
    expert_prob_mean_values: Vec<f64>,
    first_choice_tokens_per_expert: Vec<i64>,
    assignments: OnceLock<Py<PyList>>,
    /// `[T, k]` routed before capacity, and the experts before reroutes
    /// (empty: none), for the backward.
    routed: Vec<bool>,
    original_experts: Vec<i32>,
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
    /// Move a core result into NumPy arrays; `batch_shape` is the input's leading shape.
    pub fn new(py: Python<'_>, r: Routing, batch_shape: &[usize], probs: Option<Py<PyAny>>) -> PyResult<Self> {
        let (t, k, e) = (r.num_tokens, r.top_k, r.num_experts);
        let rerouted = if r.rerouted.is_empty() {
            // No reroute could happen: zeros are mapped lazily by the allocator.
            PyArray2::<bool>::zeros(py, [t, k], false).into_any().unbind()
        } else {
            arrays::matrix(py, r.rerouted, t, k)?.into_any().unbind()
        };
        let router_probs = match probs {
            Some(p) => Some(p),
            None if r.router_probs.is_empty() => None,
            None => Some(arrays::matrix(py, r.router_probs, t, e)?.into_any().unbind()),
        };
        Ok(RoutingDecision {
            expert_indices: arrays::matrix(py, r.expert_indices, t, k)?.into_any().unbind(),
            expert_weights: arrays::matrix(py, r.expert_weights, t, k)?.into_any().unbind(),
            expert_slots: arrays::matrix(py, r.expert_slots, t, k)?.into_any().unbind(),
            kept: arrays::matrix(py, r.kept, t, k)?.into_any().unbind(),
            rerouted,
            tokens_per_expert: arrays::vector(py, r.tokens_per_expert.clone()).into_any().unbind(),
            pre_drop_tokens_per_expert: arrays::vector(py, r.pre_drop_tokens_per_expert).into_any().unbind(),
            expert_prob_mean: arrays::vector(py, r.expert_prob_mean.clone()).into_any().unbind(),
            router_probs,
            batch_shape: PyTuple::new(py, batch_shape)?.unbind(),
            capacity: r.capacity,
            dropless: r.dropless,
            total_tokens: t,
            active_tokens: r.active_tokens,
            kept_assignments: r.kept_assignments,
            dropped_assignments: r.dropped_assignments,
            tokens_dropped: r.tokens_dropped,
            load_balance_loss: r.load_balance_loss,
            router_z_loss: r.router_z_loss,
            seq_load_balance_loss: r.seq_load_balance_loss,
            auxiliary_loss: r.auxiliary_loss,
            peer_load_balance_loss: r.peer_load_balance_loss,
            num_experts: e,
            top_k: k,
            sinkhorn_iterations: r.sinkhorn_iterations,
            sinkhorn_converged: r.sinkhorn_converged,
            tokens_per_expert_counts: r.tokens_per_expert,
            expert_prob_mean_values: r.expert_prob_mean,
            first_choice_tokens_per_expert: r.first_choice_tokens_per_expert,
            assignments: OnceLock::new(),
            routed: r.routed,
            original_experts: r.original_expert_indices,
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
    pub fn selected_experts(&self, py: Python<'_>) -> PyResult<Vec<i32>> {
        if !self.original_experts.is_empty() {
            return Ok(self.original_experts.clone());
        }
        let ids = self.expert_indices.bind(py).cast::<PyArray2<i32>>()?.readonly();
        Ok(ids.as_array().iter().copied().collect())
    }

    /// `[T]` whether each token was routed (not padding).
    pub fn active_mask(&self, py: Python<'_>) -> PyResult<Vec<bool>> {
        match &self.token_mask {
            None => Ok(vec![true; self.total_tokens]),
            Some(m) => Ok(m.bind(py).cast::<PyArrayDyn<bool>>()?.readonly().as_array().iter().copied().collect()),
        }
    }

    /// The same decision, differentiable through `backward`.
    pub fn with_backward(mut self, mut inputs: BackwardInputs) -> Self {
        // The backward reads k from its configuration: expert choice decides its own.
        inputs.config.top_k = self.top_k;
        self.backward_inputs = Some(inputs);
        self
    }

    /// What the peers' losses read, with Megatron's plain counts if known.
    pub fn loss_inputs<'a>(&'a self, plain_tokens_per_expert: &'a [i64]) -> LossInputs<'a> {
        LossInputs {
            num_experts: self.num_experts,
            top_k: self.top_k,
            active_tokens: self.active_tokens,
            load_balance_loss: self.load_balance_loss,
            expert_prob_mean: &self.expert_prob_mean_values,
            first_choice_tokens_per_expert: &self.first_choice_tokens_per_expert,
            plain_tokens_per_expert,
        }
    }

    /// k.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// T.
    pub fn total_tokens(&self) -> usize {
        self.total_tokens
    }

    /// E.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Per-expert capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// True when no capacity limit applied.
    pub fn is_dropless(&self) -> bool {
        self.dropless
    }

    /// The input's leading shape.
    pub fn batch_shape_vec(&self, py: Python<'_>) -> PyResult<Vec<usize>> {
        self.batch_shape.bind(py).extract()
    }

    /// What the backward needs besides the cotangents.
    pub fn backward_parts(&self) -> (Option<&BackwardInputs>, &[bool], &[i32]) {
        (self.backward_inputs.as_ref(), &self.routed, &self.original_experts)
    }

    /// The `[T, k]` choices, kept flags and reroute flags as NumPy arrays.
    pub fn choice_arrays<'py>(&self, py: Python<'py>) -> (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>) {
        (self.expert_indices.bind(py).clone(), self.kept.bind(py).clone(), self.rerouted.bind(py).clone())
    }

    /// `[E]` routed assignments before capacity.
    pub fn pre_drop_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.pre_drop_tokens_per_expert.bind(py).clone()
    }

    /// Active tokens.
    pub fn active(&self) -> usize {
        self.active_tokens
    }

    /// The `[T, k]` arrays and counts, borrowed read-only.
    pub fn assignment_arrays<'py>(&self, py: Python<'py>) -> PyResult<DecisionArrays<'py>> {
        DecisionArrays::borrow(
            self.expert_indices.bind(py),
            self.expert_slots.bind(py),
            self.expert_weights.bind(py),
            self.kept.bind(py),
            self.tokens_per_expert.bind(py),
        )
    }

    fn efficiency(&self) -> f64 {
        let total = self.active_tokens * self.top_k;
        if total == 0 {
            1.0
        } else {
            self.kept_assignments as f64 / total as f64
        }
    }

    fn cv(&self) -> f64 {
        let loads = &self.tokens_per_expert_counts;
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

#[pymethods]
impl RoutingDecision {
    /// Alias of :attr:`tokens_per_expert` (kept assignments per expert).
    #[getter]
    fn expert_capacities(&self, py: Python<'_>) -> Py<PyAny> {
        self.tokens_per_expert.clone_ref(py)
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
        let loads = &self.tokens_per_expert_counts;
        let (lo, hi, mean) = if self.capacity > 0 && !loads.is_empty() {
            let c = self.capacity as f64;
            let u = loads.iter().map(|&x| x as f64 / c);
            let lo = u.clone().fold(f64::INFINITY, f64::min);
            let hi = u.clone().fold(f64::NEG_INFINITY, f64::max);
            (lo, hi, u.sum::<f64>() / loads.len() as f64)
        } else {
            (0.0, 0.0, 0.0)
        };
        let active = self.active_tokens;
        let d = PyDict::new(py);
        d.set_item("min_utilization", lo)?;
        d.set_item("max_utilization", hi)?;
        d.set_item("mean_utilization", mean)?;
        d.set_item("tokens_dropped_rate", if active == 0 { 0.0 } else { self.tokens_dropped as f64 / active as f64 })?;
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
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     The decision did not come from logits (use ``ExpertRouter.backward``),
    ///     or came from the hierarchical gate's probabilities.
    /// InputError
    ///     A gradient array of the wrong shape, or NaN in it; ``tokens_per_expert``
    ///     not [E] or negative, or given without ``num_tokens`` (or the reverse);
    ///     ``out`` of the wrong shape, not C-contiguous, read-only or one of the inputs.
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
        let balance = crate::backward::Balance::from_args(tokens_per_expert, num_tokens, self.num_experts)?;
        crate::backward::decision_backward(self, py, grad_expert_weights, g_aux, grad_router_probs, balance, out)
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
    /// InputError
    ///     The decision's arrays were modified into an inconsistent state (a
    ///     slot used twice, counts that do not add up, an expert out of range).
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

    #[pyo3(signature = (alignment=None, pad_to_capacity=None))]
    fn dispatch_plan(
        slf: Bound<'_, Self>,
        alignment: Option<&Bound<'_, PyAny>>,
        pad_to_capacity: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDispatchPlan> {
        let alignment =
            alignment.map(|a| crate::args::count(a, "alignment", 1, Family::Config)).transpose()?.unwrap_or(1);
        let pad_to_capacity = pad_to_capacity
            .map(|p| crate::args::flag(p, "pad_to_capacity", Family::Config))
            .transpose()?
            .unwrap_or(false);
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
    ///
    /// Raises
    /// ------
    /// InputError
    ///     The decision's arrays were modified into inconsistent shapes.
    fn token_experts<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let experts = self.expert_indices.bind(py).cast::<PyArray2<i32>>()?.readonly();
        let weights = self.expert_weights.bind(py).cast::<PyArray2<f32>>()?.readonly();
        let kept = self.kept.bind(py).cast::<PyArray2<bool>>()?.readonly();
        let unreadable = crate::errors::unreadable;
        let csr = moe_router_core::token_experts(
            self.top_k,
            experts.as_slice().map_err(|e| unreadable("expert_indices", e))?,
            weights.as_slice().map_err(|e| unreadable("expert_weights", e))?,
            kept.as_slice().map_err(|e| unreadable("kept", e))?,
        )
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
        let experts = self.expert_indices.bind(py).cast::<PyArray2<i32>>()?.readonly();
        let weights = self.expert_weights.bind(py).cast::<PyArray2<f32>>()?.readonly();
        let kept = self.kept.bind(py).cast::<PyArray2<bool>>()?.readonly();
        let (experts, weights, kept) = (experts.as_array(), weights.as_array(), kept.as_array());
        let out = PyList::empty(py);
        for tok in 0..self.total_tokens {
            let row = PyList::empty(py);
            for rank in 0..self.top_k {
                if kept[[tok, rank]] {
                    let a = ExpertAssignment {
                        expert_id: i64::from(experts[[tok, rank]]),
                        probability: f64::from(weights[[tok, rank]]),
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
        d.set_item("total_tokens", self.total_tokens)?;
        d.set_item("active_tokens", self.active_tokens)?;
        d.set_item("num_experts", self.num_experts)?;
        d.set_item("top_k", self.top_k)?;
        d.set_item("capacity", self.capacity)?;
        d.set_item("dropless", self.dropless)?;
        d.set_item("tokens_per_expert", self.tokens_per_expert.bind(py).call_method0("tolist")?)?;
        d.set_item("pre_drop_tokens_per_expert", self.pre_drop_tokens_per_expert.bind(py).call_method0("tolist")?)?;
        d.set_item("kept_assignments", self.kept_assignments)?;
        d.set_item("dropped_assignments", self.dropped_assignments)?;
        d.set_item("tokens_dropped", self.tokens_dropped)?;
        d.set_item("routing_efficiency", self.efficiency())?;
        d.set_item("load_balance_cv", self.cv())?;
        d.set_item("load_balance_loss", self.load_balance_loss)?;
        d.set_item("router_z_loss", self.router_z_loss)?;
        d.set_item("seq_load_balance_loss", self.seq_load_balance_loss)?;
        d.set_item("auxiliary_loss", self.auxiliary_loss)?;
        d.set_item("peer_load_balance_loss", self.peer_load_balance_loss)?;
        d.set_item("sinkhorn_iterations", self.sinkhorn_iterations)?;
        d.set_item("sinkhorn_converged", self.sinkhorn_converged)?;
        let ready = py.import("moe_router._json")?.getattr("json_ready")?.call1((d,))?;
        Ok(ready.cast_into::<PyDict>()?)
    }

    fn __repr__(&self) -> String {
        format!(
            "RoutingDecision(T={}, E={}, k={}, capacity={}, dropped_assignments={}, load_balance_loss={}, router_z_loss={})",
            self.total_tokens,
            self.num_experts,
            self.top_k,
            self.capacity,
            self.dropped_assignments,
            g6(self.load_balance_loss),
            g6(self.router_z_loss)
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

//! `GlobalBalanceAccumulator`: the core's global-batch statistics
//! (`moe_router_core::GlobalBalance`) as a Python class; the Python layer
//! adds the all-reduce over a `moe_router.distributed` backend.

use moe_router_core::{self as core, GlobalBalance};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays;
use crate::decision::RoutingDecision;
use crate::errors::{to_py, unreadable, wrong_type, Family};
use crate::plan::{int_array, real_array};

/// A per-expert vector argument: E real values.
fn per_expert(x: &Bound<'_, PyAny>, name: &'static str, experts: usize) -> PyResult<Vec<f64>> {
    let (values, shape) = real_array(x, name)?;
    if shape != [experts] {
        return Err(to_py(core::RouterError::shape(name, format!("[{experts}] (num_experts)"), format!("{shape:?}"))));
    }
    Ok(values)
}

/// `expert_bias`, or zeros when None.
fn bias_or_zeros(x: Option<&Bound<'_, PyAny>>, experts: usize) -> PyResult<Vec<f64>> {
    x.filter(|b| !b.is_none()).map_or(Ok(vec![0.0; experts]), |b| per_expert(b, "expert_bias", experts))
}

fn count(value: &Bound<'_, PyAny>, name: &str, minimum: usize, family: Family) -> PyResult<u64> {
    crate::args::count(value, name, minimum, family).map(|n| n as u64)
}

/// Per-expert routing statistics summed over the micro-batches of one global
/// batch and over data-parallel ranks, and the balancing updates made from
/// them once per global batch.
///
/// The statistics are, per expert e: ``n_e`` (:attr:`tokens_per_expert`,
/// the routed assignments before capacity, after groups and bias: the
/// routing actually used, as ``RoutingDecision.pre_drop_tokens_per_expert``
/// and ``LoadBalancer`` count them), ``S_e`` (:attr:`prob_sums`, the sum
/// over tokens of e's share of the token's score distribution), and the
/// totals ``N`` (:attr:`num_tokens`, active tokens) and
/// :attr:`num_micro_batches`; plus the quantile-balancing quantiles
/// (:meth:`add_quantiles`). Sums are taken in the order the statistics
/// arrive, so a given order of additions gives the same bits at any thread
/// count. The arithmetic lives in the Rust core.
///
/// Parameters
/// ----------
/// num_experts : int
///     E, >= 1.
/// top_k : int
///     k, in [1, E].
///
/// Raises
/// ------
/// ConfigError
///     ``num_experts`` < 1, or ``top_k`` outside [1, E].
/// ConfigTypeError
///     One of them not an int.
///
/// Notes
/// -----
/// Megatron-Core's ``global_aux_loss`` counts ``n_e`` with a plain top-k of
/// the scores that ignores the expert bias and group limits; with neither,
/// that is exactly :attr:`tokens_per_expert`. Its aux-loss-free bias counts
/// the final routing map after drops; this project counts before capacity
/// (see ``LoadBalancer``: kept counts hide how overloaded an expert is).
///
/// Examples
/// --------
/// >>> import numpy as np, moe_router as mr
/// >>> cfg = mr.RouterConfig(num_experts=4, top_k=1)
/// >>> acc = mr.GlobalBalanceAccumulator(4, 1)
/// >>> acc.add(mr.route_logits(np.eye(4, dtype=np.float32)[[0, 0, 1, 2]], cfg))
/// >>> acc.add(mr.route_logits(np.eye(4, dtype=np.float32)[[0, 3]], cfg))
/// >>> acc.tokens_per_expert.tolist(), acc.num_tokens, acc.num_micro_batches
/// ([3, 1, 1, 1], 6, 2)
/// >>> acc.bias_update(np.zeros(4), 0.01).tolist()
/// [-0.01, 0.01, 0.01, 0.01]
#[pyclass(subclass, module = "moe_router._core", name = "GlobalBalanceAccumulator")]
pub struct PyGlobalBalance {
    inner: GlobalBalance,
}

impl PyGlobalBalance {
    /// `[E]` routed assignments before capacity, summed over the global batch.
    pub fn tokens_per_expert_counts(&self) -> &[i64] {
        self.inner.tokens_per_expert()
    }
}

#[pymethods]
impl PyGlobalBalance {
    #[new]
    #[pyo3(signature = (num_experts, top_k))]
    fn new(num_experts: &Bound<'_, PyAny>, top_k: &Bound<'_, PyAny>) -> PyResult<Self> {
        let e = crate::args::count(num_experts, "num_experts", 1, Family::Config)?;
        let k = crate::args::count(top_k, "top_k", 1, Family::Config)?;
        Ok(PyGlobalBalance { inner: GlobalBalance::new(e, k).map_err(to_py)? })
    }

    /// Add one routing call (a micro-batch): its ``pre_drop_tokens_per_expert``,
    /// ``expert_prob_mean * active_tokens`` and ``active_tokens``.
    ///
    /// Parameters
    /// ----------
    /// decision : RoutingDecision
    ///     Of the same E and k as the accumulator.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     A decision of another E or k (naming ``decision``), or counts that
    ///     overflow int64.
    /// InputTypeError
    ///     ``decision`` is not a ``RoutingDecision``.
    fn add(&mut self, py: Python<'_>, decision: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = decision
            .cast::<RoutingDecision>()
            .map_err(|_| wrong_type("decision", "a RoutingDecision", decision))?
            .borrow();
        let (e, k) = (d.num_experts(), d.top_k());
        if (e, k) != (self.inner.num_experts(), self.inner.top_k()) {
            return Err(to_py(core::RouterError::Inconsistent {
                argument: "decision",
                detail: format!(
                    "it has num_experts = {e}, top_k = {k}; the accumulator has num_experts = {}, top_k = {}",
                    self.inner.num_experts(),
                    self.inner.top_k()
                ),
            }));
        }
        let counts = d.pre_drop_counts(py);
        let counts = counts.cast::<PyArrayDyn<i64>>()?.readonly();
        let counts = counts.as_slice().map_err(|e| unreadable("pre_drop_tokens_per_expert", e))?;
        let x = d.loss_inputs(&[]);
        let sums: Vec<f64> = x.expert_prob_mean.iter().map(|p| p * x.active_tokens as f64).collect();
        self.inner.add_counts(counts, &sums, x.active_tokens as u64, 1).map_err(to_py)
    }

    /// Add statistics that arrive as arrays (another rank's, moved by the caller).
    ///
    /// Parameters
    /// ----------
    /// tokens_per_expert : array of int, shape [E]
    ///     Routed assignments per expert, >= 0.
    /// prob_sums : array of float, shape [E]
    ///     Sum over the tokens of each expert's score share
    ///     (``expert_prob_mean * active_tokens``), finite, >= 0.
    /// num_tokens : int
    ///     Active tokens, >= 0; ``sum(tokens_per_expert) <= num_tokens * k``.
    /// num_micro_batches : int, default 1
    ///     Micro-batches these statistics stand for.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     A shape other than [E], a negative count, a negative or non-finite
    ///     sum, more assignments than ``num_tokens * k``, or totals that
    ///     overflow (nothing is added then); each names the argument.
    /// InputTypeError
    ///     A non-numeric array. (``ConfigTypeError`` for a non-int count.)
    #[pyo3(signature = (tokens_per_expert, prob_sums, num_tokens, num_micro_batches=None))]
    fn add_counts(
        &mut self,
        tokens_per_expert: &Bound<'_, PyAny>,
        prob_sums: &Bound<'_, PyAny>,
        num_tokens: &Bound<'_, PyAny>,
        num_micro_batches: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let e = self.inner.num_experts();
        let (counts, shape) = int_array(tokens_per_expert, "tokens_per_expert")?;
        if shape != [e] {
            let err =
                core::RouterError::shape("tokens_per_expert", format!("[{e}] (num_experts)"), format!("{shape:?}"));
            return Err(to_py(err));
        }
        let sums = per_expert(prob_sums, "prob_sums", e)?;
        let tokens = count(num_tokens, "num_tokens", 0, Family::Input)?;
        let batches = num_micro_batches.map_or(Ok(1), |b| count(b, "num_micro_batches", 0, Family::Input))?;
        self.inner.add_counts(&counts, &sums, tokens, batches).map_err(to_py)
    }

    /// Add one micro-batch's quantile-balancing quantiles (Megatron-Core
    /// ``qb_dual_update``).
    ///
    /// With ``b`` the selection bias the router routed this micro-batch with
    /// (``-beta`` in Megatron's terms: Megatron selects on ``s - beta``, this
    /// router on ``s + b``), per token ``alpha_t`` = the (k+1)-th largest of
    /// ``s_t + b`` and per expert the quantile ``q_e`` = the ``(T*k/E + 1)``-th
    /// largest over tokens of ``s_te - alpha_t``. The per-expert selections
    /// run in parallel over experts; the values do not depend on the order.
    ///
    /// Parameters
    /// ----------
    /// scores : array of float, shape [T, E] (or [..., E])
    ///     The scores the bias is added to: ``route_logits(...,
    ///     return_probs=True).router_probs`` (softmax probabilities or sigmoid
    ///     values) of the active tokens. Megatron-Core passes the logits.
    /// expert_bias : array of float, shape [E], optional
    ///     The bias this micro-batch was routed with; zeros when None.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     ``T*k`` not a multiple of E, or T = 0 (naming ``scores``); a NaN
    ///     or infinite score (naming the token); a bias of the wrong shape or
    ///     not finite.
    /// ConfigError
    ///     ``top_k >= num_experts`` (there is no (k+1)-th expert).
    #[pyo3(signature = (scores, expert_bias=None))]
    fn add_quantiles(&mut self, scores: &Bound<'_, PyAny>, expert_bias: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let e = self.inner.num_experts();
        let (values, shape) = real_array(scores, "scores")?;
        if shape.len() < 2 || shape.last() != Some(&e) {
            return Err(to_py(core::RouterError::shape("scores", format!("[T, {e}]"), format!("{shape:?}"))));
        }
        let bias = bias_or_zeros(expert_bias, e)?;
        let tokens = values.len() / e;
        // With the GIL held: the state is borrowed mutably, and releasing the GIL would
        // let another thread's call on this object fail PyO3's borrow check.
        crate::threads::install(tokens, e, || self.inner.add_quantiles(&values, &bias)).map_err(to_py)
    }

    /// Add ``other``'s statistics to this accumulator's.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     ``other`` has another E or k, or the totals overflow.
    /// InputTypeError
    ///     ``other`` is not a ``GlobalBalanceAccumulator``.
    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, PyAny>) -> PyResult<()> {
        let theirs = other
            .cast::<Self>()
            .map_err(|_| wrong_type("other", "a GlobalBalanceAccumulator", other))?
            .borrow()
            .inner
            .clone();
        slf.borrow_mut().inner.merge(&theirs).map_err(to_py)
    }

    /// Forget every statistic (E and k stay): once per global batch, after the updates.
    fn reset(&mut self) {
        self.inner.reset();
    }

    /// The load-balance loss of the global batch: ``E / (k N^2) * sum_e n_e
    /// S_e`` = ``E * sum_e f_e P_e`` with ``f_e = n_e / (N k)`` and ``P_e =
    /// S_e / N`` over the whole global batch (0.0 before any token).
    ///
    /// This is the project's ``load_balance_loss`` normalization (1.0 at
    /// perfect balance for any k), which is also Megatron-Core's
    /// (``switch_load_balancing_loss_func``: ``E / (k T) * sum_e n_e P_e``);
    /// with global counts it is Megatron's ``global_aux_loss``
    /// (arXiv:2501.11873). Hugging Face Mixtral's normalization is k times it.
    /// Megatron computes it per micro-batch from the running mean of the
    /// counts so far, with the local ``P``; this is its value for the
    /// complete global batch.
    ///
    /// Returns
    /// -------
    /// float
    fn load_balance_loss(&self) -> f64 {
        self.inner.load_balance_loss()
    }

    /// The aux-loss-free bias after this global batch: ``expert_bias[e] + rate
    /// * sign(mean(n) - n_e)`` (DeepSeek-V3, arXiv:2408.15664; Megatron-Core
    /// ``get_updated_expert_bias``, once per global batch after the all-reduce).
    ///
    /// Parameters
    /// ----------
    /// expert_bias : array of float, shape [E]
    /// rate : float
    ///     Finite, >= 0, in score units.
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, float64, shape [E]
    ///
    /// Raises
    /// ------
    /// InputError
    ///     A bias of the wrong shape or not finite.
    /// ConfigError
    ///     ``rate`` negative or not finite.
    fn bias_update<'py>(
        &self,
        py: Python<'py>,
        expert_bias: &Bound<'py, PyAny>,
        rate: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let bias = per_expert(expert_bias, "expert_bias", self.inner.num_experts())?;
        let rate = crate::args::real(rate, "rate", Family::Config)?;
        Ok(arrays::vector(py, self.inner.bias_update(&bias, rate).map_err(to_py)?))
    }

    /// The quantile-balancing bias after this global batch (Megatron-Core
    /// ``_update_router_qb_beta``): with ``beta = -expert_bias`` and ``q`` the
    /// mean of the added quantiles, ``beta' = ema * beta + (1 - ema) * q``,
    /// minus its mean over experts; returns ``-beta'`` (mean 0).
    ///
    /// Megatron averages each rank's mean over the ranks; after
    /// :meth:`all_reduce` this is the mean over all micro-batches of all
    /// ranks, the same when every rank adds as many micro-batches.
    ///
    /// Parameters
    /// ----------
    /// expert_bias : array of float, shape [E], optional
    ///     The current bias; zeros when None.
    /// ema : float, default 0.0
    ///     In [0, 1] (``moe_router_quantile_balancing_ema``; 0 replaces the bias).
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, float64, shape [E]
    ///
    /// Raises
    /// ------
    /// InputError
    ///     No quantiles were added since the last reset; a bad bias.
    /// ConfigError
    ///     ``ema`` outside [0, 1].
    #[pyo3(signature = (expert_bias=None, ema=None))]
    fn quantile_bias_update<'py>(
        &self,
        py: Python<'py>,
        expert_bias: Option<&Bound<'py, PyAny>>,
        ema: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let bias = bias_or_zeros(expert_bias, self.inner.num_experts())?;
        let ema = ema.map_or(Ok(0.0), |v| crate::args::real(v, "ema", Family::Config))?;
        Ok(arrays::vector(py, self.inner.quantile_bias_update(&bias, ema).map_err(to_py)?))
    }

    /// E.
    #[getter]
    fn num_experts(&self) -> usize {
        self.inner.num_experts()
    }

    /// k.
    #[getter]
    fn top_k(&self) -> usize {
        self.inner.top_k()
    }

    /// int64 [E]: routed (pre-capacity) assignments per expert (a copy).
    #[getter]
    fn tokens_per_expert<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        arrays::vector(py, self.inner.tokens_per_expert().to_vec())
    }

    /// float64 [E]: sum over tokens of each expert's score share (a copy).
    #[getter]
    fn prob_sums<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        arrays::vector(py, self.inner.prob_sums().to_vec())
    }

    /// Active tokens added.
    #[getter]
    fn num_tokens(&self) -> u64 {
        self.inner.num_tokens()
    }

    /// Micro-batches added.
    #[getter]
    fn num_micro_batches(&self) -> u64 {
        self.inner.num_micro_batches()
    }

    /// Micro-batches whose quantiles were added.
    #[getter]
    fn num_quantile_batches(&self) -> u64 {
        self.inner.num_quantile_batches()
    }

    /// float64 [E]: sum of the added quantiles (their mean drives :meth:`quantile_bias_update`).
    #[getter]
    fn quantile_sums<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        arrays::vector(py, self.inner.quantile_sums().to_vec())
    }

    fn __getnewargs__(&self) -> (usize, usize) {
        (self.inner.num_experts(), self.inner.top_k())
    }

    fn __getstate__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let g = &self.inner;
        (
            g.tokens_per_expert().to_vec(),
            g.prob_sums().to_vec(),
            g.num_tokens(),
            g.num_micro_batches(),
            g.quantile_sums().to_vec(),
            g.num_quantile_batches(),
        )
            .into_pyobject(py)
    }

    #[allow(clippy::type_complexity)]
    fn __setstate__(&mut self, state: (Vec<i64>, Vec<f64>, u64, u64, Vec<f64>, u64)) -> PyResult<()> {
        let (e, k) = (self.inner.num_experts(), self.inner.top_k());
        let parts = (&state.0[..], &state.1[..], state.2, state.3);
        self.inner = GlobalBalance::from_parts(e, k, parts, (&state.4, state.5)).map_err(to_py)?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let g = &self.inner;
        format!(
            "GlobalBalanceAccumulator(num_experts={}, top_k={}, num_tokens={}, num_micro_batches={}, \
             load_balance_loss={:.6})",
            g.num_experts(),
            g.top_k(),
            g.num_tokens(),
            g.num_micro_batches(),
            g.load_balance_loss()
        )
    }
}

/// The aux-loss-free sign update, ``expert_bias + rate * sign(mean(load) -
/// load)``: the one definition ``LoadBalancer`` and
/// ``GlobalBalanceAccumulator.bias_update`` share (DeepSeek-V3, arXiv:2408.15664).
///
/// Parameters
/// ----------
/// load : array of float, shape [E]
///     Finite, >= 0.
/// expert_bias : array of float, shape [E]
/// rate : float
///     Finite, >= 0.
///
/// Returns
/// -------
/// numpy.ndarray, float64, shape [E]
///
/// Raises
/// ------
/// InputError
///     Shapes other than [E], a negative or non-finite load, a non-finite bias.
/// ConfigError
///     ``rate`` negative or not finite.
#[pyfunction]
pub fn sign_bias_update<'py>(
    py: Python<'py>,
    load: &Bound<'py, PyAny>,
    expert_bias: &Bound<'py, PyAny>,
    rate: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (load, shape) = real_array(load, "load")?;
    if shape.len() != 1 {
        return Err(to_py(core::RouterError::shape("load", "[E]", format!("{shape:?}"))));
    }
    let bias = per_expert(expert_bias, "expert_bias", load.len())?;
    let rate = crate::args::real(rate, "rate", Family::Config)?;
    Ok(arrays::vector(py, core::sign_bias_update(&load, &bias, rate).map_err(to_py)?))
}

//! `LoadBalancer` and its snapshot `LoadBalancingStats`: the core's
//! `LoadBalancer` as Python classes, and `default_bias_update_rate`.

use moe_router_core::{self as core, BalanceSnapshot, BalancerSettings};
use numpy::{PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::args::{flag, integer, real, Given};
use crate::decision::RoutingDecision;
use crate::eplb::plan_placement;
use crate::errors::{to_py, Family};
use crate::exchange::PyExpertPlacement;
use crate::global_balance::PyGlobalBalance;
use crate::guarded::Guarded;
use crate::plan::real_array;
use crate::report::{finite, finite_all, format_float};

/// `num_experts`: an int in `[1, 2**31 - 1]` (expert ids are int32).
fn experts(value: &Bound<'_, PyAny>) -> PyResult<usize> {
    integer(value, "num_experts", 1, i32::MAX.into(), Family::Config)
}

/// A configuration real (its range is the core's to check).
fn setting(name: &'static str) -> impl Fn(&Bound<'_, PyAny>) -> PyResult<f64> {
    move |v| real(v, name, Family::Config)
}

/// The default ``bias_update_rate`` for E experts: ``0.1 / E``, a tenth of the mean softmax score.
///
/// Raises
/// ------
/// ConfigError
///     ``num_experts`` is an int outside ``[1, 2**31 - 1]``.
/// ConfigTypeError
///     ``num_experts`` is not an int.
///
/// >>> default_bias_update_rate(64)
/// 0.0015625
#[pyfunction]
pub fn default_bias_update_rate(num_experts: &Bound<'_, PyAny>) -> PyResult<f64> {
    Ok(core::default_bias_update_rate(experts(num_experts)?))
}

/// Per-expert load EMA, imbalance detection and the aux-loss-free bias remedy.
///
/// Each :meth:`update` takes one training call's per-expert load and
///
/// 1. adds its share of the routed assignments, ``load_e / sum(load)``, to an
///    exponential moving average ``ema = decay * ema + (1 - decay) * share``
///    (the first step initializes the EMA) and to a bounded history;
/// 2. if :attr:`enabled`, moves every expert's selection bias by a fixed step
///    toward balance, from this step's load (DeepSeek-V3, Wang et al. 2024,
///    "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
///    arXiv:2408.15664; Megatron-Core ``moe_router_bias_update_rate``)::
///
///        expert_bias[e] += bias_update_rate * sign(mean(load) - load[e])
///
///    Overloaded experts lose ``rate``, underloaded ones gain it, experts at
///    exactly the mean keep their bias. The rule is the core's
///    ``sign_bias_update``, which ``GlobalBalanceAccumulator.bias_update``
///    applies to a global batch; ``update(accumulator)`` feeds a global
///    batch's counts to the EMA and the bias at once.
///
/// The router passes :attr:`expert_bias` (float64 [E]) to its next routing
/// call: experts are then ranked by ``score + bias``, while the combine
/// weights stay the unbiased scores (see ``docs/semantics.md``, items 3 and 6).
///
/// Parameters
/// ----------
/// num_experts : int
///     E (>= 1).
/// ema_decay : float, default 0.9
///     In [0, 1). Weight of the past in the EMA; 0.9 averages over about
///     ``1 / (1 - 0.9) = 10`` steps.
/// history : int, default 1024
///     Number of per-step load shares kept in :attr:`load_history`.
/// imbalance_threshold : float, default 0.5
///     :meth:`is_imbalanced` is ``(max - min) / mean > threshold`` on the EMA.
///     Perfectly balanced routing still shows multinomial noise, which the
///     EMA shrinks; the default sits above that noise for batches of a few
///     hundred tokens, so it flags real skew (the measurements are in
///     ``docs/balancer.md``).
/// warmup_steps : int, default 10
///     :meth:`is_imbalanced` is False until this many steps were seen (one EMA
///     time constant at the default decay), so one odd first batch is not an alarm.
///     The bias is updated from the first step (as DeepSeek-V3 does).
/// bias_update_rate : float, optional
///     ``rate`` above, in units of the router's scores (softmax probabilities
///     or sigmoid values); finite and >= 0, settable. Default ``0.1 / E``
///     (:func:`default_bias_update_rate`; 1.56e-3 for E = 64), chosen for
///     softmax routers: see Notes. For sigmoid scores DeepSeek-V3 uses 1e-3.
/// enabled : bool, default True
///     Apply the bias remedy. When False, updates only track the load and
///     :attr:`expert_bias` keeps its value (zero unless it was enabled
///     before). Settable.
///
/// Notes
/// -----
/// **Which load.** The balancer counts ``pre_drop_tokens_per_expert``: the
/// assignments the router *chose* for each expert, before capacity. The kept
/// counts (what Megatron-Core accumulates) are capped at the capacity, which
/// hides how overloaded an expert is from the EMA and the imbalance ratio,
/// and the drops lower their mean, so an expert routed less than its fair
/// share can look overloaded to the sign update. Masked (padding) tokens are never
/// counted (the core excludes them).
///
/// **The rate for softmax routers.** The bias is added to the scores, so
/// its step has to be small against the gaps between a token's k-th and
/// (k+1)-th scores, or whole crowds of tokens flip expert at once and the
/// loads swing instead of settling (a sign update never stops moving: every
/// bias changes every step). DeepSeek-V3 uses 1e-3 on sigmoid scores, which
/// lie in (0, 1) for each expert independently; softmax scores share a
/// total of 1 among E experts, so their scale, and the gaps, shrink like
/// 1/E. The default is therefore relative: ``0.1 / E``, a tenth of the mean
/// softmax score per step.
///
/// Measured balancing curves of this default and of other rates, on real
/// and synthetic router logits, are in ``docs/balancer.md``. Peaked routers
/// tolerate larger rates; pass one for faster, coarser balancing.
///
/// The bias is never re-centred: adding a constant to every expert's bias
/// does not change any top-k choice, so drift of the common level is harmless.
///
/// Thread-safe: updates and reads hold one lock. The bookkeeping is the Rust core's.
///
/// Raises
/// ------
/// ConfigError
///     ``num_experts`` is an int outside ``[1, 2**31 - 1]``, ``history`` one
///     outside ``[1, 2**63 - 1]``, ``warmup_steps`` an int below 0, ``ema_decay`` outside
///     [0, 1), or ``imbalance_threshold`` or ``bias_update_rate`` negative or
///     not finite.
/// ConfigTypeError
///     (a ``ConfigError`` and a ``TypeError``) one of them of the wrong type:
///     the counts must be ints, the rates and thresholds reals, ``enabled`` a bool.
///
/// Examples
/// --------
/// >>> import numpy as np, moe_router as mr
/// >>> lb = mr.LoadBalancer(4, bias_update_rate=0.01)
/// >>> lb.update(np.array([70, 10, 10, 10]))     # a per-expert load works as well as a decision
/// >>> lb.expert_bias.tolist()
/// [-0.01, 0.01, 0.01, 0.01]
/// >>> lb.get_stats().expert_loads.tolist()
/// [0.7, 0.1, 0.1, 0.1]
#[pyclass(frozen, module = "moe_router", name = "LoadBalancer")]
pub struct PyLoadBalancer {
    inner: Guarded<core::LoadBalancer>,
}

impl PyLoadBalancer {
    fn read<R>(&self, py: Python<'_>, f: impl FnOnce(&core::LoadBalancer) -> R) -> PyResult<R> {
        self.inner.with(py, |b| f(b))
    }

    /// The per-expert load of `decision`: a decision's pre-capacity counts, an
    /// accumulator's, an object's `pre_drop_tokens_per_expert`, or the array itself.
    fn load_of(decision: &Bound<'_, PyAny>) -> PyResult<(Vec<f64>, Vec<usize>)> {
        if let Ok(d) = decision.cast::<RoutingDecision>() {
            let counts: Vec<f64> = d.get().stats_call().pre_drop.iter().map(|&n| n as f64).collect();
            let e = counts.len();
            return Ok((counts, vec![e]));
        }
        if let Ok(acc) = decision.cast::<PyGlobalBalance>() {
            let counts = acc.borrow().tokens_per_expert_counts().iter().map(|&n| n as f64).collect::<Vec<_>>();
            let e = counts.len();
            return Ok((counts, vec![e]));
        }
        match decision.getattr("pre_drop_tokens_per_expert") {
            Ok(raw) => real_array(&raw, "decision.pre_drop_tokens_per_expert"),
            Err(_) => {
                const ACCEPTED: &str = "a RoutingDecision, a GlobalBalanceAccumulator or a per-expert load array";
                crate::plan::converted(decision, "decision", "iuf", "float64", ACCEPTED).map_err(|e| {
                    if e.is_instance_of::<pyo3::exceptions::PyTypeError>(decision.py()) {
                        crate::errors::wrong_type("decision", ACCEPTED, decision)
                    } else {
                        e
                    }
                })
            }
        }
    }
}

#[pymethods]
impl PyLoadBalancer {
    #[new]
    #[pyo3(
        signature = (num_experts, ema_decay=Given(None), history=Given(None), imbalance_threshold=Given(None),
                     warmup_steps=Given(None), bias_update_rate=None, enabled=Given(None)),
        text_signature = "(num_experts, ema_decay=0.9, history=1024, imbalance_threshold=0.5, warmup_steps=10, \
                          bias_update_rate=None, enabled=True)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_experts: &Bound<'_, PyAny>,
        ema_decay: Given<'_>,
        history: Given<'_>,
        imbalance_threshold: Given<'_>,
        warmup_steps: Given<'_>,
        bias_update_rate: Option<&Bound<'_, PyAny>>,
        enabled: Given<'_>,
    ) -> PyResult<Self> {
        let d = BalancerSettings::new(experts(num_experts)?);
        let most = i128::from(i64::MAX);
        let settings = BalancerSettings {
            ema_decay: ema_decay.or(d.ema_decay, setting("ema_decay"))?,
            history: history.or(d.history, |v| integer(v, "history", 1, most, Family::Config))?,
            imbalance_threshold: imbalance_threshold.or(d.imbalance_threshold, setting("imbalance_threshold"))?,
            warmup_steps: warmup_steps.or(d.warmup_steps, |v| integer(v, "warmup_steps", 0, most, Family::Config))?,
            bias_update_rate: Given(bias_update_rate.filter(|r| !r.is_none()).cloned())
                .or(d.bias_update_rate, setting("bias_update_rate"))?,
            enabled: enabled.flag("enabled", d.enabled, Family::Config)?,
            ..d
        };
        let balancer = core::LoadBalancer::new(settings).map_err(to_py)?;
        Ok(PyLoadBalancer { inner: Guarded::new(py, balancer)? })
    }

    /// Add one training step's load and, if enabled, update the bias.
    ///
    /// Parameters
    /// ----------
    /// decision : RoutingDecision, GlobalBalanceAccumulator or array_like
    ///     A decision (its ``pre_drop_tokens_per_expert`` is used), a
    ///     :class:`GlobalBalanceAccumulator` (its ``tokens_per_expert``: the
    ///     same counts summed over the micro-batches and ranks of one global
    ///     batch, Megatron-Core's once-per-global-batch update), or a
    ///     per-expert load of shape [E].
    ///
    /// Notes
    /// -----
    /// A step with no routed assignment (every token masked) carries no load
    /// information and is ignored: no EMA, history, step count or bias change.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     The load does not have E entries, or holds negative or non-finite values.
    /// InputTypeError
    ///     The load is not numeric.
    fn update(&self, py: Python<'_>, decision: &Bound<'_, PyAny>) -> PyResult<()> {
        let (load, shape) = Self::load_of(decision)?;
        self.inner.with(py, |b| b.check_load_shape(&shape).and_then(|()| b.update(&load)))?.map_err(to_py)
    }

    /// Forget every step and zero the bias (configuration is kept).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.with(py, |b| b.reset())
    }

    /// The lock every update and read holds (a ``threading.RLock``).
    #[getter]
    fn _lock(&self, py: Python<'_>) -> Py<PyAny> {
        self.inner.lock(py)
    }

    /// E.
    #[getter]
    fn num_experts(&self, py: Python<'_>) -> PyResult<usize> {
        self.read(py, |b| b.settings().num_experts)
    }

    /// Weight of the past in the load EMA.
    #[getter]
    fn ema_decay(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |b| b.settings().ema_decay)
    }

    /// Threshold on ``(max - min) / mean`` of the EMA load.
    #[getter]
    fn imbalance_threshold(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |b| b.settings().imbalance_threshold)
    }

    /// Steps before :meth:`is_imbalanced` may be True.
    #[getter]
    fn warmup_steps(&self, py: Python<'_>) -> PyResult<u64> {
        self.read(py, |b| b.settings().warmup_steps)
    }

    /// Whether updates change :attr:`expert_bias` (settable; a bool, else ``ConfigTypeError``).
    #[getter]
    fn enabled(&self, py: Python<'_>) -> PyResult<bool> {
        self.read(py, |b| b.settings().enabled)
    }

    #[setter]
    fn set_enabled(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let enabled = flag(value, "enabled", Family::Config)?;
        self.inner.with(py, |b| b.set_enabled(enabled))
    }

    /// Per-step change of each expert's bias, in score units (settable; finite, >= 0, else ``ConfigError``).
    #[getter]
    fn bias_update_rate(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |b| b.settings().bias_update_rate)
    }

    #[setter]
    fn set_bias_update_rate(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let rate = real(value, "bias_update_rate", Family::Config)?;
        self.inner.with(py, |b| b.set_bias_update_rate(rate))?.map_err(to_py)
    }

    /// float64 [E]: the selection bias for the router's next call (a fresh copy).
    #[getter]
    fn expert_bias<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        Ok(PyArray1::from_vec(py, self.read(py, |b| b.expert_bias().to_vec())?))
    }

    /// Updates that carried load since the last reset.
    #[getter]
    fn steps(&self, py: Python<'_>) -> PyResult<u64> {
        self.read(py, |b| b.steps())
    }

    /// float64 [E]: EMA of each expert's share of the routed assignments (a copy).
    #[getter]
    fn expert_loads<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        Ok(PyArray1::from_vec(py, self.read(py, |b| b.expert_loads().to_vec())?))
    }

    /// float64 [n, E]: each of the last (at most ``history``) steps' load shares, oldest first.
    #[getter]
    fn load_history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let (rows, e, data) = self.read(py, |b| (b.history_len(), b.settings().num_experts, b.load_history()))?;
        crate::arrays::matrix(py, data, rows, e)
    }

    /// ``(max - min) / mean`` of the EMA load (0.0 before any step).
    fn imbalance_ratio(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |b| b.imbalance_ratio())
    }

    /// True after the warm-up when :meth:`imbalance_ratio` exceeds ``imbalance_threshold``.
    fn is_imbalanced(&self, py: Python<'_>) -> PyResult<bool> {
        self.read(py, |b| b.is_imbalanced())
    }

    /// An expert placement for the observed loads: :func:`plan_placement` on the EMA load.
    ///
    /// The load planned on is :attr:`expert_loads`, the EMA of each expert's
    /// share of the routed (pre-capacity) assignments, so it follows the
    /// recent routing, with the bias remedy in effect (about the last
    /// ``1 / (1 - ema_decay)`` steps). The placement's expected rank loads
    /// (``rank_load_after``, ``rank_load_before``) are then shares too (they
    /// sum to 1; the mean is ``1 / num_ranks``). For a longer window, as vLLM's
    /// EPLB records one, plan on the history instead:
    /// ``plan_placement(lb.load_history.mean(axis=0), num_ranks)``.
    ///
    /// Parameters
    /// ----------
    /// num_ranks, num_replicas, num_nodes, num_groups
    ///     As :func:`plan_placement` (R ranks, P physical slots in total, N
    ///     nodes, G expert groups).
    ///
    /// Returns
    /// -------
    /// ExpertPlacement
    ///     With ``planned_load``, ``rank_load_before``/``rank_load_after``
    ///     and ``imbalance_before``/``imbalance_after`` (DeepSeek EPLB's
    ///     algorithm; see :func:`plan_placement`).
    ///
    /// Raises
    /// ------
    /// InputError
    ///     No load was observed yet (no :meth:`update` carried load since the last reset).
    /// ConfigError
    ///     As :func:`plan_placement`.
    ///
    /// Examples
    /// --------
    /// >>> import numpy as np, moe_router as mr
    /// >>> lb = mr.LoadBalancer(8)
    /// >>> lb.update(np.array([50, 10, 10, 10, 5, 5, 5, 5]))
    /// >>> p = lb.suggest_placement(num_ranks=4, num_replicas=12)
    /// >>> p.replica_counts.tolist(), round(p.imbalance_before, 2), round(p.imbalance_after, 2)
    /// ([4, 2, 1, 1, 1, 1, 1, 1], 2.4, 1.1)
    #[pyo3(
        signature = (num_ranks, num_replicas=None, num_nodes=None, num_groups=None),
        text_signature = "($self, num_ranks, num_replicas=None, num_nodes=1, num_groups=None)"
    )]
    fn suggest_placement(
        &self,
        py: Python<'_>,
        num_ranks: &Bound<'_, PyAny>,
        num_replicas: Option<&Bound<'_, PyAny>>,
        num_nodes: Option<&Bound<'_, PyAny>>,
        num_groups: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyExpertPlacement> {
        let (steps, load) = self.read(py, |b| (b.steps(), b.expert_loads().to_vec()))?;
        if steps == 0 {
            return Err(crate::errors::InputError::new_err(
                "LoadBalancer.suggest_placement: no load observed yet; call update() first",
            ));
        }
        plan_placement(py, PyArray1::from_vec(py, load).as_any(), num_ranks, num_replicas, num_nodes, num_groups)
    }

    /// A consistent snapshot: EMA loads, steps, imbalance, bias (see :class:`LoadBalancingStats`).
    fn get_stats(&self, py: Python<'_>) -> PyResult<PyLoadBalancingStats> {
        Ok(PyLoadBalancingStats { inner: self.read(py, |b| b.snapshot())? })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = self.read(py, |b| b.snapshot())?;
        let max_bias = s.expert_bias.iter().fold(0.0f64, |m, b| m.max(b.abs()));
        let python = |b: bool| if b { "True" } else { "False" };
        Ok(format!(
            "LoadBalancer(num_experts={}, steps={}, imbalance_ratio={}, imbalanced={}, bias_update_rate={}, \
             enabled={}, max|bias|={})",
            s.expert_loads.len(),
            s.steps,
            format_float(py, s.imbalance_ratio, ".4g")?,
            python(s.imbalanced),
            format_float(py, s.bias_update_rate, "g")?,
            python(s.enabled),
            format_float(py, max_bias, ".4g")?
        ))
    }
}

/// A snapshot of a :class:`LoadBalancer` (``LoadBalancer.get_stats()``).
///
/// Attributes
/// ----------
/// expert_loads : numpy.ndarray, float64, shape [E]
///     EMA of each expert's share of the routed assignments (pre-capacity; a
///     perfectly balanced router has ``1/E`` everywhere; the shares sum to 1
///     once a step was seen). All zeros before the first update.
/// steps : int
///     Updates that carried load (decisions with at least one routed assignment).
/// imbalanced : bool
///     ``LoadBalancer.is_imbalanced()`` at snapshot time.
/// imbalance_ratio : float
///     ``(max - min) / mean`` of ``expert_loads`` (0.0 before any step).
/// threshold : float
///     The balancer's ``imbalance_threshold``.
/// warmup_steps : int
///     Steps before ``imbalanced`` can be True.
/// expert_bias : numpy.ndarray, float64, shape [E]
///     Selection bias the router adds to the scores of the next call.
/// bias_update_rate : float
///     Change of each bias per step, in score units.
/// enabled : bool
///     Whether updates change ``expert_bias``.
/// last_load : numpy.ndarray or None
///     float64 [E] share of the routed assignments in the last step.
///
/// Raises
/// ------
/// InputTypeError
///     A field of the wrong type (arrays must be real-valued).
#[pyclass(frozen, module = "moe_router", name = "LoadBalancingStats")]
pub struct PyLoadBalancingStats {
    inner: BalanceSnapshot,
}

/// A 1-D real array-like as float64 values.
fn vector(x: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<f64>> {
    let (values, shape) = real_array(x, name)?;
    if shape.len() != 1 {
        return Err(crate::errors::InputError::new_err(format!("{name} has shape {shape:?}, expected [E]")));
    }
    Ok(values)
}

#[pymethods]
impl PyLoadBalancingStats {
    #[new]
    #[pyo3(signature = (expert_loads, steps, imbalanced, imbalance_ratio, threshold, warmup_steps, expert_bias,
                        bias_update_rate, enabled, last_load=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        expert_loads: &Bound<'_, PyAny>,
        steps: &Bound<'_, PyAny>,
        imbalanced: &Bound<'_, PyAny>,
        imbalance_ratio: &Bound<'_, PyAny>,
        threshold: &Bound<'_, PyAny>,
        warmup_steps: &Bound<'_, PyAny>,
        expert_bias: &Bound<'_, PyAny>,
        bias_update_rate: &Bound<'_, PyAny>,
        enabled: &Bound<'_, PyAny>,
        last_load: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let input = Family::Input;
        let most = i128::from(u64::MAX);
        Ok(PyLoadBalancingStats {
            inner: BalanceSnapshot {
                expert_loads: vector(expert_loads, "expert_loads")?,
                steps: integer(steps, "steps", 0, most, input)?,
                imbalanced: flag(imbalanced, "imbalanced", input)?,
                imbalance_ratio: real(imbalance_ratio, "imbalance_ratio", input)?,
                threshold: real(threshold, "threshold", input)?,
                warmup_steps: integer(warmup_steps, "warmup_steps", 0, most, input)?,
                expert_bias: vector(expert_bias, "expert_bias")?,
                bias_update_rate: real(bias_update_rate, "bias_update_rate", input)?,
                enabled: flag(enabled, "enabled", input)?,
                last_load: last_load.filter(|l| !l.is_none()).map(|l| vector(l, "last_load")).transpose()?,
            },
        })
    }

    /// float64 [E]: EMA of each expert's share of the routed assignments (a copy).
    #[getter]
    fn expert_loads<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.inner.expert_loads)
    }

    /// Updates that carried load.
    #[getter]
    fn steps(&self) -> u64 {
        self.inner.steps
    }

    /// ``LoadBalancer.is_imbalanced()`` at snapshot time.
    #[getter]
    fn imbalanced(&self) -> bool {
        self.inner.imbalanced
    }

    /// ``(max - min) / mean`` of :attr:`expert_loads` (0.0 before any step).
    #[getter]
    fn imbalance_ratio(&self) -> f64 {
        self.inner.imbalance_ratio
    }

    /// The balancer's ``imbalance_threshold``.
    #[getter]
    fn threshold(&self) -> f64 {
        self.inner.threshold
    }

    /// Steps before :attr:`imbalanced` can be True.
    #[getter]
    fn warmup_steps(&self) -> u64 {
        self.inner.warmup_steps
    }

    /// float64 [E]: the selection bias the router adds to the scores of the next call (a copy).
    #[getter]
    fn expert_bias<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.inner.expert_bias)
    }

    /// Change of each bias per step, in score units.
    #[getter]
    fn bias_update_rate(&self) -> f64 {
        self.inner.bias_update_rate
    }

    /// Whether updates change :attr:`expert_bias`.
    #[getter]
    fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// float64 [E] share of the routed assignments in the last step (a copy), or None before any.
    #[getter]
    fn last_load<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<f64>>> {
        self.inner.last_load.as_deref().map(|l| PyArray1::from_slice(py, l))
    }

    /// Population variance of :attr:`expert_loads` (squared shares), as ``numpy.var``.
    #[getter]
    fn load_variance(&self) -> f64 {
        self.inner.load_variance()
    }

    /// Coefficient of variation (population std / mean) of :attr:`expert_loads`; 0.0 if the mean is 0.
    fn load_cv(&self) -> f64 {
        self.inner.load_cv()
    }

    /// True when at least one step was seen and ``load_cv() < max_cv`` (default 0.2).
    #[pyo3(signature = (max_cv=None), text_signature = "($self, max_cv=0.2)")]
    fn is_well_balanced(&self, max_cv: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let max_cv = max_cv.map_or(Ok(core::WELL_BALANCED_CV), |v| real(v, "max_cv", Family::Input))?;
        if !(max_cv.is_finite() && max_cv >= 0.0) {
            return Err(crate::errors::value_error(
                Family::Input,
                format!("invalid max_cv: got {max_cv}; must be a finite number >= 0"),
            ));
        }
        Ok(self.inner.is_well_balanced(max_cv))
    }

    /// JSON-ready copy: arrays as lists, a float that is not finite as None
    /// (``json.dumps(..., allow_nan=False)`` accepts it).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.inner;
        let d = PyDict::new(py);
        d.set_item("expert_loads", finite_all(&s.expert_loads))?;
        d.set_item("steps", s.steps)?;
        d.set_item("imbalanced", s.imbalanced)?;
        d.set_item("imbalance_ratio", finite(s.imbalance_ratio))?;
        d.set_item("threshold", finite(s.threshold))?;
        d.set_item("warmup_steps", s.warmup_steps)?;
        d.set_item("expert_bias", finite_all(&s.expert_bias))?;
        d.set_item("bias_update_rate", finite(s.bias_update_rate))?;
        d.set_item("enabled", s.enabled)?;
        d.set_item("load_cv", finite(s.load_cv()))?;
        d.set_item("well_balanced", s.is_well_balanced(core::WELL_BALANCED_CV))?;
        d.set_item("last_load", s.last_load.as_deref().map(finite_all))?;
        Ok(d)
    }

    /// ``(LoadBalancingStats, fields)``: a snapshot pickles and copies by value.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let s = &slf.get().inner;
        let fields = (
            PyArray1::from_slice(py, &s.expert_loads),
            s.steps,
            s.imbalanced,
            s.imbalance_ratio,
            s.threshold,
            s.warmup_steps,
            PyArray1::from_slice(py, &s.expert_bias),
            s.bias_update_rate,
            s.enabled,
            s.last_load.as_deref().map(|l| PyArray1::from_slice(py, l)),
        );
        (slf.get_type(), fields).into_pyobject(py)
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "LoadBalancingStats(expert_loads={:?}, steps={}, imbalanced={}, imbalance_ratio={}, threshold={}, \
             warmup_steps={}, expert_bias={:?}, bias_update_rate={}, enabled={}, last_load={})",
            s.expert_loads,
            s.steps,
            if s.imbalanced { "True" } else { "False" },
            s.imbalance_ratio,
            s.threshold,
            s.warmup_steps,
            s.expert_bias,
            s.bias_update_rate,
            if s.enabled { "True" } else { "False" },
            s.last_load.as_ref().map_or("None".to_string(), |l| format!("{l:?}"))
        )
    }
}

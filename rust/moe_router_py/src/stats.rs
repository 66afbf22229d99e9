//! `RoutingStats`: the core's `RoutingStats` as a Python class.

use moe_router_core::{self as core, Averaged, CallRecord};
use numpy::PyArray1;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::args::{integer, real, Given};
use crate::decision::RoutingDecision;
use crate::errors::{to_py, type_error, Family};
use crate::guarded::Guarded;
use crate::plan::int_array;
use crate::report::{finite, finite_all, format_float};

/// Default number of recent timed calls whose latencies feed the percentiles.
pub const DEFAULT_WINDOW: usize = 1024;
/// Default number of per-call load variances kept.
pub const DEFAULT_HISTORY: usize = 1024;

/// One call's counts and losses, as `RoutingStats.record` reads them.
pub struct Call {
    /// Kept assignments per expert.
    pub kept: Vec<i64>,
    /// Routed (pre-capacity) assignments per expert.
    pub pre_drop: Vec<i64>,
    /// capacity, total_tokens, active_tokens, kept_assignments, dropped_assignments, tokens_dropped.
    pub counts: [u64; 6],
    /// load_balance_loss, router_z_loss, auxiliary_loss, routing_efficiency().
    pub averaged: [f64; 4],
}

impl Call {
    fn record(&self) -> CallRecord<'_> {
        let [capacity, total_tokens, active_tokens, kept_assignments, dropped_assignments, tokens_dropped] =
            self.counts;
        CallRecord {
            kept_per_expert: &self.kept,
            pre_drop_per_expert: &self.pre_drop,
            capacity,
            total_tokens,
            active_tokens,
            kept_assignments,
            dropped_assignments,
            tokens_dropped,
            averaged: self.averaged,
        }
    }

    /// The fields of `decision`: a `RoutingDecision` is read directly, any other
    /// object through the attributes of the same names.
    fn of(decision: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(d) = decision.cast::<RoutingDecision>() {
            return Ok(d.get().stats_call());
        }
        let refused = |e: PyErr| {
            let kind = decision.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            type_error(
                Family::Input,
                format!("decision must be a RoutingDecision (or carry its fields), got {kind}: {e}"),
            )
        };
        let read = || -> PyResult<_> {
            let vector = |name: &str| int_array(&decision.getattr(name)?, name);
            let (kept, pre_drop) = (vector("tokens_per_expert")?, vector("pre_drop_tokens_per_expert")?);
            let count = |name: &str| decision.getattr(name)?.extract::<u64>();
            let counts = [
                count("capacity")?,
                count("total_tokens")?,
                count("active_tokens")?,
                count("kept_assignments")?,
                count("dropped_assignments")?,
                count("tokens_dropped")?,
            ];
            let loss = |name: &str| decision.getattr(name)?.extract::<f64>();
            let efficiency = decision.call_method0("routing_efficiency")?.extract::<f64>()?;
            let averaged = [loss("load_balance_loss")?, loss("router_z_loss")?, loss("auxiliary_loss")?, efficiency];
            Ok((kept, pre_drop, counts, averaged))
        };
        let py = decision.py();
        let ((kept, kept_shape), (pre_drop, pre_shape), counts, averaged) =
            read().map_err(|e: PyErr| if e.is_instance_of::<PyException>(py) { refused(e) } else { e })?;
        for (name, shape) in
            [("decision.tokens_per_expert", kept_shape), ("decision.pre_drop_tokens_per_expert", pre_shape)]
        {
            if shape.len() != 1 {
                return Err(to_py(core::RouterError::shape(name, "[E]", format!("{shape:?}"))));
            }
        }
        Ok(Call { kept, pre_drop, counts, averaged })
    }
}

/// Totals, averages, per-expert utilization and latency of routing calls.
///
/// An ``ExpertRouter`` owns one and calls :meth:`record` after every
/// ``route_tokens``/``route_logits`` call with the decision and the wall-clock
/// time the call took; it can also be used on its own, with decisions from
/// :func:`moe_router.route_logits`. The bookkeeping is the Rust core's.
///
/// Thread-safe: :meth:`record`, :meth:`reset` and every read take the same
/// lock, so eight threads routing through one router see totals equal to the
/// sum of their decisions.
///
/// Parameters
/// ----------
/// window : int, default 1024
///     Number of most recent timed calls whose latencies are kept for the
///     p50/p95/p99 percentiles (older ones are forgotten).
/// history : int, default 1024
///     Number of most recent per-call load variances kept in
///     :attr:`load_variance_history`.
///
/// Attributes
/// ----------
/// calls : int
///     Decisions recorded (also available as :attr:`total_routings`).
/// routed_calls : int
///     Calls that routed at least one assignment.
/// timed_calls : int
///     Calls recorded with a latency.
/// total_tokens : int
///     Sum of ``RoutingDecision.total_tokens`` (rows, padding included).
/// active_tokens : int
///     Sum of ``RoutingDecision.active_tokens`` (rows not masked out).
/// total_assignments : int
///     Sum of kept + dropped assignments: the (token, expert) choices that were routed.
/// kept_assignments, dropped_assignments : int
///     Sums of the decisions' fields; ``kept + dropped == total_assignments``.
/// tokens_dropped : int
///     Sum of ``RoutingDecision.tokens_dropped``: active tokens left with no
///     kept expert at all.
/// non_finite_losses : int
///     Loss (or efficiency) values of routed calls that were inf or NaN and so
///     were left out of their running averages.
/// num_experts : int or None
///     E, fixed by the first decision recorded (None before it).
///
/// Raises
/// ------
/// ConfigError
///     ``window`` or ``history`` is an int outside ``[1, 2**63 - 1]``.
/// ConfigTypeError
///     ``window`` or ``history`` is not an int (a float, a bool, ...).
///
/// Notes
/// -----
/// Per-expert utilization (:attr:`expert_utilization`) is the cumulative
/// number of kept assignments of each expert divided by the cumulative
/// capacity offered to it, ``sum_calls tokens_per_expert[e] / sum_calls
/// capacity``. Each call's capacity is the one the decision reports: the
/// ``capacity_factor`` formula (GShard, Lepikhin et al. 2020; Switch
/// Transformer, Fedus et al. 2021, eq. 3), a fixed ``expert_capacity``, or for
/// dropless routing the largest kept load of that call (so the busiest expert
/// of a dropless call is at 100 %).
///
/// The drop rates are 0.0, not a division by zero, before any token was
/// routed. Per-call averages are arithmetic means over the calls that routed
/// at least one token (an empty batch has no loss to average), kept as
/// running means so that large finite values cannot overflow them; a value
/// that is not finite (an ``auxiliary_loss`` whose coefficient times a loss
/// exceeds the float64 range, or a decision built by hand) is left out of its
/// average and counted in ``non_finite_losses``.
///
/// Latencies are seconds, as measured by the caller (an ``ExpertRouter`` uses
/// ``time.perf_counter()`` around the routing call). Percentiles use linear
/// interpolation between order statistics (NumPy's default, Hyndman and Fan
/// 1996 type 7) over the last ``window`` timed calls. Throughput is
/// ``active tokens / total routing time`` over every timed call since the
/// last :meth:`reset`. Means, variances and percentiles give the bits NumPy
/// gives on the same values (pairwise summation).
///
/// Examples
/// --------
/// >>> import numpy as np, moe_router as mr
/// >>> cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=1.0)
/// >>> stats = mr.RoutingStats()
/// >>> dec = mr.route_logits(np.eye(4, dtype=np.float32)[[0, 0, 1, 2]], cfg)
/// >>> stats.record(dec, latency_s=0.002)
/// >>> stats.calls, stats.kept_assignments, stats.dropped_assignments
/// (1, 3, 1)
/// >>> stats.expert_utilization.tolist()  # capacity 1 per expert in this call
/// [1.0, 1.0, 1.0, 0.0]
/// >>> stats.throughput  # 4 active tokens in 2 ms
/// 2000.0
#[pyclass(frozen, module = "moe_router", name = "RoutingStats")]
pub struct PyRoutingStats {
    inner: Guarded<core::RoutingStats>,
}

impl PyRoutingStats {
    fn read<R>(&self, py: Python<'_>, f: impl FnOnce(&core::RoutingStats) -> R) -> PyResult<R> {
        self.inner.with(py, |s| f(s))
    }

    fn total(&self, py: Python<'_>, f: impl FnOnce(&core::Totals) -> u64) -> PyResult<u64> {
        self.read(py, |s| f(s.totals()))
    }

    /// The utilization summary of `s` (a copy of the state) as a dict (``[expert, utilization]``
    /// lists); `json`: every float that is not finite as None.
    fn summary_dict<'py>(py: Python<'py>, s: &core::RoutingStats, json: bool) -> PyResult<Bound<'py, PyDict>> {
        let v = |x: f64| if json { finite(x) } else { Some(x) };
        let pair =
            |p: Option<(usize, f64)>| p.map(|(e, x)| (e, v(x)).into_pyobject(py).map(|t| t.to_list())).transpose();
        let u = s.utilization_summary();
        let d = PyDict::new(py);
        d.set_item("mean_utilization", v(u.mean))?;
        d.set_item("min_utilization", v(u.min))?;
        d.set_item("max_utilization", v(u.max))?;
        d.set_item("utilization_cv", v(u.cv))?;
        d.set_item("most_utilized_expert", pair(u.most)?)?;
        d.set_item("least_utilized_expert", pair(u.least)?)?;
        d.set_item("routing_efficiency", v(s.routing_efficiency()))?;
        d.set_item("average_routing_efficiency", s.average(Averaged::RoutingEfficiency).and_then(v))?;
        d.set_item("tokens_dropped_rate", v(s.tokens_dropped_rate()))?;
        d.set_item("assignment_drop_rate", v(s.assignment_drop_rate()))?;
        d.set_item("average_load_balance_loss", s.average(Averaged::LoadBalanceLoss).and_then(v))?;
        d.set_item("average_router_z_loss", s.average(Averaged::RouterZLoss).and_then(v))?;
        Ok(d)
    }
}

#[pymethods]
impl PyRoutingStats {
    #[new]
    #[pyo3(signature = (window=Given(None), history=Given(None)), text_signature = "(window=1024, history=1024)")]
    fn new(py: Python<'_>, window: Given<'_>, history: Given<'_>) -> PyResult<Self> {
        let most = i128::from(i64::MAX);
        let window = window.or(DEFAULT_WINDOW, |v| integer(v, "window", 1, most, Family::Config))?;
        let history = history.or(DEFAULT_HISTORY, |v| integer(v, "history", 1, most, Family::Config))?;
        let stats = core::RoutingStats::new(window, history).map_err(to_py)?;
        Ok(PyRoutingStats { inner: Guarded::new(py, stats)? })
    }

    /// Add one routing call to the statistics.
    ///
    /// Parameters
    /// ----------
    /// decision : RoutingDecision
    ///     The call's result. Read: ``tokens_per_expert``,
    ///     ``pre_drop_tokens_per_expert``, ``capacity``, ``total_tokens``,
    ///     ``active_tokens``, ``kept_assignments``, ``dropped_assignments``,
    ///     ``tokens_dropped``, the three losses and ``routing_efficiency()``
    ///     (another object with those attributes is read through them).
    /// latency_s : float, optional
    ///     Wall-clock duration of the routing call in seconds (finite, >= 0).
    ///     None records the decision without timing it: it then counts in no
    ///     latency percentile and not in the throughput.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     ``latency_s`` is negative or not finite, or the decision has a
    ///     different number of experts than the decisions recorded before.
    ///     Nothing is recorded then.
    /// InputTypeError
    ///     ``latency_s`` is not a real number (nor None), or ``decision`` lacks
    ///     a field of a RoutingDecision.
    #[pyo3(signature = (decision, latency_s=None))]
    fn record(
        &self,
        py: Python<'_>,
        decision: &Bound<'_, PyAny>,
        latency_s: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let latency = latency_s.filter(|l| !l.is_none()).map(|l| real(l, "latency_s", Family::Input)).transpose()?;
        let call = Call::of(decision)?;
        self.inner.with(py, |s| s.record(&call.record(), latency))?.map_err(to_py)
    }

    /// Forget everything recorded (``window`` and ``history`` are kept).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.with(py, |s| s.reset())
    }

    /// The lock every update and read holds (a ``threading.RLock``).
    #[getter]
    fn _lock(&self, py: Python<'_>) -> Py<PyAny> {
        self.inner.lock(py)
    }

    /// Decisions recorded.
    #[getter]
    fn calls(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.calls)
    }

    /// Alias of :attr:`calls`.
    #[getter]
    fn total_routings(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.calls)
    }

    /// Calls that routed at least one assignment.
    #[getter]
    fn routed_calls(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.routed_calls)
    }

    /// Calls recorded with a latency.
    #[getter]
    fn timed_calls(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.timed_calls)
    }

    /// E, fixed by the first decision recorded (None before it).
    #[getter]
    fn num_experts(&self, py: Python<'_>) -> PyResult<Option<usize>> {
        self.read(py, |s| s.num_experts())
    }

    /// Sum of ``RoutingDecision.total_tokens`` (rows, padding included).
    #[getter]
    fn total_tokens(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.total_tokens)
    }

    /// Sum of ``RoutingDecision.active_tokens`` (rows not masked out).
    #[getter]
    fn active_tokens(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.active_tokens)
    }

    /// Sum of kept + dropped assignments: the (token, expert) choices that were routed.
    #[getter]
    fn total_assignments(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.total_assignments)
    }

    /// Sum of ``RoutingDecision.kept_assignments``.
    #[getter]
    fn kept_assignments(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.kept_assignments)
    }

    /// Sum of ``RoutingDecision.dropped_assignments``.
    #[getter]
    fn dropped_assignments(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.dropped_assignments)
    }

    /// Sum of ``RoutingDecision.tokens_dropped``: active tokens left with no kept expert.
    #[getter]
    fn tokens_dropped(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.tokens_dropped)
    }

    /// Values of routed calls that were inf or NaN, left out of their running averages.
    #[getter]
    fn non_finite_losses(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.non_finite_losses)
    }

    /// Mean ``load_balance_loss`` over calls that routed a token (finite values; None before any).
    #[getter]
    fn average_load_balance_loss(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.average(Averaged::LoadBalanceLoss))
    }

    /// Mean ``router_z_loss`` over calls that routed a token (finite values; None before any).
    #[getter]
    fn average_router_z_loss(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.average(Averaged::RouterZLoss))
    }

    /// Mean ``auxiliary_loss`` over calls that routed a token (finite values; None before any).
    #[getter]
    fn average_auxiliary_loss(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.average(Averaged::AuxiliaryLoss))
    }

    /// Mean of the per-call ``routing_efficiency()`` (kept / routed) over calls that routed a token.
    ///
    /// Every call weighs the same; :attr:`routing_efficiency` weighs by assignments.
    #[getter]
    fn average_routing_efficiency(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.average(Averaged::RoutingEfficiency))
    }

    /// ``kept_assignments / total_assignments`` over all calls; 1.0 when nothing was routed.
    #[getter]
    fn routing_efficiency(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |s| s.routing_efficiency())
    }

    /// ``tokens_dropped / active_tokens`` (fraction of tokens with no kept expert); 0.0 when empty.
    #[getter]
    fn tokens_dropped_rate(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |s| s.tokens_dropped_rate())
    }

    /// ``dropped_assignments / total_assignments``; 0.0 when nothing was routed.
    #[getter]
    fn assignment_drop_rate(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |s| s.assignment_drop_rate())
    }

    /// int64 [E]: cumulative kept assignments per expert (a copy; empty before any call).
    #[getter]
    fn expert_token_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        Ok(PyArray1::from_vec(py, self.read(py, |s| s.kept_per_expert().to_vec())?))
    }

    /// int64 [E]: cumulative routed (pre-capacity) assignments per expert (a copy).
    #[getter]
    fn pre_drop_token_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        Ok(PyArray1::from_vec(py, self.read(py, |s| s.pre_drop_per_expert().to_vec())?))
    }

    /// Cumulative per-expert capacity: the sum of ``decision.capacity`` over all calls (slots).
    #[getter]
    fn capacity_offered(&self, py: Python<'_>) -> PyResult<u64> {
        self.total(py, |t| t.capacity_offered)
    }

    /// float64 [E]: cumulative kept / cumulative capacity offered, per expert, in [0, 1].
    ///
    /// 0 for every expert while no capacity was offered (empty batches only).
    #[getter]
    fn expert_utilization<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        Ok(PyArray1::from_vec(py, self.read(py, |s| s.expert_utilization())?))
    }

    /// Coefficient of variation (population std / mean) of :attr:`expert_utilization`.
    ///
    /// 0.0 before any call or when no assignment was kept. Equals the CV of
    /// the cumulative kept counts (the capacity is a common factor).
    fn utilization_cv(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |s| s.utilization_cv())
    }

    /// ``(expert, utilization)`` of the busiest expert (lowest index on ties); None before any call.
    fn most_utilized_expert(&self, py: Python<'_>) -> PyResult<Option<(usize, f64)>> {
        self.read(py, |s| s.utilization_summary().most)
    }

    /// ``(expert, utilization)`` of the idlest expert (lowest index on ties); None before any call.
    fn least_utilized_expert(&self, py: Python<'_>) -> PyResult<Option<(usize, f64)>> {
        self.read(py, |s| s.utilization_summary().least)
    }

    /// float64 [n]: population variance of ``tokens_per_expert`` (kept, tokens^2) of each of the last calls.
    ///
    /// At most ``history`` entries, oldest first.
    #[getter]
    fn load_variance_history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        Ok(PyArray1::from_vec(py, self.read(py, |s| s.load_variance_history())?))
    }

    /// Per-expert utilization and drop figures in one dict.
    ///
    /// Returns
    /// -------
    /// dict
    ///     ``mean_utilization``, ``min_utilization``, ``max_utilization`` (of
    ///     :attr:`expert_utilization`; the mean is total kept over ``E x``
    ///     capacity offered), ``utilization_cv``, ``most_utilized_expert`` and
    ///     ``least_utilized_expert`` (``[expert, utilization]`` or None),
    ///     ``routing_efficiency``, ``average_routing_efficiency``,
    ///     ``tokens_dropped_rate``, ``assignment_drop_rate``,
    ///     ``average_load_balance_loss``, ``average_router_z_loss``. Rates and
    ///     utilizations are fractions in [0, 1].
    fn utilization_summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.read(py, |s| s.clone())?;
        Self::summary_dict(py, &state, false)
    }

    /// The ``q``-th percentile (0..100) of the recent latencies, in seconds; None before any timed call.
    ///
    /// Raises
    /// ------
    /// InputError
    ///     ``q`` outside [0, 100].
    /// InputTypeError
    ///     ``q`` is not a real number.
    fn latency_percentile(&self, py: Python<'_>, q: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
        let q = real(q, "q", Family::Input)?;
        self.read(py, |s| s.latency_percentile(q))?.map_err(to_py)
    }

    /// Median latency of the last ``window`` timed calls, seconds (None before any).
    #[getter]
    fn latency_p50(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.latencies().p50_p95_p99.map(|p| p[0]))
    }

    /// 95th-percentile latency of the last ``window`` timed calls, seconds (None before any).
    #[getter]
    fn latency_p95(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.latencies().p50_p95_p99.map(|p| p[1]))
    }

    /// 99th-percentile latency of the last ``window`` timed calls, seconds (None before any).
    #[getter]
    fn latency_p99(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.latencies().p50_p95_p99.map(|p| p[2]))
    }

    /// Mean latency over every timed call since the last reset, seconds (None before any).
    #[getter]
    fn mean_latency(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.mean_latency())
    }

    /// Sum of the recorded latencies, seconds.
    #[getter]
    fn total_time(&self, py: Python<'_>) -> PyResult<f64> {
        self.read(py, |s| s.total_time())
    }

    /// Active tokens per second of routing time, over the timed calls; None before any.
    ///
    /// ``inf`` if the timed calls took no measurable time but routed tokens;
    /// 0.0 if they routed no token.
    #[getter]
    fn throughput(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.read(py, |s| s.throughput())
    }

    /// All statistics as plain Python values; ``json.dumps(..., allow_nan=False)`` accepts the result.
    ///
    /// Latencies appear in seconds (``latency_s``) and milliseconds
    /// (``latency_ms``); an undefined value (no call yet) is None, and so is
    /// every float that is not finite (an infinite throughput, a running loss
    /// average that overflowed), as JSON has no infinity or NaN.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.read(py, |s| s.clone())?;
        let t = s.totals();
        let d = PyDict::new(py);
        let counters = [
            ("calls", Some(t.calls)),
            ("routed_calls", Some(t.routed_calls)),
            ("timed_calls", Some(t.timed_calls)),
            ("num_experts", s.num_experts().map(|e| e as u64)),
            ("total_tokens", Some(t.total_tokens)),
            ("active_tokens", Some(t.active_tokens)),
            ("total_assignments", Some(t.total_assignments)),
            ("kept_assignments", Some(t.kept_assignments)),
            ("dropped_assignments", Some(t.dropped_assignments)),
            ("tokens_dropped", Some(t.tokens_dropped)),
            ("non_finite_losses", Some(t.non_finite_losses)),
        ];
        for (name, value) in counters {
            d.set_item(name, value)?;
        }
        let rates = [
            ("tokens_dropped_rate", finite(s.tokens_dropped_rate())),
            ("assignment_drop_rate", finite(s.assignment_drop_rate())),
            ("routing_efficiency", finite(s.routing_efficiency())),
            ("average_routing_efficiency", s.average(Averaged::RoutingEfficiency).and_then(finite)),
            ("average_load_balance_loss", s.average(Averaged::LoadBalanceLoss).and_then(finite)),
            ("average_router_z_loss", s.average(Averaged::RouterZLoss).and_then(finite)),
            ("average_auxiliary_loss", s.average(Averaged::AuxiliaryLoss).and_then(finite)),
        ];
        for (name, value) in rates {
            d.set_item(name, value)?;
        }
        d.set_item("expert_token_counts", s.kept_per_expert())?;
        d.set_item("pre_drop_token_counts", s.pre_drop_per_expert())?;
        d.set_item("capacity_offered", t.capacity_offered)?;
        d.set_item("expert_utilization", finite_all(&s.expert_utilization()))?;
        d.set_item("utilization_summary", Self::summary_dict(py, &s, true)?)?;
        d.set_item("load_variance_history", finite_all(&s.load_variance_history()))?;
        d.set_item("latency_window", s.window())?;
        let lat = s.latencies();
        let p = lat.p50_p95_p99;
        let figures = [
            ("p50", p.map(|p| p[0])),
            ("p95", p.map(|p| p[1])),
            ("p99", p.map(|p| p[2])),
            ("mean", lat.mean),
            ("min", lat.min),
            ("max", lat.max),
        ];
        let (seconds, millis) = (PyDict::new(py), PyDict::new(py));
        for (name, value) in figures {
            seconds.set_item(name, value.and_then(finite))?;
            millis.set_item(name, value.map(|v| 1e3 * v).and_then(finite))?;
        }
        d.set_item("latency_s", seconds)?;
        d.set_item("latency_ms", millis)?;
        d.set_item("total_time_s", finite(s.total_time()))?;
        d.set_item("throughput_tokens_per_s", s.throughput().and_then(finite))?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let (t, cv, p50, throughput) = self
            .read(py, |s| (*s.totals(), s.utilization_cv(), s.latencies().p50_p95_p99.map(|p| p[0]), s.throughput()))?;
        let latency =
            p50.map_or(Ok("n/a".to_string()), |p| format_float(py, 1e3 * p, ".3g").map(|g| format!("{g} ms")))?;
        let rate = throughput
            .map_or(Ok("n/a".to_string()), |r| format_float(py, r, ".4g").map(|g| format!("{g} tokens/s")))?;
        Ok(format!(
            "RoutingStats(calls={}, active_tokens={}, kept_assignments={}, dropped_assignments={}, tokens_dropped={}, \
             utilization_cv={}, latency_p50={latency}, throughput={rate})",
            t.calls,
            t.active_tokens,
            t.kept_assignments,
            t.dropped_assignments,
            t.tokens_dropped,
            format_float(py, cv, ".4g")?
        ))
    }
}

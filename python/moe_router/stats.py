"""Routing statistics accumulated over many routing calls: ``RoutingStats``.

An ``ExpertRouter`` owns one ``RoutingStats`` and calls :meth:`RoutingStats.record`
after every ``route_tokens``/``route_logits`` call with the decision and the
wall-clock time the call took. The object can also be used on its own, with
decisions from :func:`moe_router.route_logits`.

How the figures are defined:

- capacity utilization divides by the capacity each call really offered
  (``RoutingDecision.capacity``);
- the mean utilization is the mean over experts of kept / offered;
- the drop rates are 0.0, not a division by zero, before any token was routed;
- per-call averages are plain arithmetic means over the calls that routed at
  least one token (an empty batch has no loss to average), kept as running
  means so that large finite values cannot overflow them; a value that is not
  finite (an ``auxiliary_loss`` whose coefficient times a loss exceeds the
  float64 range, or a decision built by hand) is left out of its average and
  counted in ``non_finite_losses``, so one call never poisons the averages;
- every update and every read holds one lock, so routers shared by threads
  report consistent totals.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import deque
from operator import attrgetter
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, TypeVar, cast

import numpy as np

from . import _inputs
from ._json import json_ready
from ._core import InputError, InputTypeError

__all__ = ["RoutingStats"]

#: Default number of recent calls whose latencies feed the percentiles.
DEFAULT_WINDOW = 1024
#: Default number of per-call load variances kept.
DEFAULT_HISTORY = 1024
#: The plain counters, in ``to_dict`` order.
_COUNTERS = ("calls", "routed_calls", "timed_calls", "num_experts", "total_tokens", "active_tokens",
             "total_assignments", "kept_assignments", "dropped_assignments", "tokens_dropped",
             "non_finite_losses")
#: The rates and per-call averages, in ``to_dict`` order.
_RATES = ("tokens_dropped_rate", "assignment_drop_rate", "routing_efficiency", "average_routing_efficiency",
          "average_load_balance_loss", "average_router_z_loss", "average_auxiliary_loss")
_T = TypeVar("_T")


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    """A size setting: an int in ``[minimum, sys.maxsize]`` (what a ``deque`` or a count can hold)."""
    return _inputs.integer(value, name, minimum, sys.maxsize)


def _per_mean(values: np.ndarray, spread: Callable[[np.ndarray], Any]) -> float:
    """``spread(values) / mean(values)``; 0.0 when ``values`` is empty or its mean is 0."""
    mean = float(values.mean()) if values.size else 0.0
    return 0.0 if mean <= 0.0 else float(spread(values) / mean)


def _locked(fget: Callable[[Any], _T], doc: Optional[str] = None) -> _T:
    """A read-only property whose getter holds the instance's lock; ``doc`` defaults to ``fget``'s docstring.

    Typed as the value the getter returns: that is what reading it from an instance gives.
    """
    def get(self: Any) -> _T:
        with self._lock:
            return fget(self)
    return cast(_T, property(get, doc=doc or fget.__doc__))


def _average(index: int, doc: str) -> Optional[float]:
    """The locked running mean ``_means[index]`` (None until a routed call gave a finite value)."""
    return _locked(lambda self: None if self._counts[index] == 0 else self._means[index], doc)


class RoutingStats:
    """Totals, averages, per-expert utilization and latency of routing calls.

    Thread-safe: :meth:`record`, :meth:`reset` and every read take the same
    lock, so eight threads routing through one router see totals equal to the
    sum of their decisions.

    Parameters
    ----------
    window : int, default 1024
        Number of most recent timed calls whose latencies are kept for the
        p50/p95/p99 percentiles (a bounded ``deque``; older ones are forgotten).
    history : int, default 1024
        Number of most recent per-call load variances kept in
        :attr:`load_variance_history`.

    Attributes
    ----------
    calls : int
        Decisions recorded (also available as :attr:`total_routings`).
    total_tokens : int
        Sum of ``RoutingDecision.total_tokens`` (rows, padding included).
    active_tokens : int
        Sum of ``RoutingDecision.active_tokens`` (rows not masked out).
    total_assignments : int
        Sum of ``active_tokens * k``: the (token, expert) choices that were routed.
    kept_assignments, dropped_assignments : int
        Sums of the decisions' fields; ``kept + dropped == total_assignments``.
    tokens_dropped : int
        Sum of ``RoutingDecision.tokens_dropped``: active tokens left with no
        kept expert at all.
    non_finite_losses : int
        Loss (or efficiency) values of routed calls that were inf or NaN and so
        were left out of their running averages.
    num_experts : int or None
        E, fixed by the first decision recorded (None before it).

    Raises
    ------
    ConfigError
        ``window`` or ``history`` is an int outside ``[1, sys.maxsize]``.
    ConfigTypeError
        ``window`` or ``history`` is not an int (a float, a bool, ...).

    Notes
    -----
    Per-expert utilization (:attr:`expert_utilization`) is the cumulative
    number of kept assignments of each expert divided by the cumulative
    capacity offered to it, ``sum_calls tokens_per_expert[e] / sum_calls
    capacity``. Each call's capacity is the one the decision reports: the
    ``capacity_factor`` formula (GShard, Lepikhin et al. 2020; Switch
    Transformer, Fedus et al. 2021, eq. 3), a fixed ``expert_capacity``, or for
    dropless routing the largest kept load of that call (so the busiest expert
    of a dropless call is at 100 %).

    Latencies are seconds, as measured by the caller (an ``ExpertRouter`` uses
    ``time.perf_counter()`` around the routing call). Percentiles use linear
    interpolation between order statistics (NumPy's default, Hyndman and Fan
    1996 type 7) over the last ``window`` timed calls. Throughput is
    ``active tokens / total routing time`` over every timed call since the
    last :meth:`reset`.

    Examples
    --------
    >>> import numpy as np, moe_router as mr
    >>> cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=1.0)
    >>> stats = mr.RoutingStats()
    >>> dec = mr.route_logits(np.eye(4, dtype=np.float32)[[0, 0, 1, 2]], cfg)
    >>> stats.record(dec, latency_s=0.002)
    >>> stats.calls, stats.kept_assignments, stats.dropped_assignments
    (1, 3, 1)
    >>> stats.expert_utilization.tolist()  # capacity 1 per expert in this call
    [1.0, 1.0, 1.0, 0.0]
    >>> stats.throughput  # 4 active tokens in 2 ms
    2000.0
    """

    __slots__ = (
        "_lock", "_window", "_history", *_COUNTERS, "_means", "_counts", "_kept_per_expert", "_pre_drop_per_expert",
        "_capacity_offered", "_variances", "_latencies", "_total_time", "_timed_active_tokens", "_max_latency",
        "_min_latency",
    )

    def __init__(self, window: int = DEFAULT_WINDOW, history: int = DEFAULT_HISTORY) -> None:
        self._lock = threading.RLock()
        self._window = _int_at_least("window", window, 1)
        self._history = _int_at_least("history", history, 1)
        self._clear()

    def _clear(self) -> None:
        self.calls = self.routed_calls = self.timed_calls = self.total_tokens = self.active_tokens = 0
        self.total_assignments = self.kept_assignments = self.dropped_assignments = self.tokens_dropped = 0
        self.non_finite_losses = 0
        self.num_experts: Optional[int] = None
        # Running means over the routed calls of the load-balance, z and auxiliary losses and the
        # routing efficiency, and how many finite values each has taken in.
        self._means = [0.0, 0.0, 0.0, 0.0]
        self._counts = [0, 0, 0, 0]
        # Cumulative kept and pre-capacity assignments per expert (empty until the first call fixes E).
        self._kept_per_expert = self._pre_drop_per_expert = np.zeros(0, dtype=np.int64)
        self._capacity_offered = self._timed_active_tokens = 0
        self._variances: Deque[float] = deque(maxlen=self._history)
        self._latencies: Deque[float] = deque(maxlen=self._window)
        self._total_time = 0.0
        self._max_latency: Optional[float] = None
        self._min_latency: Optional[float] = None

    # ------------------------------------------------------------------ update

    def record(self, decision: Any, latency_s: Optional[float] = None) -> None:
        """Add one routing call to the statistics.

        Parameters
        ----------
        decision : RoutingDecision
            The call's result. Read: ``tokens_per_expert``,
            ``pre_drop_tokens_per_expert``, ``capacity``, ``total_tokens``,
            ``active_tokens``, ``kept_assignments``, ``dropped_assignments``,
            ``tokens_dropped``, the three losses and ``routing_efficiency()``.
        latency_s : float, optional
            Wall-clock duration of the routing call in seconds (finite, >= 0).
            None records the decision without timing it: it then counts in no
            latency percentile and not in the throughput.

        Raises
        ------
        InputError
            ``latency_s`` is negative or not finite, or the decision has a
            different number of experts than the decisions recorded before.
        InputTypeError
            ``latency_s`` is not a real number (nor None), or ``decision`` lacks
            a field of a RoutingDecision.
        """
        if latency_s is not None:
            latency = _inputs.real(latency_s, "latency_s", InputError)
            if not (math.isfinite(latency) and latency >= 0.0):
                raise InputError(f"latency_s must be a finite number of seconds >= 0, got {latency_s!r}")
        try:
            kept_e = np.asarray(decision.tokens_per_expert, dtype=np.int64)
            pre_e = np.asarray(decision.pre_drop_tokens_per_expert, dtype=np.int64)
            kept = int(decision.kept_assignments)
            dropped = int(decision.dropped_assignments)
            active = int(decision.active_tokens)
            capacity = int(decision.capacity)
            losses = (float(decision.load_balance_loss), float(decision.router_z_loss),
                      float(decision.auxiliary_loss), float(decision.routing_efficiency()))
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputTypeError(f"decision must be a RoutingDecision (or carry its fields), got "
                                 f"{type(decision).__name__}: {exc}") from None
        num_experts = int(kept_e.shape[0]) if kept_e.ndim == 1 else -1
        if num_experts < 0:
            raise InputError(f"decision.tokens_per_expert has shape {list(kept_e.shape)}, expected [E]")
        variance = float(kept_e.astype(np.float64).var()) if num_experts else 0.0
        with self._lock:
            if self.num_experts is None:
                self.num_experts = num_experts
                self._kept_per_expert = np.zeros(num_experts, dtype=np.int64)
                self._pre_drop_per_expert = np.zeros(num_experts, dtype=np.int64)
            elif num_experts != self.num_experts:
                raise InputError(f"decision has {num_experts} experts but these statistics hold "
                                 f"{self.num_experts}; use one RoutingStats per expert count, or reset()")
            self.calls += 1
            self.total_tokens += int(decision.total_tokens)
            self.active_tokens += active
            self.total_assignments += kept + dropped
            self.kept_assignments += kept
            self.dropped_assignments += dropped
            self.tokens_dropped += int(decision.tokens_dropped)
            if kept + dropped > 0:
                self.routed_calls += 1
                for i, x in enumerate(losses):
                    if not math.isfinite(x):
                        self.non_finite_losses += 1
                        continue
                    n = self._counts[i] = self._counts[i] + 1
                    # mean * (n-1)/n + x/n: both terms are at most max(|mean|, |x|), so it cannot overflow.
                    self._means[i] = self._means[i] * ((n - 1) / n) + x / n
            self._kept_per_expert += kept_e
            self._pre_drop_per_expert += pre_e
            self._capacity_offered += capacity
            self._variances.append(variance)
            if latency_s is not None:
                self.timed_calls += 1
                self._latencies.append(latency)
                self._total_time += latency
                self._timed_active_tokens += active
                self._max_latency = latency if self._max_latency is None else max(self._max_latency, latency)
                self._min_latency = latency if self._min_latency is None else min(self._min_latency, latency)

    def reset(self) -> None:
        """Forget everything recorded (``window`` and ``history`` are kept)."""
        with self._lock:
            self._clear()

    # ------------------------------------------------------------------ averages and rates

    total_routings: int = _locked(attrgetter("calls"), "Alias of :attr:`calls`.")
    average_load_balance_loss = _average(
        0, "Mean ``load_balance_loss`` over calls that routed a token (finite values; None before any).")
    average_router_z_loss = _average(
        1, "Mean ``router_z_loss`` over calls that routed a token (finite values; None before any).")
    average_auxiliary_loss = _average(
        2, "Mean ``auxiliary_loss`` over calls that routed a token (finite values; None before any).")
    average_routing_efficiency = _average(
        3, """Mean of the per-call ``routing_efficiency()`` (kept / routed) over calls that routed a token.

        Every call weighs the same; :attr:`routing_efficiency` weighs by assignments.
        """)

    @_locked
    def routing_efficiency(self) -> float:
        """``kept_assignments / total_assignments`` over all calls; 1.0 when nothing was routed."""
        return 1.0 if self.total_assignments == 0 else self.kept_assignments / self.total_assignments

    @_locked
    def tokens_dropped_rate(self) -> float:
        """``tokens_dropped / active_tokens`` (fraction of tokens with no kept expert); 0.0 when empty."""
        return 0.0 if self.active_tokens == 0 else self.tokens_dropped / self.active_tokens

    @_locked
    def assignment_drop_rate(self) -> float:
        """``dropped_assignments / total_assignments``; 0.0 when nothing was routed."""
        return 0.0 if self.total_assignments == 0 else self.dropped_assignments / self.total_assignments

    # ------------------------------------------------------------------ per expert

    expert_token_counts: np.ndarray = _locked(
        lambda self: self._kept_per_expert.copy(),
        "int64 [E]: cumulative kept assignments per expert (a copy; empty before any call).")
    pre_drop_token_counts: np.ndarray = _locked(
        lambda self: self._pre_drop_per_expert.copy(),
        "int64 [E]: cumulative routed (pre-capacity) assignments per expert (a copy).")
    capacity_offered: int = _locked(
        attrgetter("_capacity_offered"),
        "Cumulative per-expert capacity: the sum of ``decision.capacity`` over all calls (slots).")

    @_locked
    def expert_utilization(self) -> np.ndarray:
        """float64 [E]: cumulative kept / cumulative capacity offered, per expert, in [0, 1].

        0 for every expert while no capacity was offered (empty batches only).
        """
        if self._capacity_offered == 0:
            return np.zeros(self._kept_per_expert.shape[0], dtype=np.float64)
        return self._kept_per_expert.astype(np.float64) / float(self._capacity_offered)

    def utilization_cv(self) -> float:
        """Coefficient of variation (population std / mean) of :attr:`expert_utilization`.

        0.0 before any call or when no assignment was kept. Equals the CV of
        the cumulative kept counts (the capacity is a common factor).
        """
        return _per_mean(self.expert_utilization, np.std)

    def _extreme(self, pick: Any) -> Optional[Tuple[int, float]]:
        u = self.expert_utilization
        if u.size == 0:
            return None
        e = int(pick(u))
        return e, float(u[e])

    def most_utilized_expert(self) -> Optional[Tuple[int, float]]:
        """``(expert, utilization)`` of the busiest expert (lowest index on ties); None before any call."""
        return self._extreme(np.argmax)

    def least_utilized_expert(self) -> Optional[Tuple[int, float]]:
        """``(expert, utilization)`` of the idlest expert (lowest index on ties); None before any call."""
        return self._extreme(np.argmin)

    @_locked
    def load_variance_history(self) -> np.ndarray:
        """float64 [n]: population variance of ``tokens_per_expert`` (kept, tokens^2) of each of the last calls.

        At most ``history`` entries, oldest first.
        """
        return np.array(self._variances, dtype=np.float64)

    def utilization_summary(self) -> Dict[str, Any]:
        """Per-expert utilization and drop figures in one dict.

        Returns
        -------
        dict
            ``mean_utilization``, ``min_utilization``, ``max_utilization`` (of
            :attr:`expert_utilization`; the mean is total kept over ``E x``
            capacity offered), ``utilization_cv``, ``most_utilized_expert`` and
            ``least_utilized_expert`` (``[expert, utilization]`` or None),
            ``routing_efficiency``, ``average_routing_efficiency``,
            ``tokens_dropped_rate``, ``assignment_drop_rate``,
            ``average_load_balance_loss``, ``average_router_z_loss``. Rates and
            utilizations are fractions in [0, 1].
        """
        with self._lock:
            u = self.expert_utilization
            most, least = self._extreme(np.argmax), self._extreme(np.argmin)
            summary = {"mean_utilization": float(u.mean()) if u.size else 0.0,
                       "min_utilization": float(u.min()) if u.size else 0.0,
                       "max_utilization": float(u.max()) if u.size else 0.0,
                       "utilization_cv": self.utilization_cv(),
                       "most_utilized_expert": None if most is None else list(most),
                       "least_utilized_expert": None if least is None else list(least)}
            names = ("routing_efficiency", "average_routing_efficiency", "tokens_dropped_rate", "assignment_drop_rate",
                     "average_load_balance_loss", "average_router_z_loss")
            return dict(summary, **{name: getattr(self, name) for name in names})

    # ------------------------------------------------------------------ latency and throughput

    def _percentiles(self, *qs: float) -> List[Optional[float]]:
        """The ``qs``-th percentiles of the latency window (all None when it is empty); call with the lock held."""
        if not self._latencies:
            return [None] * len(qs)
        return [float(p) for p in np.percentile(np.fromiter(self._latencies, dtype=np.float64), qs)]

    def latency_percentile(self, q: float) -> Optional[float]:
        """The ``q``-th percentile (0..100) of the recent latencies, in seconds; None before any timed call.

        Raises
        ------
        InputError
            ``q`` outside [0, 100].
        InputTypeError
            ``q`` is not a real number.
        """
        q = _inputs.real(q, "q", InputError)
        if not 0.0 <= q <= 100.0:
            raise InputError(f"q must be a percentile in [0, 100], got {q!r}")
        with self._lock:
            return self._percentiles(q)[0]

    latency_p50: Optional[float] = _locked(
        lambda self: self.latency_percentile(50.0),
        "Median latency of the last ``window`` timed calls, seconds (None before any).")
    latency_p95: Optional[float] = _locked(
        lambda self: self.latency_percentile(95.0),
        "95th-percentile latency of the last ``window`` timed calls, seconds (None before any).")
    latency_p99: Optional[float] = _locked(
        lambda self: self.latency_percentile(99.0),
        "99th-percentile latency of the last ``window`` timed calls, seconds (None before any).")
    mean_latency: Optional[float] = _locked(
        lambda self: None if self.timed_calls == 0 else self._total_time / self.timed_calls,
        "Mean latency over every timed call since the last reset, seconds (None before any).")
    total_time: float = _locked(attrgetter("_total_time"), "Sum of the recorded latencies, seconds.")

    @_locked
    def throughput(self) -> Optional[float]:
        """Active tokens per second of routing time, over the timed calls; None before any.

        ``inf`` if the timed calls took no measurable time but routed tokens;
        0.0 if they routed no token.
        """
        if self.timed_calls == 0:
            return None
        if self._total_time > 0.0:
            return self._timed_active_tokens / self._total_time
        return math.inf if self._timed_active_tokens > 0 else 0.0

    # ------------------------------------------------------------------ export

    def to_dict(self) -> Dict[str, Any]:
        """All statistics as plain Python values; ``json.dumps(..., allow_nan=False)`` accepts the result.

        Latencies appear in seconds (``latency_s``) and milliseconds
        (``latency_ms``); an undefined value (no call yet) is None, and so is
        every float that is not finite (an infinite throughput, a running loss
        average that overflowed), as JSON has no infinity or NaN.
        """
        with self._lock:
            names = (*_COUNTERS, *_RATES, "expert_token_counts", "pre_drop_token_counts", "capacity_offered",
                     "expert_utilization")
            lat_s = dict(zip(("p50", "p95", "p99"), self._percentiles(50.0, 95.0, 99.0)), mean=self.mean_latency,
                         min=self._min_latency, max=self._max_latency)
            return json_ready({**{name: getattr(self, name) for name in names},
                               "utilization_summary": self.utilization_summary(),
                               "load_variance_history": list(self._variances),
                               "latency_window": self._window,
                               "latency_s": lat_s,
                               "latency_ms": {k: None if v is None else 1e3 * v for k, v in lat_s.items()},
                               "total_time_s": self._total_time,
                               "throughput_tokens_per_s": self.throughput})

    def __repr__(self) -> str:
        with self._lock:
            p50, tput = self._percentiles(50.0)[0], self.throughput
            lat = "n/a" if p50 is None else f"{1e3 * p50:.3g} ms"
            tp = "n/a" if tput is None else f"{tput:.4g} tokens/s"
            return (f"RoutingStats(calls={self.calls}, active_tokens={self.active_tokens}, "
                    f"kept_assignments={self.kept_assignments}, dropped_assignments={self.dropped_assignments}, "
                    f"tokens_dropped={self.tokens_dropped}, utilization_cv={self.utilization_cv():.4g}, "
                    f"latency_p50={lat}, throughput={tp})")

"""Expert load tracking and aux-loss-free balancing: ``LoadBalancer``.

The balancer watches the per-expert load of successive training calls and
keeps a per-expert selection bias that the router adds to the scores of its
next call (DeepSeek-V3's auxiliary-loss-free load balancing): the bias is
what the next call ranks experts by.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Deque, Optional

import numpy as np

from . import _inputs
from ._json import json_ready
from ._core import (ConfigError, ExpertPlacement, GlobalBalanceAccumulator, InputError, InputTypeError, plan_placement,
                    sign_bias_update)
from .stats import _int_at_least, _locked, _per_mean

__all__ = ["LoadBalancer", "LoadBalancingStats"]

#: Default per-step bias change as a fraction of the mean softmax score 1/E:
#: ``bias_update_rate = DEFAULT_RELATIVE_BIAS_RATE / num_experts`` (see ``LoadBalancer`` Notes).
DEFAULT_RELATIVE_BIAS_RATE = 0.1
#: Default EMA decay: the EMA averages over roughly 1 / (1 - decay) = 10 steps.
DEFAULT_EMA_DECAY = 0.9
#: Default number of per-step loads kept.
DEFAULT_HISTORY = 1024
#: Default threshold on ``(max - min) / mean`` of the EMA load.
DEFAULT_IMBALANCE_THRESHOLD = 0.5
#: Default number of updates before ``is_imbalanced`` may report True.
DEFAULT_WARMUP_STEPS = 10
#: ``is_well_balanced`` default: coefficient of variation of the EMA load below this.
WELL_BALANCED_CV = 0.2


def _imbalance_ratio(loads: np.ndarray) -> float:
    """``(max - min) / mean`` of ``loads``; 0.0 when empty or the mean is 0."""
    return _per_mean(loads, lambda x: x.max() - x.min())


def _finite_non_negative(name: str, value: Any) -> float:
    v = _inputs.real(value, name)
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


@dataclass(frozen=True)
class LoadBalancingStats:
    """A snapshot of a :class:`LoadBalancer` (``LoadBalancer.get_stats()``).

    Attributes
    ----------
    expert_loads : numpy.ndarray, float64, shape [E]
        EMA of each expert's share of the routed assignments (pre-capacity; a
        perfectly balanced router has ``1/E`` everywhere; the shares sum to 1
        once a step was seen). All zeros before the first update.
    steps : int
        Updates that carried load (decisions with at least one routed assignment).
    imbalanced : bool
        ``LoadBalancer.is_imbalanced()`` at snapshot time.
    imbalance_ratio : float
        ``(max - min) / mean`` of ``expert_loads`` (0.0 before any step).
    threshold : float
        The balancer's ``imbalance_threshold``.
    warmup_steps : int
        Steps before ``imbalanced`` can be True.
    expert_bias : numpy.ndarray, float64, shape [E]
        Selection bias the router adds to the scores of the next call.
    bias_update_rate : float
        Change of each bias per step, in score units.
    enabled : bool
        Whether updates change ``expert_bias``.
    last_load : numpy.ndarray or None
        float64 [E] share of the routed assignments in the last step.
    """

    expert_loads: np.ndarray
    steps: int
    imbalanced: bool
    imbalance_ratio: float
    threshold: float
    warmup_steps: int
    expert_bias: np.ndarray
    bias_update_rate: float
    enabled: bool
    last_load: Optional[np.ndarray] = field(default=None)

    @property
    def load_variance(self) -> float:
        """Population variance of :attr:`expert_loads` (squared shares)."""
        return float(self.expert_loads.var()) if self.expert_loads.size else 0.0

    def load_cv(self) -> float:
        """Coefficient of variation (population std / mean) of :attr:`expert_loads`; 0.0 if the mean is 0."""
        return _per_mean(self.expert_loads, np.std)

    def is_well_balanced(self, max_cv: float = WELL_BALANCED_CV) -> bool:
        """True when at least one step was seen and ``load_cv() < max_cv`` (default 0.2)."""
        return self.steps > 0 and self.load_cv() < max_cv

    def to_dict(self) -> dict:
        """JSON-ready copy: arrays as lists, a float that is not finite as None
        (``json.dumps(..., allow_nan=False)`` accepts it)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "last_load"}
        values.update(load_cv=self.load_cv(), well_balanced=self.is_well_balanced(), last_load=self.last_load)
        return json_ready(values)


def default_bias_update_rate(num_experts: int) -> float:
    """The default ``bias_update_rate`` for E experts: ``0.1 / E``, a tenth of the mean softmax score.

    Raises
    ------
    ConfigError
        ``num_experts`` is an int outside ``[1, 2**31 - 1]``.
    ConfigTypeError
        ``num_experts`` is not an int.

    >>> default_bias_update_rate(64)
    0.0015625
    """
    return DEFAULT_RELATIVE_BIAS_RATE / _inputs.integer(num_experts, "num_experts", 1, _inputs.I32_MAX)


class LoadBalancer:
    """Per-expert load EMA, imbalance detection and the aux-loss-free bias remedy.

    Each :meth:`update` takes one training call's per-expert load and

    1. adds its share of the routed assignments, ``load_e / sum(load)``, to an
       exponential moving average ``ema = decay * ema + (1 - decay) * share``
       (the first step initializes the EMA) and to a bounded history;
    2. if :attr:`enabled`, moves every expert's selection bias by a fixed step
       toward balance, from this step's load (DeepSeek-V3, Wang et al. 2024,
       "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
       arXiv:2408.15664; Megatron-Core ``moe_router_bias_update_rate``)::

           expert_bias[e] += bias_update_rate * sign(mean(load) - load[e])

       Overloaded experts lose ``rate``, underloaded ones gain it, experts at
       exactly the mean keep their bias. The rule is the core's
       ``sign_bias_update``, which ``GlobalBalanceAccumulator.bias_update``
       applies to a global batch; ``update(accumulator)`` feeds a global
       batch's counts to the EMA and the bias at once.

    The router passes :attr:`expert_bias` (float64 [E]) to its next routing
    call: experts are then ranked by ``score + bias``, while the combine
    weights stay the unbiased scores (see ``docs/semantics.md``, items 3 and 6).

    Parameters
    ----------
    num_experts : int
        E (>= 1).
    ema_decay : float, default 0.9
        In [0, 1). Weight of the past in the EMA; 0.9 averages over about
        ``1 / (1 - 0.9) = 10`` steps.
    history : int, default 1024
        Number of per-step load shares kept in :attr:`load_history`.
    imbalance_threshold : float, default 0.5
        :meth:`is_imbalanced` is ``(max - min) / mean > threshold`` on the EMA.
        Perfectly balanced routing still shows multinomial noise, which the
        EMA shrinks; the default sits above that noise for batches of a few
        hundred tokens, so it flags real skew (the measurements are in
        ``docs/balancer.md``).
    warmup_steps : int, default 10
        :meth:`is_imbalanced` is False until this many steps were seen (one EMA
        time constant at the default decay), so one odd first batch is not an alarm.
        The bias is updated from the first step (as DeepSeek-V3 does).
    bias_update_rate : float, optional
        ``rate`` above, in units of the router's scores (softmax probabilities
        or sigmoid values); finite and >= 0, settable. Default ``0.1 / E``
        (:func:`default_bias_update_rate`; 1.56e-3 for E = 64), chosen for
        softmax routers: see Notes. For sigmoid scores DeepSeek-V3 uses 1e-3.
    enabled : bool, default True
        Apply the bias remedy. When False, updates only track the load and
        :attr:`expert_bias` keeps its value (zero unless it was enabled
        before). Settable.

    Notes
    -----
    **Which load.** The balancer counts ``pre_drop_tokens_per_expert``: the
    assignments the router *chose* for each expert, before capacity. The kept
    counts (what Megatron-Core accumulates) are capped at the capacity, which
    hides how overloaded an expert is from the EMA and the imbalance ratio,
    and the drops lower their mean, so an expert routed less than its fair
    share can look overloaded to the sign update. Masked (padding) tokens are never
    counted (the core excludes them).

    **The rate for softmax routers.** The bias is added to the scores, so
    its step has to be small against the gaps between a token's k-th and
    (k+1)-th scores, or whole crowds of tokens flip expert at once and the
    loads swing instead of settling (a sign update never stops moving: every
    bias changes every step). DeepSeek-V3 uses 1e-3 on sigmoid scores, which
    lie in (0, 1) for each expert independently; softmax scores share a
    total of 1 among E experts, so their scale, and the gaps, shrink like
    1/E. The default is therefore relative: ``0.1 / E``, a tenth of the mean
    softmax score per step.

    Measured balancing curves of this default and of other rates, on real
    and synthetic router logits, are in ``docs/balancer.md``. Peaked routers
    tolerate larger rates; pass one for faster, coarser balancing.

    The bias is never re-centred: adding a constant to every expert's bias
    does not change any top-k choice, so drift of the common level is harmless.

    Thread-safe: updates and reads hold one lock.

    Raises
    ------
    ConfigError
        ``num_experts`` is an int outside ``[1, 2**31 - 1]``, ``history`` one
        outside ``[1, sys.maxsize]``, ``warmup_steps`` an int below 0, ``ema_decay`` outside
        [0, 1), or ``imbalance_threshold`` or ``bias_update_rate`` negative or
        not finite.
    ConfigTypeError
        (a ``ConfigError`` and a ``TypeError``) one of them of the wrong type:
        the counts must be ints, the rates and thresholds reals, ``enabled`` a bool.

    Examples
    --------
    >>> import numpy as np, moe_router as mr
    >>> lb = mr.LoadBalancer(4, bias_update_rate=0.01)
    >>> lb.update(np.array([70, 10, 10, 10]))     # a per-expert load works as well as a decision
    >>> lb.expert_bias.tolist()
    [-0.01, 0.01, 0.01, 0.01]
    >>> lb.get_stats().expert_loads.tolist()
    [0.7, 0.1, 0.1, 0.1]
    """

    def __init__(
        self,
        num_experts: int,
        ema_decay: float = DEFAULT_EMA_DECAY,
        history: int = DEFAULT_HISTORY,
        imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        bias_update_rate: Optional[float] = None,
        enabled: bool = True,
    ) -> None:
        self._num_experts = _inputs.integer(num_experts, "num_experts", 1, _inputs.I32_MAX)
        self._ema_decay = _inputs.real(ema_decay, "ema_decay")
        if not 0.0 <= self._ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self._history = _int_at_least("history", history, 1)
        self._threshold = _finite_non_negative("imbalance_threshold", imbalance_threshold)
        self._warmup_steps = _int_at_least("warmup_steps", warmup_steps, 0)
        if bias_update_rate is None:
            bias_update_rate = default_bias_update_rate(self._num_experts)
        self.bias_update_rate = bias_update_rate  # validated by the setter
        self._lock = threading.RLock()
        self.enabled = enabled  # validated by the setter
        self._clear()

    def _clear(self) -> None:
        self._ema = np.zeros(self._num_experts, dtype=np.float64)
        self._bias = np.zeros(self._num_experts, dtype=np.float64)
        self._loads: Deque[np.ndarray] = deque(maxlen=self._history)
        self._steps = 0

    # ------------------------------------------------------------------ configuration

    num_experts: int = _locked(attrgetter("_num_experts"), "E.")
    ema_decay: float = _locked(attrgetter("_ema_decay"), "Weight of the past in the load EMA.")
    imbalance_threshold: float = _locked(attrgetter("_threshold"),
                                         "Threshold on ``(max - min) / mean`` of the EMA load.")
    warmup_steps: int = _locked(attrgetter("_warmup_steps"), "Steps before :meth:`is_imbalanced` may be True.")

    @property
    def enabled(self) -> bool:
        """Whether updates change :attr:`expert_bias` (settable; a bool)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Turn the bias remedy on or off; a non-bool raises ``ConfigTypeError``."""
        self._enabled = _inputs.flag(value, "enabled", ConfigError)

    @property
    def bias_update_rate(self) -> float:
        """Per-step change of each expert's bias, in score units (settable; finite, >= 0)."""
        return self._rate

    @bias_update_rate.setter
    def bias_update_rate(self, value: float) -> None:
        """Set the rate; a negative or non-finite value raises ``ConfigError``."""
        self._rate = _finite_non_negative("bias_update_rate", value)

    # ------------------------------------------------------------------ update

    def _load_of(self, decision: Any) -> np.ndarray:
        if isinstance(decision, GlobalBalanceAccumulator):
            raw = decision.tokens_per_expert  # the same pre-capacity counts, over a global batch
        else:
            raw = getattr(decision, "pre_drop_tokens_per_expert", decision)
        load = np.asarray(raw)
        if load.dtype.kind not in "iuf":
            raise InputTypeError(f"per-expert load must be numeric, got dtype {load.dtype}")
        if load.ndim != 1 or load.shape[0] != self._num_experts:
            raise InputError(f"expected a per-expert load of shape [{self._num_experts}] "
                             f"(num_experts), got shape {list(load.shape)}")
        load = load.astype(np.float64)
        if not np.isfinite(load).all() or (load < 0).any():
            raise InputError("per-expert load must be finite and >= 0")
        return load

    def update(self, decision: Any) -> None:
        """Add one training step's load and, if enabled, update the bias.

        Parameters
        ----------
        decision : RoutingDecision, GlobalBalanceAccumulator or array_like
            A decision (its ``pre_drop_tokens_per_expert`` is used), a
            :class:`GlobalBalanceAccumulator` (its ``tokens_per_expert``: the
            same counts summed over the micro-batches and ranks of one global
            batch, Megatron-Core's once-per-global-batch update), or a
            per-expert load of shape [E].

        Notes
        -----
        A step with no routed assignment (every token masked) carries no load
        information and is ignored: no EMA, history, step count or bias change.

        Raises
        ------
        InputError
            The load does not have E entries, or holds negative or non-finite values.
        InputTypeError
            The load is not numeric.
        """
        load = self._load_of(decision)
        total = float(load.sum())
        if total <= 0.0:
            return
        share = load / total
        with self._lock:
            if self._steps == 0:
                self._ema = share.copy()
            else:
                self._ema = self._ema_decay * self._ema + (1.0 - self._ema_decay) * share
            self._loads.append(share)
            self._steps += 1
            if self.enabled and self._rate > 0.0:
                self._bias = sign_bias_update(load, self._bias, self._rate)

    def reset(self) -> None:
        """Forget every step and zero the bias (configuration is kept)."""
        with self._lock:
            self._clear()

    # ------------------------------------------------------------------ reads

    expert_bias: np.ndarray = _locked(lambda self: self._bias.copy(),
                                      "float64 [E]: the selection bias for the router's next call (a fresh copy).")
    steps: int = _locked(attrgetter("_steps"), "Updates that carried load since the last reset.")
    expert_loads: np.ndarray = _locked(lambda self: self._ema.copy(),
                                       "float64 [E]: EMA of each expert's share of the routed assignments (a copy).")

    @_locked
    def load_history(self) -> np.ndarray:
        """float64 [n, E]: each of the last (at most ``history``) steps' load shares, oldest first."""
        if not self._loads:
            return np.zeros((0, self._num_experts), dtype=np.float64)
        return np.stack(list(self._loads))

    def imbalance_ratio(self) -> float:
        """``(max - min) / mean`` of the EMA load (0.0 before any step)."""
        with self._lock:
            return _imbalance_ratio(self._ema) if self._steps else 0.0

    def is_imbalanced(self) -> bool:
        """True after the warm-up when :meth:`imbalance_ratio` exceeds ``imbalance_threshold``."""
        with self._lock:
            return (self._steps > 0 and self._steps >= self._warmup_steps
                    and _imbalance_ratio(self._ema) > self._threshold)

    def suggest_placement(self, num_ranks: int, num_replicas: Optional[int] = None, num_nodes: int = 1,
                          num_groups: Optional[int] = None) -> ExpertPlacement:
        """An expert placement for the observed loads: :func:`plan_placement` on the EMA load.

        The load planned on is :attr:`expert_loads`, the EMA of each expert's
        share of the routed (pre-capacity) assignments, so it follows the
        recent routing, with the bias remedy in effect (about the last
        ``1 / (1 - ema_decay)`` steps). The placement's expected rank loads
        (``rank_load_after``, ``rank_load_before``) are then shares too (they
        sum to 1; the mean is ``1 / num_ranks``). For a longer window, as vLLM's
        EPLB records one, plan on the history instead:
        ``plan_placement(lb.load_history().mean(axis=0), num_ranks)``.

        Parameters
        ----------
        num_ranks, num_replicas, num_nodes, num_groups
            As :func:`plan_placement` (R ranks, P physical slots in total, N
            nodes, G expert groups).

        Returns
        -------
        ExpertPlacement
            With ``planned_load``, ``rank_load_before``/``rank_load_after``
            and ``imbalance_before``/``imbalance_after`` (DeepSeek EPLB's
            algorithm; see :func:`plan_placement`).

        Raises
        ------
        InputError
            No load was observed yet (no :meth:`update` carried load since the last reset).
        ConfigError
            As :func:`plan_placement`.

        Examples
        --------
        >>> import numpy as np, moe_router as mr
        >>> lb = mr.LoadBalancer(8)
        >>> lb.update(np.array([50, 10, 10, 10, 5, 5, 5, 5]))
        >>> p = lb.suggest_placement(num_ranks=4, num_replicas=12)
        >>> p.replica_counts.tolist(), round(p.imbalance_before, 2), round(p.imbalance_after, 2)
        ([4, 2, 1, 1, 1, 1, 1, 1], 2.4, 1.1)
        """
        with self._lock:
            if self._steps == 0:
                raise InputError("LoadBalancer.suggest_placement: no load observed yet; call update() first")
            load = self._ema.copy()
        return plan_placement(load, num_ranks, num_replicas=num_replicas, num_nodes=num_nodes,
                              num_groups=num_groups)

    def get_stats(self) -> LoadBalancingStats:
        """A consistent snapshot: EMA loads, steps, imbalance, bias (see :class:`LoadBalancingStats`)."""
        with self._lock:
            return LoadBalancingStats(
                expert_loads=self._ema.copy(), steps=self._steps, imbalanced=self.is_imbalanced(),
                imbalance_ratio=self.imbalance_ratio(), threshold=self._threshold, warmup_steps=self._warmup_steps,
                expert_bias=self._bias.copy(), bias_update_rate=self._rate, enabled=self.enabled,
                last_load=self._loads[-1].copy() if self._loads else None)

    def __repr__(self) -> str:
        with self._lock:
            return (f"LoadBalancer(num_experts={self._num_experts}, steps={self._steps}, "
                    f"imbalance_ratio={self.imbalance_ratio():.4g}, imbalanced={self.is_imbalanced()}, "
                    f"bias_update_rate={self._rate:g}, enabled={self.enabled}, "
                    f"max|bias|={float(np.abs(self._bias).max()):.4g})")

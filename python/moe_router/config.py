"""Router configuration: ``RouterConfig``, validated on construction."""

from __future__ import annotations

import decimal
import math
import re
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._core import ConfigError

Number = Union[int, float]

_CHOICES = {
    "score_function": ("softmax", "sigmoid"),
    "drop_policy": ("position", "rank", "probs", "bpr"),
    "capacity_rounding": ("exact", "megatron", "deepspeed"),
    "group_score_input": ("scores", "logits"),
    "overflow": ("drop", "reroute"),
}

#: Values of ``RouterConfig.peer``: the framework conventions a preset reproduces
#: (see :mod:`moe_router.presets`). DeepSpeed has one entry per gating function
#: because their loss normalizations differ.
PEERS = ("megatron", "deepspeed_top1", "deepspeed_top2", "deepspeed_topk", "mixtral", "qwen_moe",
         "deepseek_v3", "switch")


def _bad(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid {field}: got {value!r}; {allowed}")


def _as_int(field: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(field, value, f"must be an integer >= {minimum}")
    value = int(value)
    if value < minimum:
        raise _bad(field, value, f"must be an integer >= {minimum}")
    return value


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(field, value, "must be a real number")
    return float(value)


def _as_bool(field: str, value: Any) -> bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise _bad(field, value, "must be True or False")
    return bool(value)


def _as_group_score(value: Any) -> str:
    if isinstance(value, str) and (value == "max" or re.fullmatch(r"top[1-9][0-9]*_sum", value)):
        return value
    raise _bad("group_score", value, 'must be "max", "top2_sum" or "top<n>_sum" (n >= 1)')


def _as_choice(field: str, value: Any) -> str:
    if value not in _CHOICES[field]:
        raise _bad(field, value, "must be one of " + ", ".join(repr(c) for c in _CHOICES[field]))
    return str(value)


def _as_bias(value: Any, num_experts: int) -> Optional[Tuple[float, ...]]:
    """A fixed selection bias as a tuple of E finite floats (or None)."""
    if value is None:
        return None
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic input
        raise _bad("expert_bias", value, f"must be a sequence of {num_experts} real numbers") from exc
    if arr.dtype.kind not in "fiu" or arr.shape != (num_experts,):
        raise _bad("expert_bias", value,
                   f"must be a sequence of {num_experts} real numbers (one per expert), "
                   f"got shape {list(arr.shape)} dtype {arr.dtype}")
    out = tuple(float(v) for v in arr.astype(np.float64).tolist())
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise _bad("expert_bias", value, f"must be finite; expert_bias[{i}] = {v!r}")
    return out


def _as_peer(value: Any) -> Optional[str]:
    if value is None:
        return None
    if value not in PEERS:
        raise _bad("peer", value, "must be None or one of " + ", ".join(repr(p) for p in PEERS))
    return str(value)


def _factor_text(field: str, value: Any) -> Optional[str]:
    """The exact decimal text of a capacity factor; None for dropless (None or +inf)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise _bad(field, value, "must be a number > 0, or None for dropless routing")
    if isinstance(value, decimal.Decimal):
        if value.is_infinite() and value > 0:
            return None
        text = str(value)
    else:
        f = float(value)
        if math.isinf(f) and f > 0:
            return None
        text = repr(f)
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise _bad(field, value, "must be a finite number > 0; use None for dropless routing (no capacity limit)")
    return text


class RouterConfig:
    """Configuration of a token router, validated on construction.

    Defaults follow the torsh-distributed seed (``num_experts=8, top_k=2,
    capacity_factor=1.25, load_balance_loss_coeff=0.01,
    router_z_loss_coeff=0.001``), with the spec's native semantics elsewhere.
    Instances are immutable; use :meth:`replace` to derive a changed copy.

    Parameters
    ----------
    num_experts : int
        E, number of experts (>= 1).
    top_k : int
        k, experts per token (1 <= k <= E). ``num_experts_per_token`` is
        accepted as an alias (the seed's name).
    capacity_factor : float or None
        Per-expert capacity is ``max(min_capacity, ceil(cf * T_active * k / E))``,
        computed on the exact decimal ``cf`` prints as (1.1 is 11/10). ``None`` (or
        ``math.inf``) means dropless: no limit. Must be > 0.
    eval_capacity_factor : float, None or "dropless"
        Factor used when ``training=False`` (DeepSpeed's ``eval_capacity_factor``);
        None means "same as capacity_factor"; "dropless" lifts the limit in
        evaluation only.
    min_capacity : int
        Lower bound on the capacity (DeepSpeed ``min_capacity``; default 0).
    expert_capacity : int or None
        A fixed per-expert capacity, whatever T (Hugging Face Switch Transformers'
        ``expert_capacity``); replaces the ``capacity_factor`` formula when set
        (``min_capacity`` still applies).
    capacity_rounding : {"exact", "megatron", "deepspeed"}
        "exact" (default): exact decimal arithmetic. "megatron": Megatron-Core's
        float64 ``ceil((T*k/E) * cf)``. "deepspeed": DeepSpeed's float32
        ``ceil(f32(T/E) * f32(k*cf))``.
    drop_policy : {"position", "rank", "probs", "bpr"}
        Which assignments survive when an expert overflows: "position" (tokens in
        order, within a token by rank; the seed and Megatron "position"), "rank"
        (every first choice before any second choice; GShard, DeepSpeed top-2),
        "probs" (each expert keeps its highest float32 weights, ties to the lower
        token; Megatron "probs"), "bpr" (tokens by float32 top-1 score, highest
        first, then as "position"; V-MoE batch-prioritized routing).
    renormalize_after_drop : bool
        Rescale each token's kept weights to sum to ``weight_scale`` after drops
        (DeepSpeed top-2/top-k, fairseq). Default False (Megatron, Switch).
    score_function : {"softmax", "sigmoid"}
        Softmax over all E experts (default) or element-wise sigmoid (DeepSeek-V3).
    normalize_weights : bool
        Divide the k chosen scores by their sum (Mixtral; Qwen ``norm_topk_prob``).
    weight_scale : float
        Multiplies every weight (DeepSeek ``routed_scaling_factor``); > 0.
    load_balance_loss_coeff, router_z_loss_coeff : float
        Coefficients of ``auxiliary_loss``; ``seq_load_balance_loss_coeff``
        weighs the sequence-level loss of ``[B, S, E]`` input (default 0).
    expert_dropout : float
        In [0, 1]. With ``overflow="reroute"``, the probability in training that
        an overflowing assignment tries a reroute (the seed's gate); in evaluation
        every overflowing assignment tries.
    enable_load_balancing : bool
        Whether an ``ExpertRouter`` updates its load balancer in training.
    overflow : {"drop", "reroute"}
        What happens to an assignment whose expert is full.
    reroute_weight_scale : float
        Weight multiplier of a rerouted assignment (seed: 0.5).
    num_groups, group_top_k : int or None
        Group-limited routing (DeepSeek-V2/V3): E splits into ``num_groups``
        contiguous groups and each token routes only into its ``group_top_k``
        best groups. Both or neither.
    group_score : {"max", "top2_sum", "top<n>_sum"}
        Group score: its best expert score (DeepSeek-V2), or the sum of its two
        best (DeepSeek-V3), or of its n best (Megatron-Core: n = top_k // group_top_k).
    group_score_input : {"scores", "logits"}
        What groups are scored on: scores plus selection bias (default; DeepSeek,
        vLLM), or raw logits plus bias (Megatron-Core's default post-softmax routing).
    jitter_eps, noise_std : float
        Training-only noise on logits: multiplicative ``U(1-eps, 1+eps)``
        (Switch) and additive ``N(0, noise_std^2)`` (noisy top-k).
    seed : int
        Seed of the counter-based RNG for noise and reroute draws.
    expert_bias : sequence of E floats or None
        A fixed per-expert selection bias (Hugging Face DeepSeek-V3
        ``e_score_correction_bias``, a Megatron-Core expert bias), used by
        ``route_logits`` when its ``expert_bias`` argument is None. Like that
        argument it changes which experts win, never the weights. Stored as a tuple.
    peer : str or None
        The framework whose conventions a preset reproduces (one of
        :data:`PEERS`); set by :meth:`preset`, None for native configurations.
        It changes no routing: it selects how
        ``RoutingDecision.peer_load_balance_loss`` is normalized (see
        :func:`moe_router.presets.peer_load_balance_loss`).

    Raises
    ------
    ConfigError
        (a ``ValueError``) naming the field, the value and what is allowed.
    """

    num_experts: int
    top_k: int
    capacity_factor: Union[float, decimal.Decimal, None]
    eval_capacity_factor: Union[float, decimal.Decimal, str, None]
    min_capacity: int
    expert_capacity: Optional[int]
    capacity_rounding: str
    drop_policy: str
    renormalize_after_drop: bool
    score_function: str
    normalize_weights: bool
    weight_scale: float
    load_balance_loss_coeff: float
    router_z_loss_coeff: float
    seq_load_balance_loss_coeff: float
    expert_dropout: float
    enable_load_balancing: bool
    overflow: str
    reroute_weight_scale: float
    num_groups: Optional[int]
    group_top_k: Optional[int]
    group_score: str
    group_score_input: str
    jitter_eps: float
    noise_std: float
    seed: int
    expert_bias: Optional[Tuple[float, ...]]
    peer: Optional[str]
    _options: "_core.RouteOptions"

    __slots__ = (
        "num_experts", "top_k", "capacity_factor", "eval_capacity_factor", "min_capacity", "expert_capacity",
        "capacity_rounding", "drop_policy", "renormalize_after_drop", "score_function",
        "normalize_weights", "weight_scale", "load_balance_loss_coeff", "router_z_loss_coeff",
        "seq_load_balance_loss_coeff", "expert_dropout", "enable_load_balancing", "overflow",
        "reroute_weight_scale", "num_groups", "group_top_k", "group_score", "group_score_input", "jitter_eps",
        "noise_std", "seed", "expert_bias", "peer", "_options",
    )

    def __init__(
        self,
        num_experts: int = 8,
        top_k: Optional[int] = None,
        *,
        capacity_factor: Optional[Number] = 1.25,
        eval_capacity_factor: Union[Number, str, None] = None,
        min_capacity: int = 0,
        expert_capacity: Optional[int] = None,
        capacity_rounding: str = "exact",
        drop_policy: str = "position",
        renormalize_after_drop: bool = False,
        score_function: str = "softmax",
        normalize_weights: bool = False,
        weight_scale: float = 1.0,
        load_balance_loss_coeff: float = 0.01,
        router_z_loss_coeff: float = 0.001,
        seq_load_balance_loss_coeff: float = 0.0,
        expert_dropout: float = 0.0,
        enable_load_balancing: bool = True,
        overflow: str = "drop",
        reroute_weight_scale: float = 0.5,
        num_groups: Optional[int] = None,
        group_top_k: Optional[int] = None,
        group_score: str = "max",
        group_score_input: str = "scores",
        jitter_eps: float = 0.0,
        noise_std: float = 0.0,
        seed: int = 0,
        expert_bias: Optional[Sequence[float]] = None,
        peer: Optional[str] = None,
        num_experts_per_token: Optional[int] = None,
    ) -> None:
        if num_experts_per_token is not None:
            if top_k is not None and top_k != num_experts_per_token:
                raise _bad("num_experts_per_token", num_experts_per_token,
                           f"is an alias of top_k and must agree with top_k = {top_k!r}")
            top_k = num_experts_per_token
        if top_k is None:
            top_k = 2
        s = object.__setattr__
        s(self, "num_experts", _as_int("num_experts", num_experts, 1))
        s(self, "top_k", _as_int("top_k", top_k, 1))
        cf_text = _factor_text("capacity_factor", capacity_factor)
        # A Decimal keeps its exact value (replace() and pickling rebuild the same capacity).
        s(self, "capacity_factor", None if cf_text is None else
          capacity_factor if isinstance(capacity_factor, decimal.Decimal) else float(capacity_factor))  # type: ignore[arg-type]
        eval_text: Optional[str] = None
        if isinstance(eval_capacity_factor, str):
            if eval_capacity_factor != "dropless":
                raise _bad("eval_capacity_factor", eval_capacity_factor,
                           'must be a number > 0, "dropless", or None (same as capacity_factor)')
            eval_text = "dropless"
        elif eval_capacity_factor is not None:
            eval_text = _factor_text("eval_capacity_factor", eval_capacity_factor) or "dropless"
        s(self, "eval_capacity_factor", eval_text if eval_text in (None, "dropless")
          else eval_capacity_factor if isinstance(eval_capacity_factor, decimal.Decimal)
          else float(eval_capacity_factor))  # type: ignore[arg-type]
        s(self, "min_capacity", _as_int("min_capacity", min_capacity, 0))
        s(self, "expert_capacity", None if expert_capacity is None else _as_int("expert_capacity", expert_capacity, 1))
        s(self, "capacity_rounding", _as_choice("capacity_rounding", capacity_rounding))
        s(self, "drop_policy", _as_choice("drop_policy", drop_policy))
        s(self, "renormalize_after_drop", _as_bool("renormalize_after_drop", renormalize_after_drop))
        s(self, "score_function", _as_choice("score_function", score_function))
        s(self, "normalize_weights", _as_bool("normalize_weights", normalize_weights))
        s(self, "weight_scale", _as_float("weight_scale", weight_scale))
        if not (math.isfinite(self.weight_scale) and self.weight_scale > 0):
            raise _bad("weight_scale", weight_scale, "must be a finite number > 0")
        for name, value in (("load_balance_loss_coeff", load_balance_loss_coeff),
                            ("router_z_loss_coeff", router_z_loss_coeff),
                            ("seq_load_balance_loss_coeff", seq_load_balance_loss_coeff)):
            v = _as_float(name, value)
            if not (math.isfinite(v) and v >= 0):
                raise _bad(name, value, "must be a finite number >= 0")
            s(self, name, v)
        s(self, "expert_dropout", _as_float("expert_dropout", expert_dropout))
        s(self, "enable_load_balancing", _as_bool("enable_load_balancing", enable_load_balancing))
        s(self, "overflow", _as_choice("overflow", overflow))
        s(self, "reroute_weight_scale", _as_float("reroute_weight_scale", reroute_weight_scale))
        s(self, "num_groups", None if num_groups is None else _as_int("num_groups", num_groups, 1))
        s(self, "group_top_k", None if group_top_k is None else _as_int("group_top_k", group_top_k, 1))
        s(self, "group_score", _as_group_score(group_score))
        s(self, "group_score_input", _as_choice("group_score_input", group_score_input))
        s(self, "jitter_eps", _as_float("jitter_eps", jitter_eps))
        s(self, "noise_std", _as_float("noise_std", noise_std))
        s(self, "seed", _as_int("seed", seed, 0))
        if self.seed >= 2**64:
            raise _bad("seed", seed, "must be < 2**64")
        s(self, "expert_bias", _as_bias(expert_bias, self.num_experts))
        s(self, "peer", _as_peer(peer))
        # Semantic checks (ranges, combinations) live in the Rust core, in one place.
        s(self, "_options", _core.RouteOptions(
            num_experts=self.num_experts, top_k=self.top_k, score_function=self.score_function,
            normalize_weights=self.normalize_weights, weight_scale=self.weight_scale,
            capacity_factor=cf_text, eval_capacity_factor=eval_text, min_capacity=self.min_capacity,
            capacity_rounding=self.capacity_rounding, drop_policy=self.drop_policy,
            renormalize_after_drop=self.renormalize_after_drop, num_groups=self.num_groups,
            group_top_k=self.group_top_k, group_score=self.group_score, overflow=self.overflow,
            group_score_input=self.group_score_input,
            reroute_weight_scale=self.reroute_weight_scale, expert_dropout=self.expert_dropout,
            jitter_eps=self.jitter_eps, noise_std=self.noise_std, seed=self.seed,
            expert_capacity=self.expert_capacity,
        ))

    @classmethod
    def preset(cls, name: str, num_experts: int, top_k: Optional[int] = None,
               **overrides: Any) -> "RouterConfig":
        """A configuration that routes like Megatron-Core, DeepSpeed or a Hugging Face model.

        Shorthand for :func:`moe_router.presets.preset`; ``name`` is one of
        ``"megatron"``, ``"deepspeed"``, ``"mixtral"``, ``"qwen_moe"``,
        ``"deepseek_v3"``, ``"switch"``. ``overrides`` take this class's field
        names or the peer's own parameter names (e.g. ``pre_softmax``,
        ``norm_topk_prob``, ``min_capacity``).

        Examples
        --------
        >>> import moe_router as mr
        >>> cfg = mr.RouterConfig.preset("mixtral", num_experts=8, top_k=2)
        >>> cfg.normalize_weights, cfg.capacity_factor, cfg.peer
        (True, None, 'mixtral')
        """
        from .presets import preset

        return preset(name, num_experts, top_k, **overrides)

    @property
    def num_experts_per_token(self) -> int:
        """The seed's name for :attr:`top_k` (alias)."""
        return self.top_k

    def capacity(self, num_tokens: int, training: bool = True) -> Optional[int]:
        """Per-expert capacity for ``num_tokens`` active tokens (None when dropless).

        Parameters
        ----------
        num_tokens : int
            Unmasked tokens in the batch (T_active).
        training : bool
            Use ``capacity_factor`` (True) or ``eval_capacity_factor`` (False).

        Returns
        -------
        int or None
            ``max(min_capacity, ceil(cf * T * k / E))`` with the configured rounding
            (exact decimal by default), or ``expert_capacity``; None when dropless.

        Raises
        ------
        ConfigError
            ``num_tokens`` is not a non-negative integer.
        """
        return self._options.capacity(_as_int("num_tokens", num_tokens, 0), bool(training))

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as a plain dict of constructor arguments."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "_options"}

    def replace(self, **changes: Any) -> "RouterConfig":
        """A copy with ``changes`` applied (validated again).

        Raises
        ------
        TypeError
            A name that is not a field.
        ConfigError
            A changed value is invalid.
        """
        fields = self.to_dict()
        if "num_experts_per_token" in changes:
            changes["top_k"] = changes.pop("num_experts_per_token")
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"RouterConfig has no field(s) {sorted(unknown)}")
        fields.update(changes)
        return RouterConfig(**fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RouterConfig is immutable; use config.replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouterConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    def __repr__(self) -> str:
        defaults = _DEFAULTS.to_dict() if _DEFAULTS is not None else {}
        shown = [f"num_experts={self.num_experts}", f"top_k={self.top_k}"]
        shown += [f"{k}={v!r}" for k, v in self.to_dict().items()
                  if k not in ("num_experts", "top_k") and defaults.get(k, object()) != v]
        return f"RouterConfig({', '.join(shown)})"

    def __reduce__(self):  # pickling: rebuild from the public fields
        return (_rebuild, (self.to_dict(),))


def _rebuild(fields: Dict[str, Any]) -> RouterConfig:
    return RouterConfig(**fields)


_DEFAULTS: Optional[RouterConfig] = None
_DEFAULTS = RouterConfig()

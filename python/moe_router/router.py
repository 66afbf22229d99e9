"""``ExpertRouter``: route hidden states (or logits) with statistics and load balancing."""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import Any, Dict, Optional

import numpy as np

from . import _core, _inputs
from ._core import ConfigError, InputTypeError
from .balancer import LoadBalancer
from .config import RouterConfig
from .decision import RoutingDecision
from .gate import GateNetwork
from .stats import RoutingStats

def compute_dtype(hidden: Any, router_dtype: Optional[str]) -> Optional[np.dtype]:
    """The dtype of the router GEMM: ``router_dtype`` if set, float64 for half-precision
    hidden states (NumPy or torch float16/bfloat16: exact products), else None (the
    hidden states' own float32/float64)."""
    if router_dtype is not None:
        return np.dtype(router_dtype)
    name = str(getattr(hidden, "dtype", ""))
    return np.dtype(np.float64) if ("float16" in name or "half" in name) else None


class ExpertRouter:
    """A token router with its own weights, statistics and load balancer .

    ``route_tokens(hidden)`` computes the router logits ``hidden @ weight + bias``
    in Rust, chunk by chunk inside the parallel routing pass (a cache-blocked
    GEMM per chunk of 512 tokens), so no ``[T, E]`` logits array is ever
    materialized; or, with the hierarchical gate, ``p(e) = p(group) * p(e | group)``
    (:class:`GateNetwork`). Every call records latency and loads in
    :class:`RoutingStats`; training calls feed the :class:`LoadBalancer`, whose
    expert bias (aux-loss-free balancing, DeepSeek-V3) steers the next call's
    selection when ``config.enable_load_balancing`` is True. Safe to call from
    several Python threads at once.

    Parameters
    ----------
    config : RouterConfig
        Routing semantics; ``num_experts`` is E.
    input_dim : int
        D, the hidden size.
    seed : int
        Seed of the default weight initialization (normal, std ``1/sqrt(D)``; the
        std 1 would saturate the softmax).
    weight : array_like, float, shape [D, E], optional
        Router weight; float32 or float64 (others are converted to float32).
    bias : array_like, float or int, shape [E], optional
        Router bias, in the weight's dtype (an integer it would round, beyond 2**24
        for float32, is an InputError).
    gate : {"auto", "linear", "hierarchical"}
        "auto" picks the hierarchical gate when E > 32, no ``weight`` is given and the
        routing is not Sinkhorn (which balances logits), the linear router otherwise.
    group_top_k : int, optional
        For the hierarchical gate: groups computed per token (None = dense).
    balancer : LoadBalancer, optional
        A configured balancer (default ``LoadBalancer(E)``).
    router_dtype : {None, "float32", "float64"}
        Precision of the router GEMM (Megatron-Core's ``moe_router_dtype``). None:
        float32 hidden states use float32, float64 and float16 hidden states use
        float64 (float16 x float32 products are exact in float64, so the routing
        equals the float64 reference). Router logits can be ill-conditioned: on the
        real MiniLM data, NumPy's own float32 ``hidden @ W`` picks different top-2
        experts than float64 for about 1% of tokens.

    Raises
    ------
    ConfigError
        Bad ``input_dim`` (an int in ``[1, 2**31 - 1]``), ``seed`` (an int in
        ``[0, 2**64 - 1]``), ``gate``, ``router_dtype`` or ``group_top_k``.
    ConfigTypeError
        (a ``ConfigError`` and a ``TypeError``) one of those of the wrong type,
        ``config`` not a RouterConfig or ``balancer`` not a LoadBalancer.
    InputError
        ``weight`` or ``bias`` of the wrong shape, not finite, or an integer bias that its dtype would round.
    InputTypeError
        ``weight`` or ``bias`` not a floating-point (bias: real) array.
    """

    def __init__(self, config: RouterConfig, input_dim: int, seed: int = 0, weight: Any = None,
                 bias: Any = None, gate: str = "auto", group_top_k: Optional[int] = None,
                 balancer: Optional[LoadBalancer] = None, router_dtype: Optional[str] = None) -> None:
        _inputs.instance(config, "config", RouterConfig)
        _inputs.choice(router_dtype, "router_dtype", (None, "float32", "float64"))
        seed = _inputs.integer(seed, "seed")
        if balancer is not None:
            _inputs.instance(balancer, "balancer", LoadBalancer)
        self.config = config
        self.input_dim = _inputs.integer(input_dim, "input_dim", 1, _inputs.I32_MAX)
        self.router_dtype = router_dtype
        e = config.num_experts
        hierarchical = _core.hierarchical_gate(config, gate, weight is not None, bias is not None,
                                               group_top_k is not None)
        self._lock = threading.RLock()
        self._step = 0
        self._gate = GateNetwork(self.input_dim, e, seed=seed, group_top_k=group_top_k) if hierarchical else None
        # The linear router's (weight, bias) and their conversions to the hidden states' dtype.
        self._weights: tuple = ((None, None), {})
        if not hierarchical:
            if weight is None:
                rng = np.random.default_rng(seed)
                weight = (rng.standard_normal((self.input_dim, e)) / math.sqrt(self.input_dim)).astype(np.float32)
            self._set_weights(weight, bias)
        self._stats = RoutingStats()
        self._decisions: "weakref.WeakSet[RoutingDecision]" = weakref.WeakSet()
        self._balancer = balancer if balancer is not None else LoadBalancer(e)
        if self._balancer.num_experts != e:
            raise ConfigError(f"invalid balancer: it tracks {self._balancer.num_experts} experts, "
                              f"the config has num_experts = {e}")

    # -- weights ---------------------------------------------------------------
    def _set_weights(self, weight: Any, bias: Any) -> None:
        e = self.config.num_experts
        w = _core.read_weight(weight, "weight", (self.input_dim, e), " (input_dim x num_experts)")
        b = None if bias is None else _core.read_weight(bias, "bias", (e,), " (one value per expert)", w.dtype, "fiu")
        with self._lock:
            self._weights = ((w, b), {})

    @property
    def weight(self) -> Optional[np.ndarray]:
        """The linear router's weight ``[D, E]`` (None for the hierarchical gate)."""
        return self._weights[0][0]

    @property
    def bias(self) -> Optional[np.ndarray]:
        """The linear router's bias ``[E]`` or None."""
        return self._weights[0][1]

    @property
    def gate(self) -> Optional[GateNetwork]:
        """The hierarchical gate, or None for the linear router."""
        return self._gate

    def update_router_weights(self, new_weights: Any, bias: Any = None) -> None:
        """Replace the linear router's weight (and optionally its bias).

        Parameters
        ----------
        new_weights : array_like, float32 or float64, shape [D, E]
            The new router weight (other float dtypes become float32); copied.
        bias : array_like, float, shape [E], optional
            A new bias; by default the current one is kept (converted to the new dtype).

        Raises
        ------
        InputTypeError
            ``new_weights`` is not a floating-point array.
        InputError
            The new weight's shape differs from the current ``[D, E]`` (both shapes
            are named), or it holds NaN/inf.
        ConfigError
            The router uses the hierarchical gate, which has no single weight.
        """
        if self._gate is not None:
            raise ConfigError("invalid update_router_weights: this router uses the hierarchical gate "
                              "(gate='hierarchical'), which has no single weight matrix")
        shape = (self.input_dim, self.config.num_experts)
        w = _core.read_weight(new_weights, "new_weights", shape, ", the router weight's shape (input_dim x num_experts)")
        # The bias follows the new weight's dtype (the kept one is converted).
        self._set_weights(w, self.bias if bias is None else bias)

    # -- routing ---------------------------------------------------------------
    def _call_state(self, training: bool):
        """The RNG step of this call and the selection bias: the config's static
        ``expert_bias`` plus the balancer's learned one (None when both are zero)."""
        with self._lock:
            step = self._step
            if training:
                self._step += 1
        bias = np.zeros(self.config.num_experts)
        if self.config.expert_bias is not None:
            bias += np.asarray(self.config.expert_bias, dtype=np.float64)
        if self.config.enable_load_balancing:
            bias += self._balancer.expert_bias
        return step, (bias if np.any(bias != 0) else None)

    def route_tokens(self, hidden: Any, training: bool = False, token_mask: Any = None, *,
                     return_probs: bool = False, replay: Any = None) -> RoutingDecision:
        """Route hidden states to experts.

        Parameters
        ----------
        hidden : array_like, float, shape [B, S, D] or [T, D]
            Hidden states (float32/float64 read in place; float16 converted once).
            A NumPy masked array marks padding: a token with any masked entry
            is not routed.
        training : bool
            Training mode: noise and reroute draws apply, the step counter advances
            and the load balancer is updated.
        token_mask : array_like of bool, shape [T] or [B, S], optional
            False marks padding (counted nowhere); combined by AND with the
            mask of masked-array hidden states.
        return_probs : bool
            Also return ``router_probs`` (float32 ``[T, E]``: the gate's probabilities,
            or the scores of the router logits), written in the routing pass.
        replay : RecordedRoute, optional
            Route with these recorded experts (router replay; see
            :func:`moe_router.route_logits`); the weights come from this router's logits.

        Returns
        -------
        RoutingDecision

        Raises
        ------
        InputError
            Wrong rank, or last dimension != ``input_dim``; NaN/inf in the hidden
            states, or router logits whose ``logsumexp**2`` overflows float64
            (reported as the router logits of the first offending token).
        InputTypeError
            Non-floating-point input, or a flag that is not a bool.
        """
        dtype = compute_dtype(hidden, self.router_dtype)
        if self._gate is not None:
            g = self._gate
            return self._route(_core.route_gate, (hidden, g.group_weight, g.expert_weight, g.group_top_k), training,
                               token_mask, return_probs, replay, dtype=dtype, casts=g._casts)
        (w, b), casts = self._weights
        return self._route(_core.route_hidden, (hidden, w, b), training, token_mask, return_probs, replay,
                           dtype=dtype, casts=casts)

    def route_logits(self, logits: Any, training: bool = False, token_mask: Any = None, *,
                     return_probs: bool = False, replay: Any = None) -> RoutingDecision:
        """Route precomputed logits through this router's statistics and load balancer.

        Parameters
        ----------
        logits : array_like of floats or integers, shape [T, E] or [B, S, E]
            Router logits (float32/float64 read in place; float16 and integers
            converted). A masked array's tokens with a masked entry are padding.
        training : bool
            Training mode (noise, reroute coin, balancer update, step counter).
        token_mask : array_like of bool, shape [T] or [B, S], optional
            False marks padding.
        return_probs : bool
            Also return ``router_probs`` (as :func:`moe_router.route_logits`).
        replay : RecordedRoute, optional
            Route with these recorded experts (as :func:`moe_router.route_logits`).

        Returns
        -------
        RoutingDecision
            As :func:`moe_router.route_logits` (same formulas and sources), with this
            router's balancer bias applied to the selection.

        Raises
        ------
        InputError
            Wrong shape; NaN/+inf logits, an all -inf row, a row whose z-loss term
            overflows float64, or integer logits that float64 would round (first
            offending token named).
        InputTypeError
            Not a real-valued array, or a flag that is not a bool.
        """
        return self._route(_core.route_logits, (logits,), training, token_mask, return_probs, replay)

    def _route(self, core_call: Any, arrays: tuple, training: Any, token_mask: Any, return_probs: Any, replay: Any,
               **inputs: Any) -> RoutingDecision:
        """Call the core with this router's step, bias, statistics and balancer."""
        training = _inputs.flag(training, "training")
        step, bias = self._call_state(training)
        t0 = time.perf_counter()
        try:
            dec = core_call(*arrays, self.config, training=training, token_mask=token_mask, expert_bias=bias,
                            step=step, return_probs=return_probs, replay=replay, **inputs)
        except BaseException:
            with self._lock:  # a refused call uses up no step (unless another call took the next one)
                if training and self._step == step + 1:
                    self._step = step
            raise
        self._stats.record(dec, time.perf_counter() - t0)
        self._decisions.add(dec)
        if training and self.config.enable_load_balancing:
            self._balancer.update(dec)
        return dec

    # -- accessors -------------------------------------------------------------
    def backward(self, decision: RoutingDecision, grad_expert_weights: Any = None, grad_auxiliary_loss: float = 1.0,
                 grad_router_probs: Any = None, tokens_per_expert: Any = None, num_tokens: Optional[int] = None) -> tuple:
        """Gradients of a ``route_tokens`` decision with respect to the router's inputs.

        The objective is :meth:`RoutingDecision.backward`'s (``sum(grad_expert_weights *
        expert_weights) + grad_auxiliary_loss * auxiliary_loss + sum(grad_router_probs *
        router_probs)``, selection fixed, balance counts constant), recomputed chunk by
        chunk from the hidden states and the weights the decision was routed with (GEMMs
        in Rust; weight gradients are summed in fixed groups of chunks, so they do not
        depend on the thread count).

        - Linear router: with ``G = dL/dlogits`` ``[T, E]``, ``grad_hidden = G @ W^T``,
          ``grad_weight = H^T @ G``, ``grad_bias = sum_t G``.
        - Hierarchical gate (``p(e) = p(g) p(j | g)``): the gradient with respect to the
          probabilities goes through the within-group softmax to ``W_g`` and through the
          group softmax (plus the group router's z-loss) to ``W_group``; the sparse gate
          gives no gradient into the groups it did not compute for a token (their
          probabilities are the constant 0). The formulas are in ``docs/semantics.md``.

        Parameters
        ----------
        decision : RoutingDecision
            Made by this router's :meth:`route_tokens`.
        grad_expert_weights : array of float, shape [T, k] or batch_shape + [k], optional
        grad_auxiliary_loss : float, default 1.0
        grad_router_probs : array of float, shape [T, E] or batch_shape + [E], optional
        tokens_per_expert : array of int, shape [E], optional
        num_tokens : int, optional
            A global batch's counts and tokens for the load-balance term, both or
            neither (``GlobalBalanceAccumulator``; see :meth:`RoutingDecision.backward`).

        Returns
        -------
        (grad_hidden, grad_weight, grad_bias) : numpy.ndarray
            Linear router: ``batch_shape + [D]``, ``[D, E]`` and ``[E]``.
        (grad_hidden, grad_group_weight, grad_expert_weight) : numpy.ndarray
            Hierarchical gate: ``batch_shape + [D]``, ``[D, G]`` and ``[G, D, P]`` (0 in the
            padding columns of a short last group).
            Both in the routing GEMM's dtype (``router_dtype``; float64 for float16 hidden
            states by default).

        Raises
        ------
        ConfigError
            ``decision`` was not made by this router, or by its ``route_logits`` (use
            ``decision.backward``).
        InputError, TypeError
            Gradient arrays of the wrong shape or type, or holding NaN/inf.
        """
        if not isinstance(decision, RoutingDecision):
            raise InputTypeError(f"decision must be a RoutingDecision, got {type(decision).__name__}")
        if decision not in self._decisions:
            raise ConfigError("invalid decision: it was not routed by this router (or was routed before it "
                              "was rebuilt); backward needs the decision's own router")
        gh, gw, gb = _core.router_backward(decision, grad_expert_weights, grad_auxiliary_loss, grad_router_probs,
                                           tokens_per_expert, num_tokens)
        return gh.reshape(*decision.batch_shape, self.input_dim), gw, gb

    def get_num_experts(self) -> int:
        """E."""
        return self.config.num_experts

    def get_stats(self) -> RoutingStats:
        """The live :class:`RoutingStats` of this router."""
        return self._stats

    def reset_stats(self) -> None:
        """Clear the statistics (not the load balancer)."""
        self._stats.reset()

    def get_load_balancer(self) -> LoadBalancer:
        """The :class:`LoadBalancer` whose expert bias this router applies."""
        return self._balancer

    @property
    def step(self) -> int:
        """Training calls so far (the RNG step of the next training call)."""
        return self._step

    def __repr__(self) -> str:
        kind = repr(self._gate) if self._gate is not None else f"linear[{self.input_dim}x{self.config.num_experts}]"
        return f"ExpertRouter({self.config!r}, input_dim={self.input_dim}, gate={kind})"

"""``route_logits``: route router logits to experts."""

from __future__ import annotations

from typing import Any, Optional

from . import _core
from ._core import RecordedRoute, RouterConfig, RoutingDecision


def route_logits(
    logits: Any,
    config: RouterConfig,
    training: bool = False,
    token_mask: Any = None,
    expert_bias: Any = None,
    *,
    step: int = 0,
    return_probs: bool = False,
    replay: Optional[RecordedRoute] = None,
) -> RoutingDecision:
    """Route tokens to experts from their router logits.

    Parameters
    ----------
    logits : array_like of floats or integers, shape [T, E] or [B, S, E]
        Router logits (``E = config.num_experts``). C-contiguous float32/float64
        input is read in place (NumPy arrays, torch CPU tensors, ``__dlpack__``
        producers); other layouts are converted once, float16 (and torch
        bfloat16) to float32, integer arrays (logits read from JSON, say) and
        longdouble to float64 (integers only if float64 holds them exactly).
        ``-inf`` marks an expert as not eligible for that token. A NumPy masked
        array marks padding itself: a token with any masked entry is not routed
        (as where ``token_mask`` is False).
    config : RouterConfig
        Routing semantics (scores, top-k, capacity, drop policy, losses).
    training : bool
        Training mode: noise (``jitter_eps``, ``noise_std``) and the reroute coin
        apply, and ``capacity_factor`` is used; otherwise ``eval_capacity_factor``
        (if set). Losses are computed in both modes.
    token_mask : array_like of bool, shape [T] or [B, S], optional
        False marks padding: not read, not routed, counted in no load, loss or
        capacity. With masked-array logits, a token is routed only where both
        this mask and the logits' own mask allow it.
    expert_bias : array_like of float, shape [E], optional
        Per-expert selection bias (aux-loss-free balancing, DeepSeek-V3): added to
        the scores to choose experts, never to the weights. When None,
        ``config.expert_bias`` (if set) is used (by the core).
    step : int
        Training step, part of the RNG key of the noise and reroute draws.
    return_probs : bool
        Also return ``router_probs``: float32 ``[T, E]``, each token's score
        distribution as the router computed it (after training noise), 0 for
        padding; written by the core in the routing pass.
    replay : RecordedRoute, optional
        Router replay (Megatron-Core ``router_replay``; Rollout Routing Replay):
        use the recorded experts instead of a fresh top-k. The weights, losses
        and ``P_e`` are recomputed from ``logits`` at those experts (Megatron:
        ``probs = scores.gather(1, idx)``, then ``normalize_weights`` and
        ``weight_scale``); ``expert_bias`` and group limits do not change the
        selection (group limits still bound overflow reroutes); capacity and the
        drop policy apply as usual. A recorded
        expert whose logit is ``-inf`` gets weight 0 and no capacity. Without
        ``token_mask``, the recording's mask is used.

    Returns
    -------
    RoutingDecision
        With ``peer_load_balance_loss`` set when ``config.peer`` is (a preset's
        configuration).

    Raises
    ------
    InputTypeError
        (an ``InputError`` and a ``TypeError``) ``logits`` is not a real-valued
        array (bool, complex, strings, objects), ``token_mask`` not a bool (or
        0/1 integer) array, ``expert_bias`` not real-valued, ``training`` or
        ``return_probs`` not a bool, ``step`` not an int, ``replay`` not a
        ``RecordedRoute``.
    ConfigTypeError
        (a ``ConfigError`` and a ``TypeError``) ``config`` is not a RouterConfig.
    InputError
        (a ``ValueError``) wrong shape; NaN or +inf logits, or a row that is all
        ``-inf``, or whose ``logsumexp**2`` (z-loss term) overflows float64
        (``|logsumexp| > 1.34e154``), with the index of the first offending token;
        integer logits or bias that float64 would round (beyond 2**53);
        non-finite bias; ``step`` outside ``[0, 2**64 - 1]``; a ``replay`` of
        another T, k or E, or whose padding ``token_mask`` would route (naming ``replay``).

    Notes
    -----
    Formulas: capacity ``max(min_capacity, ceil(cf * T_active * k / E))`` with
    exact decimals (GShard / Switch capacity, without Megatron's float rounding);
    ``load_balance_loss`` from the Switch Transformer (Fedus et al. 2021, eq. 4);
    ``router_z_loss`` from ST-MoE (Zoph et al. 2022, eq. 5); see the README.

    Examples
    --------
    >>> import numpy as np, moe_router as mr
    >>> cfg = mr.RouterConfig(num_experts=4, top_k=2, capacity_factor=None)
    >>> dec = mr.route_logits(np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32), cfg)
    >>> dec.expert_indices.tolist(), [round(w, 4) for w in dec.expert_weights[0].tolist()]
    ([[0, 1]], [0.6439, 0.2369])
    """
    return _core.route_logits(logits, config, training=training, token_mask=token_mask, expert_bias=expert_bias,
                              step=step, return_probs=return_probs, replay=replay)

"""``route_logits``: route router logits to experts."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core, _inputs
from ._core import InputError
from .config import RouterConfig
from .decision import RoutingDecision


def route_logits(
    logits: Any,
    config: RouterConfig,
    training: bool = False,
    token_mask: Any = None,
    expert_bias: Any = None,
    *,
    step: int = 0,
    return_probs: bool = False,
) -> RoutingDecision:
    """Route tokens to experts from their router logits.

    Parameters
    ----------
    logits : array_like, float32 or float64, shape [T, E] or [B, S, E]
        Router logits (``E = config.num_experts``). C-contiguous float32/float64
        input is read in place (NumPy arrays, torch CPU tensors, ``__dlpack__``
        producers); float16 and other layouts are converted once. ``-inf`` marks
        an expert as not eligible for that token.
    config : RouterConfig
        Routing semantics (scores, top-k, capacity, drop policy, losses).
    training : bool
        Training mode: noise (``jitter_eps``, ``noise_std``) and the reroute coin
        apply, and ``capacity_factor`` is used; otherwise ``eval_capacity_factor``
        (if set). Losses are computed in both modes.
    token_mask : array_like of bool, shape [T] or [B, S], optional
        False marks padding: not read, not routed, counted in no load, loss or capacity.
    expert_bias : array_like of float, shape [E], optional
        Per-expert selection bias (aux-loss-free balancing, DeepSeek-V3): added to
        the scores to choose experts, never to the weights. When None,
        ``config.expert_bias`` (if set) is used.
    step : int
        Training step, part of the RNG key of the noise and reroute draws.
    return_probs : bool
        Also return ``router_probs`` (float32 [T, E] scores of the logits as given).

    Returns
    -------
    RoutingDecision
        With ``peer_load_balance_loss`` set when ``config.peer`` is (a preset's
        configuration).

    Raises
    ------
    TypeError
        ``logits`` is not a floating-point array, or ``config`` is not a RouterConfig.
    InputError
        (a ``ValueError``) wrong shape; NaN or +inf logits, or a row that is all
        ``-inf``, with the index of the first offending token; non-finite bias.

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
    if not isinstance(config, RouterConfig):
        raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
    rows, batch_shape = _inputs.float_rows(logits, "logits", config.num_experts, "num_experts", integers=True)
    mask = _inputs.token_mask(token_mask, batch_shape)
    if expert_bias is None:
        expert_bias = config.expert_bias
    bias = _inputs.expert_bias(expert_bias, config.num_experts)
    seq_len = batch_shape[1] if len(batch_shape) == 2 else None
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be a non-negative integer, got {step!r}")
    if step < 0:
        raise InputError(f"step must be a non-negative integer, got {step}")
    training = _inputs.flag(training, "training")
    return_probs = _inputs.flag(return_probs, "return_probs")
    fields = _core.route_logits(rows, config._options, bool(training), mask, bias, int(step), seq_len)
    decision = decision_from_core(fields, config, batch_shape, rows if return_probs else None, mask)
    if config.peer is not None:
        from . import presets

        plain = None
        if presets.counts_plain_topk(config, bias is not None):
            # Megatron-Core counts a plain top-k (no bias, no groups) in its aux loss:
            # route once more without them, on the same (noised) logits.
            plain_cfg = presets.plain_topk_config(config)
            plain = _core.route_logits(rows, plain_cfg._options, bool(training), mask, None, int(step),
                                       None)["pre_drop_tokens_per_expert"]
        decision.peer_load_balance_loss = presets.peer_loss_from_counts(decision, config.peer, mask, plain)
    return decision


def decision_from_core(fields: dict, config: RouterConfig, batch_shape: tuple,
                       rows_for_probs: Optional[np.ndarray] = None,
                       token_mask: Optional[np.ndarray] = None) -> RoutingDecision:
    """Wrap the core's result dict; adds ``auxiliary_loss`` and, if asked, ``router_probs``."""
    aux = (config.load_balance_loss_coeff * fields["load_balance_loss"]
           + config.router_z_loss_coeff * fields["router_z_loss"])
    if fields["seq_load_balance_loss"] is not None:
        aux += config.seq_load_balance_loss_coeff * fields["seq_load_balance_loss"]
    probs = None
    if rows_for_probs is not None:
        # Masked rows are never read (they may hold garbage): their scores are 0.
        mask = token_mask
        probs = np.zeros(rows_for_probs.shape, dtype=np.float32)
        active = slice(None) if mask is None else mask
        probs[active] = scores_of(rows_for_probs[active], config.score_function)
    return RoutingDecision(fields, auxiliary_loss=aux, batch_shape=batch_shape, router_probs=probs)


def scores_of(rows: np.ndarray, score_function: str) -> np.ndarray:
    """float32 softmax or sigmoid scores of ``[T, E]`` logits (NumPy; not on the hot path)."""
    z = rows.astype(np.float64)
    if score_function == "sigmoid":
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    if z.shape[0] == 0:
        return z.astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

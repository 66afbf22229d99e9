"""JAX bridge: routing as a differentiable function with ``jax.custom_vjp``.

The forward and the backward run in Rust on the host through
``jax.pure_callback`` (so :func:`route` also works under ``jax.jit``, on the CPU);
the backward routes the same logits again (routing is deterministic, so the
decision is the same) and calls :meth:`RoutingDecision.backward`. JAX is not a
dependency of the package; this module imports it.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ._core import InputError
from .config import RouterConfig
from .routing import route_logits

__all__ = ["route"]


def _decide(logits: np.ndarray, config: RouterConfig, training: bool, step: int) -> Any:
    return route_logits(np.asarray(logits), config, training=training, step=step)


def _shapes(logits: Any, config: RouterConfig) -> Tuple[Any, Any, Any]:
    lead = logits.shape[:-1]
    return (jax.ShapeDtypeStruct((*lead, config.top_k), jnp.int32),
            jax.ShapeDtypeStruct((*lead, config.top_k), jnp.float32),
            jax.ShapeDtypeStruct((), logits.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def route(logits: Any, config: RouterConfig, training: bool = True, step: int = 0) -> Tuple[Any, Any, Any]:
    """Route ``logits`` differentiably.

    Parameters
    ----------
    logits : jax.Array, float32 or float64, shape [T, E] or [B, S, E]
    config : RouterConfig
        Static (hashable).
    training : bool, default True
        Static.
    step : int, default 0
        Static: the RNG step of the training noise.

    Returns
    -------
    expert_indices : int32 [..., k] (no gradient)
    expert_weights : float32 [..., k]
    auxiliary_loss : scalar of the logits' dtype

    Notes
    -----
    The gradient is :meth:`RoutingDecision.backward`'s: selection fixed, balance
    counts constant (as Megatron-Core and Hugging Face differentiate the router).

    Raises
    ------
    InputError
        ``logits`` of the wrong shape (at trace time).
    ConfigError, InputError, TypeError
        As :func:`moe_router.route_logits` for concrete (eager) logits; under ``jit`` or
        ``grad`` a bad value raised in the host callback reaches the caller as JAX's
        ``JaxRuntimeError`` wrapping that message.
    """
    return _forward(logits, config, training, step)


def _forward(logits: Any, config: RouterConfig, training: bool, step: int) -> Tuple[Any, Any, Any]:
    if logits.ndim not in (2, 3) or logits.shape[-1] != config.num_experts:
        raise InputError(f"logits has shape {list(logits.shape)}, expected [T, {config.num_experts}] or "
                         f"[B, S, {config.num_experts}] (num_experts = {config.num_experts})")

    def host(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        dec = _decide(x, config, training, step)
        lead = x.shape[:-1]
        return (dec.expert_indices.reshape(*lead, -1), dec.expert_weights.reshape(*lead, -1),
                np.asarray(dec.auxiliary_loss, dtype=x.dtype))

    if not isinstance(logits, jax.core.Tracer):
        # Concrete input: route here, so bad values raise the package's own errors.
        return tuple(jnp.asarray(v) for v in host(np.asarray(logits)))
    # Traced (jit, grad): the host callback; errors then surface as JAX runtime errors.
    return jax.pure_callback(host, _shapes(logits, config), logits)


def _route_fwd(logits: Any, config: RouterConfig, training: bool, step: int) -> Tuple[Tuple[Any, Any, Any], Any]:
    return _forward(logits, config, training, step), logits


def _route_bwd(config: RouterConfig, training: bool, step: int, logits: Any, cotangents: Any) -> Tuple[Any]:
    _, g_weights, g_aux = cotangents

    def host(x: np.ndarray, gw: np.ndarray, ga: np.ndarray) -> np.ndarray:
        dec = _decide(x, config, training, step)
        gw = np.asarray(gw)
        # float32 is read in place; the others (bfloat16 included) go as float64
        gw = gw if gw.dtype == np.float32 else gw.astype(np.float64)
        return np.asarray(dec.backward(gw, float(ga)), dtype=x.dtype).reshape(x.shape)

    grad = jax.pure_callback(host, jax.ShapeDtypeStruct(logits.shape, logits.dtype), logits, g_weights, g_aux)
    return (grad,)


route.defvjp(_route_fwd, _route_bwd)

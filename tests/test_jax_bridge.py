"""The JAX bridge (``moe_router.jax.route``, ``jax.custom_vjp``) against JAX autodiff of the same math,
eagerly and under ``jax.jit``. JAX's CPU wheels are installed in CI; skips where JAX is absent."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.jax import route  # noqa: E402


def reference(logits, idx, kept, counts, cfg):
    """The decision's weights and auxiliary loss in jax.numpy (selection and counts fixed)."""
    T, E = logits.shape
    s = jax.nn.sigmoid(logits) if cfg.score_function == "sigmoid" else jax.nn.softmax(logits, -1)
    S = jnp.take_along_axis(s, idx, 1)
    w = S * kept
    if cfg.normalize_weights:
        w = w / S.sum(1, keepdims=True)
    w = cfg.weight_scale * w
    q = s / s.sum(1, keepdims=True)
    lb = E * ((counts / (T * cfg.top_k)) * q.mean(0)).sum()
    z = (jax.scipy.special.logsumexp(logits, -1) ** 2).mean()
    return w, cfg.load_balance_loss_coeff * lb + cfg.router_z_loss_coeff * z


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_jax_gradients_equal_autodiff_of_the_same_math(score_function, normalize, jit):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(48, 8)))
    gw = jnp.asarray(np.random.default_rng(1).normal(size=(48, 2)))
    cfg = mr.RouterConfig(num_experts=8, top_k=2, score_function=score_function, normalize_weights=normalize,
                          capacity_factor=0.75, load_balance_loss_coeff=0.2, router_z_loss_coeff=0.01,
                          weight_scale=1.5)
    dec = mr.route_logits(np.asarray(x), cfg, training=True)

    def ours(z):
        idx, w, aux = route(z, cfg, True, 0)
        return (w.astype(z.dtype) * gw).sum() + 0.8 * aux

    def theirs(z):
        w, aux = reference(z, jnp.asarray(dec.expert_indices), jnp.asarray(dec.kept), jnp.asarray(
            dec.pre_drop_tokens_per_expert, dtype=z.dtype), cfg)
        return (w * gw).sum() + 0.8 * aux

    f = jax.jit(jax.grad(ours)) if jit else jax.grad(ours)
    got, want = np.asarray(f(x)), np.asarray(jax.grad(theirs)(x))
    # the weights are float32: their cotangent is rounded to float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    idx, w, aux = route(x, cfg, True, 0)
    np.testing.assert_array_equal(np.asarray(idx), dec.expert_indices)
    assert float(aux) == pytest.approx(dec.auxiliary_loss, rel=1e-12)


def test_jax_bad_input():
    cfg = mr.RouterConfig(num_experts=8, top_k=2)
    with pytest.raises(mr.InputError, match="logits"):
        route(jnp.zeros((4, 7)), cfg)
    with pytest.raises(mr.InputError, match="NaN"):
        route(jnp.full((4, 8), jnp.nan), cfg)

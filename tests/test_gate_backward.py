"""``ExpertRouter.backward`` with the hierarchical gate, against float64 central finite differences of a
NumPy forward written here (the gate's two softmaxes, the decision's selection held fixed, the balance-loss
counts constant)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import moe_router as mr
from helpers import same_at_thread_counts, softmax

EPS = 1e-6


def gate_forward(h, gw, ew, num_experts, top):
    """The gate's probabilities ``[T, E]`` and the group router's logsumexp ``[T]``."""
    groups, _, per = ew.shape
    a = h @ gw
    pg = softmax(a)
    probs = np.zeros((h.shape[0], num_experts))
    for g in range(groups):
        size = min(per, num_experts - g * per)
        probs[:, g * per:g * per + size] = pg[:, g:g + 1] * softmax(h @ ew[g][:, :size])
    if top is not None:
        order = np.argsort(-a, axis=1, kind="stable")[:, :top]  # ties to the lower group
        keep = np.zeros((h.shape[0], groups), bool)
        np.put_along_axis(keep, order, True, axis=1)
        probs *= np.repeat(keep, per, axis=1)[:, :num_experts]
    lse = a.max(1) + np.log(np.exp(a - a.max(1, keepdims=True)).sum(1))
    return probs, lse


def objective(h, gw, ew, dec, cfg, g_w, g_aux, g_p, top):
    """sum(g_w * w) + g_aux * aux + sum(g_p * probs) for dec's choices, in float64."""
    E, k = cfg.num_experts, cfg.top_k
    s, lse = gate_forward(h, gw, ew, E, top)
    total = float((g_p * s).sum()) if g_p is not None else 0.0
    for t in range(h.shape[0]):
        S = s[t, dec.expert_indices[t]]
        n = dec.kept[t].astype(float)
        if cfg.renormalize_after_drop:
            w = n * S / (n * S).sum() if (n * S).sum() > 0 else np.zeros(k)
        elif cfg.normalize_weights:
            w = n * S / S.sum()
        else:
            w = n * S
        total += float((g_w[t] * w).sum())
    q = s / s.sum(1, keepdims=True)
    f = dec.pre_drop_tokens_per_expert / (h.shape[0] * k)
    aux = cfg.load_balance_loss_coeff * E * (f * q.mean(0)).sum() + cfg.router_z_loss_coeff * (lse ** 2).mean()
    return total + g_aux * aux


def central_differences(f, x):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + EPS
        up = f()
        x[i] = old - EPS
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * EPS)
    return grad


def relative_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


CASES = list(itertools.product([None, 2], [None, 0.75], [False, True], [False, True]))


@pytest.mark.parametrize("top,cf,normalize,renormalize", CASES)
def test_gate_backward_matches_finite_differences(rng, top, cf, normalize, renormalize):
    # E = 10: G = 4 groups of P = 3, the last group has one expert (a short group).
    T, D, E, k = 30, 5, 10, 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, normalize_weights=normalize,
                          renormalize_after_drop=renormalize, load_balance_loss_coeff=0.3,
                          router_z_loss_coeff=0.05)
    router = mr.ExpertRouter(cfg, D, gate="hierarchical", group_top_k=top, seed=3)
    gate = router.gate
    gw = rng.normal(size=gate.group_weight.shape)
    ew = rng.normal(size=gate.expert_weight.shape)
    gate.group_weight, gate.expert_weight = gw, ew
    h = rng.normal(size=(T, D))
    dec = router.route_tokens(h, training=True, return_probs=True)
    probs, _ = gate_forward(h, gw, ew, E, top)
    np.testing.assert_allclose(dec.router_probs, probs, rtol=1e-6, atol=1e-7)
    g_w, g_p, g_aux = rng.normal(size=(T, k)), rng.normal(size=(T, E)), 0.8
    gh, ggw, gew = router.backward(dec, g_w, g_aux, g_p)
    assert gh.shape == (T, D) and ggw.shape == gw.shape and gew.shape == ew.shape
    f = lambda: objective(h, gw, ew, dec, cfg, g_w, g_aux, g_p, top)  # noqa: E731
    assert relative_error(ggw, central_differences(f, gw)) < 1e-5
    assert relative_error(gew, central_differences(f, ew)) < 1e-5
    assert relative_error(gh, central_differences(f, h)) < 1e-5
    # The short last group's padding columns get no gradient.
    assert not gew[-1, :, 1:].any()


def test_sparse_gate_gives_no_gradient_to_groups_it_did_not_compute(rng):
    T, D, E = 40, 6, 16  # G = 4 groups of 4
    cfg = mr.RouterConfig(num_experts=E, top_k=1, capacity_factor=None, load_balance_loss_coeff=0.0,
                          router_z_loss_coeff=0.0)
    router = mr.ExpertRouter(cfg, D, gate="hierarchical", group_top_k=1)
    gate = router.gate
    gw = np.zeros((D, 4))
    gw[0, 2] = 50.0  # with h[:, 0] > 0 every token's best group is group 2
    gate.group_weight = gw
    h = np.abs(rng.normal(size=(T, D))) + 0.1
    dec = router.route_tokens(h)
    assert set(dec.expert_indices.ravel()) <= set(range(8, 12))
    _, _, gew = router.backward(dec, rng.normal(size=(T, 1)), 0.0)
    assert gew[2].any()
    assert not gew[[0, 1, 3]].any()


def test_gate_backward_masks_float32_and_threads(rng, restore_threads):
    T, D, E, k = 3000, 12, 64, 4
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=0.1, router_z_loss_coeff=0.01)
    router = mr.ExpertRouter(cfg, D, gate="hierarchical", group_top_k=3)
    h = rng.normal(size=(T, D)).astype(np.float32)
    mask = rng.random(T) > 0.2
    dec = router.route_tokens(h, token_mask=mask)
    g = rng.normal(size=(T, k))
    gh, ggw, gew = same_at_thread_counts(lambda: router.backward(dec, g), restore_threads)
    assert gh.dtype == ggw.dtype == gew.dtype == np.float32
    assert not gh[~mask].any() and gh[mask].any()
    with pytest.raises(mr.InputError, match="grad_expert_weights"):
        router.backward(dec, g[:, :1])
    with pytest.raises(mr.ConfigError, match="not routed from hidden states"):
        mr._core.router_backward(mr.route_logits(rng.normal(size=(10, E)), cfg))

"""``score_function="sqrtsoftplus"``: scores ``sqrt(softplus(z))`` handled like sigmoid.

Against the sequential reference (tests/reference.py, which scores with
``sqrt(logaddexp(0, z))``): selection on scores plus bias, weights the unbiased
scores (renormalized with ``normalize_weights``), ``P_e`` the scores normalized
over all E; group limits, masks, capacity; ``return_probs``; the hidden-state
path; the backward against a NumPy formula and finite differences; Megatron-Core's
``topk_routing_with_score_function`` when the installed version has it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router import presets
from helpers import logsumexp, route_json, sigmoid, softmax
from reference import reference_route
from test_reference_parity import assert_parity, random_logits


def sqrt_softplus(z: np.ndarray) -> np.ndarray:
    return np.sqrt(np.logaddexp(0.0, np.asarray(z, dtype=np.float64)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(1, 70), e=st.sampled_from([4, 8, 12, 64]),
       k=st.integers(1, 4), normalize=st.booleans(), bias=st.booleans(), groups=st.booleans(),
       cf=st.sampled_from([None, 1.0, 1.25]), policy=st.sampled_from(["position", "probs", "rank", "bpr"]))
def test_matches_the_reference(seed, t, e, k, normalize, bias, groups, cf, policy) -> None:
    rng = np.random.default_rng(seed)
    kw = {}
    if groups:
        kw = dict(num_groups=4, group_top_k=2, group_score="top2_sum" if e >= 8 else "max")
    k = min(k, e // 2 if groups else e)
    cfg = mr.RouterConfig(num_experts=e, top_k=k, score_function="sqrtsoftplus", normalize_weights=normalize,
                          capacity_factor=cf, drop_policy=policy, weight_scale=2.5, **kw)
    logits = random_logits(rng, (t, e), dtype=np.float64, neg_inf=0.05)
    call = {"training": True}
    if bias:
        call["expert_bias"] = rng.normal(scale=0.3, size=e)
    mask = rng.random(t) < 0.9
    call["token_mask"] = mask
    dec = mr.route_logits(logits, cfg, **call)
    assert_parity(dec, reference_route(logits, cfg, **call))


def test_weights_probs_and_balance_loss_by_formula() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 8)) * 3
    cfg = mr.RouterConfig(num_experts=8, top_k=2, score_function="sqrtsoftplus", normalize_weights=False,
                          capacity_factor=None)
    dec = mr.route_logits(z, cfg, return_probs=True)
    s = sqrt_softplus(z)
    np.testing.assert_allclose(dec.router_probs, s, rtol=1e-6)
    order = np.argsort(-s, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(dec.expert_indices, order)
    np.testing.assert_allclose(dec.expert_weights, np.take_along_axis(s, order, 1), rtol=1e-6)
    p = (s / s.sum(1, keepdims=True)).mean(0)
    f = np.bincount(order.ravel(), minlength=8) / order.size
    np.testing.assert_allclose(dec.load_balance_loss, 8 * (f * p).sum(), rtol=1e-9)


def test_extreme_logits_stay_finite_and_exact() -> None:
    # softplus(z) = z above 37 to float64 precision; e^(z/2) far below, where e^z underflows.
    z = np.array([[1e4, 0.0, -1e4, -50.0], [-1400.0, -1401.0, -1500.0, -np.inf], [-800.0, -760.0, -745.5, -744.0]])
    cfg = mr.RouterConfig(num_experts=4, top_k=2, score_function="sqrtsoftplus", normalize_weights=True,
                          capacity_factor=None)
    dec = mr.route_logits(z, cfg)
    assert np.isfinite(dec.expert_weights).all() and np.isfinite(dec.load_balance_loss)
    np.testing.assert_array_equal(dec.expert_indices, [[0, 1], [0, 1], [3, 2]])
    w1 = 1 / (1 + np.exp(-0.5))  # e^(-700) / (e^(-700) + e^(-700.5))
    np.testing.assert_allclose(dec.expert_weights[1], [w1, 1 - w1], rtol=1e-6)
    w2 = 1 / (1 + np.exp(-0.75))
    np.testing.assert_allclose(dec.expert_weights[2], [w2, 1 - w2], rtol=1e-6)


def test_hidden_state_path_equals_the_logits_path() -> None:
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(300, 16))
    w, b = rng.normal(size=(16, 8)) / 4, rng.normal(size=8)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, score_function="sqrtsoftplus", normalize_weights=True)
    router = mr.ExpertRouter(cfg, 16, weight=w, bias=b, gate="linear")
    got = router.route_tokens(hidden, training=True)
    want = mr.route_logits(hidden @ w + b, cfg, training=True)
    np.testing.assert_array_equal(got.expert_indices, want.expert_indices)
    np.testing.assert_array_equal(got.kept, want.kept)
    np.testing.assert_allclose(got.expert_weights, want.expert_weights, rtol=1e-6)
    np.testing.assert_allclose(got.load_balance_loss, want.load_balance_loss, rtol=1e-9)


def numpy_backward(z, dec, g_w, g_aux, cfg) -> np.ndarray:
    """d(sum g_w * w + g_aux * aux)/dz for sqrtsoftplus scores (normalized weights, no drops)."""
    t, e = z.shape
    k = cfg.top_k
    s = sqrt_softplus(z)
    slope = sigmoid(z) / (2 * s)
    idx = dec.expert_indices
    ds = np.zeros_like(z)
    for i in range(t):
        chosen = s[i, idx[i]]
        total = chosen.sum()
        for j in range(k):
            ds[i, idx[i, j]] += cfg.weight_scale * (g_w[i, j] / total - (g_w[i] * chosen).sum() / total**2)
    # Balance loss through q = s / sum(s), counts constant.
    n = dec.pre_drop_tokens_per_expert.astype(float)
    dq = g_aux * cfg.load_balance_loss_coeff * e * n / (k * t * t)
    total = s.sum(1, keepdims=True)
    q = s / total
    ds += (dq[None, :] - (q * dq[None, :]).sum(1, keepdims=True)) / total
    dz = ds * slope
    dz += g_aux * cfg.router_z_loss_coeff * 2 / t * logsumexp(z)[:, None] * softmax(z)
    return dz


def test_backward_matches_numpy_and_finite_differences() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(40, 6)) * 2
    cfg = mr.RouterConfig(num_experts=6, top_k=2, score_function="sqrtsoftplus", normalize_weights=True,
                          capacity_factor=None, weight_scale=1.5, load_balance_loss_coeff=0.3,
                          router_z_loss_coeff=0.05)
    g_w = rng.normal(size=(40, 2))
    dec = mr.route_logits(z, cfg, training=True)
    grad = dec.backward(grad_expert_weights=g_w, grad_auxiliary_loss=0.7)
    np.testing.assert_allclose(grad, numpy_backward(z, dec, g_w, 0.7, cfg), rtol=1e-9, atol=1e-12)

    def objective(x):
        d = mr.route_logits(x, cfg, training=True)
        assert (d.expert_indices == dec.expert_indices).all()  # the selection is piecewise constant
        return (g_w * d.expert_weights.astype(np.float64)).sum() + 0.7 * d.auxiliary_loss

    h = 1e-3
    for i, j in [(0, 0), (3, 2), (17, 5), (39, 1)]:
        up, down = z.copy(), z.copy()
        up[i, j] += h
        down[i, j] -= h
        fd = (objective(up) - objective(down)) / (2 * h)
        assert abs(fd - grad[i, j]) < 1e-4 + 1e-3 * abs(grad[i, j]), (i, j, fd, grad[i, j])


def test_megatron_preset_accepts_sqrtsoftplus() -> None:
    cfg = presets.megatron(16, 2, moe_router_score_function="sqrtsoftplus", moe_router_enable_expert_bias=True)
    assert (cfg.score_function, cfg.normalize_weights) == ("sqrtsoftplus", True)
    assert presets.megatron(16, 1, moe_router_score_function="sqrtsoftplus").normalize_weights is False
    with pytest.raises(mr.ConfigError, match="sqrtsoftplus"):
        presets.megatron(16, 2, moe_router_score_function="softmax", moe_router_enable_expert_bias=True)


def test_cli_accepts_sqrtsoftplus(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys, "--score-function", "sqrtsoftplus", "--normalize-weights")
    assert report["config"]["score_function"] == "sqrtsoftplus"


def test_against_megatron_topk_routing() -> None:
    torch = pytest.importorskip("torch")
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    rng = np.random.default_rng(4)
    z = rng.normal(size=(512, 16)).astype(np.float32) * 2
    bias = rng.normal(scale=0.1, size=16).astype(np.float32)
    try:
        probs, routing_map = moe_utils.topk_routing_with_score_function(
            torch.from_numpy(z), 4, score_function="sqrtsoftplus", expert_bias=torch.from_numpy(bias))
    except ValueError as exc:
        pytest.skip(f"this Megatron-Core has no sqrtsoftplus: {exc}")
    cfg = presets.megatron(16, 4, moe_router_score_function="sqrtsoftplus", expert_bias=bias.tolist())
    dec = mr.route_logits(z, cfg)
    mine = np.zeros((512, 16), dtype=bool)
    np.put_along_axis(mine, dec.expert_indices, True, 1)
    np.testing.assert_array_equal(mine, routing_map.numpy())
    np.testing.assert_allclose(np.take_along_axis(probs.numpy(), dec.expert_indices, 1), dec.expert_weights,
                               rtol=1e-5)


@pytest.mark.parametrize(("precision", "bias"), [("float32", False), ("float32", True), ("float32_logits", False)])
def test_float32_score_precision_scores_sqrtsoftplus(precision, bias) -> None:
    # The peers' float32 arithmetic: s = float32(sqrt(softplus(z))), ranked by s (+ bias)
    # in float32 for "float32" (by the logits otherwise, without bias), weights
    # s / (sum of the chosen s + 1e-20); router_probs are s.
    rng = np.random.default_rng(11)
    t, e, k = 300, 16, 4
    z = (rng.normal(size=(t, e)) * 3).astype(np.float32)
    call = {"return_probs": True}
    if bias:
        call["expert_bias"] = rng.normal(scale=0.2, size=e).astype(np.float32)
    cfg = mr.RouterConfig(num_experts=e, top_k=k, score_function="sqrtsoftplus", normalize_weights=True,
                          capacity_factor=None, score_precision=precision)
    dec = mr.route_logits(z, cfg, **call)
    s = sqrt_softplus(z).astype(np.float32)
    keys = s + call["expert_bias"] if bias else (s if precision == "float32" else z)
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(dec.expert_indices, order)
    chosen = np.take_along_axis(s, order, 1)
    want = chosen / (chosen.sum(axis=1, keepdims=True, dtype=np.float32) + np.float32(1e-20))
    np.testing.assert_allclose(dec.expert_weights, want, rtol=2e-7)
    np.testing.assert_array_equal(dec.router_probs, s)  # the scores themselves, as for sigmoid
    # The float64 scores route the same and weigh within float32 rounding.
    exact = mr.route_logits(z, cfg.replace(score_precision="float64"), **call)
    np.testing.assert_array_equal(dec.expert_indices, exact.expert_indices)
    np.testing.assert_allclose(dec.expert_weights, exact.expert_weights, rtol=1e-6)


def test_megatron_preset_sqrtsoftplus_weights_are_not_a_softmax() -> None:
    rng = np.random.default_rng(12)
    z = (rng.normal(size=(256, 16)) * 2).astype(np.float32)
    bias = rng.normal(scale=0.1, size=16).astype(np.float32)
    cfg = presets.megatron(16, 4, moe_router_score_function="sqrtsoftplus", expert_bias=bias.tolist())
    dec = mr.route_logits(z, cfg)
    s = sqrt_softplus(z).astype(np.float32)
    order = np.argsort(-(s + bias), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(dec.expert_indices, order)
    chosen = np.take_along_axis(s, order, 1)
    np.testing.assert_allclose(dec.expert_weights, chosen / (chosen.sum(axis=1, keepdims=True) + 1e-20), rtol=2e-7)

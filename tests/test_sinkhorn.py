"""``RouterConfig(routing="sinkhorn")``: Megatron-Core's Sinkhorn (S-BASE) routing.

A sequential float64 NumPy reference of the iteration (row maximum subtracted
before ``exp``, Megatron's ``+1e-8`` updates and stopping rule, an iteration
cap) gives the selection exactly and the weights to 1e-6; hypothesis checks the
balance it reaches, large logits, thread-count invariance and the cap;
evaluation is the plain top-k of the activation; bad configurations raise
``ConfigError`` naming the field; the CLI routes it with ``--training``; the
backward flows through the activation only; Megatron's own ``sinkhorn`` (peers
venv) agrees on the peer vectors and the real router logits.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Tuple

import numpy as np
import pytest
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st

import moe_router as mr
from helpers import route_json, sigmoid, softmax
from moe_router import presets

#: The reference is slow: report the failing example as found, without shrinking it.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
REAL = "/work/shared/data/real_router/minilm_l5.npz"
PEER = "/work/shared/peers/vectors/k8_e64.npz"


def reference_sinkhorn(z: np.ndarray, mask: Optional[np.ndarray], tol: float, cap: int
                       ) -> Tuple[np.ndarray, int, bool]:
    """The balanced ``[T, E]`` matrix (0 for masked rows), iterations, converged: plain loops, float64."""
    t, e = z.shape
    active = np.ones(t, bool) if mask is None else mask
    cost = np.zeros((t, e))
    for i in np.flatnonzero(active):
        row = z[i].astype(np.float64)
        cost[i] = np.exp(row - row.max())
    n = int(active.sum())
    d0, d1 = np.zeros(t), np.ones(e)
    iterations, converged = 0, n == 0
    while n and iterations < cap:
        iterations += 1
        d0 = np.where(active, (1.0 / n) * (1.0 / (cost @ d1 + 1e-8)), 0.0)
        new = (1.0 / e) * (1.0 / (cost.T @ d0 + 1e-8))
        change = float(np.abs(new - d1).mean())
        d1 = new
        if change <= tol:
            converged = True
            break
    return d1[None, :] * cost * d0[:, None], iterations, converged


def reference_route(z, k, mask=None, tol=1e-4, cap=1000, cf=None, scale=1.0):
    """Indices, weights (0 where dropped), kept, iterations, converged of Sinkhorn training routing
    (``drop_policy="position"``, exact capacity)."""
    t, e = z.shape
    balanced, iterations, converged = reference_sinkhorn(z, mask, tol, cap)
    active = np.ones(t, bool) if mask is None else mask
    act = sigmoid(z) if k == 1 else softmax(z)
    indices = np.tile(np.arange(k), (t, 1))
    weights, kept = np.zeros((t, k)), np.zeros((t, k), bool)
    n = int(active.sum())
    capacity = math.inf if cf is None else math.ceil(Fraction(str(cf)) * n * k / e)
    load = np.zeros(e, int)
    for i in np.flatnonzero(active):
        keys = np.where(np.isneginf(z[i]), -np.inf, balanced[i])
        indices[i] = np.argsort(-keys, kind="stable")[:k]  # ties to the lower expert
        for j, x in enumerate(indices[i]):
            if np.isfinite(z[i, x]) and load[x] < capacity:
                load[x] += 1
                kept[i, j] = True
                weights[i, j] = act[i, x] * scale
    return indices, weights, kept, iterations, converged


def logits_strategy():
    return st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 300), st.sampled_from([2, 4, 8, 16, 64]),
                     st.floats(0.5, 6.0))


def make_logits(seed, t, e, spread, neg_inf=0.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(t, e)) * spread + np.linspace(2.0, 0.0, e)  # skewed toward low experts
    if neg_inf:
        z[rng.random((t, e)) < neg_inf] = -np.inf
        z[np.isneginf(z).all(1), 0] = 0.0
    return z


def config(e, k, **kw):
    return mr.RouterConfig(num_experts=e, top_k=min(k, e), routing="sinkhorn", **{"capacity_factor": None, **kw})


@settings(max_examples=40, deadline=None, phases=NO_SHRINK)
@given(case=logits_strategy(), k=st.integers(1, 4), masked=st.booleans(), cf=st.sampled_from([None, 1.0, 1.5]),
       neg_inf=st.sampled_from([0.0, 0.1]))
def test_matches_the_sequential_reference(case, k, masked, cf, neg_inf) -> None:
    seed, t, e, spread = case
    k = min(k, e)
    z = make_logits(seed, t, e, spread, neg_inf)
    mask = np.random.default_rng(seed + 1).random(t) < 0.8 if masked else None
    cfg = config(e, k, capacity_factor=cf, weight_scale=1.5)
    dec = mr.route_logits(z, cfg, training=True, token_mask=mask)
    idx, w, kept, iterations, converged = reference_route(z, k, mask, cf=cf, scale=1.5)
    active = np.ones(t, bool) if mask is None else mask
    np.testing.assert_array_equal(dec.expert_indices[active], idx[active])
    np.testing.assert_array_equal(dec.kept, kept)
    np.testing.assert_allclose(dec.expert_weights, w, rtol=1e-6, atol=1e-7)
    assert (dec.sinkhorn_iterations, dec.sinkhorn_converged) == (iterations, converged)


@settings(max_examples=30, deadline=None, phases=NO_SHRINK)
@given(case=logits_strategy())
def test_balance_after_convergence(case) -> None:
    # Megatron's tolerance: the 1e-8 terms make (d0, d1) drift slowly along their
    # scale, so a much smaller tolerance may never be met.
    tol = 1e-4
    seed, t, e, spread = case
    t = max(t, 4 * e)  # columns of a few tokens are within 1e-8 / (their mass) of 1/E only
    z = make_logits(seed, t, e, spread)
    balanced, iterations, converged = reference_sinkhorn(z, None, tol, 5000)
    dec = mr.route_logits(z, config(e, 1, sinkhorn_tolerance=tol, sinkhorn_max_iterations=5000), training=True)
    assert (dec.sinkhorn_iterations, dec.sinkhorn_converged) == (iterations, converged)
    # A few skewed inputs (8 tokens of 2 experts at spread 6, seed 1720) do not reach the
    # tolerance in 5000 iterations, in the reference either; the balance below needs it.
    assume(converged)
    # Columns sum to (1/E) S_e / (S_e + 1e-8) (S_e the column's scaled mass, as low as
    # about 1e-3 for wide skewed rows); rows to 1/T up to the last change of d1.
    np.testing.assert_allclose(balanced.sum(0) * e, 1.0, atol=1e-4)
    np.testing.assert_allclose(balanced.sum(1) * t, 1.0, atol=50 * tol)


@settings(max_examples=20, deadline=None, phases=NO_SHRINK)
@given(case=logits_strategy(), scale=st.sampled_from([1e2, 1e3, 1e4]), k=st.integers(1, 3))
def test_large_logits_do_not_overflow(case, scale, k) -> None:
    seed, t, e, _ = case
    z = np.clip(np.random.default_rng(seed).normal(size=(t, e)) * scale, -1e4, 1e4).astype(np.float32)
    dec = mr.route_logits(z, config(e, k), training=True)
    assert np.isfinite(dec.expert_weights).all() and np.isfinite(dec.load_balance_loss)
    assert dec.sinkhorn_iterations >= 1
    idx, w, _, iterations, _ = reference_route(z.astype(np.float64), min(k, e))
    # Clipping makes equal logits, and experts whose balanced scores are equal in exact
    # arithmetic differ only by summation order (BLAS here, fixed chunks in the core).
    # Where the reference's choices are near-tied (1e-12 relative) either order is right;
    # the chosen experts' balanced scores must still be the reference's best ones.
    balanced, _, _ = reference_sinkhorn(z.astype(np.float64), None, 1e-4, 1000)
    rows = np.arange(t)[:, None]
    np.testing.assert_allclose(balanced[rows, dec.expert_indices], balanced[rows, idx], rtol=1e-12, atol=0)
    differ = (dec.expert_indices != idx).any(axis=1)
    near_tie = np.isclose(balanced[rows, idx][:, :, None], balanced[:, None, :], rtol=1e-12, atol=0)  # [T, k, E]
    assert (near_tie.sum(axis=2) > 1).any(axis=1)[differ].all(), "a selection differs without a near-tie"
    assert dec.sinkhorn_iterations == iterations


def test_thread_count_invariance() -> None:
    z = make_logits(7, 5000, 64, 2.0)
    cfg = config(64, 2, capacity_factor=1.0)
    before = mr.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            mr.set_num_threads(n)
            results.append(mr.route_logits(z, cfg, training=True))
    finally:
        mr.set_num_threads(before)
    for d in results[1:]:
        np.testing.assert_array_equal(d.expert_indices, results[0].expert_indices)
        np.testing.assert_array_equal(d.expert_weights, results[0].expert_weights)
        assert d.sinkhorn_iterations == results[0].sinkhorn_iterations


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_iteration_cap_is_honoured_and_reported(cap) -> None:
    z = make_logits(3, 400, 8, 3.0)
    cfg = config(8, 2, sinkhorn_tolerance=1e-300, sinkhorn_max_iterations=cap)
    dec = mr.route_logits(z, cfg, training=True)
    assert (dec.sinkhorn_iterations, dec.sinkhorn_converged) == (cap, False)
    idx, _, _, iterations, converged = reference_route(z, 2, tol=1e-300, cap=cap)
    np.testing.assert_array_equal(dec.expert_indices, idx)
    assert dec.to_dict()["sinkhorn_iterations"] == cap


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eval_is_plain_top_k_of_the_activation(k) -> None:
    z = make_logits(4, 300, 8, 2.0)
    dec = mr.route_logits(z, config(8, k, weight_scale=2.0))
    act = sigmoid(z) if k == 1 else softmax(z)
    idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(dec.expert_indices, idx)
    np.testing.assert_allclose(dec.expert_weights, 2.0 * np.take_along_axis(act, idx, 1), rtol=1e-6)
    assert dec.sinkhorn_iterations is None and dec.sinkhorn_converged is None
    token_choice = mr.route_logits(z, mr.RouterConfig(num_experts=8, top_k=k, capacity_factor=None))
    assert token_choice.sinkhorn_iterations is None


def test_training_spreads_a_skewed_load() -> None:
    z = make_logits(5, 2000, 16, 1.0)
    z[:, 0] += 5.0
    cfg = config(16, 1)
    train, evaluate = mr.route_logits(z, cfg, training=True), mr.route_logits(z, cfg)
    assert evaluate.tokens_per_expert[0] > 1500
    assert train.tokens_per_expert.max() < 2 * 2000 / 16


def test_masked_tokens_are_excluded() -> None:
    z = make_logits(6, 600, 8, 2.0)
    mask = np.random.default_rng(0).random(600) < 0.7
    full = mr.route_logits(z, config(8, 2), training=True, token_mask=mask)
    alone = mr.route_logits(z[mask], config(8, 2), training=True)
    np.testing.assert_array_equal(full.expert_indices[mask], alone.expert_indices)
    np.testing.assert_array_equal(full.tokens_per_expert, alone.tokens_per_expert)
    assert full.sinkhorn_iterations == alone.sinkhorn_iterations
    assert not full.kept[~mask].any()


def test_hidden_state_path() -> None:
    rng = np.random.default_rng(8)
    hidden, w = rng.normal(size=(700, 12)), rng.normal(size=(12, 8)) / 3
    cfg = config(8, 2)
    got = mr.ExpertRouter(cfg, 12, weight=w, gate="linear").route_tokens(hidden, training=True)
    want = mr.route_logits(hidden @ w, cfg, training=True)
    np.testing.assert_array_equal(got.expert_indices, want.expert_indices)
    assert got.sinkhorn_iterations == want.sinkhorn_iterations


@pytest.mark.parametrize("k", [1, 2])
def test_backward_flows_through_the_activation(k) -> None:
    rng = np.random.default_rng(9)
    z = rng.normal(size=(50, 6)) * 2
    cfg = config(6, k, weight_scale=1.5, load_balance_loss_coeff=0.0, router_z_loss_coeff=0.0)
    dec = mr.route_logits(z, cfg, training=True)
    g = rng.normal(size=(50, k))
    grad = dec.backward(grad_expert_weights=g)
    gs = np.zeros_like(z)
    np.put_along_axis(gs, dec.expert_indices, 1.5 * g, 1)
    if k == 1:
        s = sigmoid(z)
        want = gs * s * (1 - s)
    else:
        p = softmax(z)
        want = p * (gs - (gs * p).sum(1, keepdims=True))
    np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-12)
    h, (i, j) = 1e-3, (7, 3)
    up, down = z.copy(), z.copy()
    up[i, j] += h
    down[i, j] -= h
    f = [(g * mr.route_logits(x, cfg, training=True).expert_weights).sum() for x in (up, down)]
    assert abs((f[0] - f[1]) / (2 * h) - grad[i, j]) < 1e-4 + 1e-3 * abs(grad[i, j])


@pytest.mark.parametrize("field, value", [
    ("sinkhorn_tolerance", 0.0), ("sinkhorn_tolerance", -1.0), ("sinkhorn_tolerance", float("nan")),
    ("sinkhorn_tolerance", "1e-4"), ("sinkhorn_max_iterations", 0), ("sinkhorn_max_iterations", 2.5),
    ("sinkhorn_max_iterations", True), ("normalize_weights", True), ("score_function", "sigmoid"),
    ("num_groups", 2), ("expert_bias", [0.0] * 8), ("jitter_eps", 0.1), ("noise_std", 0.5),
])
def test_bad_configuration_names_the_field(field, value) -> None:
    extra = {"group_top_k": 1} if field == "num_groups" else {}
    with pytest.raises(mr.ConfigError, match=field):
        mr.RouterConfig(num_experts=8, top_k=2, routing="sinkhorn", **{field: value}, **extra)


def test_call_bias_is_refused() -> None:
    with pytest.raises(mr.ConfigError, match="expert_bias"):
        mr.route_logits(np.zeros((4, 8)), config(8, 2), training=True, expert_bias=np.zeros(8))


def test_bad_logits_are_reported_as_for_token_choice() -> None:
    z = np.zeros((5, 8))
    z[3, 2] = np.nan
    with pytest.raises(mr.InputError, match="token 3"):
        mr.route_logits(z, config(8, 2), training=True)


def test_megatron_preset_maps_sinkhorn() -> None:
    cfg = presets.megatron(8, 2, moe_router_load_balancing_type="sinkhorn")
    assert (cfg.routing, cfg.load_balance_loss_coeff, cfg.normalize_weights) == ("sinkhorn", 0.0, False)
    with pytest.raises(mr.ConfigError, match="moe_aux_loss_coeff"):
        presets.megatron(8, 2, moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.01)


def test_cli_routes_sinkhorn_in_training_mode(capsys: pytest.CaptureFixture) -> None:
    train = route_json(capsys, "--router", "sinkhorn", "--training", "--capacity-factor", "none")
    assert train["config"]["training"] is True and train["sinkhorn_iterations"] >= 1
    assert train["sinkhorn_converged"] is True
    evaluate = route_json(capsys, "--router", "sinkhorn")
    assert evaluate["config"]["training"] is False and evaluate["sinkhorn_iterations"] is None


def megatron_agreement(z: np.ndarray, k: int) -> Tuple[int, int]:
    """Rows where Megatron's ``sinkhorn`` + ``topk`` (float32, no max subtraction) picks our experts."""
    torch = pytest.importorskip("torch")
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    balanced = moe_utils.sinkhorn(torch.from_numpy(z.astype(np.float32)))
    theirs = torch.topk(balanced, k, dim=1).indices.numpy()
    ours = mr.route_logits(z, config(z.shape[1], k), training=True).expert_indices
    same = (np.sort(theirs, 1) == np.sort(ours, 1)).all(1)
    return int(same.sum()), len(z)


# Megatron's loop has no cap: on logits_e8 (logits up to 50) it did not stop within 9 minutes.
@pytest.mark.parametrize("source, key, k", [(PEER, "logits", 8), (PEER, "logits", 1), (REAL, "logits_e64", 2),
                                            (REAL, "logits_e256", 2)])
def test_agrees_with_megatron_sinkhorn(source, key, k) -> None:
    z = np.load(source)[key][:4096]
    same, total = megatron_agreement(z, k)
    print(f"{source.rsplit('/', 1)[-1]}[{key}] k={k}: {same} of {total} rows agree with Megatron")
    assert same >= 0.99 * total


def test_the_hierarchical_gate_is_refused_and_auto_picks_the_linear_router() -> None:
    cfg = mr.RouterConfig(num_experts=64, top_k=2, routing="sinkhorn", capacity_factor=None)
    with pytest.raises(mr.ConfigError, match="invalid gate: routing='sinkhorn' balances logits"):
        mr.ExpertRouter(cfg, 16, gate="hierarchical")
    router = mr.ExpertRouter(cfg, 16)  # gate="auto", E > 32
    assert router.gate is None and router.weight.shape == (16, 64)
    dec = router.route_tokens(np.random.default_rng(0).normal(size=(256, 16)), training=True)
    assert dec.sinkhorn_iterations is not None and dec.sinkhorn_iterations >= 1

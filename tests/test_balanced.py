"""``routing="balanced"`` (BASE layers): the exact balanced assignment, fairseq's
auction (the ``"base"`` preset), greedy top-1 in evaluation.

The references are in ``balanced_reference.py``: the optimum by
``scipy.optimize.linear_sum_assignment``, a NumPy transcription of fairseq's
auction, a greedy fill in token order.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from balanced_reference import auction_experts, greedy_experts, optimum, optimum_k, total
from helpers import balance_json, route_json

pytest.importorskip("scipy.optimize")


def cfg(E: int, k: int = 1, **kw) -> mr.RouterConfig:
    return mr.RouterConfig(num_experts=E, top_k=k, routing="balanced", **kw)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def check_balanced(dec: mr.RoutingDecision, E: int, mask: Optional[np.ndarray] = None) -> None:
    """Exactly T_active/E per expert, every active token kept, slots in token order."""
    T = dec.expert_indices.shape[0]
    active = np.ones(T, bool) if mask is None else mask
    share = int(active.sum()) // E
    idx = dec.expert_indices[:, 0]
    assert np.array_equal(dec.kept[:, 0], active)
    assert np.array_equal(dec.tokens_per_expert, np.full(E, share))
    assert np.array_equal(dec.pre_drop_tokens_per_expert, np.full(E, share))
    assert dec.capacity == share and not dec.dropless
    assert dec.dropped_assignments == 0 and dec.tokens_dropped == 0
    for e in range(E):
        tokens = np.flatnonzero(active & (idx == e))
        assert np.array_equal(dec.expert_slots[tokens, 0], np.arange(share))
    assert np.all(dec.expert_slots[~active, 0] == -1)
    assert np.all(dec.expert_weights[~active] == 0)


shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1), st.booleans())
def test_exact_is_the_optimum(shape, seed, integer) -> None:
    E, share = shape
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(E * share, E)).astype(np.float64) if integer else rng.normal(size=(E * share, E))
    dec = mr.route_logits(x, cfg(E), training=True)
    check_balanced(dec, E)
    idx = dec.expert_indices[:, 0].astype(np.int64)
    got = total(x, idx)
    assert got == pytest.approx(optimum(x), rel=1e-12, abs=1e-12)
    assert got >= total(x, greedy_experts(x)) - 1e-12
    if E > 1:  # fairseq's top-(T/E + 1) needs E >= 2
        assert got >= total(x, auction_experts(x)) - 1e-12
    np.testing.assert_allclose(dec.expert_weights[:, 0], softmax(x)[np.arange(len(x)), idx], rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_exact_with_k_distinct_experts_is_the_optimum(E, share, seed, integer, normalize) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, E + 1))
    T = E * share // np.gcd(E, k)  # T * k divisible by E
    x = rng.integers(-3, 4, size=(T, E)).astype(np.float64) if integer else rng.normal(size=(T, E))
    dec = mr.route_logits(x, cfg(E, k, normalize_weights=normalize), training=True)
    idx = dec.expert_indices.astype(np.int64)
    assert all(len(set(row)) == k for row in idx.tolist())
    assert np.array_equal(np.bincount(idx.reshape(-1), minlength=E), np.full(E, T * k // E))
    assert dec.kept.all() and dec.capacity == T * k // E
    # ranks: logit descending, the lower expert first on ties
    for row, xs in zip(idx.tolist(), x):
        assert row == sorted(row, key=lambda e: (-xs[e], e))
    got = float(np.take_along_axis(x, idx, axis=1).sum())
    assert got == pytest.approx(optimum_k(x, k), rel=1e-9, abs=1e-9)
    w = np.take_along_axis(softmax(x), idx, axis=1)
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dec.expert_weights, w, rtol=1e-6)
    for e in range(E):
        rows, ranks = np.nonzero(idx == e)
        assert np.array_equal(dec.expert_slots[rows, ranks], np.arange(len(rows)))


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]), st.booleans())
def test_base_preset_reproduces_fairseq(shape, seed, dtype, integer) -> None:
    E, share = shape
    E += 1  # fairseq's topk of T/E + 1 needs E >= 2
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(E * share, E)) if integer else rng.normal(size=(E * share, E))
    x = x.astype(dtype)
    dec = mr.route_logits(x, mr.preset("base", E), training=True)
    check_balanced(dec, E)
    want = auction_experts(x)
    assert np.array_equal(dec.expert_indices[:, 0], want)
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(dec.expert_weights[:, 0], sigmoid[np.arange(len(x)), want], rtol=1e-6)
    assert dec.auxiliary_loss == 0


def test_auction_on_real_logits_matches_transcription(real_logits) -> None:
    x = real_logits("minilm_l5.npz", 8)[:2048]
    dec = mr.route_logits(x, mr.preset("base", 8), training=True)
    assert np.array_equal(dec.expert_indices[:, 0], auction_experts(x))
    exact = mr.route_logits(x, cfg(8), training=True).expert_indices[:, 0]
    assert total(x, exact) >= total(x, dec.expert_indices[:, 0])


def test_non_finite_scores_in_the_auction_take_the_finite_minimum() -> None:
    x = np.array([[0.0, -np.inf], [1.0, 2.0], [3.0, -np.inf], [0.5, 0.25]], np.float32)
    dec = mr.route_logits(x, mr.preset("base", 2), training=True)
    assert np.array_equal(dec.expert_indices[:, 0], auction_experts(x))


def test_ties_fill_experts_in_token_order() -> None:
    dec = mr.route_logits(np.zeros((6, 3)), cfg(3), training=True)
    assert dec.expert_indices[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    # Two tokens tie for expert 0; the lower one keeps it, the other moves.
    x = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert mr.route_logits(x, cfg(2), training=True).expert_indices[:, 0].tolist() == [0, 1]


def test_float32_input_is_solved_exactly_as_widened() -> None:
    x = np.random.default_rng(3).normal(size=(96, 8)).astype(np.float32)
    a = mr.route_logits(x, cfg(8), training=True)
    b = mr.route_logits(x.astype(np.float64), cfg(8), training=True)
    assert np.array_equal(a.expert_indices, b.expert_indices)
    assert total(x, a.expert_indices[:, 0]) == pytest.approx(optimum(x), rel=1e-12)


def test_masked_tokens_are_excluded() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4))
    mask = np.ones(30, bool)
    mask[[1, 7, 8, 20, 29, 3]] = False
    dec = mr.route_logits(x, cfg(4), training=True, token_mask=mask)
    check_balanced(dec, 4, mask)
    alone = mr.route_logits(x[mask], cfg(4), training=True)
    assert np.array_equal(dec.expert_indices[mask], alone.expert_indices)


def test_evaluation_is_greedy_top1_without_capacity() -> None:
    x = np.random.default_rng(6).normal(size=(64, 8)) + np.linspace(0, 3, 8)
    dec = mr.route_logits(x, cfg(8), training=False)
    plain = mr.route_logits(x, mr.RouterConfig(num_experts=8, top_k=1, capacity_factor=None), training=False)
    assert np.array_equal(dec.expert_indices, plain.expert_indices)
    assert np.array_equal(dec.expert_weights, plain.expert_weights)
    assert dec.dropless and dec.kept.all()
    top2 = mr.route_logits(x, cfg(8, 2), training=False)
    plain2 = mr.route_logits(x, mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=None), training=False)
    assert np.array_equal(top2.expert_indices, plain2.expert_indices)


def test_thread_count_does_not_change_the_result(restore_threads) -> None:
    x = np.random.default_rng(7).normal(size=(4096, 16)).astype(np.float32)
    restore_threads(1)
    one = [mr.route_logits(x, c, training=True) for c in (cfg(16), mr.preset("base", 16))]
    restore_threads(4)
    four = [mr.route_logits(x, c, training=True) for c in (cfg(16), mr.preset("base", 16))]
    for a, b in zip(one, four):
        assert np.array_equal(a.expert_indices, b.expert_indices)
        assert np.array_equal(a.expert_weights, b.expert_weights)


def test_losses_dispatch_plan_and_backward() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 4))
    dec = mr.route_logits(x, cfg(4, router_z_loss_coeff=0.0), training=True)
    p = softmax(x)
    # f_e = 1/E for every expert, so E * sum_e f_e P_e = sum_e P_e = 1 for softmax.
    assert dec.load_balance_loss == pytest.approx(p.mean(axis=0).sum(), abs=1e-12)
    plan = dec.dispatch_plan()
    assert plan.expert_offsets.tolist() == [0, 10, 20, 30, 40]
    idx = dec.expert_indices[:, 0]
    assert np.array_equal(plan.token_ids, np.argsort(idx, kind="stable"))
    # d(sum g * w)/dx for w = softmax(x)[x_t]: the assignment is a constant.
    g = rng.normal(size=(40, 1))
    grad = dec.backward(grad_expert_weights=g, grad_auxiliary_loss=0.0)
    w = p[np.arange(40), idx]
    onehot = np.eye(4)[idx]
    np.testing.assert_allclose(grad, g * w[:, None] * (onehot - p), atol=1e-12)


def test_bad_input() -> None:
    x = np.zeros((10, 4))
    with pytest.raises(mr.InputError, match="10 active tokens"):
        mr.route_logits(x, cfg(4), training=True)
    mask = np.ones(12, bool)
    mask[0] = False
    with pytest.raises(mr.InputError, match="11 active tokens"):
        mr.route_logits(np.zeros((12, 4)), cfg(4), training=True, token_mask=mask)
    with pytest.raises(mr.ConfigError, match="top_k"):
        cfg(4, 2, balanced_solver="fairseq_auction")
    with pytest.raises(mr.InputError, match="3 active tokens"):
        mr.route_logits(np.zeros((3, 4)), cfg(4, 2), training=True)
    with pytest.raises(mr.ConfigError, match="jitter_eps"):
        cfg(4, jitter_eps=0.1)
    with pytest.raises(mr.ConfigError, match="num_groups"):
        cfg(4, num_groups=2, group_top_k=1)
    nan = np.zeros((8, 4))
    nan[5, 2] = np.nan
    with pytest.raises(mr.InputError, match="token 5"):
        mr.route_logits(nan, cfg(4), training=True)
    # Three tokens can only use expert 0, which has room for two.
    only0 = np.array([[0.0, -np.inf]] * 3 + [[0.0, 0.0]])
    with pytest.raises(mr.InputError, match="no balanced assignment"):
        mr.route_logits(only0, cfg(2), training=True)
    with pytest.raises(mr.ConfigError, match="seq_load_balance_loss_coeff"):
        cfg(4, seq_load_balance_loss_coeff=0.1)
    with pytest.raises(mr.ConfigError, match="top_k"):
        mr.preset("base", 4, 2)
    with pytest.raises(mr.ConfigError, match="base_shuffle"):
        mr.preset("base", 4, base_shuffle=True)


def test_batch_of_sequences_is_one_balanced_batch() -> None:
    x = np.random.default_rng(9).normal(size=(2, 6, 3))
    dec = mr.route_logits(x, cfg(3), training=True)
    flat = mr.route_logits(x.reshape(12, 3), cfg(3), training=True)
    assert np.array_equal(dec.expert_indices.reshape(12, 1), flat.expert_indices)
    assert dec.seq_load_balance_loss is None


def test_config_capacity_is_the_share() -> None:
    assert cfg(4).capacity(40) == 10 and cfg(4).capacity(40, training=False) is None


def test_hidden_states_and_probs() -> None:
    rng = np.random.default_rng(10)
    hidden, weight = rng.normal(size=(32, 6)), rng.normal(size=(6, 4))
    router = mr.ExpertRouter(cfg(4), 6, weight=weight, gate="linear")
    dec = router.route_tokens(hidden, training=True)
    check_balanced(dec, 4)
    direct = mr.route_logits(hidden @ weight, cfg(4), training=True, return_probs=True)
    assert np.array_equal(dec.expert_indices, direct.expert_indices)
    np.testing.assert_allclose(direct.router_probs, softmax(hidden @ weight), rtol=1e-6)
    assert mr.route_logits(hidden @ weight, cfg(4), training=True).router_probs is None


def test_empty_batch() -> None:
    dec = mr.route_logits(np.zeros((0, 4)), cfg(4), training=True)
    assert dec.expert_indices.shape == (0, 1) and dec.tokens_per_expert.tolist() == [0, 0, 0, 0]


def test_cli_route_and_balance(capsys) -> None:
    report = route_json(capsys, "--router", "balanced", "-k", "1")
    assert report["config"]["routing"] == "balanced" and report["dropless"]  # evaluation: greedy top-1
    steps = balance_json(capsys, "--router", "balanced", "-k", "1", "--steps", "2")
    tokens, experts = report["active_tokens"], report["experts"]
    for step in steps["steps"]:
        assert step["max_load"] == tokens // experts and step["dropped_assignments"] == 0

"""``GateNetwork`` (the hierarchical gate) and routing through it, against NumPy references;
plus a vectorized NumPy cross-check of DeepSeek-V3-style group-limited routing on logits."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import pytest

import moe_router as mr
from moe_router import ConfigError, InputError
from helpers import logsumexp, sigmoid, softmax


# --------------------------------------------------------------------------- NumPy reference


def layout(experts: int) -> Tuple[int, int]:
    groups = math.ceil(math.sqrt(experts))
    return groups, math.ceil(experts / groups)


def reference_gate(hidden: np.ndarray, group_weight: np.ndarray, expert_weight: np.ndarray, experts: int,
                   group_top_k: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``p(e) = softmax(x W_group)[g] * softmax(x W_g)[j]`` in float64, for ``[T, D]`` hidden.

    The last group's softmax runs over its real experts only (E not a multiple of P).
    With ``group_top_k = m`` only each token's m best groups (by group logit, ties to the
    lower group) keep their experts' probabilities; the rest are 0. Returns the
    ``[T, E]`` probabilities and the ``[T, G]`` group logits.
    """
    x = hidden.astype(np.float64)
    gw, ew = group_weight.astype(np.float64), expert_weight.astype(np.float64)
    groups, per = layout(experts)
    assert gw.shape == (x.shape[1], groups) and ew.shape == (groups, x.shape[1], per)
    group_logits = x @ gw
    p_group = softmax(group_logits)
    expert_logits = np.einsum("td,gdp->tgp", x, ew)  # [T, G, P]
    sizes = np.minimum(per, experts - per * np.arange(groups))
    real = np.arange(per)[None, :] < sizes[:, None]  # [G, P]: padding columns of the last group
    within = softmax(np.where(real[None], expert_logits, -np.inf))
    probs = (p_group[:, :, None] * within).reshape(x.shape[0], groups * per)[:, real.reshape(-1)]
    if group_top_k is not None:
        best = np.argsort(-group_logits, axis=1, kind="stable")[:, :group_top_k]
        keep = np.zeros((x.shape[0], groups), dtype=bool)
        np.put_along_axis(keep, best, True, axis=1)
        probs = np.where(np.repeat(keep, per, axis=1)[:, :experts], probs, 0.0)
    return probs, group_logits


def computed_mask(gate: mr.GateNetwork, group_logits: np.ndarray, m: int, experts: int) -> np.ndarray:
    per = gate.experts_per_group()
    best = np.argsort(-group_logits, axis=1, kind="stable")[:, :m]
    keep = np.zeros(group_logits.shape, dtype=bool)
    np.put_along_axis(keep, best, True, axis=1)
    return np.repeat(keep, per, axis=1)[:, :experts]


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("experts,groups,per", [
    (1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2), (5, 3, 2), (9, 3, 3), (10, 4, 3), (33, 6, 6), (50, 8, 7),
    (64, 8, 8), (65, 9, 8), (100, 10, 10), (256, 16, 16), (257, 17, 16),
])
def test_layout(experts: int, groups: int, per: int) -> None:
    gate = mr.GateNetwork(8, experts, seed=0)
    assert (gate.num_groups(), gate.experts_per_group()) == (groups, per) == layout(experts)
    assert gate.group_weight.shape == (8, groups) and gate.expert_weight.shape == (groups, 8, per)
    stats = gate.get_hierarchy_stats()
    assert (stats["num_groups"], stats["experts_per_group"], stats["total_experts"]) == (groups, per, experts)
    assert stats["group_top_k"] is None and stats["flop_fraction"] == 1.0


def test_init_is_seeded_normal_with_std_one_over_sqrt_d() -> None:
    gate = mr.GateNetwork(256, 256, seed=3)
    w = np.concatenate([gate.group_weight.ravel(), gate.expert_weight.ravel()]).astype(np.float64)
    assert w.std() * 16 == pytest.approx(1.0, abs=0.01) and abs(w.mean()) < 1e-3
    again = mr.GateNetwork(256, 256, seed=3)
    assert np.array_equal(again.group_weight, gate.group_weight)
    assert np.array_equal(again.expert_weight, gate.expert_weight)
    assert not np.array_equal(mr.GateNetwork(256, 256, seed=4).expert_weight, gate.expert_weight)


# --------------------------------------------------------------------------- dense forward


@pytest.mark.parametrize("experts", [50, 64, 7, 2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batched", [False, True], ids=["TD", "BSD"])
def test_dense_forward_matches_numpy(experts: int, dtype: type, batched: bool) -> None:
    rng = np.random.default_rng(experts)
    d, t = 40, 1100  # 1100 tokens: three chunks of the parallel pass
    gate = mr.GateNetwork(d, experts, seed=5, dtype=dtype)
    hidden = rng.normal(size=(t, d)).astype(dtype)
    x = hidden.reshape(11, 100, d) if batched else hidden
    probs = gate.forward(x)
    assert probs.dtype == dtype and probs.shape == x.shape[:-1] + (experts,)
    assert np.array_equal(gate(x), probs)  # __call__
    want, _ = reference_gate(hidden, gate.group_weight, gate.expert_weight, experts)
    tol = 1e-13 if dtype == np.float64 else 3e-7
    np.testing.assert_allclose(probs.reshape(t, experts), want, rtol=0, atol=tol)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-5)
    assert (probs >= 0).all()


def test_short_last_group_softmax_runs_over_its_real_experts() -> None:
    """E = 50: 8 groups of 7, the last holding one expert, which therefore gets all of
    its group's probability (the 6 padding slots of its group take no share)."""
    gate = mr.GateNetwork(16, 50, seed=1, dtype=np.float64)
    hidden = np.random.default_rng(2).normal(size=(300, 16))
    probs = gate.forward(hidden)
    p_group = softmax(hidden @ gate.group_weight)
    np.testing.assert_allclose(probs[:, 49], p_group[:, 7], rtol=1e-13)
    np.testing.assert_allclose(probs[:, 42:49].sum(axis=1), p_group[:, 6], rtol=1e-13)
    np.testing.assert_allclose(probs.reshape(300, -1)[:, :49].reshape(300, 7, 7).sum(axis=2), p_group[:, :7],
                               rtol=1e-12)


def test_float16_and_non_contiguous_input() -> None:
    gate = mr.GateNetwork(16, 20, seed=1)
    hidden = np.random.default_rng(4).normal(size=(64, 16))
    p16 = gate.forward(hidden.astype(np.float16))
    assert p16.dtype == np.float32
    np.testing.assert_array_equal(p16, gate.forward(hidden.astype(np.float16).astype(np.float32)))
    np.testing.assert_array_equal(gate.forward(np.asfortranarray(hidden)), gate.forward(hidden))
    assert gate.forward(np.zeros((0, 16))).shape == (0, 20)


# --------------------------------------------------------------------------- sparse forward


@pytest.mark.parametrize("experts", [50, 64, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_sparse_equals_dense_on_the_best_groups(experts: int, dtype: type) -> None:
    rng = np.random.default_rng(10 + experts)
    d, t = 32, 1100
    hidden = rng.normal(size=(t, d)).astype(dtype)
    dense_gate = mr.GateNetwork(d, experts, seed=6, dtype=dtype)
    dense = dense_gate.forward(hidden)
    groups = dense_gate.num_groups()
    group_logits = hidden.astype(np.float64) @ dense_gate.group_weight.astype(np.float64)
    for m in sorted({1, 2, groups // 4 or 1, groups - 1, groups}):
        gate = mr.GateNetwork(d, experts, seed=6, group_top_k=m, dtype=dtype)
        assert np.array_equal(gate.group_weight, dense_gate.group_weight)
        sparse = gate.forward(hidden)
        mask = computed_mask(gate, group_logits, m, experts)
        # Exactly the m best groups' experts are computed: 0 elsewhere, the dense value there.
        assert (sparse[~mask] == 0).all(), m
        rtol = 1e-13 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(sparse[mask], dense[mask], rtol=rtol, atol=0, err_msg=f"m={m}")
        assert (sparse[mask] > 0).all()
        # Each row sums to the probability mass of its chosen groups (1 when m = G).
        p_group = softmax(group_logits)
        keep = mask[:, ::gate.experts_per_group()][:, :groups]
        np.testing.assert_allclose(sparse.sum(axis=1), (p_group * keep).sum(axis=1), atol=1e-5)
        want, _ = reference_gate(hidden, gate.group_weight, gate.expert_weight, experts, group_top_k=m)
        np.testing.assert_allclose(sparse, want, rtol=0, atol=1e-13 if dtype == np.float64 else 3e-7)
        if m == groups:
            np.testing.assert_array_equal(sparse, dense)


@pytest.mark.parametrize("m,expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [0, 1, 2, 3])])
def test_sparse_group_ties_go_to_the_lower_group(m: int, expected: list) -> None:
    """E = 16: 4 groups of 4. Group logits [-1, 1, 1, 0.5]: groups 1 and 2 tie."""
    gate = mr.GateNetwork(2, 16, seed=0, group_top_k=m, dtype=np.float64)
    gate.group_weight = np.array([[-1.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    hidden = np.array([[1.0, 0.3], [1.0, -2.0]])
    probs = gate.forward(hidden)
    computed = sorted({e // 4 for e in np.nonzero(probs[0])[0]})
    assert computed == expected
    assert sorted({e // 4 for e in np.nonzero(probs[1])[0]}) == expected
    # All-zero hidden states: every group logit is 0, the m lowest groups win.
    zero = gate.forward(np.zeros((3, 2)))
    assert (zero[:, : 4 * m] > 0).all() and (zero[:, 4 * m:] == 0).all()


def test_sparse_groups_are_ranked_by_group_logit_not_by_rounded_probability() -> None:
    """The sparse gate ranks groups by their float64 softmax probabilities: two different
    group logits whose probabilities round to the same value tie, and the lower group wins
    although the other has the larger logit (documented: "best groups by group logit")."""
    gate = mr.GateNetwork(1, 4, seed=0, group_top_k=1, dtype=np.float64)  # 2 groups of 2
    gate.group_weight = np.array([[0.0, 1e-17]])  # group logits 0 and 1e-17: group 1 is best
    probs = gate.forward(np.ones((1, 1)))
    assert probs[0, 2:].sum() > 0 and (probs[0, :2] == 0).all(), probs


def test_hierarchy_stats_flops() -> None:
    d = 64
    for experts in (64, 256, 16, 9):
        groups, per = layout(experts)
        dense = mr.GateNetwork(d, experts).get_hierarchy_stats()
        assert dense["dense_flops_per_token"] == 2 * d * (groups + experts) == dense["flops_per_token"]
        assert dense["group_router_params"] == d * groups and dense["expert_router_params"] == d * experts
        for m in range(1, groups + 1):
            s = mr.GateNetwork(d, experts, group_top_k=m).get_hierarchy_stats()
            assert s["group_top_k"] == m
            assert s["flop_fraction"] == pytest.approx((groups + m * per) / (groups + experts), rel=1e-12)
            assert s["flops_per_token"] == 2 * d * (groups + m * per)
    # E = 50 (8 groups of 7, the last one short): the stats count the computed (padded) width.
    s = mr.GateNetwork(d, 50, group_top_k=2).get_hierarchy_stats()
    assert s["flop_fraction"] == pytest.approx(s["flops_per_token"] / s["dense_flops_per_token"])
    assert s["flops_per_token"] == 2 * d * (8 + 2 * 7)


@pytest.mark.parametrize("bad", [0, -1, 9, 2.5, True, "2", np.float64(2.0)])
def test_bad_group_top_k(bad) -> None:
    with pytest.raises(ConfigError, match="group_top_k"):
        mr.GateNetwork(16, 64, group_top_k=bad)  # G = 8
    with pytest.raises(ConfigError, match="group_top_k"):
        mr.ExpertRouter(mr.RouterConfig(num_experts=64, top_k=2), 16, gate="hierarchical", group_top_k=bad)


def test_bad_gate_construction_and_input() -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="input_dim"):
            mr.GateNetwork(bad, 8)
        with pytest.raises(ConfigError, match="num_experts"):
            mr.GateNetwork(8, bad)
    with pytest.raises(TypeError, match="dtype"):
        mr.GateNetwork(8, 8, dtype=np.float16)
    gate = mr.GateNetwork(8, 10)
    with pytest.raises(InputError, match=r"\[5, 7\].*8"):
        gate.forward(np.zeros((5, 7)))
    with pytest.raises(InputError, match=r"\[8\]"):
        gate.forward(np.zeros(8))
    with pytest.raises(TypeError, match="int64"):
        gate.forward(np.zeros((5, 8), dtype=np.int64))


# --------------------------------------------------------------------------- routing through the gate


@pytest.mark.parametrize("group_top_k", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "norm"])
def test_hierarchical_router_routes_on_the_gate_probabilities(group_top_k: Optional[int], dtype: type,
                                                               normalize: bool) -> None:
    rng = np.random.default_rng(21)
    experts, d, t, k = 50, 24, 1500, 3
    cfg = mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=1.0, normalize_weights=normalize,
                          enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, d, seed=4, gate="hierarchical", group_top_k=group_top_k)
    gate = router.gate
    assert gate is not None and gate.group_top_k == group_top_k
    hidden = rng.normal(size=(t, d)).astype(dtype)
    mask = rng.random(t) > 0.15
    dec = router.route_tokens(hidden, token_mask=mask)

    # NumPy: the gate, then top-k on the probabilities (ties to the lower expert).
    probs, group_logits = reference_gate(hidden, gate.group_weight, gate.expert_weight, experts, group_top_k)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(dec.expert_indices[mask], top[mask])
    np.testing.assert_array_equal(dec.expert_indices[~mask], np.tile(np.arange(k), ((~mask).sum(), 1)))
    chosen = np.take_along_axis(probs, top, axis=1)
    pre_drop = chosen / chosen.sum(axis=1, keepdims=True) if normalize else chosen
    expected_w = np.where(dec.kept, pre_drop, 0.0)
    np.testing.assert_allclose(dec.expert_weights[mask], expected_w[mask], rtol=1e-5, atol=1e-7)
    assert not dec.kept[~mask].any()
    assert dec.dropped_assignments > 0

    # The whole decision (capacity, slots, drops, counts, P_e) is route_logits on log p:
    # softmax(log p) = p, log 0 = -inf marks the uncomputed experts as not eligible.
    with np.errstate(divide="ignore"):
        log_p = np.log(gate.forward(hidden).astype(np.float64))
    ref = mr.route_logits(log_p, cfg, token_mask=mask)
    for name in ("expert_indices", "expert_slots", "kept", "tokens_per_expert", "pre_drop_tokens_per_expert"):
        np.testing.assert_array_equal(getattr(dec, name), getattr(ref, name), err_msg=name)
    assert (dec.capacity, dec.dropped_assignments, dec.tokens_dropped) == \
        (ref.capacity, ref.dropped_assignments, ref.tokens_dropped)
    if normalize or group_top_k is None:  # softmax(log p) = p / sum(p): the raw sparse weights are p
        np.testing.assert_allclose(dec.expert_weights, ref.expert_weights, rtol=0, atol=1e-7)
    # P_e of the load-balance loss normalizes each token's scores to sum 1.
    np.testing.assert_allclose(dec.expert_prob_mean, ref.expert_prob_mean, rtol=1e-9, atol=1e-15)
    assert dec.load_balance_loss == pytest.approx(ref.load_balance_loss, rel=1e-9)
    # The z-loss is the group router's: mean over active tokens of logsumexp(group logits)^2.
    z_ref = float(np.mean(logsumexp(group_logits[mask]) ** 2))
    assert dec.router_z_loss == pytest.approx(z_ref, rel=1e-12 if dtype == np.float64 else 1e-5)
    assert dec.auxiliary_loss == pytest.approx(
        cfg.load_balance_loss_coeff * dec.load_balance_loss + cfg.router_z_loss_coeff * dec.router_z_loss)


def test_sparse_gate_with_k_above_the_computed_experts_fills_with_unrouted_choices() -> None:
    """group_top_k = 1 of 8 groups computes 8 experts; k = 10 leaves 2 filler choices."""
    cfg = mr.RouterConfig(num_experts=64, top_k=10, capacity_factor=None)
    router = mr.ExpertRouter(cfg, 16, seed=3, gate="hierarchical", group_top_k=1)
    dec = router.route_tokens(np.random.default_rng(5).normal(size=(200, 16)))
    assert dec.kept[:, :8].all() and not dec.kept[:, 8:].any()
    assert (dec.expert_weights[:, 8:] == 0).all() and (dec.expert_slots[:, 8:] == -1).all()
    assert (dec.expert_indices[:, :8] // 8 == dec.expert_indices[:, :1] // 8).all()  # one group
    assert dec.kept_assignments == 8 * 200 and dec.tokens_per_expert.sum() == 8 * 200


# --------------------------------------------------------------------------- group-limited routing on logits


def deepseek_v3_reference(logits: np.ndarray, bias: np.ndarray, num_groups: int, group_top_k: int, k: int,
                          scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """Vectorized NumPy DeepSeek-V3 routing: sigmoid scores, bias for selection, top-2-sum
    group scores, top groups, top-k among them (ties to the lower index), normalized
    unbiased weights times the scale."""
    t, e = logits.shape
    scores = sigmoid(logits)
    keys = scores + bias
    grouped = keys.reshape(t, num_groups, e // num_groups)
    group_score = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
    best_groups = np.argsort(-group_score, axis=1, kind="stable")[:, :group_top_k]
    allowed = np.zeros((t, num_groups), dtype=bool)
    np.put_along_axis(allowed, best_groups, True, axis=1)
    masked = np.where(np.repeat(allowed, e // num_groups, axis=1), keys, -np.inf)
    top = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(scores, top, axis=1)
    return top, w / w.sum(axis=1, keepdims=True) * scale


def test_deepseek_v3_group_limited_routing_matches_numpy() -> None:
    rng = np.random.default_rng(33)
    t, e, k = 3000, 64, 8
    logits = rng.normal(size=(t, e)) * 1.5
    logits[:, 8:16] += 0.7  # make group 1 popular, so the group limit binds
    bias = rng.normal(size=e) * 0.05
    cfg = mr.RouterConfig(num_experts=e, top_k=k, capacity_factor=None, score_function="sigmoid",
                          normalize_weights=True, weight_scale=2.5, num_groups=8, group_top_k=4,
                          group_score="top2_sum", expert_bias=bias)
    for dtype in (np.float64, np.float32):
        x = logits.astype(dtype)
        dec = mr.route_logits(x, cfg)
        top, w = deepseek_v3_reference(x, bias, 8, 4, k, 2.5)
        np.testing.assert_array_equal(dec.expert_indices, top)
        np.testing.assert_allclose(dec.expert_weights, w, rtol=1e-6, atol=1e-7)
        # At most 4 groups per token, and the limit does bind for some tokens.
        used = np.array([len(set(row // 8)) for row in dec.expert_indices])
        assert used.max() <= 4
        unlimited = mr.route_logits(x, cfg.replace(num_groups=None, group_top_k=None))
        assert (np.sort(unlimited.expert_indices, 1) != np.sort(dec.expert_indices, 1)).any(axis=1).sum() > 100

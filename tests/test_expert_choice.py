"""Expert-choice routing and EC-CAP against plain NumPy references; the preset, the CLI,
the CSR view, the dispatch plan, statistics, the backward and the hidden-state path on
expert-choice decisions."""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router.data import default_logits
from helpers import route_json, text_report

Lists = List[List[Tuple[float, int]]]


# --------------------------------------------------------------------------- references
def scores_of(x: np.ndarray, function: str = "softmax") -> np.ndarray:
    """float64 scores [T, E] (0 where the logit is -inf)."""
    x = np.asarray(x, dtype=np.float64)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def capacity_of(cf: float, t: int, k: int, e: int, min_capacity: int = 0, rounding: str = "exact") -> int:
    f = Fraction(repr(cf))
    if rounding == "flaxformer":
        return max(int(round(f * t / e)), min_capacity)  # Python's round of a Fraction: half to even
    return max(math.ceil(f * t * k / e), min_capacity)


def eligible(x: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    ok = np.isfinite(np.asarray(x, dtype=np.float64))
    if mask is not None:
        ok &= mask[:, None]
    return ok


def expert_orders(s: np.ndarray, ok: np.ndarray) -> Lists:
    """Each expert's eligible tokens: score descending, then token ascending."""
    return [sorted(((float(s[t, x]), t) for t in range(s.shape[0]) if ok[t, x]), key=lambda p: (-p[0], p[1]))
            for x in range(s.shape[1])]


def reference_uncapped(s: np.ndarray, ok: np.ndarray, c: int) -> Lists:
    return [order[:c] for order in expert_orders(s, ok)]


def reference_capped(s: np.ndarray, ok: np.ndarray, c: int, cap: int) -> Lists:
    """Deferred acceptance, experts proposing one offer at a time in FIFO order (another
    order than the core's: the expert-optimal stable assignment does not depend on it)."""
    orders = expert_orders(s, ok)
    e = len(orders)
    held: Dict[int, List[int]] = {}
    nxt, free = [0] * e, [min(c, len(o)) for o in orders]
    queue = deque(range(e))
    while queue:
        x = queue.popleft()
        if free[x] == 0 or nxt[x] >= len(orders[x]):
            continue
        score, t = orders[x][nxt[x]]
        nxt[x] += 1
        mine = held.setdefault(t, [])
        mine.append(x)
        free[x] -= 1
        if len(mine) > cap:
            worst = min(mine, key=lambda y: (s[t, y], -y))
            mine.remove(worst)
            free[worst] += 1
            queue.append(worst)
        queue.append(x)
    return [[p for p in orders[x] if x in held.get(p[1], [])] for x in range(e)]


def columns(lists: Lists, t: int, e: int, k: Optional[int], scale: float = 1.0):
    """The decision's [T, k] arrays from each expert's tokens in slot order."""
    per_token: List[List[Tuple[float, int, int]]] = [[] for _ in range(t)]
    for x, lst in enumerate(lists):
        for slot, (score, tok) in enumerate(lst):
            per_token[tok].append((float(np.float32(score * scale)), x, slot))
    k = max(1, k if k is not None else max((len(p) for p in per_token), default=0))
    idx, w = np.zeros((t, k), np.int32), np.zeros((t, k), np.float32)
    slots, kept = np.full((t, k), -1, np.int32), np.zeros((t, k), bool)
    for tok, entries in enumerate(per_token):
        entries.sort(key=lambda p: (-p[0], p[1]))
        fillers = [x for x in range(e) if x not in {p[1] for p in entries}]
        for j in range(k):
            if j < len(entries):
                w[tok, j], idx[tok, j], slots[tok, j] = entries[j]
                kept[tok, j] = True
            else:
                idx[tok, j] = fillers[j - len(entries)]
    return idx, w, slots, kept


def assert_same(dec: mr.RoutingDecision, ref) -> None:
    idx, w, slots, kept = ref
    assert dec.top_k == idx.shape[1]
    np.testing.assert_array_equal(dec.expert_indices, idx)
    np.testing.assert_array_equal(dec.kept, kept)
    np.testing.assert_array_equal(dec.expert_slots, slots)
    np.testing.assert_allclose(dec.expert_weights, w, rtol=0, atol=1e-6)


def ec(num_experts: int, **kw) -> mr.RouterConfig:
    return mr.RouterConfig(num_experts=num_experts, routing="expert_choice", **kw)


# --------------------------------------------------------------------------- the algorithm
@pytest.mark.parametrize("function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("t,e,k,cf", [(64, 8, 1, 1.0), (200, 16, 2, 1.25), (37, 4, 2, 0.5), (5, 8, 1, 1.0)])
def test_matches_the_reference(rng, function, t, e, k, cf) -> None:
    x = rng.normal(size=(t, e)) * 2
    cfg = ec(e, top_k=k, capacity_factor=cf, score_function=function, weight_scale=1.5)
    dec = mr.route_logits(x, cfg)
    c = capacity_of(cf, t, k, e)
    assert dec.capacity == c == cfg.capacity(t)
    s = scores_of(x, function)
    lists = reference_uncapped(s, eligible(x, None), c)
    assert_same(dec, columns(lists, t, e, None, 1.5))
    np.testing.assert_array_equal(dec.tokens_per_expert, [len(lst) for lst in lists])
    assert dec.kept_assignments == sum(map(len, lists))
    assert dec.tokens_dropped == t - len({tok for lst in lists for _, tok in lst})
    assert dec.dropped_assignments == t * dec.top_k - dec.kept_assignments


@pytest.mark.parametrize("cap", [1, 2, 3])
@pytest.mark.parametrize("t,e,cf", [(64, 8, 2.0), (100, 6, 1.5), (30, 4, 3.0)])
def test_capped_matches_the_reference(rng, cap, t, e, cf) -> None:
    x = rng.normal(size=(t, e)) * 2
    dec = mr.route_logits(x, ec(e, top_k=2, capacity_factor=cf, expert_choice_cap=cap))
    c = capacity_of(cf, t, 2, e)
    lists = reference_capped(scores_of(x), eligible(x, None), c, cap)
    assert_same(dec, columns(lists, t, e, cap))
    assert dec.top_k == cap


def test_masks_ineligible_experts_and_batches(rng) -> None:
    x = rng.normal(size=(4, 25, 6))
    x[0, 3, 2] = -np.inf
    x[1, :, 5] = -np.inf
    mask = rng.random((4, 25)) < 0.8
    x[~mask] = np.nan  # masked rows are never read
    cfg = ec(6, top_k=2, capacity_factor=1.0)
    dec = mr.route_logits(x, cfg, token_mask=mask)
    flat, m = x.reshape(100, 6), mask.reshape(100)
    c = capacity_of(1.0, int(m.sum()), 2, 6)
    lists = reference_uncapped(scores_of(np.where(m[:, None], flat, 0.0)), eligible(flat, m), c)
    assert dec.batch_shape == (4, 25) and dec.capacity == c and dec.active_tokens == m.sum()
    assert_same(dec, columns(lists, 100, 6, None))
    assert not (dec.kept[25:50] & (dec.expert_indices[25:50] == 5)).any()
    assert not dec.kept[~m].any() and dec.tokens_dropped == sum(
        1 for t in np.flatnonzero(m) if not dec.kept[t].any())
    # The sequence balance loss: each sequence's own loss with the decision's k, averaged.
    p = scores_of(np.where(m[:, None], flat, 0.0)) * m[:, None]
    per_seq = []
    for b in range(4):
        rows = slice(25 * b, 25 * (b + 1))
        n = np.bincount(dec.expert_indices[rows][dec.kept[rows]], minlength=6)
        a = m[rows].sum()
        per_seq.append(6 * (n * p[rows].sum(0)).sum() / (dec.top_k * a * a))
    assert dec.seq_load_balance_loss == pytest.approx(np.mean(per_seq), rel=1e-9)


def test_float32_and_float64_agree_and_threads_do_not_matter(rng, restore_threads) -> None:
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    for cap in (None, 2):
        cfg = ec(16, top_k=2, expert_choice_cap=cap)
        restore_threads(1)
        one = mr.route_logits(x, cfg)
        restore_threads(2)
        two = mr.route_logits(x.astype(np.float64), cfg)
        for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "tokens_per_expert"):
            np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
        assert one.load_balance_loss == two.load_balance_loss and one.router_z_loss == two.router_z_loss


def test_losses(rng) -> None:
    x = rng.normal(size=(80, 8))
    dec = mr.route_logits(x, ec(8, top_k=2, load_balance_loss_coeff=0.5, router_z_loss_coeff=0.25))
    p = scores_of(x)
    n = np.bincount(dec.expert_indices[dec.kept], minlength=8)
    lb = 8 * (n * p.mean(0)).sum() / (80 * dec.top_k)
    lse = np.log(np.exp(x).sum(1))
    assert dec.load_balance_loss == pytest.approx(lb, rel=1e-9)
    assert dec.router_z_loss == pytest.approx((lse**2).mean(), rel=1e-9)
    assert dec.auxiliary_loss == pytest.approx(0.5 * lb + 0.25 * (lse**2).mean(), rel=1e-9)


def test_fixed_capacity_and_min_capacity(rng) -> None:
    x = rng.normal(size=(50, 4))
    assert mr.route_logits(x, ec(4, expert_capacity=7)).capacity == 7
    assert mr.route_logits(x, ec(4, capacity_factor=0.01, min_capacity=3)).capacity == 3
    np.testing.assert_array_equal(mr.route_logits(x, ec(4, expert_capacity=7)).tokens_per_expert, [7] * 4)
    big = mr.route_logits(x, ec(4, expert_capacity=80))  # more than T: each expert takes every token
    assert big.top_k == 4 and big.kept.all() and big.tokens_dropped == 0


@settings(max_examples=60, deadline=None)
@given(t=st.integers(0, 40), e=st.integers(1, 6), cap=st.one_of(st.none(), st.integers(1, 6)),
       c=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), ties=st.booleans())
def test_invariants(t, e, cap, c, seed, ties) -> None:
    cap = None if cap is None else min(cap, e)
    g = np.random.default_rng(seed)
    x = g.integers(-2, 3, size=(t, e)).astype(np.float64) if ties else g.normal(size=(t, e))
    x[g.random((t, e)) < 0.15] = -np.inf
    x[np.arange(t), g.integers(0, e, size=t)] = 0.0  # every row has an eligible expert
    mask = g.random(t) < 0.9
    dec = mr.route_logits(x, ec(e, top_k=1, expert_capacity=c, expert_choice_cap=cap), token_mask=mask)
    k = dec.top_k
    ok = eligible(x, mask)
    s = scores_of(np.where(np.isfinite(x), x, -np.inf))
    has = np.zeros((t, e), bool)
    for tok, j in zip(*np.nonzero(dec.kept)):
        has[tok, dec.expert_indices[tok, j]] = True
    assert (has <= ok).all() and has.sum() == dec.kept.sum()  # no expert twice, only eligible ones
    counts = has.sum(0)
    np.testing.assert_array_equal(counts, dec.tokens_per_expert)
    assert (counts <= c).all()
    for x_ in range(e):  # slots of an expert: 0..n-1 in descending score
        rows = np.nonzero(dec.kept & (dec.expert_indices == x_))
        order = np.argsort(dec.expert_slots[rows])
        assert sorted(dec.expert_slots[rows].tolist()) == list(range(counts[x_]))
        assert (np.diff(s[rows[0][order], x_]) <= 1e-12).all()
    assert not (dec.expert_weights[~dec.kept] != 0).any() and (dec.expert_slots[~dec.kept] == -1).all()
    if cap is None:
        # Full when enough eligible tokens exist; no skipped token scores above a taken one.
        assert (counts == np.minimum(c, ok.sum(0))).all()
        for x_ in range(e):
            if has[:, x_].any() and (ok[:, x_] & ~has[:, x_]).any():
                assert s[has[:, x_], x_].min() >= s[ok[:, x_] & ~has[:, x_], x_].max() - 1e-12
    else:
        assert k == cap and (has.sum(1) <= cap).all()
        for tok in range(t):
            for x_ in np.flatnonzero(ok[tok] & ~has[tok]):
                expert_wants = counts[x_] < c or (s[has[:, x_], x_] < s[tok, x_] - 1e-12).any()
                token_wants = has[tok].sum() < cap or (s[tok, has[tok]] < s[tok, x_] - 1e-12).any()
                assert not (expert_wants and token_wants), (tok, x_)
    assert dec.tokens_dropped == int((mask & ~has.any(1)).sum())


# --------------------------------------------------------------------------- capacity
@pytest.mark.parametrize("t,e,k,cf,want", [(200, 4, 1, 1.1, 55), (320, 6, 2, 1.05, 56), (4096, 64, 2, 1.25, 80),
                                           (100, 8, 2, 1.0, 12), (36, 8, 1, 1.0, 4), (20, 8, 1, 1.0, 4),
                                           (44, 8, 1, 1.0, 6), (1000, 64, 1, 2.0, 31)])
def test_flaxformer_capacity(t, e, k, cf, want) -> None:
    cfg = mr.RouterConfig(num_experts=e, top_k=k, capacity_factor=cf, capacity_rounding="flaxformer", min_capacity=4)
    assert cfg.capacity(t) == want == capacity_of(cf, t, k, e, 4, "flaxformer")


# --------------------------------------------------------------------------- the decision's other views
def test_token_experts_csr(rng) -> None:
    x = rng.normal(size=(300, 8))
    for cfg in (ec(8, top_k=2), mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.8)):
        dec = mr.route_logits(x, cfg)
        offsets, experts, weights = dec.token_experts()
        assert offsets.dtype == np.int64 and experts.dtype == np.int32 and weights.dtype == np.float32
        assert offsets.shape == (301,) and offsets[-1] == dec.kept_assignments
        for t in range(300):
            j = np.flatnonzero(dec.kept[t])
            np.testing.assert_array_equal(experts[offsets[t]:offsets[t + 1]], dec.expert_indices[t, j])
            np.testing.assert_array_equal(weights[offsets[t]:offsets[t + 1]], dec.expert_weights[t, j])


def test_dispatch_plan_combine_and_stats(rng) -> None:
    x = rng.normal(size=(120, 6))
    dec = mr.route_logits(x, ec(6, top_k=2, capacity_factor=1.5))
    plan = dec.dispatch_plan()
    np.testing.assert_array_equal(np.diff(plan.expert_offsets), dec.tokens_per_expert)
    hidden = rng.normal(size=(120, 5)).astype(np.float32)
    rows = plan.permute(hidden)
    out = rows * (1 + np.repeat(np.arange(6), dec.tokens_per_expert))[:, None]
    y = plan.combine(out.astype(np.float32))
    want = np.zeros((120, 5))
    for t, j in zip(*np.nonzero(dec.kept)):
        want[t] += dec.expert_weights[t, j] * hidden[t] * (1 + dec.expert_indices[t, j])
    np.testing.assert_allclose(y, want, atol=1e-5)
    stats = mr.RoutingStats()
    stats.record(dec)
    d = stats.to_dict()
    assert d["tokens_dropped"] == dec.tokens_dropped == int((~dec.kept.any(1)).sum())
    assert d["kept_assignments"] == dec.kept_assignments


@pytest.mark.parametrize("function", ["softmax", "sigmoid"])
def test_backward_against_finite_differences(rng, function) -> None:
    t, e = 30, 5
    x = rng.normal(size=(t, e))
    cfg = ec(e, top_k=2, score_function=function, weight_scale=2.0, load_balance_loss_coeff=0.3,
             router_z_loss_coeff=0.2)
    dec = mr.route_logits(x, cfg, training=True)
    g = rng.normal(size=(t, dec.top_k))
    k, kept, idx = dec.top_k, dec.kept, dec.expert_indices
    n = np.bincount(idx[kept], minlength=e)

    def f(z: np.ndarray) -> float:  # the selection held fixed
        s = scores_of(z, function)
        q = s / s.sum(1, keepdims=True)
        w = 2.0 * np.take_along_axis(s, idx, 1) * kept
        lse = np.log(np.exp(z).sum(1))
        lb = e * (n * q.mean(0)).sum() / (t * k)
        return float((g * w).sum() + 0.3 * lb + 0.2 * (lse**2).mean())

    fd = np.zeros_like(x)
    for i in range(t):
        for j in range(e):
            d = np.zeros_like(x)
            d[i, j] = 1e-6
            fd[i, j] = (f(x + d) - f(x - d)) / 2e-6
    np.testing.assert_allclose(dec.backward(grad_expert_weights=g, grad_auxiliary_loss=1.0), fd, atol=1e-6)


def test_hidden_state_path(rng) -> None:
    hidden = rng.normal(size=(200, 16))
    w, b = rng.normal(size=(16, 8)) / 4, rng.normal(size=8) / 4
    cfg = ec(8, top_k=2, expert_choice_cap=3)
    router = mr.ExpertRouter(cfg, input_dim=16, weight=w, bias=b)
    dec = router.route_tokens(hidden)
    logits = hidden @ w + b
    lists = reference_capped(scores_of(logits), eligible(logits, None), capacity_of(1.25, 200, 2, 8), 3)
    assert_same(dec, columns(lists, 200, 8, 3))
    assert router.get_stats().to_dict()["calls"] == 1


# --------------------------------------------------------------------------- configuration and errors
@pytest.mark.parametrize("kwargs,field", [
    (dict(expert_choice_cap=0), "expert_choice_cap"),
    (dict(expert_choice_cap=9), "expert_choice_cap"),
    (dict(normalize_weights=True), "normalize_weights"),
    (dict(renormalize_after_drop=True), "renormalize_after_drop"),
    (dict(overflow="reroute"), "overflow"),
    (dict(drop_policy="probs"), "drop_policy"),
    (dict(num_groups=2, group_top_k=1), "num_groups"),
    (dict(capacity_factor=None), "capacity_factor"),
    (dict(eval_capacity_factor="dropless"), "eval_capacity_factor"),
    (dict(score_precision="float32"), "score_precision"),
])
def test_refused_settings(kwargs, field) -> None:
    with pytest.raises(mr.ConfigError, match=field) as info:
        ec(8, **kwargs)
    assert not isinstance(info.value, TypeError)


def test_wrong_types_and_cap_without_expert_choice() -> None:
    for bad in (1.0, True, "2", [2]):
        with pytest.raises(mr.ConfigTypeError, match="expert_choice_cap"):
            ec(8, expert_choice_cap=bad)
    with pytest.raises(mr.ConfigError, match="expert_choice_cap"):
        mr.RouterConfig(num_experts=8, expert_choice_cap=2)
    with pytest.raises(mr.ConfigError, match="routing"):
        mr.RouterConfig(routing="experts_choice")
    with pytest.raises(mr.InputError, match="logits"):
        mr.route_logits(np.full((3, 8), np.nan), ec(8))
    with pytest.raises(mr.InputError, match="token 1"):
        mr.route_logits(np.array([[0.0] * 8, [-np.inf] * 8]), ec(8))


# --------------------------------------------------------------------------- preset and command line
def test_preset(rng) -> None:
    cfg = mr.preset("expert_choice", 64)
    assert (cfg.routing, cfg.capacity_rounding, cfg.min_capacity, cfg.score_function) == (
        "expert_choice", "flaxformer", 4, "softmax")
    assert cfg.load_balance_loss_coeff == 0.0 and cfg.peer is None
    assert cfg.capacity(4096) == 64 and cfg.capacity(100) == 4
    capped = mr.presets.expert_choice(8, train_capacity_factor=2.0, expert_choice_cap=2, router_z_loss_factor=1e-3)
    assert (capped.capacity_factor, capped.expert_choice_cap, capped.router_z_loss_coeff) == (2.0, 2, 1e-3)
    with pytest.raises(mr.ConfigError, match="jitter_noise"):
        mr.preset("expert_choice", 8, jitter_noise=0.01)
    x = rng.normal(size=(4096, 64)).astype(np.float32)
    dec = mr.route_logits(x, cfg)
    assert dec.capacity == 64 and dec.auxiliary_loss == 0.0
    assert_same(dec, columns(reference_uncapped(scores_of(x), eligible(x, None), 64), 4096, 64, None))


def test_cli_route_on_the_embedded_data(capsys) -> None:
    report = route_json(capsys, "--router", "expert_choice")
    logits, _ = default_logits()
    dec = mr.route_logits(logits, ec(64, top_k=2))
    assert report["capacity"] == dec.capacity == 160
    assert report["top_k"] == dec.top_k and report["tokens_dropped"] == dec.tokens_dropped
    assert report["dropped_assignments"] == dec.dropped_assignments


def test_cli_text_report_names_unfilled_columns_not_drops(capsys) -> None:
    _, lines, row = text_report(capsys, "route", "--router", "expert_choice")
    dec = mr.route_logits(default_logits()[0], ec(64, top_k=2))
    assert row("unfilled token columns").split()[3] == str(dec.dropped_assignments)
    assert not any(line.startswith("dropped assignments") for line in lines)

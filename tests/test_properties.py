"""Properties of every routing decision, checked with hypothesis.

Logits come from a seeded NumPy generator (hypothesis draws the seed and the shape
and options), which keeps examples cheap; integer-valued logits and -inf entries
are drawn often so ties and fillers are common.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_router as mr
from reference import reference_route

SETTINGS = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)
FACTORS = [None, 0.25, 0.5, 1.0, 1.25, 2.0]
POLICIES = ["position", "rank", "probs", "bpr"]


@st.composite
def routing_problems(draw, max_tokens=300, min_tokens=0):
    E = draw(st.integers(1, 12))
    k = draw(st.integers(1, E))
    T = draw(st.integers(min_tokens, max_tokens))
    seed = draw(st.integers(0, 2**32 - 1))
    ints = draw(st.booleans())
    neg_inf = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    masked = draw(st.sampled_from([None, 0.5, 0.9]))
    # [B, S, E] only within one 512-token chunk: larger 3-D input has its own (bug) test.
    three_d = draw(st.booleans()) and 0 < T <= 512
    options = dict(
        num_experts=E, top_k=k,
        capacity_factor=draw(st.sampled_from(FACTORS)),
        drop_policy=draw(st.sampled_from(POLICIES)),
        score_function=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.booleans()),
        weight_scale=draw(st.sampled_from([1.0, 2.5, 0.3])),
        min_capacity=draw(st.sampled_from([0, 0, 3])),
        overflow=draw(st.sampled_from(["drop", "drop", "reroute"])),
        renormalize_after_drop=draw(st.booleans()),
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, E)) * 2
    if ints:
        x = np.round(x)
    if neg_inf:
        x[rng.random((T, E)) < neg_inf] = -np.inf
        dead = np.isneginf(x).all(axis=1)
        x[dead, rng.integers(0, E, size=int(dead.sum()))] = 1.0
    mask = None if masked is None else rng.random(T) < masked
    bias = rng.normal(size=E) * 0.3 if draw(st.booleans()) else None
    if three_d:
        # A divisor of T as the sequence length (T <= 512 here, one chunk).
        S = max(d for d in range(1, min(T, 64) + 1) if T % d == 0)
        x = x.reshape(T // S, S, E)
        if mask is not None:
            mask = mask.reshape(T // S, S)
    return mr.RouterConfig(**options), x, dict(token_mask=mask, expert_bias=bias)


def check_invariants(cfg: mr.RouterConfig, x: np.ndarray, call, dec: mr.RoutingDecision) -> None:
    E, k = cfg.num_experts, cfg.top_k
    mask = call["token_mask"]
    T = int(np.prod(x.shape[:-1]))
    active = np.ones(T, bool) if mask is None else np.asarray(mask).reshape(-1)
    idx, kept, slots, w = dec.expert_indices, dec.kept, dec.expert_slots, dec.expert_weights
    assert idx.shape == kept.shape == slots.shape == w.shape == (T, k)
    assert dec.total_tokens == T and dec.active_tokens == int(active.sum())
    # Indices: k distinct experts per token, in [0, E).
    assert ((idx >= 0) & (idx < E)).all()
    assert all(len(set(row)) == k for row in idx.tolist())
    # Kept implies active (masked tokens are routed nowhere); weights 0 and slot -1 where not kept.
    assert not kept[~active].any()
    assert (w[~kept] == 0).all() and (slots[~kept] == -1).all()
    assert (w[kept] >= 0).all() and np.isfinite(w).all()
    # Capacity and slots: each expert's kept count <= capacity; slots distinct and in [0, capacity).
    assert (dec.tokens_per_expert <= dec.capacity).all()
    for e in range(E):
        s = slots[kept & (idx == e)]
        assert ((s >= 0) & (s < dec.capacity)).all()
        assert len(np.unique(s)) == len(s)
        assert sorted(s.tolist()) == list(range(len(s)))
    # Counts.
    np.testing.assert_array_equal(dec.tokens_per_expert, np.bincount(idx[kept], minlength=E))
    assert dec.kept_assignments == int(kept.sum())
    assert dec.dropped_assignments == int(active.sum()) * k - int(kept.sum())
    assert dec.tokens_dropped == int((active & ~kept.any(axis=1)).sum())
    assert dec.pre_drop_tokens_per_expert.sum() <= int(active.sum()) * k
    if not dec.rerouted.any():
        assert (dec.tokens_per_expert <= dec.pre_drop_tokens_per_expert).all()
    if dec.dropless:
        assert dec.capacity == (int(dec.tokens_per_expert.max()) if E else 0)
        np.testing.assert_array_equal(dec.tokens_per_expert, dec.pre_drop_tokens_per_expert)
    else:
        assert dec.capacity == cfg.capacity(int(active.sum()))
    # Losses are finite and non-negative.
    assert np.isfinite(dec.load_balance_loss) and dec.load_balance_loss >= 0
    assert np.isfinite(dec.router_z_loss) and dec.router_z_loss >= 0


@SETTINGS
@given(routing_problems())
def test_invariants(problem):
    cfg, x, call = problem
    dec = mr.route_logits(x, cfg, **call)
    check_invariants(cfg, x, call, dec)


@SETTINGS
@given(routing_problems(max_tokens=120))
def test_matches_reference(problem):
    cfg, x, call = problem
    dec = mr.route_logits(x, cfg, **call)
    ref = reference_route(x, cfg, **call)
    for name in ("expert_indices", "expert_slots", "kept", "rerouted", "tokens_per_expert",
                 "pre_drop_tokens_per_expert"):
        np.testing.assert_array_equal(getattr(dec, name), ref[name], err_msg=name)
    for name in ("capacity", "dropped_assignments", "tokens_dropped"):
        assert getattr(dec, name) == ref[name], name
    np.testing.assert_allclose(dec.expert_weights, ref["expert_weights"], rtol=1e-6, atol=1e-7)
    for name in ("load_balance_loss", "router_z_loss"):
        np.testing.assert_allclose(getattr(dec, name), ref[name], rtol=1e-6, atol=1e-12)


@settings(deadline=None, max_examples=15, derandomize=True)
@given(routing_problems(max_tokens=4000, min_tokens=1100), st.sampled_from([(1, 4), (4, 2), (3, 1)]))
def test_thread_count_and_repeat_do_not_change_anything(problem, threads):
    cfg, x, call = problem
    x = x.reshape(-1, x.shape[-1])
    if call["token_mask"] is not None:
        call = dict(call, token_mask=call["token_mask"].reshape(-1))
    try:
        mr.set_num_threads(threads[0])
        a = mr.route_logits(x, cfg, **call)
        a2 = mr.route_logits(x, cfg, **call)
        mr.set_num_threads(threads[1])
        b = mr.route_logits(x, cfg, **call)
    finally:
        mr.set_num_threads(0)
    check_invariants(cfg, x, call, a)
    for other in (a2, b):
        for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "rerouted",
                     "tokens_per_expert", "pre_drop_tokens_per_expert"):
            np.testing.assert_array_equal(getattr(a, name), getattr(other, name), err_msg=name)
        for name in ("capacity", "dropped_assignments", "tokens_dropped", "load_balance_loss",
                     "router_z_loss", "auxiliary_loss"):
            assert getattr(a, name) == getattr(other, name), name


def test_thread_count_knob(restore_threads):
    restore_threads(3)
    assert mr.get_num_threads() == 3
    restore_threads(1)
    assert mr.get_num_threads() == 1


@SETTINGS
@given(routing_problems(max_tokens=700))
def test_float32_and_float64_route_identically(problem):
    cfg, x, call = problem
    x32 = x.astype(np.float32)
    x64 = x32.astype(np.float64)  # the same, float32-representable values
    a = mr.route_logits(x32, cfg, **call)
    b = mr.route_logits(x64, cfg, **call)
    for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "rerouted", "tokens_per_expert",
                 "pre_drop_tokens_per_expert"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("capacity", "load_balance_loss", "router_z_loss", "seq_load_balance_loss"):
        assert getattr(a, name) == getattr(b, name), name


@SETTINGS
@given(routing_problems())
def test_normalized_weights_sum_to_scale_before_drops(problem):
    cfg, x, call = problem
    mask = call["token_mask"]
    cfg = cfg.replace(normalize_weights=True, renormalize_after_drop=False, overflow="drop")
    dec = mr.route_logits(x, cfg, **call)
    free = mr.route_logits(x, cfg.replace(capacity_factor=None), **call)
    np.testing.assert_array_equal(dec.expert_indices, free.expert_indices)
    # Pre-drop weights (kept + dropped) of each active token sum to weight_scale.
    active = np.ones(dec.total_tokens, bool) if mask is None else mask.reshape(-1)
    sums = free.expert_weights.astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(sums[active], cfg.weight_scale, rtol=1e-6 * cfg.top_k)
    # Kept weights are those pre-drop weights, not renormalized.
    np.testing.assert_array_equal(dec.expert_weights[dec.kept], free.expert_weights[dec.kept])


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.integers(1, 16), st.data())
def test_load_balance_loss_is_one_when_perfectly_balanced(E, data):
    k = data.draw(st.integers(1, E))
    reps = data.draw(st.integers(1, 20))
    seed = data.draw(st.integers(0, 2**32 - 1))
    score_function = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    rng = np.random.default_rng(seed)
    T = E * reps
    x = rng.normal(size=(T, E)) * 0.1
    for t in range(T):
        for j in range(k):
            x[t, (t + j) % E] = 20.0 - j  # token t's winners rotate: every expert chosen T*k/E times
    x = x[rng.permutation(T)]
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=data.draw(st.sampled_from(FACTORS)),
                          score_function=score_function)
    dec = mr.route_logits(x, cfg)
    assert (dec.pre_drop_tokens_per_expert == reps * k).all()
    assert dec.load_balance_loss == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------
# Training noise: a pure function of (seed, step, token, expert)
# --------------------------------------------------------------------------


def _logit_of(w: np.ndarray) -> np.ndarray:
    w = w.astype(np.float64)
    return np.log(w / (1.0 - w))


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.9])
def test_jitter_is_multiplicative_uniform(eps):
    T, c = 20000, 2.0
    x = np.tile([[c, 0.0]], (T, 1))  # z' = [c * u, 0 * u'] = [c * u, 0]
    cfg = mr.RouterConfig(num_experts=2, top_k=1, capacity_factor=None, jitter_eps=eps, seed=3)
    dec = mr.route_logits(x, cfg, training=True)
    assert (dec.expert_indices[:, 0] == 0).all()
    u = _logit_of(dec.expert_weights[:, 0]) / c  # weight = sigmoid(c * u)
    assert u.min() >= 1 - eps - 1e-5 and u.max() <= 1 + eps + 1e-5
    assert u.mean() == pytest.approx(1.0, abs=0.02 * eps + 1e-4)
    assert u.std() == pytest.approx(2 * eps / np.sqrt(12), rel=0.05)
    # The z-loss sees the noisy logits z' (semantics item 14: every later step uses z').
    lse = np.logaddexp(c * u, 0.0)
    assert dec.router_z_loss == pytest.approx(np.mean(lse ** 2), rel=1e-5)
    # Evaluation: no noise at all.
    ev = mr.route_logits(x, cfg, training=False)
    plain = mr.route_logits(x, cfg.replace(jitter_eps=0.0), training=True)
    for d in (ev, plain):
        np.testing.assert_allclose(d.expert_weights[:, 0], 1 / (1 + np.exp(-c)), rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_gaussian_noise_has_the_given_std(sigma):
    T = 20000
    cfg = mr.RouterConfig(num_experts=2, top_k=2, capacity_factor=None, noise_std=sigma, seed=11)
    dec = mr.route_logits(np.zeros((T, 2)), cfg, training=True)
    order = np.argsort(dec.expert_indices, axis=1)
    w = np.take_along_axis(dec.expert_weights, order, axis=1).astype(np.float64)
    diff = np.log(w[:, 0] / w[:, 1])  # = sigma * (n0 - n1) ~ N(0, 2 sigma^2)
    assert diff.mean() == pytest.approx(0.0, abs=0.05 * sigma)
    assert diff.std() == pytest.approx(np.sqrt(2) * sigma, rel=0.05)
    # The winner is whichever noisy logit is larger: both experts win about half the time.
    assert 0.45 < (dec.expert_indices[:, 0] == 0).mean() < 0.55


def test_noise_is_keyed_by_seed_step_and_token(restore_threads, rng):
    T, E = 3000, 8
    x = rng.normal(size=(T, E))
    cfg = mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=None, jitter_eps=0.2, noise_std=0.3, seed=5)
    base = mr.route_logits(x, cfg, training=True, step=7)
    restore_threads(1)
    again = mr.route_logits(x, cfg, training=True, step=7)
    restore_threads(2)
    again2 = mr.route_logits(x, cfg, training=True, step=7)
    for d in (again, again2):
        np.testing.assert_array_equal(base.expert_indices, d.expert_indices)
        np.testing.assert_array_equal(base.expert_weights, d.expert_weights)
        assert base.router_z_loss == d.router_z_loss
    other_step = mr.route_logits(x, cfg, training=True, step=8)
    other_seed = mr.route_logits(x, cfg.replace(seed=6), training=True, step=7)
    for d in (other_step, other_seed):
        assert (d.expert_weights != base.expert_weights).mean() > 0.9
    # A token's noise does not depend on the other tokens (pure function of its index).
    y = x.copy()
    y[::2] = rng.normal(size=y[::2].shape)
    changed = mr.route_logits(y, cfg, training=True, step=7)
    np.testing.assert_array_equal(changed.expert_weights[1::2], base.expert_weights[1::2])
    np.testing.assert_array_equal(changed.expert_indices[1::2], base.expert_indices[1::2])


# --------------------------------------------------------------------------
# Training reroute with 0 < expert_dropout < 1: properties of the random draw
# --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("p", [0.25, 0.5, 0.8])
def test_training_reroute_draw(policy, p, restore_threads, rng):
    T, E, k = 4000, 8, 2
    x = rng.normal(size=(T, E)) * 0.1
    x[:, 0] += 5.0  # every token wants experts 0 and 1: both overflow, the others have room
    x[:, 1] += 4.0
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.25, drop_policy=policy,
                          overflow="reroute", expert_dropout=p, reroute_weight_scale=0.5, seed=9)
    dec = mr.route_logits(x, cfg, training=True, step=2)
    dropped = mr.route_logits(x, cfg.replace(overflow="drop"), training=True, step=2)
    overflowed = ~dropped.kept
    assert overflowed.sum() == 2 * (T - dec.capacity)
    # Only overflowing assignments move; nothing kept is displaced.
    assert not (dec.rerouted & ~overflowed).any()
    np.testing.assert_array_equal(dec.kept & ~dec.rerouted, dropped.kept)
    np.testing.assert_array_equal(dec.expert_slots[dropped.kept], dropped.expert_slots[dropped.kept])
    # There is always room here, so each overflowing assignment moves with probability p.
    frac = dec.rerouted[overflowed].mean()
    assert frac == pytest.approx(p, abs=0.04)
    # Given the draws, everything else is the deterministic rule of semantics item 13.
    coin = lambda t, j: bool(dec.rerouted[t, j])  # noqa: E731
    ref = reference_route(x, cfg, training=True, reroute_coin=coin)
    for name in ("expert_indices", "expert_slots", "kept", "rerouted", "tokens_per_expert"):
        np.testing.assert_array_equal(getattr(dec, name), ref[name], err_msg=name)
    np.testing.assert_allclose(dec.expert_weights, ref["expert_weights"], rtol=1e-6, atol=1e-7)
    assert dec.load_balance_loss == dropped.load_balance_loss  # pre-drop routing unchanged
    np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, dropped.pre_drop_tokens_per_expert)
    # Reproducible for (seed, step), whatever the thread count; another seed draws differently.
    restore_threads(1)
    again = mr.route_logits(x, cfg, training=True, step=2)
    np.testing.assert_array_equal(again.rerouted, dec.rerouted)
    np.testing.assert_array_equal(again.expert_indices, dec.expert_indices)
    other = mr.route_logits(x, cfg.replace(seed=10), training=True, step=2)
    assert (other.rerouted != dec.rerouted).any()
    # Evaluation ignores the draw: every overflowing assignment tries.
    ev = mr.route_logits(x, cfg, training=False)
    assert ev.rerouted[overflowed].all()

"""The bug-report cases of shared/cases/cases.json, and the whole kind of fault behind each.

Every case is run as given (in float64 and float32). Each case is one sample of a
kind of fault that public MoE routers had; the tests after the case runner check
the whole kind: every place padding could leak in, every way a capacity could round
to 0, every dtype and position of a NaN, and so on.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import moe_router as mr
from reference import reference_route
from helpers import logsumexp, scores

POLICIES = ["position", "rank", "probs", "bpr"]
ARRAY_FIELDS = ("expert_indices", "expert_weights", "expert_slots", "kept", "rerouted")
SCALAR_FIELDS = ("capacity", "active_tokens", "kept_assignments", "dropped_assignments", "tokens_dropped")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def route_raises(logits, config, **call):
    """The exception raised by route_logits; fails on a panic or on no exception."""
    try:
        mr.route_logits(logits, config, **call)
    except BaseException as exc:  # pyo3_runtime.PanicException derives from BaseException
        assert isinstance(exc, Exception) and "Panic" not in type(exc).__name__, (
            f"panic instead of an exception: {type(exc).__name__}: {exc}")
        return exc
    pytest.fail("route_logits did not raise")


# --------------------------------------------------------------------------
# The cases, as given
# --------------------------------------------------------------------------

def run_case(case, dtype):
    config = dict(case["config"])
    call = {name: np.asarray(value) for name, value in case["call"].items()}
    T = len(case["logits"])
    E = config.get("num_experts", 8)
    # JSON integers would make an integer array; logits are floating point.
    logits = np.asarray(case["logits"], dtype=dtype).reshape(T, E)
    cfg = mr.RouterConfig(**config)
    return mr.route_logits(logits, cfg, **call)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_case(bug_case, dtype, cases_path):
    """One case of cases.json (parametrized by name in conftest.pytest_generate_tests)."""
    case = bug_case
    expect = case["expect"]
    if "raises" in expect:
        assert expect["raises"] == "ValueError"
        with pytest.raises(ValueError):
            run_case(case, dtype)
        return
    dec = run_case(case, dtype)
    assert expect, "a case must expect something"
    for name, want in expect.items():
        got = dec.total_tokens if name == "shape_T" else getattr(dec, name)
        want_arr = np.asarray(want)
        if want_arr.dtype.kind in "biu":
            assert np.asarray(got).shape == want_arr.shape, name
            np.testing.assert_array_equal(np.asarray(got), want_arr, err_msg=name)
        else:
            assert np.asarray(got).shape == want_arr.shape, name
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want_arr, rtol=1e-5, atol=1e-12,
                                       err_msg=name)


def test_cases_cover_every_kind(all_cases):
    kinds = {c["kind"] for c in all_cases}
    assert len(all_cases) >= 20 and len(kinds) >= 15
    assert len({c["name"] for c in all_cases}) == len(all_cases), "case names must be unique"


# --------------------------------------------------------------------------
# Kind: aux-loss formula (load-balance loss)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(2, 1), (8, 2), (16, 4), (32, 8)])
def test_load_balance_loss_formula(E, k, score_function, rng):
    T = 900
    x = rng.normal(size=(T, E)) * 2 + np.linspace(1, 0, E)
    mask = rng.random(T) < 0.8
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=0.5, score_function=score_function)
    dec = mr.route_logits(x, cfg, token_mask=mask)
    free = mr.route_logits(x, cfg.replace(capacity_factor=None), token_mask=mask)
    # f_e: the routing before drops (what a dropless router keeps).
    np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, free.tokens_per_expert)
    counts = np.bincount(free.expert_indices[free.kept], minlength=E)
    np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, counts)
    s = scores(x[mask], score_function)
    P = (s / s.sum(axis=1, keepdims=True)).mean(axis=0)  # full distribution over all E experts
    f = counts / (mask.sum() * k)
    want = E * np.sum(f * P)
    assert dec.load_balance_loss == pytest.approx(want, rel=1e-9)
    # Computed before capacity drops: the same with or without a capacity limit.
    assert free.load_balance_loss == pytest.approx(dec.load_balance_loss, rel=1e-12)
    # Not from the top-k renormalized weights.
    normed = mr.route_logits(x, cfg.replace(normalize_weights=True), token_mask=mask)
    assert normed.load_balance_loss == pytest.approx(dec.load_balance_loss, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_load_balance_loss_is_one_at_perfect_balance_for_any_k(k):
    E, T = 8, 8 * 16
    x = np.zeros((T, E))
    for t in range(T):
        for j in range(k):
            x[t, (t + j) % E] = 10.0 - j  # k distinct winners, rotating
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)
    dec = mr.route_logits(x, cfg)
    assert (dec.tokens_per_expert == T * k // E).all()
    assert dec.load_balance_loss == pytest.approx(1.0, abs=1e-12)
    # Hugging Face Mixtral's loss is k times this one: ours is not k.
    if k > 1:
        assert dec.load_balance_loss != pytest.approx(float(k))


def test_load_balance_loss_penalizes_collapse():
    E, T = 8, 64
    x = np.zeros((T, E))
    x[:, 3] = 5.0
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=E, top_k=1, capacity_factor=None))
    p3 = np.exp(5) / (np.exp(5) + 7)
    assert dec.load_balance_loss == pytest.approx(E * p3, rel=1e-12)
    assert dec.load_balance_loss > 1.0


def test_auxiliary_loss_uses_the_config_coefficients(rng):
    x = rng.normal(size=(3, 50, 8))
    cfg = mr.RouterConfig(num_experts=8, top_k=2, load_balance_loss_coeff=0.3, router_z_loss_coeff=0.07,
                          seq_load_balance_loss_coeff=0.11)
    dec = mr.route_logits(x, cfg)
    want = 0.3 * dec.load_balance_loss + 0.07 * dec.router_z_loss + 0.11 * dec.seq_load_balance_loss
    assert dec.auxiliary_loss == pytest.approx(want, rel=1e-12)
    flat = mr.route_logits(x.reshape(150, 8), cfg)
    assert flat.seq_load_balance_loss is None
    assert flat.auxiliary_loss == pytest.approx(0.3 * flat.load_balance_loss + 0.07 * flat.router_z_loss)


def test_sequence_balance_loss_is_per_sequence(rng):
    """Each sequence's own loss, averaged: not the batch loss."""
    B, S, E, k = 4, 30, 6, 2
    x = rng.normal(size=(B, S, E))
    x[0, :, 0] += 4  # sequence 0 collapses onto expert 0, sequence 1 onto expert 1
    x[1, :, 1] += 4
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)
    dec = mr.route_logits(x, cfg)
    per_seq = [mr.route_logits(x[b], cfg).load_balance_loss for b in range(B)]
    assert dec.seq_load_balance_loss == pytest.approx(np.mean(per_seq), rel=1e-9)
    assert dec.seq_load_balance_loss > dec.load_balance_loss + 0.1


# --------------------------------------------------------------------------
# Kinds: z-loss input, numerics, reduction
# --------------------------------------------------------------------------


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shift", [-50.0, 0.0, 10.0, 1000.0])
def test_z_loss_is_on_logits_not_probabilities(shift, score_function, rng):
    x = rng.normal(size=(200, 8)) + shift
    cfg = mr.RouterConfig(num_experts=8, top_k=2, score_function=score_function)
    dec = mr.route_logits(x, cfg)
    want = np.mean(logsumexp(x) ** 2)
    assert dec.router_z_loss == pytest.approx(want, rel=1e-9)
    # Probabilities are shift-invariant; the z-loss is not.
    if shift != 0.0:
        base = mr.route_logits(x - shift, cfg)
        np.testing.assert_array_equal(base.expert_indices, dec.expert_indices)
        assert base.router_z_loss != pytest.approx(dec.router_z_loss, rel=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e15, 1e30])
def test_z_loss_large_logits_stay_finite_and_exact(scale, dtype):
    x = np.array([[1.0, 0.0, 0.0, -1.0], [0.0, 0.5, 1.0, 0.0]]) * scale
    x = x.astype(dtype)
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=4, top_k=1))
    want = np.mean(logsumexp(x.astype(np.float64)) ** 2)
    assert math.isfinite(dec.router_z_loss)
    assert dec.router_z_loss == pytest.approx(want, rel=1e-9)
    assert math.isfinite(dec.load_balance_loss)
    assert np.isfinite(dec.expert_weights).all()


def test_z_loss_is_mean_of_squares(rng):
    x = np.stack([np.full(4, c) for c in (-3.0, 0.0, 1.0, 7.0)])
    lse = logsumexp(x)
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=4, top_k=1))
    assert dec.router_z_loss == pytest.approx(np.mean(lse ** 2), rel=1e-12)
    assert dec.router_z_loss != pytest.approx(np.mean(lse) ** 2, rel=1e-3)
    assert dec.router_z_loss != pytest.approx(np.sum(lse ** 2), rel=1e-3)


def test_z_loss_ignores_ineligible_and_masked(rng):
    x = rng.normal(size=(40, 6))
    x[rng.random((40, 6)) < 0.3] = -np.inf
    x[:, 0] = np.where(np.isneginf(x).all(axis=1), 0.0, x[:, 0])
    mask = rng.random(40) < 0.6
    garbage = x.copy()
    garbage[~mask] = np.nan
    dec = mr.route_logits(garbage, mr.RouterConfig(num_experts=6, top_k=2), token_mask=mask)
    assert dec.router_z_loss == pytest.approx(np.mean(logsumexp(x[mask]) ** 2), rel=1e-12)


# --------------------------------------------------------------------------
# Kind: padding mask (padding must not leak anywhere)
# --------------------------------------------------------------------------


def _padding_configs():
    for policy in POLICIES:
        yield pytest.param(dict(drop_policy=policy), id=policy)
    yield pytest.param(dict(drop_policy="bpr", overflow="reroute"), id="bpr-reroute")
    yield pytest.param(dict(drop_policy="rank", overflow="reroute", renormalize_after_drop=True),
                       id="rank-reroute-renorm")
    yield pytest.param(dict(drop_policy="probs", normalize_weights=True, renormalize_after_drop=True,
                            weight_scale=2.0), id="probs-normalize")
    yield pytest.param(dict(capacity_factor=None), id="dropless")
    yield pytest.param(dict(score_function="sigmoid", num_groups=4, group_top_k=2), id="sigmoid-groups")
    yield pytest.param(dict(min_capacity=5, capacity_rounding="megatron"), id="min-capacity-megatron")


@pytest.mark.parametrize("T", [37, 1400])
@pytest.mark.parametrize("options", list(_padding_configs()))
def test_padding_changes_nothing_for_the_other_tokens(options, T, rng):
    E, k = 8, 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, **{"capacity_factor": 0.8, **options})
    x = np.round(rng.normal(size=(T, E)) * 2)  # integer-valued: ties across tokens
    x[:, 1] += 1.0
    mask = rng.random(T) < 0.6
    garbage = x.copy()
    bad_rows = np.flatnonzero(~mask)
    garbage[bad_rows[0::4]] = np.nan
    garbage[bad_rows[1::4]] = np.inf
    garbage[bad_rows[2::4]] = -np.inf
    garbage[bad_rows[3::4]] = 1e30
    dec = mr.route_logits(garbage, cfg, token_mask=mask)
    compact = mr.route_logits(x[mask], cfg)
    for name in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(dec, name)[mask], getattr(compact, name), err_msg=name)
    for name in ("tokens_per_expert", "pre_drop_tokens_per_expert"):
        np.testing.assert_array_equal(getattr(dec, name), getattr(compact, name), err_msg=name)
    for name in SCALAR_FIELDS:
        assert getattr(dec, name) == getattr(compact, name), name
    for name in ("load_balance_loss", "router_z_loss", "auxiliary_loss"):
        assert getattr(dec, name) == pytest.approx(getattr(compact, name), rel=1e-12, abs=1e-15), name
    if cfg.capacity_factor is not None:
        assert dec.capacity == cfg.capacity(int(mask.sum()))
    # The padding rows themselves: routed nowhere.
    np.testing.assert_array_equal(dec.expert_indices[~mask], np.tile(np.arange(k), (len(bad_rows), 1)))
    assert (dec.expert_weights[~mask] == 0).all()
    assert not dec.kept[~mask].any() and not dec.rerouted[~mask].any()
    assert (dec.expert_slots[~mask] == -1).all()
    assert dec.total_tokens == T and dec.active_tokens == int(mask.sum())


@pytest.mark.parametrize("policy", POLICIES)
def test_padding_in_batch_seq_input(policy, rng):
    """[B, S, E] input with a [B, S] mask: garbage in padding changes nothing, incl. the sequence loss."""
    B, S, E = 6, 64, 8
    x = rng.normal(size=(B, S, E))
    lengths = np.array([64, 10, 33, 1, 50, 64])
    mask = np.arange(S)[None, :] < lengths[:, None]
    mask[5, :] = False  # a fully padded sequence
    garbage = x.copy()
    garbage[~mask] = np.nan
    cfg = mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=1.0, drop_policy=policy,
                          seq_load_balance_loss_coeff=0.2)
    dec = mr.route_logits(garbage, cfg, token_mask=mask)
    clean = mr.route_logits(np.where(mask[..., None], x, 0.0), cfg, token_mask=mask)
    flat = mr.route_logits(x.reshape(-1, E), cfg, token_mask=mask.reshape(-1))
    for name in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(dec, name), getattr(clean, name), err_msg=name)
        np.testing.assert_array_equal(getattr(dec, name), getattr(flat, name), err_msg=name)
    assert dec.load_balance_loss == pytest.approx(flat.load_balance_loss, rel=1e-12)
    assert dec.seq_load_balance_loss == pytest.approx(clean.seq_load_balance_loss, rel=1e-12)
    # Mean over the 5 sequences with an active token, each on its own active tokens.
    per_seq = [mr.route_logits(x[b, :lengths[b]], cfg).load_balance_loss for b in range(5)]
    assert dec.seq_load_balance_loss == pytest.approx(np.mean(per_seq), rel=1e-9)


def test_all_tokens_masked_is_an_empty_batch(rng):
    x = np.full((20, 4), np.nan)
    cfg = mr.RouterConfig(num_experts=4, top_k=2, min_capacity=3)
    dec = mr.route_logits(x, cfg, token_mask=np.zeros(20, bool))
    assert dec.active_tokens == 0 and dec.total_tokens == 20
    assert dec.capacity == 3
    assert dec.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert dec.dropped_assignments == 0 and dec.tokens_dropped == 0
    assert dec.load_balance_loss == 0.0 and dec.router_z_loss == 0.0


# --------------------------------------------------------------------------
# Kind: top-k > 1 counting
# --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_counts_for_top_k(policy, k, rng):
    E, T = 8, 700
    x = rng.normal(size=(T, E)) + np.linspace(2, 0, E)
    x[rng.random((T, E)) < 0.15] = -np.inf  # some fillers
    x[:, 0] = np.where(np.isneginf(x).all(axis=1), 0.0, x[:, 0])
    mask = rng.random(T) < 0.9
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=0.6, drop_policy=policy)
    dec = mr.route_logits(x, cfg, token_mask=mask)
    kept = dec.kept
    assert dec.kept_assignments == int(kept.sum())
    assert dec.dropped_assignments == int(mask.sum()) * k - int(kept.sum())
    assert dec.tokens_dropped == int((mask & ~kept.any(axis=1)).sum())
    np.testing.assert_array_equal(dec.tokens_per_expert, np.bincount(dec.expert_indices[kept], minlength=E))
    assert dec.tokens_dropped > 0 or k > 1


def test_top2_tokens_dropped_counts_tokens_not_assignments():
    """Every token keeps one of its two choices: no token is dropped, T assignments are."""
    T, E = 40, 2
    x = np.tile([[1.0, 0.0], [0.0, 1.0]], (T // 2, 1))  # half prefer expert 0, half expert 1
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=0.5, drop_policy="rank"))
    assert dec.capacity == 20
    assert dec.kept[:, 0].all() and not dec.kept[:, 1].any()
    assert dec.dropped_assignments == T
    assert dec.tokens_dropped == 0  # T - kept = 40 - 40 = 0 would be right only by accident here
    # Position order: tokens 0..9 keep both choices, tokens 10..39 keep none.
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=0.25, drop_policy="position"))
    assert dec.capacity == 10
    np.testing.assert_array_equal(dec.kept.all(axis=1), np.arange(T) < 10)
    assert dec.tokens_dropped == 30 and dec.dropped_assignments == 60  # T - kept would say 20


# --------------------------------------------------------------------------
# Kinds: capacity not enforced / bounds / rounding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cf,min_capacity", [(0.3, 0), (0.3, 40), (1.0, 0), (1.25, 7)])
def test_capacity_is_enforced(cf, min_capacity, policy, overflow, rng):
    E, k, T = 8, 2, 1300
    x = rng.normal(size=(T, E)) + np.linspace(3, 0, E)  # skewed loads
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=min_capacity,
                          drop_policy=policy, overflow=overflow)
    dec = mr.route_logits(x, cfg)
    C = max(min_capacity, math.ceil(Fraction(repr(cf)) * T * k / E))
    assert dec.capacity == C == cfg.capacity(T)
    assert (dec.tokens_per_expert <= C).all()
    if overflow == "drop":
        # Each expert keeps exactly min(C, routed): a full expert is really full.
        np.testing.assert_array_equal(dec.tokens_per_expert, np.minimum(C, dec.pre_drop_tokens_per_expert))
    for e in range(E):
        slots = dec.expert_slots[dec.kept & (dec.expert_indices == e)]
        assert sorted(slots.tolist()) == list(range(len(slots)))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cf,min_capacity", [(2.0, 0), (50.0, 0), (1e6, 0), (0.1, 10_000)])
def test_capacity_above_tokens_keeps_everything(cf, min_capacity, policy, rng):
    E, k, T = 4, 2, 300
    x = rng.normal(size=(T, E))
    x[:, 0] += 5  # everyone wants expert 0
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=min_capacity,
                          drop_policy=policy)
    dec = mr.route_logits(x, cfg)
    assert dec.capacity >= T
    assert dec.kept.all() and dec.dropped_assignments == 0 and dec.tokens_dropped == 0
    free = mr.route_logits(x, cfg.replace(capacity_factor=None, min_capacity=0))
    np.testing.assert_array_equal(dec.expert_slots, free.expert_slots)


@pytest.mark.parametrize("rounding", ["exact", "megatron", "deepspeed"])
@pytest.mark.parametrize("cf", [1e-6, 0.01, 0.1, 0.5, 0.99])
def test_capacity_never_zero_when_tokens_are_fewer_than_experts(cf, rounding):
    E = 64
    for k in (1, 2):
        for T in (1, 2, 7, 31):
            if T * k >= E:
                continue
            cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, capacity_rounding=rounding)
            assert cfg.capacity(T) >= 1, (T, k)
            x = np.zeros((T, E))
            x[:, 5] = 1.0  # all tokens want the same expert
            dec = mr.route_logits(x, cfg)
            assert dec.capacity >= 1
            assert dec.kept[0, 0] and dec.tokens_per_expert[5] >= 1


@pytest.mark.parametrize("T,E,k,cf,exact,megatron,deepspeed", [
    (200, 4, 1, 1.1, 55, 56, 55),     # float64: 50 * 1.1 = 55.00000000000001
    (300, 3, 1, 0.07, 7, 8, 7),       # float64: 100 * 0.07 = 7.000000000000001
    (70, 3, 1, 0.3, 7, 7, 8),         # float32: f32(23.333334) * f32(0.3) > 7
    (140, 3, 1, 0.3, 14, 14, 15),
    (10, 4, 2, 1.25, 7, 7, 7),
    (3, 8, 1, 1.25, 1, 1, 1),
    (1000, 7, 3, 1.3, 558, 558, 558),
])
def test_capacity_rounding_table(T, E, k, cf, exact, megatron, deepspeed):
    # The table itself, from the formulas of docs/semantics.md item 8.
    assert math.ceil(Fraction(repr(cf)) * T * k / E) == exact
    assert math.ceil((T * k / E) * cf) == megatron
    assert math.ceil(float(np.float32(T / E) * np.float32(cf * k))) == deepspeed
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf)
    assert cfg.capacity(T) == exact
    assert cfg.replace(capacity_rounding="megatron").capacity(T) == megatron
    assert cfg.replace(capacity_rounding="deepspeed").capacity(T) == deepspeed
    for rounding, want in (("exact", exact), ("megatron", megatron), ("deepspeed", deepspeed)):
        dec = mr.route_logits(np.zeros((T, E)), cfg.replace(capacity_rounding=rounding))
        assert dec.capacity == want, rounding
        assert dec.tokens_per_expert.max() == min(want, T)


def test_capacity_uses_eval_factor_only_in_evaluation(rng):
    x = rng.normal(size=(400, 8))
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0)
    assert mr.route_logits(x, cfg, training=True).capacity == 100
    assert mr.route_logits(x, cfg, training=False).capacity == 200
    dl = cfg.replace(eval_capacity_factor="dropless")
    ev = mr.route_logits(x, dl, training=False)
    assert ev.dropless and ev.kept.all() and ev.capacity == int(ev.tokens_per_expert.max())
    assert not mr.route_logits(x, dl, training=True).dropless


# --------------------------------------------------------------------------
# Kind: config validation (generalized: every group combination)
# --------------------------------------------------------------------------


def test_group_config_validity_is_exactly_divisibility_and_reachability():
    for E in range(1, 13):
        for G in range(1, E + 1):
            for m in range(1, G + 1):
                for k in range(1, E + 1):
                    valid = E % G == 0 and k <= m * (E // G)
                    try:
                        mr.RouterConfig(num_experts=E, top_k=k, num_groups=G, group_top_k=m)
                    except ValueError as exc:
                        assert not valid, f"E={E} G={G} m={m} k={k} rejected: {exc}"
                        assert ("num_groups" in str(exc)) if E % G else ("top_k" in str(exc))
                    else:
                        assert valid, f"E={E} G={G} m={m} k={k} accepted"
        for G in (g for g in range(1, E + 1) if E % g == 0):
            with pytest.raises(ValueError, match="group_top_k"):
                mr.RouterConfig(num_experts=E, top_k=1, num_groups=G, group_top_k=G + 1)


# --------------------------------------------------------------------------
# Kind: group-limited masking
# --------------------------------------------------------------------------


def _best_groups(keys: np.ndarray, G: int, m: int, group_score: str) -> np.ndarray:
    """Boolean [T, E]: experts in the token's best m groups (numpy, vectorized)."""
    T, E = keys.shape
    g = keys.reshape(T, G, E // G)
    if group_score == "max":
        gs = g.max(axis=2)
    else:
        srt = -np.sort(-g, axis=2)
        top2 = np.where(np.isfinite(srt[:, :, 1]), srt[:, :, 0] + srt[:, :, 1], srt[:, :, 0])
        gs = top2
    order = np.argsort(-gs, axis=1, kind="stable")[:, :m]
    allowed = np.zeros((T, G), bool)
    np.put_along_axis(allowed, order, True, axis=1)
    return np.repeat(allowed, E // G, axis=1)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("score_function,use_bias", [("softmax", False), ("sigmoid", False), ("sigmoid", True)])
def test_group_limit_with_negative_keys(score_function, use_bias, group_score, rng):
    T, E, G, m, k = 500, 16, 4, 2, 4
    x = -np.abs(rng.normal(size=(T, E))) * 3 - 1  # all logits negative
    bias = -np.abs(rng.normal(size=E)) if use_bias else None  # all keys negative
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None, score_function=score_function,
                          num_groups=G, group_top_k=m, group_score=group_score)
    dec = mr.route_logits(x, cfg, expert_bias=bias)
    s = scores(x, score_function)
    gkeys = s + (0 if bias is None else bias)
    allowed = _best_groups(gkeys, G, m, group_score)
    chosen = np.take_along_axis(allowed, dec.expert_indices.astype(np.int64), axis=1)
    assert chosen.all(), "an expert outside the best groups was chosen"
    # Within the allowed experts, the top-k by key (logit without bias, score + bias with it).
    keys = np.where(allowed, x if bias is None else gkeys, -np.inf)
    want = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(dec.expert_indices, want)


def test_group_limit_fillers_when_best_groups_lack_eligible_experts():
    # E=8, 4 groups of 2; best group {2, 3} has one eligible expert; k = 2, m = 1.
    x = np.array([[-np.inf, -np.inf, 5.0, -np.inf, 1.0, 1.0, 0.0, 0.0]])
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=None, num_groups=4, group_top_k=1)
    dec = mr.route_logits(x, cfg)
    assert dec.expert_indices.tolist() == [[2, 0]]  # filler: lowest index not chosen
    assert dec.kept.tolist() == [[True, False]]
    assert dec.expert_slots.tolist() == [[0, -1]]
    assert dec.expert_weights[0, 1] == 0.0
    assert dec.pre_drop_tokens_per_expert.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


# --------------------------------------------------------------------------
# Kinds: NaN logits, inf logits, no eligible expert
# --------------------------------------------------------------------------

BAD_DTYPES = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["nan", "posinf", "all_neginf"])
@pytest.mark.parametrize("token", [0, 3, 511, 512, 1500, 2047])
def test_bad_rows_report_first_offending_token(kind, token, dtype, rng):
    T, E = 2048, 6
    x = rng.normal(size=(T, E)).astype(dtype)
    col = token % E  # every position in the row, across the parametrization

    def spoil(t, what):
        if what == "nan":
            x[t, col] = np.nan
        elif what == "posinf":
            x[t, (col + 1) % E] = np.inf
        else:
            x[t, :] = -np.inf

    spoil(token, kind)
    # Later offenders of every kind, in the same and in later chunks, must not win.
    for later, what in ((token + 1, "posinf"), (token + 2, "all_neginf"), (T - 1, "nan")):
        if later < T and later != token:
            spoil(later, what)
    exc = route_raises(x, mr.RouterConfig(num_experts=E, top_k=2))
    assert isinstance(exc, ValueError) and isinstance(exc, mr.InputError)
    msg = str(exc)
    assert f"token {token}" in msg, msg
    assert "logits" in msg
    word = {"nan": "NaN", "posinf": "+inf", "all_neginf": "-inf"}[kind]
    assert word in msg, msg
    # The same rows masked out are never read.
    mask = np.ones(T, bool)
    bad = ~np.isfinite(x).all(axis=1)
    mask[bad] = False
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=E, top_k=2), token_mask=mask)
    assert dec.active_tokens == int(mask.sum())
    assert len(set(map(tuple, dec.expert_indices[mask].tolist()))) > 1
    assert all(len(set(r)) == 2 for r in dec.expert_indices.tolist()), "duplicate expert ids"


@pytest.mark.parametrize("shape", [(2, 300, 4), (1, 5, 4)])
def test_bad_rows_in_batch_seq_input_use_flat_token_index(shape):
    x = np.zeros(shape)
    B, S, _ = shape
    x[B - 1, S - 2, 1] = np.nan
    exc = route_raises(x, mr.RouterConfig(num_experts=4, top_k=1))
    assert f"token {(B - 1) * S + S - 2}" in str(exc)


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (6, 3), (8, 8)])
def test_neg_inf_means_not_eligible(E, k, rng):
    T = 300
    x = rng.normal(size=(T, E))
    x[rng.random((T, E)) < 0.4] = -np.inf
    x[:, -1] = np.where(np.isneginf(x).all(axis=1), 0.0, x[:, -1])
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None))
    eligible = np.isfinite(x)
    n_elig = eligible.sum(axis=1)
    chosen_elig = np.take_along_axis(eligible, dec.expert_indices.astype(np.int64), axis=1)
    ranks = np.arange(k)[None, :]
    # The first min(k, n_eligible) choices are eligible and kept; the rest are fillers.
    np.testing.assert_array_equal(chosen_elig, ranks < n_elig[:, None])
    np.testing.assert_array_equal(dec.kept, ranks < n_elig[:, None])
    fill = ~dec.kept
    assert (dec.expert_weights[fill] == 0).all() and (dec.expert_slots[fill] == -1).all()
    for t in np.flatnonzero(fill.any(axis=1)):
        n = n_elig[t]
        rest = [e for e in range(E) if e not in dec.expert_indices[t, :n]]
        assert dec.expert_indices[t, n:].tolist() == rest[:k - n]
    assert all(len(set(r)) == k for r in dec.expert_indices.tolist())
    assert dec.dropped_assignments == int(fill.sum())
    assert dec.tokens_per_expert.sum() == dec.pre_drop_tokens_per_expert.sum() == int(dec.kept.sum())


def test_normalized_weights_with_fillers_sum_over_routed_only():
    x = np.array([[0.0, -np.inf, -np.inf, -np.inf], [1.0, 2.0, -np.inf, -np.inf]])
    cfg = mr.RouterConfig(num_experts=4, top_k=3, capacity_factor=None, normalize_weights=True,
                          weight_scale=2.0)
    dec = mr.route_logits(x, cfg)
    np.testing.assert_allclose(dec.expert_weights.sum(axis=1), [2.0, 2.0], rtol=1e-6)
    assert dec.expert_indices.tolist() == [[0, 1, 2], [1, 0, 2]]
    assert dec.kept.tolist() == [[True, False, False], [True, True, False]]


# --------------------------------------------------------------------------
# Kind: expert bias (never reaches the weights)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_bias_never_reaches_weights(score_function, normalize, rng):
    T, E, k, scale = 400, 8, 3, 1.7
    x = rng.normal(size=(T, E))
    bias = rng.normal(size=E) * 2.0  # large: it changes the selection a lot
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None, score_function=score_function,
                          normalize_weights=normalize, weight_scale=scale)
    dec = mr.route_logits(x, cfg, expert_bias=bias)
    plain = mr.route_logits(x, cfg)
    assert (dec.expert_indices != plain.expert_indices).any(), "the bias must change the selection"
    s = scores(x, score_function)
    w = np.take_along_axis(s, dec.expert_indices.astype(np.int64), axis=1)
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dec.expert_weights, (w * scale).astype(np.float32), rtol=1e-6, atol=1e-7)
    # The losses' P_e does not see the bias either (f_e does: it follows the routing).
    counts = np.bincount(dec.expert_indices.ravel(), minlength=E)
    P = (s / s.sum(axis=1, keepdims=True)).mean(axis=0)
    assert dec.load_balance_loss == pytest.approx(E * np.sum(counts / (T * k) * P), rel=1e-9)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_bias_selection_key_is_score_plus_bias(score_function):
    """Semantics item 3: with a bias, experts are ranked by score + bias (float64).

    logits [0, 1, 2, 3], bias [0, 0.6, 0, 0], k = 1: softmax scores are
    [0.032, 0.087, 0.237, 0.644]; expert 1's key 0.687 beats expert 3's 0.644.
    (An earlier build ranked by exp(z - max) + bias and picked expert 3.)
    """
    x = np.array([[0.0, 1.0, 2.0, 3.0]])
    bias = np.array([0.0, 0.6, 0.0, 0.0])
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=None, score_function=score_function)
    s = scores(x, score_function)[0]
    want = int(np.argmax(s + bias))
    assert want == 1
    dec = mr.route_logits(x, cfg, expert_bias=bias)
    assert dec.expert_indices.tolist() == [[want]]
    assert dec.expert_weights[0, 0] == pytest.approx(s[1], rel=1e-6)
    # And over many random rows.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    B = rng.normal(size=8) * 0.2
    cfg = cfg.replace(num_experts=8, top_k=2)
    dec = mr.route_logits(X, cfg, expert_bias=B)
    keys = scores(X, score_function) + B
    np.testing.assert_array_equal(dec.expert_indices, np.argsort(-keys, axis=1, kind="stable")[:, :2])


def test_zero_bias_changes_nothing(rng):
    x = rng.normal(size=(300, 8))
    cfg = mr.RouterConfig(num_experts=8, top_k=2)
    a = mr.route_logits(x, cfg)
    b = mr.route_logits(x, cfg, expert_bias=np.zeros(8))
    for name in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------
# Kinds: renormalisation axis, weight semantics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("E", [2, 5, 64])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_top1_normalized_weights_are_scale(E, scale, rng):
    x = rng.normal(size=(50, E))
    cfg = mr.RouterConfig(num_experts=E, top_k=1, capacity_factor=None, normalize_weights=True,
                          weight_scale=scale)
    dec = mr.route_logits(x, cfg)
    np.testing.assert_allclose(dec.expert_weights, scale, rtol=1e-7)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_normalization_is_per_token(score_function, rng):
    """Over the token's k choices (axis 1), never over the batch; each row independent of the others."""
    x = rng.normal(size=(64, 8)) * 3
    cfg = mr.RouterConfig(num_experts=8, top_k=3, capacity_factor=None, normalize_weights=True,
                          score_function=score_function)
    dec = mr.route_logits(x, cfg)
    np.testing.assert_allclose(dec.expert_weights.sum(axis=1), 1.0, rtol=1e-6)
    for t in (0, 17, 63):
        one = mr.route_logits(x[t:t + 1], cfg)
        np.testing.assert_array_equal(one.expert_weights[0], dec.expert_weights[t])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_weights_are_full_softmax_or_topk_softmax(k, rng):
    E = 8
    x = rng.normal(size=(100, E)) * 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)
    dec = mr.route_logits(x, cfg)
    idx = dec.expert_indices.astype(np.int64)
    full = np.take_along_axis(scores(x), idx, axis=1)
    np.testing.assert_allclose(dec.expert_weights, full, rtol=1e-6)
    normed = mr.route_logits(x, cfg.replace(normalize_weights=True))
    topk_softmax = scores(np.take_along_axis(x, idx, axis=1))  # softmax over the top-k logits
    np.testing.assert_allclose(normed.expert_weights, topk_softmax, rtol=1e-6)
    sig = mr.route_logits(x, cfg.replace(score_function="sigmoid"))
    np.testing.assert_allclose(sig.expert_weights,
                               np.take_along_axis(scores(x, "sigmoid"), idx, axis=1), rtol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_dropped_weights_are_zero_and_others_not_renormalized(policy, rng):
    x = rng.normal(size=(600, 8)) + np.linspace(2, 0, 8)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.7, drop_policy=policy,
                          normalize_weights=True)
    dec = mr.route_logits(x, cfg)
    free = mr.route_logits(x, cfg.replace(capacity_factor=None))
    assert (~dec.kept).any()
    np.testing.assert_array_equal(dec.expert_weights[~dec.kept], 0)
    np.testing.assert_array_equal(dec.expert_weights[dec.kept], free.expert_weights[dec.kept])
    renorm = mr.route_logits(x, cfg.replace(renormalize_after_drop=True))
    partly = dec.kept.any(axis=1)
    np.testing.assert_allclose(renorm.expert_weights.sum(axis=1)[partly], 1.0, rtol=1e-6)


def test_scores_that_underflow_to_zero_normalize_exactly_not_to_nan():
    """Sigmoid scores that underflow to 0 in float64 still have exact ratios: (re)normalization gives them.

    Row 0's four scores are all e^-1000 (0 in float64): normalized over the two
    chosen they are [0.5, 0.5], and the score distribution of the load-balance
    loss is uniform. (Earlier builds gave [0, 0] and left the row out of P_e,
    as if the sum were 0; one clamped the sigmoid's exponent and gave [0.5, 0.5]
    for the wrong reason.)
    """
    x = np.array([[-1000.0, -1000.0, -1000.0, -1000.0], [0.0, 0.0, -1000.0, -1000.0]])
    for renormalize in (False, True):
        cfg = mr.RouterConfig(num_experts=4, top_k=2, capacity_factor=None, score_function="sigmoid",
                              normalize_weights=True, renormalize_after_drop=renormalize)
        dec = mr.route_logits(x, cfg)
        assert np.isfinite(dec.expert_weights).all()
        np.testing.assert_allclose(dec.expert_weights, [[0.5, 0.5], [0.5, 0.5]], rtol=1e-7)
        assert dec.kept.all()
        assert math.isfinite(dec.load_balance_loss) and math.isfinite(dec.router_z_loss)
        # P_e: row 0 is [0.25] * 4, row 1 is [0.5, 0.5, 0, 0]; f = [2, 2, 0, 0] / 4.
        assert dec.load_balance_loss == pytest.approx(4 * (0.5 * 0.375 + 0.5 * 0.375), rel=1e-12)


def test_zero_renormalization_denominator_gives_zero_weights_not_nan():
    """A token whose only kept assignment was rerouted with reroute_weight_scale=0 sums to 0: weight 0."""
    x = np.array([[5.0, 0.0, -1.0], [5.0, 0.0, -1.0]])
    cfg = mr.RouterConfig(num_experts=3, top_k=1, capacity_factor=0.5, overflow="reroute",
                          reroute_weight_scale=0.0, renormalize_after_drop=True)
    dec = mr.route_logits(x, cfg)  # capacity 1: token 1 is rerouted to expert 1 with weight 0
    assert dec.kept.all() and dec.rerouted[1, 0]
    assert dec.expert_weights.tolist() == [[1.0], [0.0]]


def test_sigmoid_of_very_negative_logits():
    """float64 sigmoid keeps the ratio e^-1 of two scores one logit apart, far into the tail.

    (An earlier build clamped the exponent at 700 and gave [0.5, 0.5] below -700.)
    """
    cfg = mr.RouterConfig(num_experts=2, top_k=2, capacity_factor=None, score_function="sigmoid",
                          normalize_weights=True)
    for z in (-100.0, -650.0, -700.5, -706.0):
        dec = mr.route_logits(np.array([[z, z - 1.0]]), cfg)
        np.testing.assert_allclose(dec.expert_weights[0], [1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))], rtol=1e-6,
                                   err_msg=f"logits [{z}, {z - 1}]")


def test_sigmoid_of_subnormal_range_logits():
    """Between about -708 and -745 the float64 sigmoid is a subnormal number, not 0.

    Weights and losses must stay finite and keep the ratio of the two scores
    (float64: sigmoid(-720) = 2.0e-313, sigmoid(-721) = 7.5e-314, normalized
    [0.731, 0.269]). Regression: earlier builds gave [0, 0] (exp flushed to 0
    below -708), then [inf, inf] with an infinite load-balance loss (the
    normalization multiplied by scale / sum, and 1 / 2.7e-313 overflows).
    """
    assert np.exp(-720.0) > 0 and np.exp(-744.0) > 0
    cfg = mr.RouterConfig(num_experts=2, top_k=2, capacity_factor=None, score_function="sigmoid",
                          normalize_weights=True)
    for z in (-710.0, -720.0, -735.0):
        dec = mr.route_logits(np.array([[z, z - 1.0]]), cfg)
        assert np.isfinite(dec.expert_weights).all(), f"logits [{z}, {z - 1}]: weights {dec.expert_weights}"
        assert math.isfinite(dec.load_balance_loss), f"logits [{z}, {z - 1}]: lb {dec.load_balance_loss}"
        want = np.array([np.exp(z), np.exp(z - 1.0)])
        np.testing.assert_allclose(dec.expert_weights[0], want / want.sum(), rtol=1e-5,
                                   err_msg=f"logits [{z}, {z - 1}]")
        assert dec.load_balance_loss == pytest.approx(1.0, rel=1e-5)


# --------------------------------------------------------------------------
# Kind: top-k ties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(8, 3), (5, 5), (64, 6)])
def test_ties_go_to_the_lower_expert_index(E, k, score_function, rng):
    x = np.zeros((3, E))
    x[1, E // 2:] = 1.0  # tie among the upper half
    x[2, ::2] = -1.0
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None, score_function=score_function)
    dec = mr.route_logits(x, cfg)
    for t in range(3):
        want = sorted(range(E), key=lambda e: (-x[t, e], e))[:k]
        assert dec.expert_indices[t].tolist() == want
    # Integer-valued random logits: many ties, same total order.
    X = np.round(rng.normal(size=(500, E)))
    dec = mr.route_logits(X, cfg)
    np.testing.assert_array_equal(dec.expert_indices, np.argsort(-X, axis=1, kind="stable")[:, :k])
    # Equal biases on equal logits keep the index order.
    dec = mr.route_logits(X, cfg, expert_bias=np.full(E, 0.25))
    np.testing.assert_array_equal(dec.expert_indices, np.argsort(-X, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("policy", POLICIES)
def test_tied_tokens_resolved_by_token_order(policy):
    T, E = 1500, 4
    x = np.tile([[2.0, 1.0, 0.0, 0.0]], (T, 1))  # all tokens identical: every tie
    cfg = mr.RouterConfig(num_experts=E, top_k=1, capacity_factor=1.0, drop_policy=policy)
    dec = mr.route_logits(x, cfg)
    C = dec.capacity
    assert C == 375
    np.testing.assert_array_equal(dec.kept[:, 0], np.arange(T) < C)
    np.testing.assert_array_equal(dec.expert_slots[:C, 0], np.arange(C))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_identical_across_runs_and_thread_counts(policy, dtype, restore_threads, rng):
    T, E, k = 5000, 16, 4
    x = np.round(rng.normal(size=(T, E)) * 1.5).astype(dtype)
    mask = rng.random(T) < 0.9
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=0.9, drop_policy=policy,
                          overflow="reroute", normalize_weights=True)
    results = []
    for threads in (1, 2, 4, 0, 3):
        restore_threads(threads)
        for _ in range(2):
            results.append(mr.route_logits(x, cfg, token_mask=mask))
    first = results[0]
    for other in results[1:]:
        for name in ARRAY_FIELDS + ("tokens_per_expert", "pre_drop_tokens_per_expert"):
            np.testing.assert_array_equal(getattr(first, name), getattr(other, name), err_msg=name)
        for name in ("load_balance_loss", "router_z_loss", "capacity", "dropped_assignments"):
            assert getattr(first, name) == getattr(other, name), name


# --------------------------------------------------------------------------
# Kind: empty batch
# --------------------------------------------------------------------------

EMPTY_SHAPES = [(0, 4), (0, 5, 4), (3, 0, 4)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("cf", [None, 1.25])
@pytest.mark.parametrize("policy", POLICIES)
def test_empty_batch(policy, cf, overflow, shape):
    """An empty batch gives empty arrays and zero counts and losses, for every policy."""
    cfg = mr.RouterConfig(num_experts=4, top_k=2, capacity_factor=cf, drop_policy=policy, overflow=overflow)
    for training in (False, True):
        dec = mr.route_logits(np.zeros(shape, np.float32), cfg, training=training)
        assert dec.total_tokens == 0 and dec.active_tokens == 0
        assert dec.expert_indices.shape == (0, 2) and dec.expert_weights.shape == (0, 2)
        assert dec.expert_slots.shape == (0, 2) and dec.kept.shape == (0, 2)
        assert dec.tokens_per_expert.tolist() == [0, 0, 0, 0]
        assert dec.pre_drop_tokens_per_expert.tolist() == [0, 0, 0, 0]
        assert dec.capacity == 0 and dec.dropped_assignments == 0 and dec.tokens_dropped == 0
        assert dec.load_balance_loss == 0.0 and dec.router_z_loss == 0.0
        assert dec.batch_shape == shape[:-1]
        util = dec.expert_utilization()
        assert all(math.isfinite(v) for v in util.values())
        assert util["tokens_dropped_rate"] == 0.0 and dec.routing_efficiency() == 1.0
        assert dec.load_balance_cv() == 0.0 and dec.expert_assignments == []
        if len(shape) == 2:
            assert dec.seq_load_balance_loss is None and dec.auxiliary_loss == 0.0


@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4)], ids=str)
def test_empty_batch_seq_loss_of_3d_input_is_zero(shape):
    """Semantics item 12: [B, S, E] input has a sequence loss, 0 when no token is active.

    Regression: an earlier build returned None for [B, 0, E] (and 0.0 for [0, S, E]);
    a later one raised InputError for [B, 0, E].
    """
    cfg = mr.RouterConfig(num_experts=4, top_k=2, seq_load_balance_loss_coeff=1.0)
    dec = mr.route_logits(np.zeros(shape), cfg)
    assert dec.seq_load_balance_loss == 0.0
    assert dec.auxiliary_loss == 0.0


def test_empty_batch_matches_reference():
    cfg = mr.RouterConfig(num_experts=4, top_k=2, min_capacity=2)
    ref = reference_route(np.zeros((0, 4)), cfg)
    dec = mr.route_logits(np.zeros((0, 4)), cfg)
    assert dec.capacity == ref["capacity"] == 2


# --------------------------------------------------------------------------
# Sanity of the helpers used above
# --------------------------------------------------------------------------


def test_helpers_agree_with_reference(rng):
    x = rng.normal(size=(5, 6))
    ref = reference_route(x, mr.RouterConfig(num_experts=6, top_k=2, capacity_factor=None))
    assert ref["router_z_loss"] == pytest.approx(np.mean(logsumexp(x) ** 2), rel=1e-12)
    w = np.take_along_axis(scores(x), ref["expert_indices"].astype(np.int64), axis=1)
    np.testing.assert_allclose(ref["expert_weights"], w, rtol=1e-7)


@pytest.mark.parametrize("policy", ["position", "rank", "probs", "bpr"])
def test_reroute_only_to_experts_the_token_may_use(policy):
    """A rerouted assignment never lands on an ineligible (-inf) expert or outside the
    token's allowed groups (semantics item 13)."""
    rng = np.random.default_rng(3)
    T, E = 400, 8
    x = rng.standard_normal((T, E))
    x[:, 0] += 4.0                      # everybody wants expert 0: heavy overflow
    x[::3, 1:] = -np.inf                # every third token may only use expert 0
    cfg = mr.RouterConfig(num_experts=E, top_k=1, capacity_factor=1.0, drop_policy=policy,
                          overflow="reroute")
    dec = mr.route_logits(x, cfg)
    assert dec.rerouted.any()
    moved = np.nonzero(dec.rerouted)
    assert np.isfinite(x[moved[0], dec.expert_indices[moved]]).all()
    assert not dec.rerouted[::3].any()  # tokens that may only use expert 0 are never moved
    # Groups: 4 groups of 2, one group per token; reroutes stay in the token's group.
    g = cfg.replace(num_groups=4, group_top_k=1, score_function="sigmoid")
    y = rng.standard_normal((T, E))
    y[:, 0] += 4.0
    d = mr.route_logits(y, g)
    t, j = np.nonzero(d.rerouted)
    assert t.size > 0
    assert ((d.expert_indices[t, j] // 2) == 0).all()  # group 0 holds experts 0 and 1

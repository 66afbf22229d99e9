"""Parity of ``mr.route_logits`` with the sequential reference (tests/reference.py).

Integer outputs (indices, slots, kept, counts, capacity, drop counts) must agree
exactly; weights to rtol=1e-6 / atol=1e-7; losses to 1e-6 relative.

A note on ties: integer-valued logits create exact ties, which both sides must
break the same way (lower expert index, lower token index). Ties that exist only
in exact arithmetic but not in float64 (e.g. ``(s1 + b1) + (s2 + b2)`` against
``(s2 + b1) + (s1 + b2)`` under ``group_score="top2_sum"`` with a bias) depend on
the last bit of each softmax and are not specified by the semantics, so those
combinations use continuous logits.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Any, Dict

import numpy as np
import pytest

import moe_router as mr
from reference import reference_route

EXACT_FIELDS = (
    "expert_indices", "expert_slots", "kept", "rerouted", "tokens_per_expert",
    "pre_drop_tokens_per_expert", "capacity", "dropless", "active_tokens", "kept_assignments",
    "dropped_assignments", "tokens_dropped", "total_tokens",
)
LOSS_FIELDS = ("load_balance_loss", "router_z_loss", "auxiliary_loss")


def assert_parity(dec: mr.RoutingDecision, ref: Dict[str, Any]) -> None:
    for name in EXACT_FIELDS:
        got, want = getattr(dec, name), ref[name]
        if isinstance(want, np.ndarray):
            assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
            diff = np.argwhere(np.asarray(got) != want)
            assert diff.size == 0, (
                f"{name} differs at {len(diff)} positions; first {diff[:5].tolist()}: "
                f"got {np.asarray(got)[tuple(diff[0])]!r}, want {want[tuple(diff[0])]!r}")
        else:
            assert got == want, f"{name}: got {got!r}, want {want!r}"
    assert dec.expert_indices.dtype == np.int32 and dec.expert_slots.dtype == np.int32
    assert dec.expert_weights.dtype == np.float32 and dec.kept.dtype == np.bool_
    assert dec.tokens_per_expert.dtype == np.int64
    np.testing.assert_allclose(dec.expert_weights, ref["expert_weights"], rtol=1e-6, atol=1e-7,
                               err_msg="expert_weights")
    for name in LOSS_FIELDS:
        np.testing.assert_allclose(getattr(dec, name), ref[name], rtol=1e-6, atol=1e-12, err_msg=name)
    if hasattr(dec, "expert_prob_mean"):  # P_e, exposed by newer versions of the decision
        np.testing.assert_allclose(dec.expert_prob_mean, ref["expert_prob_mean"], rtol=1e-6, atol=1e-12,
                                   err_msg="expert_prob_mean")
    if ref["seq_load_balance_loss"] is None:
        assert dec.seq_load_balance_loss is None
    else:
        assert dec.seq_load_balance_loss is not None
        np.testing.assert_allclose(dec.seq_load_balance_loss, ref["seq_load_balance_loss"], rtol=1e-6,
                                   atol=1e-12, err_msg="seq_load_balance_loss")


def check(logits, config: mr.RouterConfig, **call) -> mr.RoutingDecision:
    dec = mr.route_logits(logits, config, **call)
    assert_parity(dec, reference_route(logits, config, **call))
    return dec


def random_logits(rng: np.random.Generator, shape, *, dtype=np.float32, ints: bool = False,
                  neg_inf: float = 0.1, skew: float = 0.0) -> np.ndarray:
    """Normal logits with some -inf entries (never a whole row), optionally integer-valued (ties)."""
    x = rng.normal(size=shape)
    if skew:
        x = x + skew * np.linspace(1.0, 0.0, shape[-1])
    if ints:
        x = np.round(x * 1.5)
    if neg_inf:
        x[rng.random(shape) < neg_inf] = -np.inf
        flat = x.reshape(-1, shape[-1])
        dead = np.isneginf(flat).all(axis=1)
        flat[dead, rng.integers(0, shape[-1], size=int(dead.sum()))] = 0.0
        # A few rows with exactly one eligible expert (fewer than k: filler choices).
        if flat.shape[0] > 20 and shape[-1] > 1:
            flat[7, :] = -np.inf
            flat[7, shape[-1] - 1] = 0.5
        x = flat.reshape(shape)
    return x.astype(dtype)


# --------------------------------------------------------------------------
# Random grid: (E, k) x capacity factor x drop policy, other options rotated
# --------------------------------------------------------------------------

EK = [(1, 1), (4, 1), (8, 2), (16, 4), (64, 6)]
FACTORS = [None, 0.5, 1.0, 1.25, 2.0]
POLICIES = ["position", "rank", "probs", "bpr"]
SIZES = [700, 1300, 1537, 300]


def _grid():
    for n, ((e, k), cf, policy) in enumerate(itertools.product(EK, FACTORS, POLICIES)):
        yield pytest.param(e, k, cf, policy, n, id=f"E{e}-k{k}-cf{cf}-{policy}")


@pytest.mark.parametrize("E,k,cf,policy,n", list(_grid()))
def test_random_grid(E, k, cf, policy, n):
    rng = np.random.default_rng(1000 + n)
    T = SIZES[n % len(SIZES)]
    dtype = np.float32 if n % 2 == 0 else np.float64
    cfg = mr.RouterConfig(
        num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy,
        score_function="sigmoid" if n % 3 == 1 else "softmax",
        normalize_weights=n % 4 >= 2,
        weight_scale=(1.0, 2.5, 0.75)[n % 3],
    )
    x = random_logits(rng, (T, E), dtype=dtype, ints=n % 5 in (0, 3), neg_inf=0.1 if E > 1 else 0.0,
                      skew=1.5 if n % 7 == 0 else 0.0)
    dec = check(x, cfg)
    assert dec.total_tokens == T


# --------------------------------------------------------------------------
# Each option on its own, for every drop policy
# --------------------------------------------------------------------------

OPTION_CASES: Dict[str, Dict[str, Any]] = {
    "min_capacity": dict(config=dict(num_experts=8, top_k=2, capacity_factor=0.25, min_capacity=120)),
    "megatron_rounding": dict(config=dict(num_experts=12, top_k=2, capacity_factor=1.1,
                                          capacity_rounding="megatron"), T=1320),
    "deepspeed_rounding": dict(config=dict(num_experts=7, top_k=3, capacity_factor=1.3,
                                           capacity_rounding="deepspeed"), T=1111),
    "eval_factor_eval": dict(config=dict(num_experts=8, top_k=2, capacity_factor=2.0,
                                         eval_capacity_factor=0.6), call=dict(training=False)),
    "eval_factor_training": dict(config=dict(num_experts=8, top_k=2, capacity_factor=0.6,
                                             eval_capacity_factor=2.0), call=dict(training=True)),
    "eval_dropless": dict(config=dict(num_experts=8, top_k=2, capacity_factor=0.5,
                                      eval_capacity_factor="dropless")),
    "expert_bias": dict(config=dict(num_experts=16, top_k=4, capacity_factor=1.0), bias=0.2, ints=True),
    "expert_bias_sigmoid": dict(config=dict(num_experts=16, top_k=2, capacity_factor=1.0,
                                            score_function="sigmoid", normalize_weights=True), bias=0.3),
    "token_mask": dict(config=dict(num_experts=8, top_k=2, capacity_factor=1.0), mask=0.7, ints=True),
    "renormalize_after_drop": dict(config=dict(num_experts=8, top_k=3, capacity_factor=0.75,
                                               renormalize_after_drop=True, weight_scale=2.0)),
    "renormalize_normalized": dict(config=dict(num_experts=8, top_k=2, capacity_factor=0.75,
                                               normalize_weights=True, renormalize_after_drop=True)),
    "reroute_eval": dict(config=dict(num_experts=8, top_k=2, capacity_factor=1.0, overflow="reroute",
                                     reroute_weight_scale=0.5), skew=2.0),
    "reroute_eval_masked_renorm": dict(config=dict(num_experts=6, top_k=2, capacity_factor=1.25,
                                                   overflow="reroute", renormalize_after_drop=True),
                                       skew=2.0, mask=0.8, ints=True),
    "reroute_training_p1": dict(config=dict(num_experts=8, top_k=2, capacity_factor=1.0, overflow="reroute",
                                            expert_dropout=1.0), call=dict(training=True), skew=2.0),
    "reroute_training_p0": dict(config=dict(num_experts=8, top_k=2, capacity_factor=1.0, overflow="reroute",
                                            expert_dropout=0.0), call=dict(training=True), skew=2.0),
    "groups_max": dict(config=dict(num_experts=16, top_k=4, capacity_factor=1.0, num_groups=4,
                                   group_top_k=2, group_score="max"), ints=True),
    "groups_max_bias": dict(config=dict(num_experts=16, top_k=4, capacity_factor=1.0, num_groups=4,
                                        group_top_k=2, group_score="max"), bias=0.1, ints=True),
    "groups_top2_sum": dict(config=dict(num_experts=12, top_k=3, capacity_factor=1.25, num_groups=3,
                                        group_top_k=1, group_score="top2_sum"), ints=True),
    "groups_top2_sum_bias_sigmoid": dict(config=dict(num_experts=32, top_k=6, capacity_factor=1.0,
                                                     num_groups=8, group_top_k=3, group_score="top2_sum",
                                                     score_function="sigmoid", normalize_weights=True,
                                                     weight_scale=2.5), bias=0.05),
    "batch_seq_input": dict(config=dict(num_experts=8, top_k=2, capacity_factor=1.0,
                                        seq_load_balance_loss_coeff=0.1), shape=(10, 64), mask=0.85),
    "batch_seq_input_small": dict(config=dict(num_experts=4, top_k=2, capacity_factor=0.75,
                                              seq_load_balance_loss_coeff=1.0), shape=(6, 7), mask=0.7,
                                  ints=True),
}


def _option_params():
    for case in sorted(OPTION_CASES):
        for policy in POLICIES:
            yield pytest.param(case, policy, id=f"{case}-{policy}")


@pytest.mark.parametrize("case,policy", list(_option_params()))
def test_option(case, policy):
    spec = OPTION_CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{case}/{policy}".encode()))
    cfg = mr.RouterConfig(drop_policy=policy, **spec["config"])
    E = cfg.num_experts
    lead = spec.get("shape", (spec.get("T", 1100),))
    x = random_logits(rng, lead + (E,), dtype=np.float64 if len(case) % 2 else np.float32,
                      ints=spec.get("ints", False), skew=spec.get("skew", 0.0))
    call = dict(spec.get("call", {}))
    if "mask" in spec:
        call["token_mask"] = rng.random(lead) < spec["mask"]
    if "bias" in spec:
        call["expert_bias"] = rng.normal(size=E) * spec["bias"]
    dec = check(x, cfg, **call)
    if case.startswith("reroute") and not case.endswith("p0"):
        assert dec.rerouted.any(), "the construction must exercise rerouting"
    if case == "reroute_training_p0":
        assert not dec.rerouted.any()
    if case.startswith("batch_seq"):
        assert dec.seq_load_balance_loss is not None


def test_option_cases_differ_from_defaults():
    """The option grid must really change the routing, or it tests nothing new."""
    rng = np.random.default_rng(3)
    x = random_logits(rng, (1100, 8), neg_inf=0.0)
    base = mr.route_logits(x, mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.25))
    minc = mr.route_logits(x, mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.25, min_capacity=120))
    assert base.capacity == 69 and minc.capacity == 120
    assert minc.kept_assignments > base.kept_assignments


# --------------------------------------------------------------------------
# Chunk boundaries: T around multiples of 512, several chunks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 511, 512, 513, 1023, 1025, 2600])
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_boundaries(T, policy):
    rng = np.random.default_rng(T)
    cfg = mr.RouterConfig(num_experts=6, top_k=2, capacity_factor=0.9, drop_policy=policy)
    x = random_logits(rng, (T, 6), ints=True, neg_inf=0.05)
    check(x, cfg)
    check(x, cfg, token_mask=rng.random(T) < 0.6)


# --------------------------------------------------------------------------
# [B, S, E] input whose sequence length does not divide the 512-token chunk
# --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cf", [None, 1.0])
@pytest.mark.parametrize("B,S", [(7, 100), (2, 600), (5, 513)])
def test_batch_seq_input_sequence_not_dividing_chunk(B, S, cf, policy):
    """[B, S, E] input with T > 512 and S not dividing the 512-token chunk.

    Regression: an earlier build worked in sequence-aligned chunks in the scoring
    pass but assumed 512-token chunks when giving slots, so tokens past 512 were
    kept with slot -1, capacity was not enforced, and some inputs raised
    pyo3_runtime.PanicException ("disjoint write out of bounds").
    """
    rng = np.random.default_rng(B * 1000 + S)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=cf, drop_policy=policy,
                          seq_load_balance_loss_coeff=0.3)
    x = random_logits(rng, (B, S, 8), neg_inf=0.0)
    mask = rng.random((B, S)) < 0.9
    for call in ({}, {"token_mask": mask}):
        try:
            dec = mr.route_logits(x, cfg, **call)
        except BaseException as exc:  # a PanicException is a BaseException
            pytest.fail(f"route_logits raised {type(exc).__name__}: {exc}")
        assert_parity(dec, reference_route(x, cfg, **call))


# --------------------------------------------------------------------------
# Real router logits (MiniLM layers 3 and 5, MoEfication)
# --------------------------------------------------------------------------

REAL_FULL = [
    # (E, k, cf, policy, extra config)
    (64, 2, 1.0, "position", {}),
    (8, 2, None, "position", {}),
    (256, 2, 1.25, "probs", {}),
]
REAL_SUBSET = [
    (8, 1, 1.0, "rank", {}),
    (8, 2, 1.25, "bpr", {"normalize_weights": True}),
    (64, 2, 0.5, "probs", {}),
    (64, 4, 2.0, "position", {"normalize_weights": True}),
    (64, 2, None, "bpr", {}),
    (256, 8, 1.25, "rank", {"score_function": "sigmoid", "normalize_weights": True, "weight_scale": 2.5}),
    (256, 1, 1.0, "bpr", {}),
    (256, 4, None, "probs", {}),
    (64, 8, 1.0, "probs", {"num_groups": 8, "group_top_k": 4, "group_score": "top2_sum",
                           "score_function": "sigmoid", "normalize_weights": True}),
    (64, 2, 1.0, "bpr", {"overflow": "reroute"}),
    (8, 2, 0.75, "rank", {"renormalize_after_drop": True, "capacity_rounding": "megatron"}),
]
REAL_FILES = ["minilm_l3.npz", "minilm_l5.npz"]


@pytest.mark.parametrize("E,k,cf,policy,extra", REAL_FULL,
                         ids=[f"E{e}-k{k}-cf{cf}-{p}" for e, k, cf, p, _ in REAL_FULL])
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_router_full(real_logits, name, E, k, cf, policy, extra):
    x = real_logits(name, E)
    assert x.shape == (16384, E) and x.dtype == np.float32
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy, **extra)
    dec = check(x, cfg)
    if cf is not None:
        # The real loads are skewed: capacity must bite.
        assert dec.dropped_assignments > 0


@pytest.mark.parametrize("E,k,cf,policy,extra", REAL_SUBSET,
                         ids=[f"E{e}-k{k}-cf{cf}-{p}-{i}" for i, (e, k, cf, p, _) in enumerate(REAL_SUBSET)])
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_router_subset(real_logits, name, E, k, cf, policy, extra):
    x = real_logits(name, E)
    sub = np.ascontiguousarray(x[::4])  # 4096 tokens, every 4th
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy, **extra)
    call = {}
    if "num_groups" in extra:
        call["expert_bias"] = np.random.default_rng(E).normal(size=E) * 0.05
    check(sub, cfg, **call)


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_router_batch_seq(real_logits, name, real_router_dir):
    """The real text as [128 sequences, 128 tokens, E], with padding after each sequence's end."""
    x = real_logits(name, 64).reshape(128, 128, 64)
    rng = np.random.default_rng(5)
    lengths = rng.integers(20, 129, size=128)
    mask = np.arange(128)[None, :] < lengths[:, None]
    cfg = mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25, seq_load_balance_loss_coeff=0.5)
    dec = check(x, cfg, token_mask=mask)
    assert dec.active_tokens == int(lengths.sum())
    assert dec.seq_load_balance_loss is not None and dec.seq_load_balance_loss > 0


# --------------------------------------------------------------------------
# Expert counts that are not multiples of 8, heavy ties, mostly-ineligible rows,
# and logits over a wide range (the core's vectorized exp and top-k prefilter)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("E", [2, 3, 7, 9, 17, 33, 100, 257])
def test_odd_expert_counts_ties_and_wide_ranges(E):
    rng = np.random.default_rng(E)
    for n, k in enumerate(sorted({1, 2, min(E, 5), min(E, 8), E})):
        cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0, normalize_weights=n % 2 == 1,
                              score_function="sigmoid" if n % 3 == 2 else "softmax",
                              drop_policy=POLICIES[n % 4])
        ties = np.round(random_logits(rng, (300, E), ints=True, neg_inf=0.0) / 3)
        sparse = random_logits(rng, (300, E), neg_inf=0.9)
        wide = rng.uniform(-800, 800, size=(300, E))
        for x in (ties, sparse, wide, wide.astype(np.float32)):
            check(x, cfg)


@pytest.mark.parametrize("group_score", ["top3_sum", "top4_sum"])
@pytest.mark.parametrize("group_score_input", ["scores", "logits"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_scores_top_n_on_scores_or_logits(group_score, group_score_input, with_bias):
    """Group scores summing the n best keys, on scores or on raw logits (Megatron post-softmax)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1500, 32))
    bias = rng.uniform(-0.05, 0.05, 32) if with_bias else None
    cfg = mr.RouterConfig(num_experts=32, top_k=4, capacity_factor=1.25, num_groups=4, group_top_k=2,
                          group_score=group_score, group_score_input=group_score_input)
    dec = mr.route_logits(x, cfg, expert_bias=bias)
    assert_parity(dec, reference_route(x, cfg, expert_bias=bias))

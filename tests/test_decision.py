"""The RoutingDecision API: metrics, the per-token assignment views, probabilities and to_dict."""

from __future__ import annotations

import gc
import json
import math
import sys
import weakref

import numpy as np
import pytest

import moe_router as mr
from helpers import same_at_thread_counts, sigmoid, softmax
from reference import reference_route


@pytest.fixture
def decision(rng):
    """A capacity-limited top-2 decision with padding, drops and a weight_scale > 1."""
    T, E = 500, 8
    x = rng.normal(size=(T, E)) + np.linspace(2, 0, E)
    mask = rng.random(T) < 0.85
    cfg = mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=0.9, weight_scale=1.5,
                          load_balance_loss_coeff=0.05, router_z_loss_coeff=0.002)
    dec = mr.route_logits(x, cfg, token_mask=mask)
    assert dec.dropped_assignments > 0 and dec.tokens_dropped >= 0
    return dec, x, mask, cfg


def test_array_types_and_shapes(decision):
    dec, x, mask, cfg = decision
    T, E, k = x.shape[0], cfg.num_experts, cfg.top_k
    assert dec.expert_indices.dtype == np.int32 and dec.expert_indices.shape == (T, k)
    assert dec.expert_weights.dtype == np.float32 and dec.expert_weights.shape == (T, k)
    assert dec.expert_slots.dtype == np.int32 and dec.expert_slots.shape == (T, k)
    assert dec.kept.dtype == np.bool_ and dec.kept.shape == (T, k)
    assert dec.tokens_per_expert.dtype == np.int64 and dec.tokens_per_expert.shape == (E,)
    assert dec.num_experts == E and dec.top_k == k and dec.total_tokens == T
    assert dec.router_probs is None
    for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "tokens_per_expert"):
        assert not np.shares_memory(getattr(dec, name), x)
    text = repr(dec)
    assert f"T={T}" in text and f"E={E}" in text and f"capacity={dec.capacity}" in text


def test_routing_efficiency(decision):
    dec, x, mask, cfg = decision
    want = dec.kept.sum() / (mask.sum() * cfg.top_k)
    assert dec.routing_efficiency() == pytest.approx(want, rel=1e-12)
    assert 0 < dec.routing_efficiency() < 1


def test_load_balance_cv(decision):
    dec, *_ = decision
    loads = dec.tokens_per_expert.astype(np.float64)
    assert dec.load_balance_cv() == pytest.approx(np.std(loads) / np.mean(loads), rel=1e-12)
    assert dec.load_balance_cv() > 0
    balanced = mr.route_logits(np.eye(4).repeat(5, axis=0), mr.RouterConfig(num_experts=4, top_k=1))
    assert balanced.tokens_per_expert.tolist() == [5, 5, 5, 5]
    assert balanced.load_balance_cv() == 0.0


def test_expert_utilization(decision):
    dec, x, mask, cfg = decision
    util = dec.expert_utilization()
    assert set(util) == {"min_utilization", "max_utilization", "mean_utilization", "tokens_dropped_rate",
                         "assignment_drop_rate", "routing_efficiency"}
    u = dec.tokens_per_expert / dec.capacity
    assert util["min_utilization"] == pytest.approx(u.min())
    assert util["max_utilization"] == pytest.approx(u.max()) == pytest.approx(1.0)
    assert util["mean_utilization"] == pytest.approx(u.mean())
    assert util["mean_utilization"] != pytest.approx(1 / cfg.num_experts)  # not the constant 1/E
    assert util["tokens_dropped_rate"] == pytest.approx(dec.tokens_dropped / mask.sum())
    assert util["routing_efficiency"] == pytest.approx(dec.routing_efficiency())
    assert util["assignment_drop_rate"] == pytest.approx(dec.dropped_assignments / (mask.sum() * cfg.top_k))


@pytest.mark.parametrize("shape,mask", [((0, 4), None), ((6, 4), np.zeros(6, bool))], ids=["empty", "all-masked"])
def test_expert_utilization_on_empty_input(shape, mask):
    dec = mr.route_logits(np.zeros(shape), mr.RouterConfig(num_experts=4, top_k=2), token_mask=mask)
    util = dec.expert_utilization()
    assert all(isinstance(v, float) and math.isfinite(v) for v in util.values())
    assert util["tokens_dropped_rate"] == 0.0 and util["mean_utilization"] == 0.0
    assert util["routing_efficiency"] == 1.0 and util["assignment_drop_rate"] == 0.0
    assert dec.load_balance_cv() == 0.0


def test_expert_assignments(decision):
    dec, x, mask, cfg = decision
    assignments = dec.expert_assignments
    assert len(assignments) == dec.total_tokens
    assert sum(len(a) for a in assignments) == dec.kept_assignments
    assert dec.expert_assignments is assignments  # built once
    over_one = 0
    for t, per_token in enumerate(assignments):
        assert [a.expert_rank for a in per_token] == sorted(a.expert_rank for a in per_token)
        assert {a.expert_rank for a in per_token} == set(np.flatnonzero(dec.kept[t]).tolist())
        for a in per_token:
            assert isinstance(a, mr.ExpertAssignment)
            assert a.token_idx == t and dec.kept[t, a.expert_rank]
            assert a.expert_id == dec.expert_indices[t, a.expert_rank]
            assert a.probability == pytest.approx(float(dec.expert_weights[t, a.expert_rank]), rel=1e-7)
            assert a.weighted_contribution() == pytest.approx(a.probability / (a.expert_rank + 1))
            assert a.is_valid() == (0.0 <= a.probability <= 1.0)
            over_one += a.probability > 1.0
        if not mask[t]:
            assert per_token == []
    assert over_one > 0, "weight_scale = 1.5 must give some weights above 1 (is_valid False)"
    one = mr.ExpertAssignment(expert_id=3, probability=0.6, token_idx=0, expert_rank=2)
    assert one.weighted_contribution() == pytest.approx(0.2) and one.is_valid()
    assert not mr.ExpertAssignment(1, -0.1, 0, 0).is_valid()


def test_expert_capacities_alias(decision):
    dec, *_ = decision
    np.testing.assert_array_equal(dec.expert_capacities, dec.tokens_per_expert)
    assert dec.expert_capacities.sum() == dec.kept_assignments


def test_auxiliary_loss(decision):
    dec, x, mask, cfg = decision
    want = 0.05 * dec.load_balance_loss + 0.002 * dec.router_z_loss
    assert dec.auxiliary_loss == pytest.approx(want, rel=1e-12)
    zero = mr.route_logits(x, cfg.replace(load_balance_loss_coeff=0.0, router_z_loss_coeff=0.0), token_mask=mask)
    assert zero.auxiliary_loss == 0.0 and zero.load_balance_loss == dec.load_balance_loss
    seq = mr.route_logits(x.reshape(5, 100, -1), cfg.replace(seq_load_balance_loss_coeff=0.5))
    assert seq.auxiliary_loss == pytest.approx(0.05 * seq.load_balance_loss + 0.002 * seq.router_z_loss
                                               + 0.5 * seq.seq_load_balance_loss, rel=1e-12)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape", [(40, 6), (4, 10, 6)])
def test_router_probs(score_function, shape, rng):
    x = rng.normal(size=shape) * 3
    x.reshape(-1, 6)[3, 1] = -np.inf
    cfg = mr.RouterConfig(num_experts=6, top_k=2, score_function=score_function)
    dec = mr.route_logits(x, cfg, return_probs=True)
    z = x.reshape(-1, 6)
    if score_function == "softmax":
        want = softmax(z)
        np.testing.assert_allclose(dec.router_probs.sum(axis=1), 1.0, rtol=1e-6)
    else:
        want = sigmoid(z)
    assert dec.router_probs.dtype == np.float32 and dec.router_probs.shape == z.shape
    np.testing.assert_allclose(dec.router_probs, want, rtol=1e-6, atol=1e-9)
    assert dec.router_probs[3, 1] == 0.0
    # The weights are the probabilities of the chosen experts.
    chosen = np.take_along_axis(dec.router_probs, dec.expert_indices.astype(np.int64), axis=1)
    np.testing.assert_allclose(dec.expert_weights[dec.kept], chosen[dec.kept], rtol=1e-6)
    assert mr.route_logits(x, cfg).router_probs is None


def test_to_dict_is_json_ready(decision):
    dec, x, mask, cfg = decision
    d = dec.to_dict()
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back == d
    assert d["total_tokens"] == dec.total_tokens and d["active_tokens"] == int(mask.sum())
    assert d["tokens_per_expert"] == dec.tokens_per_expert.tolist()
    assert d["pre_drop_tokens_per_expert"] == dec.pre_drop_tokens_per_expert.tolist()
    for name in ("capacity", "kept_assignments", "dropped_assignments", "tokens_dropped", "dropless",
                 "num_experts", "top_k"):
        assert d[name] == getattr(dec, name), name
        assert type(d[name]) in (int, bool), (name, type(d[name]))
    for name in ("load_balance_loss", "router_z_loss", "auxiliary_loss"):
        assert d[name] == pytest.approx(getattr(dec, name)), name
    assert d["routing_efficiency"] == pytest.approx(dec.routing_efficiency())
    assert d["load_balance_cv"] == pytest.approx(dec.load_balance_cv())
    assert d["seq_load_balance_loss"] is None
    empty = mr.route_logits(np.zeros((0, 3, 8)), cfg).to_dict()
    assert json.loads(json.dumps(empty))["tokens_per_expert"] == [0] * 8


def overflowing_decision() -> mr.RoutingDecision:
    """A real decision with an infinite loss: a finite coefficient times a load-balance loss > 1."""
    x = np.random.default_rng(0).normal(size=(64, 8))
    x[:, 0] += 3.0
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=8, top_k=2, load_balance_loss_coeff=1e308))
    assert dec.load_balance_loss > 1.0 and dec.auxiliary_loss == math.inf
    return dec


def test_to_dict_has_null_for_a_non_finite_loss():
    dec = overflowing_decision()
    d = dec.to_dict()
    assert d["auxiliary_loss"] is None and d["load_balance_loss"] == dec.load_balance_loss
    text = json.dumps(d, allow_nan=False)  # strict JSON: no Infinity, no NaN
    assert json.loads(text) == d and "Infinity" not in text
    assert dec.auxiliary_loss == math.inf  # the attribute itself stays the float


def test_batch_shape_and_dropless_flags(rng):
    x = rng.normal(size=(3, 7, 5))
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=5, top_k=2, capacity_factor=None))
    assert dec.batch_shape == (3, 7) and dec.total_tokens == 21
    assert dec.dropless and dec.capacity == int(dec.tokens_per_expert.max())
    assert dec.kept.all() and not dec.rerouted.any()
    dec = mr.route_logits(x.reshape(21, 5), mr.RouterConfig(num_experts=5, top_k=2))
    assert dec.batch_shape == (21,) and not dec.dropless


@pytest.mark.parametrize("gate", ["linear", "hierarchical"])
def test_expert_router_returns_probs(gate, rng):
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=36, top_k=2), 12, gate=gate, seed=1)
    hidden = rng.normal(size=(3, 7, 12))
    mask = rng.random((3, 7)) < 0.7
    dec = router.route_tokens(hidden, token_mask=mask, return_probs=True)
    assert dec.router_probs.shape == (21, 36) and dec.router_probs.dtype == np.float32
    if gate == "hierarchical":
        want = router.gate.forward(hidden).reshape(21, 36)
    else:
        z = hidden.reshape(21, 12).astype(np.float32) @ router.weight
        want = np.exp(z - z.max(1, keepdims=True))
        want /= want.sum(1, keepdims=True)
    active = mask.reshape(-1)
    np.testing.assert_allclose(dec.router_probs[active], want[active], rtol=2e-5, atol=1e-7)
    assert (dec.router_probs[~active] == 0).all()
    chosen = np.take_along_axis(dec.router_probs, dec.expert_indices.astype(np.int64), axis=1)
    np.testing.assert_allclose(dec.expert_weights[dec.kept], chosen[dec.kept], rtol=1e-6)


ARRAYS = ("expert_indices", "expert_weights", "expert_slots", "kept", "rerouted", "tokens_per_expert",
          "pre_drop_tokens_per_expert", "expert_prob_mean", "expert_capacities", "router_probs")


@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_arrays_are_read_only_views_of_the_decision(rng, overflow):
    x = rng.normal(size=(300, 8)).astype(np.float32)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.8, overflow=overflow)
    dec = mr.route_logits(x, cfg, return_probs=True)
    for name in ARRAYS:
        a = getattr(dec, name)
        assert not a.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
        if name != "router_probs":  # NumPy's own array (allocated for the core to write into)
            with pytest.raises(ValueError):
                a.flags.writeable = True
    # a new view per read, each of the decision's own memory
    assert dec.expert_indices is not dec.expert_indices
    assert np.shares_memory(dec.expert_weights, dec.expert_weights)
    assert dec.expert_weights.base is dec


def test_a_view_outlives_its_decision_and_nothing_leaks(rng):
    x = rng.normal(size=(64, 16))
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=16, top_k=4, capacity_factor=1.0))
    want = {name: getattr(dec, name).copy() for name in ARRAYS[:-1]}
    refs = sys.getrefcount(dec)
    views = {name: getattr(dec, name) for name in want}
    assert sys.getrefcount(dec) == refs + len(views)  # each view holds the decision, nothing else does
    alive = weakref.ref(dec)
    del dec
    gc.collect()
    assert alive() is not None
    for name, a in views.items():
        np.testing.assert_array_equal(a, want[name])
    del a, views
    assert alive() is None  # freed by reference counting: no cycle through a cached view
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=16, top_k=4, capacity_factor=1.0))
    dec.expert_assignments, dec.to_dict(), dec.dispatch_plan(), dec.record()
    alive = weakref.ref(dec)
    del dec
    assert alive() is None


@pytest.mark.parametrize("T", [1, 7, 64, 512, 513, 1500])
@pytest.mark.parametrize("policy", ["position", "probs", "bpr"])
def test_one_chunk_on_the_calling_thread_is_the_pooled_result(rng, restore_threads, T, policy):
    E, k = 64, 4
    x = rng.normal(size=(T, E)).astype(np.float32)
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0, drop_policy=policy)

    def run():
        d = mr.route_logits(x, cfg)
        return (d.expert_indices, d.expert_weights, d.expert_slots, d.kept, d.tokens_per_expert,
                d.expert_prob_mean, np.array([d.load_balance_loss, d.router_z_loss, d.capacity]))
    got = same_at_thread_counts(run, restore_threads, counts=(1, 2, 3, 0))
    want = reference_route(x, cfg)
    for name, a in zip(("expert_indices", "expert_slots", "kept", "tokens_per_expert"), got[:1] + got[2:5]):
        np.testing.assert_array_equal(a, want[name], err_msg=name)
    np.testing.assert_allclose(got[1], want["expert_weights"], rtol=1e-6, atol=1e-7)

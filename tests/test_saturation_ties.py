"""The conformance harness's detector of ties created by float32 saturation (``saturation.py``),
on constructed cases: it finds exactly the equal float32 values, and the relaxed invariants it
enables still catch a wrong answer."""

from __future__ import annotations

import numpy as np
import pytest

import saturation
import test_conformance as tc

F32 = np.float32


def test_float32_scores_are_torchs():
    # torch 2.13 on CPU: softmax([0, -x]) and sigmoid(z) in float32
    assert saturation.softmax32(np.array([[0.0, -103.9]]))[0, 1] == F32(1.401298464324817e-45)
    assert saturation.softmax32(np.array([[0.0, -104.0]]))[0, 1] == 0
    assert saturation.softmax32(np.array([[200.0, 200.0, -200.0]])).tolist() == [[0.5, 0.5, 0.0]]
    s = saturation.sigmoid32(np.array([16.6, 16.64, -88.7, -88.8]))
    assert s.tolist() == [F32(0.9999998807907104), 1.0, F32(3.006635794144578e-39), 0.0]


def test_boundary_ties_are_exact():
    one_ulp = np.nextafter(F32(0.5), F32(0))
    v = np.array([[1.0, 0.0, 0.0], [1.0, 1e-45, 0.0], [0.5, 0.5, 0.0], [0.5, one_ulp, 0.0]], F32)
    np.testing.assert_array_equal(saturation.boundary_ties(v, 1), [False, False, True, False])
    np.testing.assert_array_equal(saturation.boundary_ties(v, 2), [True, False, False, False])
    assert not saturation.boundary_ties(v, 3).any()  # k = E: nothing to choose
    # the conservative tolerance of the handed-vector check would count the one-ulp pair
    assert tc.near_tie_rows(v, 1)[3]


def test_order_ties_are_exact():
    v = np.array([[0.5, 0.5, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], F32)
    np.testing.assert_array_equal(saturation.order_ties(v, 2), [True, False, False])
    np.testing.assert_array_equal(saturation.order_ties(v, 3), [True, False, True])


@pytest.mark.parametrize("peer,params", [
    ("hf-mixtral", {"k": 2}), ("hf-qwen2moe", {"k": 4, "norm_topk_prob": True}),
    ("deepspeed", {"gate": "topk", "k": 2}), ("megatron", {"topk": 2, "pre_softmax": True}),
    ("megatron", {"topk": 2, "score_function": "sigmoid"}),
    ("hf-dsv3", {"k": 2, "n_group": 2, "topk_group": 1, "e_score_correction_bias": None}),
])
def test_saturation_ties_found_only_where_float32_values_are_equal(rng, peer, params):
    plain = rng.normal(size=(64, 8)).astype(F32)
    assert not tc.saturation_tied(peer, params, plain)
    hot = plain.copy()
    hot[5] = [-30, 60, 30, 40, -50, 20, 70, -40]  # several sigmoid scores 1.0, softmax 0 below the top
    hot[6] = [80, -30, -40, -50, -60, -70, -25, -45]  # softmax 0 for all but expert 0
    assert tc.saturation_tied(peer, params, hot)
    tied = tc.tie_tokens(peer, params, hot, saturation.boundary_ties)
    assert tied[5] or tied[6]
    assert not tied[np.r_[0:5, 7:64]].any()


def test_argmax_routers_are_never_tied_by_saturation():
    x = np.array([[80.0, -40.0, -50.0, -60.0]], F32)
    assert not tc.saturation_tied("hf-switch", {"expert_capacity": 4}, x)
    assert not tc.saturation_tied("deepspeed", {"gate": "top2"}, x)


def test_zero_priority_and_kept_bounds():
    x = np.array([[80.0, -40.0, -80.0], [80.0, 0.0, -80.0]], F32)
    experts = np.array([[0, 1], [0, 1]])
    np.testing.assert_array_equal(saturation.zero_priority("deepspeed", {}, x, experts),
                                  [[False, True], [False, False]])
    # Megatron after top-k: softmax over the chosen logits [80, -40] gives exactly [1, 0]
    np.testing.assert_array_equal(saturation.zero_priority("megatron", {"topk": 2}, x, experts),
                                  [[False, True], [False, False]])
    lo, hi = saturation.kept_bounds(np.array([5, 3]), np.array([1, 3]), 2, 10)
    np.testing.assert_array_equal(lo, [1, 2])
    np.testing.assert_array_equal(hi, [2, 2])
    lo, hi = saturation.kept_bounds(np.array([5, 3]), np.array([1, 3]), 10, 10)  # capacity >= T: no drop
    np.testing.assert_array_equal(lo, hi)


def stored_variant(case, vid):
    logits, config, arrays = tc.load_case(case)
    v = config["variants"][vid]
    cfg = tc.config_for(v["peer"], v["params"], logits.shape[1])
    dec = tc.mr.route_logits(logits, cfg, training=True)
    return v["peer"], v["params"], cfg, dec, dict(tc.peer_arrays(arrays, vid)), logits


def without(a, i):
    out = dict(a)
    for f in ("coo_token", "coo_expert", "coo_weight"):
        out[f] = np.delete(a[f], i)
    return out


@pytest.mark.parametrize("vid", ["mcore/softmax-k2-cf1p0-probs", "mcore/softmax-k2-cf1p25-probs"])
def test_relaxed_capacity_invariant_still_catches_a_dropped_positive_assignment(vid):
    case = "saturation_zero_prob_capacity"
    peer, params, cfg, dec, a, logits = stored_variant(case, vid)
    tc.check_tied(peer, params, False, cfg, dec, a, logits)  # the peer's own answer passes
    # The peer really dropped 0-probability routed assignments an exact invariant would miss.
    lo, hi = tc.peer_kept_range(peer, params, dec, logits, dec.pre_drop_tokens_per_expert, np.zeros(len(logits), bool))
    assert (lo < hi).any()
    kept = np.bincount(a["coo_expert"], minlength=logits.shape[1])
    assert (kept < hi).any()
    # Losing one positive-weight kept pair of an expert at its lower bound is a failure.
    at_lo = np.nonzero((kept == lo) & (lo > 0))[0]
    assert at_lo.size
    i = int(np.nonzero((a["coo_expert"] == at_lo[0]) & (a["coo_weight"] > 0))[0][0])
    with pytest.raises(AssertionError, match="kept"):
        tc.check_tied(peer, params, False, cfg, dec, without(a, i), logits)


def test_tied_check_still_catches_an_untied_token_routed_elsewhere():
    case, vid = "saturation_sigmoid", "mcore/sigmoid-k2-dropless"
    peer, params, cfg, dec, a, logits = stored_variant(case, vid)
    tc.check_tied(peer, params, True, cfg, dec, a, logits)
    tied = tc.tie_tokens(peer, params, logits)
    i = int(np.nonzero(~tied[a["coo_token"]])[0][0])
    t = a["coo_token"][i]
    free = sorted(set(range(logits.shape[1])) - set(a["coo_expert"][a["coo_token"] == t].tolist()))
    moved = dict(a, coo_expert=a["coo_expert"].copy())
    moved["coo_expert"][i] = free[0]
    with pytest.raises(AssertionError, match="untied tokens elsewhere"):
        tc.check_tied(peer, params, True, cfg, dec, moved, logits)

"""LoadBalancer: EMA, history, imbalance detection and the aux-loss-free expert-bias remedy."""

from __future__ import annotations

import json
import threading
from typing import List, Tuple

import numpy as np
import pytest

import moe_router as mr
from moe_router.balancer import LoadBalancer, LoadBalancingStats, default_bias_update_rate
from conftest import REAL_L5, needs_real_router
from helpers import is_documented_getter, softmax, waits_for_lock



# --------------------------------------------------------------------------- arithmetic by hand


def test_defaults() -> None:
    lb = LoadBalancer(64)
    assert lb.bias_update_rate == pytest.approx(0.1 / 64) == default_bias_update_rate(64)
    assert (lb.ema_decay, lb.imbalance_threshold, lb.warmup_steps, lb.enabled) == (0.9, 0.5, 10, True)
    bias = lb.expert_bias
    assert bias.dtype == np.float64 and bias.shape == (64,) and not bias.any()
    assert lb.steps == 0 and not lb.is_imbalanced() and lb.imbalance_ratio() == 0.0
    assert lb.load_history.shape == (0, 64)
    st = lb.get_stats()
    assert isinstance(st, LoadBalancingStats)
    assert st.steps == 0 and not st.imbalanced and st.last_load is None
    assert st.load_cv() == 0.0 and not st.is_well_balanced()  # nothing seen yet
    assert mr.LoadBalancer is LoadBalancer and "LoadBalancer" in mr.__all__


def test_ema_history_and_bias_by_hand() -> None:
    lb = LoadBalancer(4, ema_decay=0.5, bias_update_rate=0.1, warmup_steps=0)
    lb.update(np.array([6, 2, 0, 0]))  # mean 2: signs -1, 0, +1, +1
    np.testing.assert_allclose(lb.expert_loads, [0.75, 0.25, 0.0, 0.0])  # first step initializes the EMA
    np.testing.assert_allclose(lb.expert_bias, [-0.1, 0.0, 0.1, 0.1])
    lb.update(np.array([0, 0, 4, 4]))  # mean 2: signs +1, +1, -1, -1
    np.testing.assert_allclose(lb.expert_loads, [0.5 * 0.75, 0.5 * 0.25, 0.5 * 0.5, 0.5 * 0.5])
    np.testing.assert_allclose(lb.expert_bias, [0.0, 0.1, 0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(lb.load_history, [[0.75, 0.25, 0, 0], [0, 0, 0.5, 0.5]])
    assert lb.steps == 2
    ema = np.array([0.375, 0.125, 0.25, 0.25])
    assert lb.imbalance_ratio() == pytest.approx((0.375 - 0.125) / 0.25)
    st = lb.get_stats()
    assert st.load_cv() == pytest.approx(ema.std() / ema.mean())
    assert st.load_variance == pytest.approx(ema.var())
    np.testing.assert_allclose(st.last_load, [0, 0, 0.5, 0.5])
    assert st.imbalanced == lb.is_imbalanced() is True  # ratio 1.0 > 0.5, no warm-up


def test_ema_with_default_decay_over_steps() -> None:
    lb = LoadBalancer(2)
    loads = [np.array([3, 1]), np.array([1, 1]), np.array([0, 2]), np.array([5, 5])]
    ema = loads[0] / 4
    for load in loads[1:]:
        ema = 0.9 * ema + 0.1 * load / load.sum()
    for load in loads:
        lb.update(load)
    np.testing.assert_allclose(lb.expert_loads, ema)
    # Biases: [-r, +r], then 0 change (balanced), then [+r, -r], then none.
    r = lb.bias_update_rate
    np.testing.assert_allclose(lb.expert_bias, [0.0, 0.0], atol=1e-18)
    lb.update(np.array([2, 1]))
    np.testing.assert_allclose(lb.expert_bias, [-r, r])


def test_warmup_and_imbalance_detection() -> None:
    lb = LoadBalancer(4, warmup_steps=3, imbalance_threshold=0.5)
    skewed = np.array([10, 4, 3, 3])  # ratio (0.5 - 0.15) / 0.25 = 1.4
    lb.update(skewed)
    assert lb.imbalance_ratio() == pytest.approx(1.4) and not lb.is_imbalanced()
    lb.update(skewed)
    assert not lb.is_imbalanced()  # 2 < warmup_steps
    lb.update(skewed)
    assert lb.is_imbalanced() and lb.get_stats().imbalanced
    balanced = LoadBalancer(4, warmup_steps=3, imbalance_threshold=0.5)
    for _ in range(10):
        balanced.update(np.array([26, 25, 25, 24]))  # ratio 0.08
    assert not balanced.is_imbalanced() and balanced.get_stats().is_well_balanced()
    # The threshold is strict: ratio == threshold is not imbalanced.
    edge = LoadBalancer(2, warmup_steps=0, imbalance_threshold=1.0)
    edge.update(np.array([3, 1]))  # (0.75 - 0.25) / 0.5 = 1.0
    assert edge.imbalance_ratio() == pytest.approx(1.0) and not edge.is_imbalanced()


def test_bias_updates_from_the_first_step_during_warmup() -> None:
    lb = LoadBalancer(3, warmup_steps=100, bias_update_rate=0.01)
    lb.update(np.array([5, 0, 1]))
    np.testing.assert_allclose(lb.expert_bias, [-0.01, 0.01, 0.01])
    assert not lb.is_imbalanced()


def test_disabled_or_zero_rate_tracks_load_but_keeps_the_bias() -> None:
    off = LoadBalancer(3, enabled=False, bias_update_rate=0.5)
    off.update(np.array([5, 0, 1]))
    assert not off.expert_bias.any() and off.steps == 1
    np.testing.assert_allclose(off.expert_loads, [5 / 6, 0, 1 / 6])
    off.enabled = True
    off.update(np.array([5, 0, 1]))
    np.testing.assert_allclose(off.expert_bias, [-0.5, 0.5, 0.5])
    off.enabled = False
    off.update(np.array([0, 5, 1]))
    np.testing.assert_allclose(off.expert_bias, [-0.5, 0.5, 0.5])  # kept, not reset
    zero = LoadBalancer(3, bias_update_rate=0.0)
    zero.update(np.array([5, 0, 1]))
    assert not zero.expert_bias.any()
    zero.bias_update_rate = 0.25
    zero.update(np.array([5, 0, 1]))
    np.testing.assert_allclose(zero.expert_bias, [-0.25, 0.25, 0.25])


def test_empty_step_is_ignored_and_masked_tokens_never_count() -> None:
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=None)
    lb = LoadBalancer(4, bias_update_rate=0.1)
    logits = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 2, 3]] * 5
    all_masked = mr.route_logits(logits, cfg, training=True, token_mask=np.zeros(6, dtype=bool))
    lb.update(all_masked)
    assert lb.steps == 0 and not lb.expert_bias.any() and not lb.expert_loads.any()
    # Masking tokens 0 and 1 leaves one token per expert: balanced, so no bias change.
    mask = np.array([False, False, True, True, True, True])
    dec = mr.route_logits(logits, cfg, training=True, token_mask=mask)
    assert dec.pre_drop_tokens_per_expert.tolist() == [1, 1, 1, 1]
    lb.update(dec)
    assert lb.steps == 1 and not lb.expert_bias.any()
    np.testing.assert_allclose(lb.expert_loads, [0.25] * 4)


def test_uses_pre_drop_load_not_kept_load() -> None:
    """Capacity caps hide overload: the balancer must see what the router wanted."""
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=1.0)
    logits = np.eye(4, dtype=np.float32)[[0, 0, 0, 0, 0, 1, 2, 3]] * 5  # expert 0 wanted by 5 of 8
    dec = mr.route_logits(logits, cfg, training=True)
    assert dec.tokens_per_expert.tolist() == [2, 1, 1, 1]  # capacity 2
    lb = LoadBalancer(4, warmup_steps=0)
    lb.update(dec)
    np.testing.assert_allclose(lb.expert_loads, [5 / 8, 1 / 8, 1 / 8, 1 / 8])


def test_history_is_bounded_and_reset_clears() -> None:
    lb = LoadBalancer(2, history=3, bias_update_rate=0.1)
    for i in range(1, 6):
        lb.update(np.array([i, 1]))
    np.testing.assert_allclose(lb.load_history, [[3 / 4, 1 / 4], [4 / 5, 1 / 5], [5 / 6, 1 / 6]])
    assert lb.steps == 5
    lb.reset()
    assert lb.steps == 0 and lb.load_history.shape == (0, 2) and not lb.expert_bias.any()
    assert not lb.expert_loads.any() and lb.bias_update_rate == 0.1


def test_expert_bias_is_a_copy() -> None:
    lb = LoadBalancer(3, bias_update_rate=0.1)
    lb.update(np.array([3, 0, 0]))
    b = lb.expert_bias
    b[:] = 7.0
    np.testing.assert_allclose(lb.expert_bias, [-0.1, 0.1, 0.1])


def test_stats_to_dict_is_json() -> None:
    lb = LoadBalancer(3)
    lb.update(np.array([3, 2, 1]))
    d = lb.get_stats().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["steps"] == 1 and d["expert_bias"] == lb.expert_bias.tolist()
    assert "imbalance_ratio=" in repr(lb)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": 2.0}, "num_experts"),
    ({"num_experts": 4, "ema_decay": 1.0}, "ema_decay"),
    ({"num_experts": 4, "ema_decay": -0.1}, "ema_decay"),
    ({"num_experts": 4, "history": 0}, "history"),
    ({"num_experts": 4, "imbalance_threshold": -1}, "imbalance_threshold"),
    ({"num_experts": 4, "warmup_steps": -1}, "warmup_steps"),
    ({"num_experts": 4, "bias_update_rate": -1e-3}, "bias_update_rate"),
    ({"num_experts": 4, "bias_update_rate": float("nan")}, "bias_update_rate"),
])
def test_bad_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(mr.ConfigError, match=match):
        LoadBalancer(**kwargs)


def test_bad_loads() -> None:
    lb = LoadBalancer(4)
    with pytest.raises(mr.InputError, match=r"shape \[4\].*\[3\]"):
        lb.update(np.array([1, 2, 3]))
    with pytest.raises(mr.InputError, match=">= 0"):
        lb.update(np.array([1, -2, 3, 0]))
    with pytest.raises(mr.InputError, match="finite"):
        lb.update(np.array([1, np.nan, 3, 0]))
    cfg = mr.RouterConfig(num_experts=8, top_k=2)
    dec = mr.route_logits(np.zeros((4, 8), np.float32), cfg)
    with pytest.raises(mr.InputError, match="num_experts"):
        lb.update(dec)
    assert lb.steps == 0


def test_eight_threads_updating_at_once() -> None:
    lb = LoadBalancer(4, bias_update_rate=0.01)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(100):
            lb.update(np.array([4, 2, 1, 1]))  # mean 2: signs -1, 0, +1, +1 every time

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lb.steps == 800
    np.testing.assert_allclose(lb.expert_bias, [-8.0, 0.0, 8.0, 8.0])


# --------------------------------------------------------------------------- the bias in the router


def test_bias_changes_selection_in_the_next_call_but_not_the_weights() -> None:
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(2000, 8)).astype(np.float32)
    logits[:, :2] += 1.5  # experts 0 and 1 are overloaded
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=None)
    lb = LoadBalancer(8, bias_update_rate=0.05)
    first = mr.route_logits(logits, cfg, training=True, expert_bias=lb.expert_bias)
    lb.update(first)
    bias = lb.expert_bias
    assert bias[0] < 0 and bias[1] < 0 and (bias[2:] > 0).all()
    second = mr.route_logits(logits, cfg, training=True, expert_bias=bias, step=1)
    # Selection changed, toward the experts whose bias rose.
    changed = (np.sort(first.expert_indices, 1) != np.sort(second.expert_indices, 1)).any(axis=1)
    assert changed.sum() > 100
    assert second.pre_drop_tokens_per_expert[:2].sum() < first.pre_drop_tokens_per_expert[:2].sum()
    # Selection is the top-k of score + bias (NumPy reference; lower index first on ties).
    p = softmax(logits)
    ref = np.argsort(-(p + bias), axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(second.expert_indices, ref)
    # Weights are the unbiased scores: same (token, expert) pair, same weight in both calls.
    w1 = {(t, int(e)): w for t in range(2000) for e, w in zip(first.expert_indices[t], first.expert_weights[t])}
    same = 0
    for t in range(2000):
        for e, w in zip(second.expert_indices[t], second.expert_weights[t]):
            assert w == pytest.approx(p[t, e], rel=1e-6)
            if (t, int(e)) in w1:
                assert w == w1[(t, int(e))]  # bit for bit
                same += 1
    assert same > 2000  # most pairs are shared; the check above is not vacuous


@needs_real_router
def test_balancing_real_router_logits_reduces_load_and_drops() -> None:
    """MiniLM-L6 layer 5, E = 64, k = 2, capacity factor 1.25: 50 steps on the same batch."""
    with np.load(REAL_L5) as z:
        logits = z["logits_e64"]
    cfg = mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25)
    lb = LoadBalancer(64)  # default rate 0.1 / E
    curve: List[Tuple[float, int, int]] = []
    for step in range(50):
        bias = lb.expert_bias
        dec = mr.route_logits(logits, cfg, training=True, expert_bias=bias if bias.any() else None, step=step)
        pre = dec.pre_drop_tokens_per_expert
        curve.append((pre.max() / pre.mean(), dec.dropped_assignments, dec.tokens_dropped))
        if step == 0:
            first_pre = pre.copy()
        lb.update(dec)
    (mm0, drop0, tok0), (mm49, drop49, tok49) = curve[0], curve[-1]
    assert mm0 > 15 and drop0 > 15000  # strongly skewed to start with
    assert mm49 < 0.75 * mm0
    assert drop49 < 0.65 * drop0
    assert tok49 < tok0
    first10, last10 = np.array(curve[:10]), np.array(curve[-10:])
    assert last10[:, 0].mean() < 0.8 * first10[:, 0].mean()
    assert last10[:, 1].mean() < 0.75 * first10[:, 1].mean()
    assert lb.steps == 50 and lb.is_imbalanced()  # still skewed: detection stays on
    # The bias pushed the busiest expert of step 0 down and the idlest one up.
    assert lb.expert_bias[first_pre.argmax()] < 0 < lb.expert_bias[first_pre.argmin()]


@needs_real_router
def test_disabled_balancer_leaves_real_routing_unchanged() -> None:
    with np.load(REAL_L5) as z:
        logits = z["logits_e64"][:4096]
    cfg = mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25)
    lb = LoadBalancer(64, enabled=False)
    drops = set()
    for step in range(5):
        bias = lb.expert_bias
        dec = mr.route_logits(logits, cfg, training=True, expert_bias=bias if bias.any() else None, step=step)
        drops.add(dec.dropped_assignments)
        lb.update(dec)
    assert len(drops) == 1 and lb.steps == 5 and lb.is_imbalanced() is False  # warm-up of 10 steps


def test_reads_are_documented_read_only_properties_and_wait_for_the_lock() -> None:
    lb = LoadBalancer(3, bias_update_rate=0.01)
    lb.update(np.array([5, 1, 0]))
    for name in ("num_experts", "ema_decay", "imbalance_threshold", "warmup_steps", "expert_bias", "steps",
                 "expert_loads", "load_history"):
        assert is_documented_getter(LoadBalancer, name), name
        with pytest.raises(AttributeError):
            setattr(lb, name, 0)
    for name in ("expert_bias", "steps", "expert_loads", "load_history"):
        assert waits_for_lock(lb, lambda: getattr(lb, name)), name
    for name in ("imbalance_ratio", "is_imbalanced", "get_stats", "__repr__"):
        assert waits_for_lock(lb, getattr(lb, name)), name

"""RoutingStats and LoadBalancer figures equal NumPy's bit for bit (the core sums pairwise as NumPy does);
their docstring examples run; the classes keep the Python API's signatures, None refusals and pickling."""

from __future__ import annotations

import doctest
import inspect
import pickle
from typing import List

import numpy as np
import pytest

import moe_router as mr
from moe_router.balancer import LoadBalancingStats
from test_stats import fake


@pytest.mark.parametrize("num_experts", [3, 8, 17, 300])
def test_reductions_equal_numpy_bit_for_bit(num_experts: int) -> None:
    rng = np.random.default_rng(num_experts)
    s = mr.RoutingStats(window=50)
    kept_total = np.zeros(num_experts, np.int64)
    variances: List[float] = []
    latencies: List[float] = []
    for i in range(80):
        kept = rng.integers(0, 1000, size=num_experts)
        kept_total += kept
        latency = float(rng.exponential(1e-3))
        s.record(fake(kept.tolist(), kept.tolist(), 1000), latency)
        variances.append(float(kept.astype(np.float64).var()))
        latencies.append(latency)
    assert s.load_variance_history.tolist() == variances
    u = kept_total.astype(np.float64) / float(80 * 1000)
    assert s.expert_utilization.tolist() == u.tolist()
    assert s.utilization_cv() == float(np.std(u) / u.mean())
    assert s.utilization_summary()["mean_utilization"] == float(u.mean())
    window = np.array(latencies[-50:])
    for q in (0.0, 12.5, 50.0, 95.0, 99.0, 99.9, 100.0):
        assert s.latency_percentile(q) == float(np.percentile(window, q)), q
    assert s.latency_p95 == float(np.percentile(window, 95))


@pytest.mark.parametrize("num_experts", [4, 9, 300])
def test_balancer_ema_equals_numpy_bit_for_bit(num_experts: int) -> None:
    rng = np.random.default_rng(num_experts)
    lb = mr.LoadBalancer(num_experts, ema_decay=0.8, history=5)
    ema = np.zeros(num_experts)
    shares = []
    for step in range(12):
        load = rng.integers(0, 50, size=num_experts)
        share = load.astype(np.float64) / float(load.astype(np.float64).sum())
        ema = share.copy() if step == 0 else 0.8 * ema + (1.0 - 0.8) * share
        shares.append(share)
        lb.update(load)
    assert lb.expert_loads.tolist() == ema.tolist()
    assert lb.load_history.tolist() == np.stack(shares[-5:]).tolist()
    st = lb.get_stats()
    assert st.load_variance == float(ema.var())
    assert st.load_cv() == float(np.std(ema) / ema.mean())
    assert lb.imbalance_ratio() == float((ema.max() - ema.min()) / ema.mean())


@pytest.mark.parametrize("obj", [mr.RoutingStats, mr.LoadBalancer, mr.LoadBalancer.suggest_placement,
                                 mr.balancer.default_bias_update_rate])
def test_docstring_examples_run(obj) -> None:
    runner = doctest.DocTestRunner()
    tests = doctest.DocTestFinder().find(obj, getattr(obj, "__name__", "obj"),
                                        globs={"default_bias_update_rate": mr.balancer.default_bias_update_rate})
    assert tests and any(t.examples for t in tests)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_signatures_show_the_defaults() -> None:
    assert str(inspect.signature(mr.RoutingStats)) == "(window=1024, history=1024)"
    assert str(inspect.signature(mr.LoadBalancer)) == (
        "(num_experts, ema_decay=0.9, history=1024, imbalance_threshold=0.5, warmup_steps=10, "
        "bias_update_rate=None, enabled=True)")
    assert mr.RoutingStats.__module__ == mr.LoadBalancer.__module__ == LoadBalancingStats.__module__ == "moe_router"


@pytest.mark.parametrize("call, name", [
    (lambda: mr.RoutingStats(window=None), "window"),
    (lambda: mr.RoutingStats(history=None), "history"),
    (lambda: mr.LoadBalancer(4, ema_decay=None), "ema_decay"),
    (lambda: mr.LoadBalancer(4, warmup_steps=None), "warmup_steps"),
])
def test_an_explicit_none_is_not_the_default(call, name: str) -> None:
    with pytest.raises(mr.ConfigTypeError, match=name):
        call()


def test_bias_update_rate_none_is_the_default() -> None:
    assert mr.LoadBalancer(8, bias_update_rate=None).bias_update_rate == 0.1 / 8


def test_records_of_a_decision_and_of_its_fields_agree() -> None:
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    dec = mr.route_logits(np.random.default_rng(5).normal(size=(100, 8)).astype(np.float32), cfg, training=True)
    direct, by_fields = mr.RoutingStats(), mr.RoutingStats()
    direct.record(dec, 0.001)
    by_fields.record(fake(dec.tokens_per_expert.tolist(), dec.pre_drop_tokens_per_expert.tolist(), dec.capacity,
                          k=2, total_tokens=dec.total_tokens, tokens_dropped=dec.tokens_dropped,
                          lb=dec.load_balance_loss, z=dec.router_z_loss, aux=dec.auxiliary_loss), 0.001)
    assert direct.to_dict() == by_fields.to_dict()


def test_record_refuses_counts_of_the_wrong_shape() -> None:
    bad = fake([1, 1], [1, 1], 1)
    bad.tokens_per_expert = np.ones((2, 2), np.int64)
    with pytest.raises(mr.InputError, match=r"decision.tokens_per_expert has shape \[2, 2\]"):
        mr.RoutingStats().record(bad)
    with pytest.raises(mr.InputError, match=r"load.*shape \[4\].*\[2, 2\]"):
        mr.LoadBalancer(4).update(np.ones((2, 2)))


def test_snapshot_pickles_by_value() -> None:
    lb = mr.LoadBalancer(3, bias_update_rate=0.1)
    lb.update(np.array([3, 2, 1]))
    st = lb.get_stats()
    back = pickle.loads(pickle.dumps(st))
    assert isinstance(back, LoadBalancingStats) and back.to_dict() == st.to_dict()
    assert back.last_load.tolist() == st.last_load.tolist() and back.steps == 1

"""RoutingStats: totals, averages, utilization, latency percentiles, throughput, threads."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import List

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router.stats import RoutingStats
from helpers import is_documented_getter, waits_for_lock


@dataclass
class FakeDecision:
    """The attributes RoutingStats reads, with values chosen by hand."""

    tokens_per_expert: np.ndarray
    pre_drop_tokens_per_expert: np.ndarray
    capacity: int
    total_tokens: int
    active_tokens: int
    kept_assignments: int
    dropped_assignments: int
    tokens_dropped: int
    load_balance_loss: float
    router_z_loss: float
    auxiliary_loss: float
    dropless: bool = False

    def routing_efficiency(self) -> float:
        total = self.kept_assignments + self.dropped_assignments
        return 1.0 if total == 0 else self.kept_assignments / total


def fake(kept: List[int], pre: List[int], capacity: int, *, k: int = 1, total_tokens: int = None,
         tokens_dropped: int = 0, lb: float = 1.0, z: float = 2.0, aux: float = 0.5) -> FakeDecision:
    kept_total, pre_total = sum(kept), sum(pre)
    active = pre_total // k
    return FakeDecision(
        tokens_per_expert=np.array(kept, dtype=np.int64),
        pre_drop_tokens_per_expert=np.array(pre, dtype=np.int64),
        capacity=capacity, total_tokens=active if total_tokens is None else total_tokens,
        active_tokens=active, kept_assignments=kept_total, dropped_assignments=pre_total - kept_total,
        tokens_dropped=tokens_dropped, load_balance_loss=lb, router_z_loss=z, auxiliary_loss=aux)


# --------------------------------------------------------------------------- empty


def test_empty_stats_have_no_division_by_zero() -> None:
    s = RoutingStats()
    assert (s.calls, s.total_tokens, s.active_tokens, s.total_assignments) == (0, 0, 0, 0)
    assert s.tokens_dropped_rate == 0.0 and s.assignment_drop_rate == 0.0
    assert s.routing_efficiency == 1.0
    assert s.average_load_balance_loss is None and s.average_router_z_loss is None
    assert s.average_auxiliary_loss is None and s.average_routing_efficiency is None
    assert s.latency_p50 is None and s.latency_p95 is None and s.latency_p99 is None
    assert s.throughput is None and s.mean_latency is None
    assert s.most_utilized_expert() is None and s.least_utilized_expert() is None
    assert s.utilization_cv() == 0.0
    assert s.expert_utilization.shape == (0,) and s.expert_token_counts.shape == (0,)
    assert s.utilization_summary()["mean_utilization"] == 0.0
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert "calls=0" in repr(s)


def test_empty_batches_from_route_logits() -> None:
    """All-masked and zero-row batches count as calls but route nothing: rates stay finite."""
    cfg = mr.RouterConfig(num_experts=4, top_k=2, capacity_factor=1.25)
    s = RoutingStats()
    masked = mr.route_logits(np.zeros((5, 4), np.float32), cfg, token_mask=np.zeros(5, dtype=bool))
    empty = mr.route_logits(np.zeros((0, 4), np.float32), cfg)
    s.record(masked, 1e-4)
    s.record(empty, 1e-4)
    assert s.calls == 2 and s.routed_calls == 0
    assert s.total_tokens == 5 and s.active_tokens == 0 and s.total_assignments == 0
    assert s.tokens_dropped_rate == 0.0 and s.assignment_drop_rate == 0.0
    assert s.average_load_balance_loss is None  # no loss to average over empty batches
    assert s.capacity_offered == 0
    assert s.expert_utilization.tolist() == [0.0] * 4 and s.utilization_cv() == 0.0
    assert s.most_utilized_expert() == (0, 0.0)
    assert s.throughput == 0.0  # timed, but no active token
    assert s.load_variance_history.tolist() == [0.0, 0.0]
    json.dumps(s.to_dict())


# --------------------------------------------------------------------------- hand-computed values


def test_totals_averages_and_utilization_by_hand() -> None:
    s = RoutingStats()
    # Call 1: capacity 10, E = 3, k = 1: routed [14, 4, 2], kept [10, 4, 2]; 4 tokens dropped.
    s.record(fake([10, 4, 2], [14, 4, 2], 10, total_tokens=24, tokens_dropped=4, lb=1.5, z=3.0, aux=0.2), 0.010)
    # Call 2: capacity 30: routed [30, 0, 6], all kept.
    s.record(fake([30, 0, 6], [30, 0, 6], 30, lb=1.1, z=1.0, aux=0.4), 0.030)
    assert s.calls == 2 and s.routed_calls == 2 and s.timed_calls == 2
    assert s.total_tokens == 24 + 36 and s.active_tokens == 20 + 36
    assert s.total_assignments == 56 and s.kept_assignments == 52 and s.dropped_assignments == 4
    assert s.tokens_dropped == 4
    assert s.tokens_dropped_rate == pytest.approx(4 / 56)
    assert s.assignment_drop_rate == pytest.approx(4 / 56)
    assert s.routing_efficiency == pytest.approx(52 / 56)
    assert s.average_routing_efficiency == pytest.approx((16 / 20 + 1.0) / 2)
    assert s.average_load_balance_loss == pytest.approx(1.3)
    assert s.average_router_z_loss == pytest.approx(2.0)
    assert s.average_auxiliary_loss == pytest.approx(0.3)
    assert s.expert_token_counts.tolist() == [40, 4, 8]
    assert s.pre_drop_token_counts.tolist() == [44, 4, 8]
    # Utilization divides by the capacity each call offered (10 + 30), not by an assumed 100.
    assert s.capacity_offered == 40
    np.testing.assert_allclose(s.expert_utilization, [40 / 40, 4 / 40, 8 / 40])
    assert s.most_utilized_expert() == (0, 1.0)
    assert s.least_utilized_expert() == (1, pytest.approx(0.1))
    u = np.array([1.0, 0.1, 0.2])
    assert s.utilization_cv() == pytest.approx(u.std() / u.mean())
    summary = s.utilization_summary()
    assert summary["mean_utilization"] == pytest.approx(u.mean())  # not the constant 1/E
    assert summary["min_utilization"] == pytest.approx(0.1) and summary["max_utilization"] == 1.0
    assert summary["most_utilized_expert"] == [0, 1.0]
    # Per-call population variance of the kept loads.
    np.testing.assert_allclose(s.load_variance_history, [np.var([10, 4, 2]), np.var([30, 0, 6])])
    # Throughput: active tokens over the summed latency.
    assert s.total_time == pytest.approx(0.040)
    assert s.throughput == pytest.approx(56 / 0.040)
    assert s.mean_latency == pytest.approx(0.020)


def test_ties_pick_the_lowest_expert() -> None:
    s = RoutingStats()
    s.record(fake([5, 7, 7, 5], [5, 7, 7, 5], 8))
    assert s.most_utilized_expert() == (1, 7 / 8)
    assert s.least_utilized_expert() == (0, 5 / 8)


def test_untimed_record_counts_but_does_not_time() -> None:
    s = RoutingStats()
    s.record(fake([2, 2], [2, 2], 2))  # no latency
    s.record(fake([1, 1], [1, 1], 1), 0.5)
    assert s.calls == 2 and s.timed_calls == 1
    assert s.latency_p50 == 0.5 and s.throughput == pytest.approx(2 / 0.5)


def test_latency_percentiles_and_bounded_window() -> None:
    s = RoutingStats(window=100)
    order = np.random.default_rng(0).permutation(np.arange(1, 101))  # 1 .. 100 ms, in any order
    for ms in order:
        s.record(fake([1], [1], 1), float(ms) / 1e3)
    # Linear interpolation between order statistics (NumPy's default).
    assert s.latency_p50 == pytest.approx(0.0505)
    assert s.latency_p95 == pytest.approx(0.09505)
    assert s.latency_p99 == pytest.approx(0.09901)
    assert s.latency_percentile(0) == pytest.approx(0.001)
    assert s.latency_percentile(100) == pytest.approx(0.100)
    d = s.to_dict()
    assert d["latency_ms"]["p50"] == pytest.approx(50.5) and d["latency_ms"]["p99"] == pytest.approx(99.01)
    assert d["latency_s"]["p95"] == pytest.approx(0.09505)
    assert d["latency_ms"]["min"] == pytest.approx(1.0) and d["latency_ms"]["max"] == pytest.approx(100.0)
    # A window of 10 keeps only the last ten calls; the mean and throughput keep everything.
    w = RoutingStats(window=10)
    for ms in range(1, 101):
        w.record(fake([1], [1], 1), ms / 1e3)
    assert w.latency_p50 == pytest.approx(0.0955)  # median of 91..100 ms
    assert w.latency_percentile(0) == pytest.approx(0.091)
    assert w.mean_latency == pytest.approx(0.0505)
    assert w.throughput == pytest.approx(100 / 5.050)
    with pytest.raises(mr.InputError, match="percentile"):
        w.latency_percentile(101)


def test_variance_history_is_bounded() -> None:
    s = RoutingStats(history=3)
    for i in range(6):
        s.record(fake([i, 0], [i, 0], 10))
    np.testing.assert_allclose(s.load_variance_history, [np.var([i, 0]) for i in (3, 4, 5)])
    assert s.calls == 6


def test_dropless_capacity_is_the_largest_load() -> None:
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=None)
    logits = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 2]]
    dec = mr.route_logits(logits, cfg)
    s = RoutingStats()
    s.record(dec, 0.001)
    assert dec.capacity == 3 and s.capacity_offered == 3
    np.testing.assert_allclose(s.expert_utilization, [1.0, 1 / 3, 1 / 3, 0.0])


# --------------------------------------------------------------------------- real route_logits calls


def test_real_calls_match_the_decisions() -> None:
    rng = np.random.default_rng(3)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    s = RoutingStats()
    decisions = []
    for t in (50, 300, 17, 1000):
        logits = (rng.normal(size=(t, 8)) * 2).astype(np.float32)
        logits[:, 0] += 1.0  # skew so that expert 0 overflows
        mask = rng.random(t) > 0.1
        dec = mr.route_logits(logits, cfg, training=True, token_mask=mask)
        decisions.append(dec)
        s.record(dec, 0.002)
    assert s.calls == 4
    assert s.total_tokens == sum(d.total_tokens for d in decisions)
    assert s.active_tokens == sum(d.active_tokens for d in decisions)
    assert s.total_assignments == 2 * s.active_tokens
    assert s.kept_assignments == sum(d.kept_assignments for d in decisions)
    assert s.dropped_assignments == sum(d.dropped_assignments for d in decisions) > 0
    assert s.tokens_dropped == sum(d.tokens_dropped for d in decisions)
    kept = sum(d.tokens_per_expert for d in decisions)
    assert s.expert_token_counts.tolist() == kept.tolist()
    assert s.pre_drop_token_counts.tolist() == sum(d.pre_drop_tokens_per_expert for d in decisions).tolist()
    capacity = sum(d.capacity for d in decisions)
    assert capacity == sum(cfg.capacity(d.active_tokens) for d in decisions)
    np.testing.assert_allclose(s.expert_utilization, kept / capacity)
    assert s.expert_utilization.max() <= 1.0
    assert s.average_load_balance_loss == pytest.approx(np.mean([d.load_balance_loss for d in decisions]))
    assert s.average_router_z_loss == pytest.approx(np.mean([d.router_z_loss for d in decisions]))
    assert s.average_auxiliary_loss == pytest.approx(np.mean([d.auxiliary_loss for d in decisions]))
    assert s.average_routing_efficiency == pytest.approx(np.mean([d.routing_efficiency() for d in decisions]))
    assert s.tokens_dropped_rate == pytest.approx(s.tokens_dropped / s.active_tokens)
    np.testing.assert_allclose(s.load_variance_history,
                               [np.var(d.tokens_per_expert.astype(float)) for d in decisions])
    assert s.throughput == pytest.approx(s.active_tokens / 0.008)


# --------------------------------------------------------------------------- reset, export, errors


def test_reset_clears_everything_and_allows_a_new_expert_count() -> None:
    s = RoutingStats(window=7, history=5)
    s.record(fake([3, 1], [4, 1], 3, tokens_dropped=1), 0.01)
    s.reset()
    assert s.calls == 0 and s.num_experts is None and s.tokens_dropped == 0
    assert s.latency_p50 is None and s.load_variance_history.size == 0 and s.capacity_offered == 0
    assert s.to_dict()["latency_window"] == 7
    s.record(fake([1, 1, 1], [1, 1, 1], 1), 0.01)  # E = 3 after the reset is fine
    assert s.num_experts == 3


def test_errors() -> None:
    s = RoutingStats()
    s.record(fake([1, 1], [1, 1], 1))
    with pytest.raises(mr.InputError, match="3 experts.*2"):
        s.record(fake([1, 1, 1], [1, 1, 1], 1))
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(mr.InputError, match="latency_s"):
            s.record(fake([1, 1], [1, 1], 1), bad)
    assert s.calls == 1  # failed records change nothing
    for bad in (0, -3, 2.5, True):
        with pytest.raises(mr.ConfigError, match="window"):
            RoutingStats(window=bad)
        with pytest.raises(mr.ConfigError, match="history"):
            RoutingStats(history=bad)


def test_to_dict_json_round_trip() -> None:
    cfg = mr.RouterConfig(num_experts=16, top_k=2, capacity_factor=1.25)
    logits = np.random.default_rng(1).normal(size=(256, 16)).astype(np.float32)
    s = RoutingStats()
    for _ in range(3):
        s.record(mr.route_logits(logits, cfg, training=True), 0.001)
    d = s.to_dict()
    back = json.loads(json.dumps(d))
    assert back == d
    assert d["calls"] == 3 and d["num_experts"] == 16
    assert d["expert_token_counts"] == s.expert_token_counts.tolist()
    assert d["expert_utilization"] == s.expert_utilization.tolist()
    assert d["latency_ms"]["p50"] == pytest.approx(1.0) and d["latency_s"]["p50"] == pytest.approx(0.001)
    assert d["throughput_tokens_per_s"] == pytest.approx(3 * 256 / 0.003)
    assert d["utilization_summary"]["utilization_cv"] == pytest.approx(s.utilization_cv())
    assert all(isinstance(v, float) for v in d["load_variance_history"])
    # Infinite throughput (timed calls that took no time) becomes null, never "Infinity".
    z = RoutingStats()
    z.record(fake([1], [1], 1), 0.0)
    assert z.throughput == math.inf and z.to_dict()["throughput_tokens_per_s"] is None
    json.dumps(z.to_dict(), allow_nan=False)


def test_to_dict_has_null_for_every_non_finite_float() -> None:
    """A non-finite loss does not poison the running averages (it is skipped and counted); to_dict is
    strict JSON, and a non-finite value anywhere in a snapshot is None."""
    s = RoutingStats()
    s.record(fake([1, 1], [1, 1], 1, lb=math.inf, z=-math.inf, aux=math.nan), 0.002)
    s.record(fake([1, 1], [1, 1], 1), 0.001)
    assert math.isfinite(s.average_load_balance_loss) and math.isfinite(s.average_auxiliary_loss)
    d = s.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    assert d["non_finite_losses"] >= 3
    assert d["calls"] == 2 and d["latency_s"]["max"] == 0.002  # everything finite is kept as it is
    # The balancer's snapshot follows the same rule.
    stats = mr.LoadBalancingStats(expert_loads=np.array([0.5, math.nan]), steps=1, imbalanced=False,
                                  imbalance_ratio=math.inf, threshold=0.5, warmup_steps=0,
                                  expert_bias=np.array([-math.inf, 0.25]), bias_update_rate=0.1, enabled=True)
    snapshot = stats.to_dict()
    assert snapshot["expert_loads"] == [0.5, None] and snapshot["expert_bias"] == [None, 0.25]
    assert snapshot["imbalance_ratio"] is None and snapshot["last_load"] is None
    json.dumps(snapshot, allow_nan=False)


def test_exported_and_returns_copies() -> None:
    assert mr.RoutingStats is RoutingStats and "RoutingStats" in mr.__all__
    s = RoutingStats()
    s.record(fake([2, 1], [2, 1], 2))
    counts = s.expert_token_counts
    counts[0] = 99
    assert s.expert_token_counts.tolist() == [2, 1]
    assert s.total_routings == 1  # the alias of calls


# --------------------------------------------------------------------------- threads


def test_eight_threads_recording_at_once_give_consistent_totals() -> None:
    num_threads, per_thread, num_experts = 8, 250, 6
    s = RoutingStats(window=4096)
    barrier = threading.Barrier(num_threads)
    errors: List[BaseException] = []

    def worker(tid: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                kept = [(tid + i + e) % 4 for e in range(num_experts)]
                pre = [k + (1 if e == tid % num_experts else 0) for e, k in enumerate(kept)]
                s.record(fake(kept, pre, 5, tokens_dropped=i % 2, lb=float(tid)), 1e-3 * (1 + tid))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    exp_kept = np.zeros(num_experts, dtype=np.int64)
    exp_pre = np.zeros(num_experts, dtype=np.int64)
    for tid in range(num_threads):
        for i in range(per_thread):
            kept = np.array([(tid + i + e) % 4 for e in range(num_experts)])
            exp_kept += kept
            exp_pre += kept
            exp_pre[tid % num_experts] += 1
    n = num_threads * per_thread
    assert s.calls == n and s.timed_calls == n
    assert s.expert_token_counts.tolist() == exp_kept.tolist()
    assert s.pre_drop_token_counts.tolist() == exp_pre.tolist()
    assert s.kept_assignments == int(exp_kept.sum())
    assert s.dropped_assignments == n  # one dropped assignment per call
    assert s.tokens_dropped == n // 2
    assert s.capacity_offered == 5 * n
    assert s.average_load_balance_loss == pytest.approx(np.mean(range(num_threads)))
    assert s.total_time == pytest.approx(per_thread * 1e-3 * sum(1 + t for t in range(num_threads)))
    assert len(s.load_variance_history) == min(n, 1024)


def test_eight_threads_routing_and_recording_real_calls() -> None:
    """route_logits releases the GIL; recording from 8 threads still sums exactly."""
    cfg = mr.RouterConfig(num_experts=16, top_k=2, capacity_factor=1.25)
    batches = [np.random.default_rng(i).normal(size=(512, 16)).astype(np.float32) for i in range(8)]
    expected = [mr.route_logits(b, cfg, training=True) for b in batches]
    s = RoutingStats()
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            s.record(mr.route_logits(batches[i], cfg, training=True), 1e-4)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.calls == 160
    assert s.kept_assignments == 20 * sum(d.kept_assignments for d in expected)
    assert s.dropped_assignments == 20 * sum(d.dropped_assignments for d in expected)
    assert s.expert_token_counts.tolist() == (20 * sum(d.tokens_per_expert for d in expected)).tolist()
    assert s.capacity_offered == 20 * sum(d.capacity for d in expected)


PROPERTIES = ["total_routings", "average_load_balance_loss", "average_router_z_loss", "average_auxiliary_loss",
              "average_routing_efficiency", "routing_efficiency", "tokens_dropped_rate", "assignment_drop_rate",
              "expert_token_counts", "pre_drop_token_counts", "capacity_offered", "expert_utilization",
              "load_variance_history", "latency_p50", "latency_p95", "latency_p99", "mean_latency", "total_time",
              "throughput"]
METHODS = ["utilization_cv", "most_utilized_expert", "least_utilized_expert", "utilization_summary", "to_dict",
           "__repr__"]


def test_reads_are_documented_read_only_properties_and_wait_for_the_lock() -> None:
    s = RoutingStats()
    s.record(fake([2, 1], [3, 1], 2), 0.001)
    for name in PROPERTIES:
        assert is_documented_getter(RoutingStats, name), name
        with pytest.raises(AttributeError):
            setattr(s, name, 0)
        assert waits_for_lock(s, lambda: getattr(s, name)), name
    for name in METHODS:
        assert waits_for_lock(s, getattr(s, name)), name
    assert waits_for_lock(s, lambda: s.latency_percentile(50))


# --------------------------------------------------------------------------- non-finite values


@settings(deadline=None, max_examples=200, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from([0.5, 3.0, 1e308, 1.7976931348623157e308, math.inf, -math.inf,
                                            math.nan, 0.0]),
                          st.sampled_from([1.0, 1e300, math.inf, math.nan])), min_size=1, max_size=12))
def test_one_non_finite_loss_never_poisons_the_averages(values) -> None:
    """Averages are over the finite values only (exact running means, no overflow); the others are counted."""
    s = RoutingStats()
    for aux, z in values:
        s.record(fake([1, 1], [1, 1], 1, lb=1.0, z=z, aux=aux), 1e-3)

    def mean_of_finite(xs):
        finite = [x for x in xs if math.isfinite(x)]
        return None if not finite else float(sum(Fraction(x) for x in finite) / len(finite))

    for got, column in ((s.average_auxiliary_loss, [a for a, _ in values]),
                        (s.average_router_z_loss, [z for _, z in values])):
        want = mean_of_finite(column)
        assert (got is None) == (want is None)
        if want is not None:
            assert math.isfinite(got) and got == pytest.approx(want, rel=1e-12)
    assert s.average_load_balance_loss == 1.0
    assert s.non_finite_losses == sum(not math.isfinite(x) for pair in values for x in pair)
    assert json.loads(json.dumps(s.to_dict()))["non_finite_losses"] == s.non_finite_losses

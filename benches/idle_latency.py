"""T=1 and T=64 latency per Python call (against np.argpartition) and T=262144 time of route_logits,
with the Python wrapper's share (the median paired difference of the call and
``moe_router._core.route_logits`` on the same input, made alternately, over the core call),
for the SIMD level MOE_ROUTER_SIMD selects; one markdown table.

Usage: MOE_ROUTER_SIMD=avx2 python benches/idle_latency.py"""
import os
import time

import numpy as np

import moe_router as mr
from moe_router import _core

mr.set_num_threads(2)
rng = np.random.default_rng(0)


def median(f, n, reps=5):
    """Median seconds per call of ``f`` over ``reps`` loops of ``n`` calls, after one warm-up call."""
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            f()
        out.append((time.perf_counter() - t) / n)
    return float(np.median(out))


def paired(f, g, n):
    """(median seconds of ``f``, median of ``f - g`` over ``g``'s median), the two called
    alternately ``n`` times after a warm-up each, so that the guest's drifting speed cancels."""
    f(), g()
    tf, tg, diff = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        g()
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tg.append(t2 - t1)
        diff.append((t1 - t0) - (t2 - t1))
    return float(np.median(tf)), float(np.median(diff) / np.median(tg))


rows = []
for E, k in [(8, 2), (64, 2), (64, 8), (256, 8)]:
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.25)
    one = rng.normal(size=(1, E)).astype(np.float32)
    x = rng.normal(size=(64, E)).astype(np.float32)
    t1 = median(lambda: mr.route_logits(one, cfg), 2000)
    t64 = median(lambda: mr.route_logits(x, cfg), 2000)
    ap = median(lambda: np.argpartition(x, -k, axis=1), 2000)
    big = rng.normal(size=(262144, E)).astype(np.float32)
    full, core = paired(lambda: mr.route_logits(big, cfg), lambda: _core.route_logits(big, cfg), 9)
    rows.append(f"| {E} | {k} | {t1 * 1e6:.1f} | {t64 * 1e6:.1f} | {ap * 1e6:.1f} | {t64 / ap:.2f} | "
                f"{full * 1e3:.1f} | {core * 100:.1f}% |")
print(f"SIMD={os.environ.get('MOE_ROUTER_SIMD', 'auto')}, load {' '.join(open('/proc/loadavg').read().split()[:3])}")
print("| E | k | T=1 median us | T=64 median us | argpartition us | ratio | T=262144 median ms | wrapper share |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))

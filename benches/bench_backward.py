#!/usr/bin/env python3
"""Benchmark ``RoutingDecision.backward`` against the forward and against torch autograd through
Megatron-Core's router functions, in one run.

At T=262144, (E, k) in {(64, 2), (256, 8)}, capacity factor 1.25, float32 N(0,1) logits, 2 threads:

* forward: ``mr.route_logits`` (training, load-balance and z losses on), the call a user makes,
  and the route alone (``moe_router._core.route_logits``, without the Python wrapper's input
  normalization);
* backward: ``decision.backward(grad_expert_weights, 1.0)`` on that decision, into a fresh
  ``[T, E]`` array, and with ``out=`` a buffer reused across calls (no first-touch page faults);
* Megatron-Core (where torch and megatron-core import, e.g. the peers venv): forward
  ``topk_routing_with_score_function`` + ``compute_routing_scores_for_aux_loss`` +
  ``switch_load_balancing_loss_func`` + ``z_loss_func``, then ``backward()`` of
  ``(probs * G).sum() + aux + z`` with torch autograd on the CPU; the backward time is the
  autograd call alone.

Our four timings are interleaved (one of each per round, median of ``--repeat`` rounds after one
warm-up), so load changes hit them alike. Prints a markdown table with the ratios (targets:
backward <= 1.5x forward; >= 10x faster than Megatron's autograd backward). ``MOE_ROUTER_SIMD``
(``avx512``, ``avx2``, ``off``) caps the kernels' instruction set; ``--no-peers`` skips Megatron.

    python benches/bench_backward.py [--repeat 5] [--tokens 262144] [--no-peers]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import time

import numpy as np

import moe_router as mr
from moe_router import _core


def median_time(f, repeat):
    return interleaved({"f": f}, repeat)["f"]


def interleaved(calls, repeat):
    """Median seconds of each call, one of each per round, after one warm-up round."""
    for f in calls.values():
        f()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def megatron_times(x, k, repeat):
    try:
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.transformer.moe import moe_utils as mu
    except Exception as err:  # not installed here
        return None, f"{type(err).__name__}: {err}"
    torch.set_num_threads(2)
    T, E = x.shape
    G = torch.randn(T, E)

    def forward():
        a = torch.from_numpy(x).requires_grad_()
        probs, _ = mu.topk_routing_with_score_function(a, k)
        map_aux, scores_aux = mu.compute_routing_scores_for_aux_loss(a, k, "softmax")
        aux = mu.switch_load_balancing_loss_func(probs=scores_aux, tokens_per_expert=map_aux.sum(0),
                                                 total_num_tokens=T, topk=k, num_experts=E, moe_aux_loss_coeff=0.01)
        return (probs * G).sum() + aux + mu.z_loss_func(a, 0.001)

    fwd = median_time(forward, repeat)
    bwd = []
    for _ in range(repeat + 1):
        loss = forward()
        t0 = time.perf_counter()
        loss.backward()
        bwd.append(time.perf_counter() - t0)
    return (fwd, statistics.median(bwd[1:])), None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--no-peers", action="store_true", help="skip the Megatron-Core columns")
    a = p.parse_args(argv)
    mr.set_num_threads(2)
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"# backward benchmark, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu or platform.processor()}, "
          f"T={a.tokens}, 2 threads, MOE_ROUTER_SIMD={os.environ.get('MOE_ROUTER_SIMD', 'unset')}, "
          f"median of {a.repeat}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print("| E, k | route ms | forward ms | backward ms | backward out= ms | backward / forward "
          "| out= / forward | Megatron fwd ms | Megatron autograd bwd ms | Megatron bwd / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for E, k in ((64, 2), (256, 8)):
        x = np.random.default_rng(0).normal(size=(a.tokens, E)).astype(np.float32)
        cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.25, load_balance_loss_coeff=0.01,
                              router_z_loss_coeff=0.001)
        g = np.random.default_rng(1).normal(size=(a.tokens, k))
        dec = mr.route_logits(x, cfg, training=True)
        buf = np.empty_like(x)
        t = interleaved({
            "route": lambda: _core.route_logits(x, cfg, training=True),
            "forward": lambda: mr.route_logits(x, cfg, training=True),
            "backward": lambda: dec.backward(g, 1.0),
            "out": lambda: dec.backward(g, 1.0, out=buf),
        }, a.repeat)
        meg, why = (None, "skipped (--no-peers)") if a.no_peers else megatron_times(x, k, a.repeat)
        bwd, fwd = t["backward"], t["forward"]
        meg_cols = (f"{meg[0] * 1e3:.1f} | {meg[1] * 1e3:.1f} | {meg[1] / bwd:.1f}x" if meg else f"n/a | n/a | {why}")
        print(f"| {E}, {k} | {t['route'] * 1e3:.1f} | {fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {t['out'] * 1e3:.1f} "
              f"| {bwd / fwd:.2f}x | {t['out'] / fwd:.2f}x | {meg_cols} |")


if __name__ == "__main__":
    main()

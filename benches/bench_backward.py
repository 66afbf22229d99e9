#!/usr/bin/env python3
"""Benchmark ``RoutingDecision.backward`` against the forward and against torch autograd through
Megatron-Core's router functions, in one run.

At T=262144, (E, k) in {(64, 2), (256, 8)}, capacity factor 1.25, float32 N(0,1) logits, 2 threads:

* forward: ``mr.route_logits`` (training, load-balance and z losses on);
* backward: ``decision.backward(grad_expert_weights, 1.0)`` on that decision;
* Megatron-Core (where torch and megatron-core import, e.g. the peers venv): forward
  ``topk_routing_with_score_function`` + ``compute_routing_scores_for_aux_loss`` +
  ``switch_load_balancing_loss_func`` + ``z_loss_func``, then ``backward()`` of
  ``(probs * G).sum() + aux + z`` with torch autograd on the CPU; the backward time is the
  autograd call alone.

Median of ``--repeat`` runs after one warm-up. Prints a markdown table with the ratios
(targets: backward <= 1.5x forward; >= 10x faster than Megatron's autograd backward).

    python benches/bench_backward.py [--repeat 5] [--tokens 262144]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import subprocess
import time

import numpy as np

import moe_router as mr


def median_time(f, repeat):
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    a = p.parse_args(argv)
    mr.set_num_threads(2)
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"# backward benchmark, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu or platform.processor()}, "
          f"T={a.tokens}, 2 threads, median of {a.repeat}\n")
    print("| E, k | forward ms | backward ms | backward / forward | Megatron fwd ms | Megatron autograd bwd ms "
          "| Megatron bwd / ours |")
    print("|---|---|---|---|---|---|---|")
    for E, k in ((64, 2), (256, 8)):
        x = np.random.default_rng(0).normal(size=(a.tokens, E)).astype(np.float32)
        cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.25, load_balance_loss_coeff=0.01,
                              router_z_loss_coeff=0.001)
        g = np.random.default_rng(1).normal(size=(a.tokens, k))
        fwd = median_time(lambda: mr.route_logits(x, cfg, training=True), a.repeat)
        dec = mr.route_logits(x, cfg, training=True)
        bwd = median_time(lambda: dec.backward(g, 1.0), a.repeat)
        meg, why = megatron_times(x, k, a.repeat)
        meg_cols = (f"{meg[0] * 1e3:.1f} | {meg[1] * 1e3:.1f} | {meg[1] / bwd:.1f}x" if meg else f"n/a | n/a | {why}")
        print(f"| {E}, {k} | {fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {bwd / fwd:.2f}x | {meg_cols} |")


if __name__ == "__main__":
    main()

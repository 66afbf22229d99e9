#!/usr/bin/env python3
"""Benchmark Sinkhorn routing against a NumPy transcription of Megatron-Core's loop.

At T=65536, E=64, k=2, dropless: the real router logits ``logits_e64`` of
``shared/data/real_router/minilm_l5.npz`` (16384 tokens, tiled to T), float32.

* ours: ``mr.route_logits(..., RouterConfig(routing="sinkhorn"), training=True)``, the
  whole routing call (cost, iteration, selection, weights, losses);
* Megatron's ``moe_utils.sinkhorn`` transcribed to NumPy float32 (``exp`` of the raw
  logits, the same ``+1e-8`` updates, ``while error > tol``), then ``argpartition`` top-k.

Median of ``--repeat`` runs after one warm-up; prints a markdown row with the iteration counts.

    python benches/bench_sinkhorn.py [--repeat 5] [--tokens 65536]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

import moe_router as mr

DATA = "/work/shared/data/real_router/minilm_l5.npz"


def megatron_numpy(logits: np.ndarray, k: int, tol: float = 1e-4):
    """Megatron-Core ``sinkhorn`` (float32) and a top-k of the balanced matrix; returns (indices, iterations)."""
    cost = np.exp(logits)
    d0 = np.ones(cost.shape[0], np.float32)
    d1 = np.ones(cost.shape[1], np.float32)
    eps, error, d1_old, iterations = np.float32(1e-8), 1e9, d1, 0
    while error > tol:
        d0 = (1 / d0.size) * 1 / ((d1 * cost).sum(1) + eps)
        d1 = (1 / d1.size) * 1 / ((d0[:, None] * cost).sum(0) + eps)
        error = float(np.abs(d1_old - d1).mean())
        d1_old = d1
        iterations += 1
    balanced = d1 * cost * d0[:, None]
    return np.argpartition(-balanced, k - 1, axis=1)[:, :k], iterations


def median_ms(fn, repeat: int):
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args()
    base = np.load(DATA)["logits_e64"]
    logits = np.ascontiguousarray(np.resize(base, (args.tokens, base.shape[1])), dtype=np.float32)
    cfg = mr.RouterConfig(num_experts=64, top_k=2, routing="sinkhorn", capacity_factor=None)
    ours_ms, dec = median_ms(lambda: mr.route_logits(logits, cfg, training=True), args.repeat)
    theirs_ms, (idx, iterations) = median_ms(lambda: megatron_numpy(logits, 2), args.repeat)
    same = (np.sort(idx, 1) == np.sort(dec.expert_indices, 1)).all(1).sum()
    print(f"CPU: {platform.processor() or platform.machine()}, threads: {mr.get_num_threads()}")
    print("| T, E, k | ours ms (iterations) | NumPy Megatron loop ms (iterations) | ratio | rows agreeing |")
    print("|---|---|---|---|---|")
    print(f"| {args.tokens}, 64, 2 | {ours_ms:.1f} ({dec.sinkhorn_iterations}) | {theirs_ms:.1f} ({iterations}) | "
          f"{theirs_ms / ours_ms:.1f}x | {same} of {args.tokens} |")


if __name__ == "__main__":
    main()

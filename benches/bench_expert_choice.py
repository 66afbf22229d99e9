#!/usr/bin/env python3
"""Benchmark expert-choice routing against NumPy and torch transcriptions of flaxformer.

``moe_router.route_logits`` with ``preset("expert_choice", E)`` (capacity
``round(cf * T / E)``, softmax, each expert takes its top-C tokens) and with EC-CAP
(``expert_choice_cap=2``), against:

* ``numpy-argpartition``: flaxformer's ``ExpertsChooseMaskedRouter`` in NumPy: float32
  softmax, the ``[E, T]`` transposed probabilities, ``argpartition`` for the top C of
  each row, then a sort of those C (``jax.lax.top_k`` returns them in order);
* ``numpy-argsort``: the same with a full stable ``argsort`` of each row;
* ``torch-topk``: ``torch.topk(probs.T, C)`` (when torch is importable; its thread
  count is set to ``--threads``).

The transcriptions produce the ``[E, C]`` token indices and combine weights only; ours
also produces the ``[T, k]`` decision, slots, counts and losses. Median of ``--repeat``
calls after a warm-up. ``--append PATH`` appends the markdown section to PATH.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

import moe_router as mr


def timed(fn: Callable[[], Any], repeat: int) -> Tuple[float, Any]:
    out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def softmax32(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def numpy_argpartition(x: np.ndarray, c: int) -> Tuple[np.ndarray, np.ndarray]:
    probs_t = softmax32(x).T
    top = np.argpartition(-probs_t, c - 1, axis=1)[:, :c]
    vals = np.take_along_axis(probs_t, top, 1)
    order = np.lexsort((top, -vals), axis=1)
    return np.take_along_axis(top, order, 1), np.take_along_axis(vals, order, 1)


def numpy_argsort(x: np.ndarray, c: int) -> Tuple[np.ndarray, np.ndarray]:
    probs_t = softmax32(x).T
    top = np.argsort(-probs_t, axis=1, kind="stable")[:, :c]
    return top, np.take_along_axis(probs_t, top, 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", metavar="PATH", help="append the markdown section to this file")
    args = ap.parse_args()
    t, e = args.tokens, args.experts
    mr.set_num_threads(args.threads)
    x = np.random.default_rng(0).normal(size=(t, e)).astype(np.float32)
    cfg = mr.preset("expert_choice", e, train_capacity_factor=args.capacity_factor)
    c = cfg.capacity(t)
    rows: List[Tuple[str, float, str]] = []
    ours_ms, dec = timed(lambda: mr.route_logits(x, cfg), args.repeat)
    rows.append(("moe_router expert choice", ours_ms, f"top_k (columns) {dec.top_k}"))
    cap_ms, capped = timed(lambda: mr.route_logits(x, cfg.replace(expert_choice_cap=2)), args.repeat)
    rows.append(("moe_router EC-CAP (cap 2)", cap_ms, f"tokens with no expert {capped.tokens_dropped}"))
    # Agreement with the float32 transcription: the same token sets per expert.
    plan = dec.dispatch_plan()
    ours_sets = [set(plan.token_ids[plan.expert_offsets[i]:plan.expert_offsets[i + 1]].tolist()) for i in range(e)]
    for name, fn in (("numpy argpartition (flaxformer)", numpy_argpartition), ("numpy argsort", numpy_argsort)):
        ms, (top, _) = timed(lambda fn=fn: fn(x, c), args.repeat)
        same = sum(len(ours_sets[i] & set(top[i].tolist())) for i in range(e)) / (e * c)
        rows.append((name, ms, f"same tokens as ours: {same:.4%}"))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        xt = torch.from_numpy(x)

        def torch_topk() -> Any:
            return torch.topk(torch.softmax(xt, dim=-1).T, c, dim=1)

        ms, _ = timed(torch_topk, args.repeat)
        rows.append((f"torch {torch.__version__} topk(probs.T, C)", ms, ""))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%a %b %d %Y, %H:%M UTC")
    lines = [
        "",
        "## Expert-choice routing: `benches/bench_expert_choice.py`",
        "",
        f"- **Date**: {now}. **Command**: `python benches/bench_expert_choice.py --repeat {args.repeat} "
        f"--threads {args.threads}` (quick-profile build, not LTO). **CPU**: {cpu_name()}, "
        f"{args.threads} threads; a shared machine: compare ratios, not absolute times.",
        f"- T={t}, E={e}, float32 N(0,1) logits, `preset('expert_choice', {e})`: C = round({args.capacity_factor} * T / E)"
        f" = {c}. Median of {args.repeat} calls after a warm-up.",
        "",
        "| implementation | ms | ours / it | note |",
        "|---|---|---|---|",
    ]
    for name, ms, note in rows:
        lines.append(f"| {name} | {ms:.1f} | {ours_ms / ms:.2f} | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()

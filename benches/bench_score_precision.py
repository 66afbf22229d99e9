"""Cost of the presets' float32 score arithmetic: each preset routed with ``score_precision`` as
the preset sets it (float32) and with ``"float64"`` (native scores), on the same N(0,1) logits.

    python benches/bench_score_precision.py --tokens 65536 --repeat 7

Prints a markdown table of the best time of ``--repeat`` alternating runs (milliseconds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import moe_router as mr

CASES = [("mixtral", {}), ("megatron", {}), ("megatron", {"pre_softmax": True}), ("deepspeed", {}),
         ("deepseek_v3", {"n_group": 8, "topk_group": 4})]


def best_ms(x: np.ndarray, configs: dict, repeat: int) -> dict:
    times = {name: [] for name in configs}
    for _ in range(repeat):
        for name, cfg in configs.items():
            start = time.perf_counter()
            mr.route_logits(x, cfg, training=True)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    print("| T | E, k | preset | score_precision | float32 ms | float64 ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for E, k in [(64, 2), (256, 8)]:
        x = np.random.default_rng(0).normal(size=(a.tokens, E)).astype(np.float32)
        for name, extra in CASES:
            cfg = mr.preset(name, E, k, **extra)
            t = best_ms(x, {"f32": cfg, "f64": cfg.replace(score_precision="float64")}, a.repeat)
            label = name + "".join(f" {key}={value}" for key, value in extra.items())
            print(f"| {a.tokens} | {E}, {k} | {label} | {cfg.score_precision} | {t['f32']:.1f} | {t['f64']:.1f} "
                  f"| {t['f32'] / t['f64']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

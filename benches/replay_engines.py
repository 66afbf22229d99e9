"""Router replay on the real data: how many tokens two "engines" route differently, and what a replay costs.

Two engines route the same tokens with the same routers (layers 3 and 5 of
all-MiniLM-L6-v2, E experts, top-2): engine A on the float32 router logits, engine B
on the same logits rounded to bfloat16, as an inference engine whose router emits
bfloat16 logits (ties that the rounding creates go to the lower expert index).
The script records both (``RecordedRoutes``), reports per layer the tokens whose expert
sets differ (``RecordedRoute.differing_tokens``, as ``moe-router replay-diff``) and the
tokens that differ in at least one layer, then routes engine A's logits with engine
B's recording (the R3 setting: train on the rollout's experts) and times
``route_logits`` with and without ``replay=`` (median of ``--repeat`` calls after one warm-up).

Usage: ``python benches/replay_engines.py [--experts 64] [--repeat 20]`` (needs ../shared/data/real_router).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import moe_router as mr
from bench_backward import median_time  # this folder is on sys.path when the script runs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_router"


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def engine_logits(layer: str, experts: int) -> tuple:
    """Engine A's float32 logits of ``layer`` and engine B's bfloat16-rounded ones."""
    with np.load(DATA / f"minilm_{layer}.npz") as f:
        a = f[f"logits_e{experts}"]
    return a, bf16(a)


def median_ms(call, repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up, in ms."""
    return 1e3 * median_time(call, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64, choices=(8, 64, 256))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    cfg = mr.RouterConfig(num_experts=args.experts, top_k=2, capacity_factor=1.25, normalize_weights=True)
    logits = {layer: engine_logits(layer, args.experts) for layer in ("l3", "l5")}
    rec_a = mr.RecordedRoutes([mr.route_logits(a, cfg) for a, _ in logits.values()])
    rec_b = mr.RecordedRoutes([mr.route_logits(b, cfg) for _, b in logits.values()])
    flags = [x.differing_tokens(y) for x, y in zip(rec_a.layers, rec_b.layers)]
    t = flags[0].size
    print(f"E={args.experts}, k=2, T={t}, engines float32 vs bfloat16")
    for layer, f in zip(logits, flags):
        print(f"  layer {layer}: {int(f.sum())} tokens differ ({100 * f.mean():.2f} %)")
    union = np.logical_or.reduce(flags)
    print(f"  any layer: {int(union.sum())} tokens ({100 * union.mean():.2f} %); "
          f"layers differing: {sum(int(f.any()) for f in flags)} of {len(flags)}")
    a5, _ = logits["l5"]
    replayed = mr.route_logits(a5, cfg, replay=rec_b[1])
    fresh = mr.route_logits(a5, cfg)
    moved = np.abs(replayed.expert_weights - fresh.expert_weights).max()
    print(f"  layer l5, A's logits with B's experts: {int((replayed.expert_indices != rec_b[1].expert_indices).sum())} "
          f"choices off the recording; weights (with drops) differ from A's own routing by up to {moved:.3g}; "
          f"load_balance_loss {fresh.load_balance_loss:.5f} -> {replayed.load_balance_loss:.5f}")
    plain = median_ms(lambda: mr.route_logits(a5, cfg), args.repeat)
    replay = median_ms(lambda: mr.route_logits(a5, cfg, replay=rec_b[1]), args.repeat)
    rec_ms = median_ms(lambda: fresh.record(), args.repeat)
    print(f"  route_logits {plain:.3f} ms, with replay= {replay:.3f} ms ({replay / plain:.2f}x), "
          f"record() {rec_ms:.3f} ms (median of {args.repeat}, {mr.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

"""Timing of the hidden-state path: the hierarchical gate (dense vs sparse) and the fused
linear router against NumPy's GEMM alone.

    python benches/bench_hidden.py                      # the default sizes (about a minute)
    python benches/bench_hidden.py --tokens 4096        # smaller

Prints two markdown tables:

1. ``GateNetwork.forward`` and ``ExpertRouter(gate="hierarchical").route_tokens`` with
   the dense gate (``group_top_k=None``) and the sparse one (``group_top_k = G/4`` by
   default), E=256, D=1024, T=16384, float32.
2. ``ExpertRouter.route_tokens`` (router GEMM fused with top-k, capacity and losses, in
   Rust) against NumPy's ``hidden @ W`` alone, and against ``hidden @ W`` followed by
   ``route_logits``, at T=16384, D=4096, E=64, float32.

Each time is the median of ``--repeat`` calls after one warm-up call (min in brackets).
Times depend on the machine; the ratios are the point.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable, List, Tuple

import numpy as np

import moe_router as mr


def measure(fn: Callable[[], object], repeat: int) -> Tuple[float, float]:
    """(median, min) wall-clock seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times: List[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def fmt_ms(t: Tuple[float, float]) -> str:
    return f"{1e3 * t[0]:.1f} ms ({1e3 * t[1]:.1f})"


def bench_gate(tokens: int, dim: int, experts: int, group_top_k: int, k: int, repeat: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((tokens, dim), dtype=np.float32)
    dense = mr.GateNetwork(dim, experts, seed=seed)
    groups, per = dense.num_groups(), dense.experts_per_group()
    m = group_top_k if group_top_k > 0 else max(1, groups // 4)
    sparse = mr.GateNetwork(dim, experts, seed=seed, group_top_k=m)
    cfg = mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=1.25, enable_load_balancing=False)
    r_dense = mr.ExpertRouter(cfg, dim, seed=seed, gate="hierarchical")
    r_sparse = mr.ExpertRouter(cfg, dim, seed=seed, gate="hierarchical", group_top_k=m)
    # Same weights in both (same seed): the sparse values equal the dense ones where computed.
    p_dense, p_sparse = dense.forward(hidden[:2048]), sparse.forward(hidden[:2048])
    computed = p_sparse > 0
    assert np.array_equal(p_sparse[computed], p_dense[computed])

    rows = [
        ("GateNetwork.forward", measure(lambda: dense.forward(hidden), repeat),
         measure(lambda: sparse.forward(hidden), repeat)),
        (f"ExpertRouter(gate='hierarchical').route_tokens, k={k}",
         measure(lambda: r_dense.route_tokens(hidden), repeat), measure(lambda: r_sparse.route_tokens(hidden), repeat)),
    ]
    fraction = sparse.get_hierarchy_stats()["flop_fraction"]
    print(f"### Hierarchical gate: E={experts} (G={groups} groups of P={per}), D={dim}, T={tokens}, float32, "
          f"sparse group_top_k={m}\n")
    print(f"FLOP fraction of the sparse gate: (G + m*P) / (G + E) = {fraction:.3f}\n")
    print("| call | dense | sparse | dense / sparse |")
    print("|---|---:|---:|---:|")
    for name, td, ts in rows:
        print(f"| {name} | {fmt_ms(td)} | {fmt_ms(ts)} | {td[0] / ts[0]:.2f}x |")
    print()


def bench_linear(tokens: int, dim: int, experts: int, k: int, repeat: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((tokens, dim), dtype=np.float32)
    weight = (rng.standard_normal((dim, experts), dtype=np.float32) / np.float32(np.sqrt(dim)))
    cfg = mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=1.25, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, dim, weight=weight, gate="linear")
    ref = mr.route_logits(hidden @ weight, cfg)
    dec = router.route_tokens(hidden)
    agree = float((dec.expert_indices == ref.expert_indices).all(axis=1).mean())

    t_router = measure(lambda: router.route_tokens(hidden), repeat)
    t_numpy = measure(lambda: hidden @ weight, repeat)
    t_both = measure(lambda: mr.route_logits(hidden @ weight, cfg), repeat)
    print(f"### Linear router: T={tokens}, D={dim}, E={experts}, k={k}, float32\n")
    print("| call | time | / NumPy `hidden @ W` |")
    print("|---|---:|---:|")
    print(f"| NumPy `hidden @ W` alone | {fmt_ms(t_numpy)} | 1.00x |")
    print(f"| `ExpertRouter.route_tokens` (GEMM + routing, fused) | {fmt_ms(t_router)} | "
          f"{t_router[0] / t_numpy[0]:.2f}x |")
    print(f"| NumPy `hidden @ W`, then `route_logits` | {fmt_ms(t_both)} | {t_both[0] / t_numpy[0]:.2f}x |")
    print(f"\nSame experts as `route_logits(hidden @ W)` for {agree:.2%} of tokens (both float32 GEMMs).\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="T (default 16384)")
    p.add_argument("--gate-dim", type=int, default=1024, help="D of the gate benchmark (default 1024)")
    p.add_argument("--gate-experts", type=int, default=256, help="E of the gate benchmark (default 256)")
    p.add_argument("--group-top-k", type=int, default=0, help="sparse gate's groups per token (default G/4)")
    p.add_argument("--linear-dim", type=int, default=4096, help="D of the linear benchmark (default 4096)")
    p.add_argument("--linear-experts", type=int, default=64, help="E of the linear benchmark (default 64)")
    p.add_argument("--top-k", type=int, default=2, help="k (default 2)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=0, help="moe_router threads (default 0: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-gate", action="store_true")
    p.add_argument("--skip-linear", action="store_true")
    args = p.parse_args()
    mr.set_num_threads(args.threads)
    print(f"moe_router {mr.__version__}, NumPy {np.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, moe_router threads {mr.get_num_threads()}; median of {args.repeat} calls "
          f"after one warm-up (min in brackets)\n")
    if not args.skip_gate:
        bench_gate(args.tokens, args.gate_dim, args.gate_experts, args.group_top_k, args.top_k, args.repeat,
                   args.seed)
    if not args.skip_linear:
        bench_linear(args.tokens, args.linear_dim, args.linear_experts, args.top_k, args.repeat, args.seed)


if __name__ == "__main__":
    main()

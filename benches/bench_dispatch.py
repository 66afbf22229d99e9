#!/usr/bin/env python3
"""Benchmark the dispatch plan (issue 10): building it, ``permute`` and ``combine``, in one run.

For T in {4096, 65536, 262144}, D in {1024, 4096}, (E, k) in {(64, 2), (256, 8)} and
float32 / float16 hidden states (float16 stands in for bfloat16: the same bytes), on
decisions of ``moe_router.route_logits`` (capacity factor 1.25, default drop policy,
float32 N(0,1) logits with the seed of ``bench_route.py``), 2 threads:

* plan building: ``dec.dispatch_plan()`` against ``mr.route_logits`` itself (same logits).
* ``plan.permute(hidden)`` and ``plan.combine(expert_out)`` (weighted), each with a
  preallocated ``out=`` and without (a new array per call). ``expert_out`` is the
  permuted hidden states.
* memory-copy floor: NumPy copying the same bytes into a preallocated buffer (one
  thread): for ``permute`` ``np.copyto`` of an ``[N, D]`` array (reads and writes N*D
  elements); for ``combine``, which reads N*D and writes T*D elements, ``np.copyto`` of
  ``(N+T)/2`` rows (the same number of bytes moved).
* NumPy: ``hidden[plan.token_ids]`` and ``np.add.at(y, plan.token_ids, expert_out *
  plan.weights[:, None])`` (weights cast to the dtype) into a new zero ``y``.
* torch and Megatron-Core, where the peers virtualenv exists (``/work/peers-venv``;
  ``bash ../shared/peers/setup.sh``): this script is run again with that venv's Python
  (``--torch-worker``), regenerates the same hidden states and reads the same decisions
  (``plan.token_ids``, ``plan.weights`` and ``plan.megatron_routing_map()``, saved to a
  temporary directory), and times torch ``index_select`` (permute) and ``index_add_`` of
  ``expert_out * w[:, None]`` into zeros (combine), Megatron-Core's
  ``moe_utils.permute(tokens, routing_map, probs, num_out_tokens=N)`` and
  ``moe_utils.unpermute(..., probs=probs, routing_map=routing_map)``, and a 2-thread
  torch ``copy_`` of the ``[N, D]`` buffer. It checks that Megatron's ``sorted_indices``
  equal ``plan.token_ids`` (the same rows).
* extra peak memory in fresh processes (this script with ``--mem-worker``; the
  ``VmHWM`` method of ``bench_route.py``): of ``dec.dispatch_plan()``, compared with
  T*k*8 bytes, and of ``permute``/``combine`` with ``out=`` (at D=128 float32).

Each time is the median of several calls (at least 3, more within ``--budget-s``) after one
warm-up call. Calls whose times are compared are timed interleaved, round robin, so the load
of a shared machine drifts over them alike: routing and plan building; ``permute``/``combine``
with ``out=`` and the two copy floors; the two allocating calls; NumPy's two; in the torch
worker, ``index_select(out=)`` and ``copy_``, and the four allocating torch / Megatron calls.
The calls with ``out=`` and the copy floors each start from evicted caches (``--evict-mib``):
in a round robin, whichever call ran before leaves some arrays in the L3 and not others
(a 4096-token float16 case fits in it), which decided the ratio at T=4096 by up to 1.5x. Cases whose buffers (hidden, the ``[N, D]`` rows, the ``[T, D]``
output) exceed ``--max-gb`` or whose estimated peak exceeds ``--max-peak-gb`` are skipped
and listed. Prints a markdown table with the ratios and the targets as MET / NOT MET;
``--out PATH`` writes the same text to a file. ``--quick`` runs a small subset.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_DIR = REPO.parent / "shared" / "peers"
DEFAULT_VENV = Path("/work/peers-venv")

TS = [4096, 65536, 262144]
DS = [1024, 4096]
SHAPES = [(64, 2), (256, 8)]
DTYPES = ["float32", "float16"]
QUICK_TS = [4096, 65536]
QUICK_DS = [1024]
CF = 1.25
SEED = 20240601  # the logits of bench_route.py and the peers harness
MEM_D = 128

# targets (issue 10, item 6)
PLAN_VS_ROUTE = 2.0
MOVE_VS_FLOOR = 1.5
MCORE_VS_MOVE = 3.0


def make_logits(T: int, E: int) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((T, E), dtype=np.float32)


def make_hidden(T: int, D: int, dtype: str) -> np.ndarray:
    h = np.random.default_rng(SEED + D).standard_normal((T, D), dtype=np.float32)
    return h if dtype == "float32" else h.astype(dtype)


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def buffers_bytes(T: int, D: int, k: int, dtype: str) -> Tuple[int, int]:
    """(hidden + [N, D] rows + [T, D] output, estimated peak) with N = T*k (an upper bound).

    The peak is that plus one more [N, D] array (the new output of ``permute`` without
    ``out=``, NumPy's ``hidden[ids]``, the copy floor's destination, ``expert_out * w``;
    one at a time), in this process and in the torch worker."""
    s, N = itemsize(dtype), T * k
    return s * D * (2 * T + N), s * D * (2 * T + 2 * N)


class CacheEvictor:
    """Writes a buffer larger than the last-level cache, so the next call finds none of
    its arrays there (the 2-core guests measured have a 32 MiB L3)."""

    def __init__(self, mib: int):
        self.buffer = np.zeros(mib << 17)  # float64: 2**17 per MiB
        self.value = 0.0

    def __call__(self) -> None:
        self.value += 1.0
        self.buffer.fill(self.value)


def time_group(fns: Dict[str, Callable[[], Any]], budget_s: float, max_n: int = 51,
               min_n: int = 3, before: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median seconds per call of each of ``fns``, timed interleaved (round robin) so that
    the machine's load drifts over all of them alike: one warm-up call each, then up to
    ``max_n`` rounds (at least ``min_n``) within about ``budget_s`` per function.
    ``before``, when given, runs (untimed) before every timed call."""
    first = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        r = fn()
        first += time.perf_counter() - t0
        del r
    n = max(min_n, min(max_n, int(budget_s * len(fns) / max(first, 1e-7))))
    ts: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            r = fn()
            ts[name].append(time.perf_counter() - t0)
            del r
    return {name: statistics.median(v) for name, v in ts.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def extra_mb(fn: Callable[[], Any]) -> Tuple[Optional[float], Any]:
    """(peak RSS growth in MB during ``fn()``, its result): VmHWM after minus VmRSS before."""
    rss0 = _status_kb("VmRSS")
    ok = _reset_peak()
    r = fn()
    hwm = _status_kb("VmHWM")
    return ((hwm - rss0) / 1024 if ok else None), r


# --------------------------------------------------------------------------
# worker: extra peak memory in a fresh process (the package under test)
# --------------------------------------------------------------------------
def mem_worker(a) -> int:
    import moe_router as mr

    mr.set_num_threads(a.threads)
    cfg = mr.RouterConfig(num_experts=a.E, top_k=a.k, capacity_factor=CF)
    # thread pool and lazy statics first, not in the measured calls
    warm = mr.route_logits(make_logits(8192, a.E), cfg)
    wp = warm.dispatch_plan()
    wp.combine(wp.permute(make_hidden(8192, 8, "float32")))
    del warm, wp
    dec = mr.route_logits(make_logits(a.T, a.E), cfg)
    plan_mb, plan = extra_mb(lambda: dec.dispatch_plan())
    hidden = make_hidden(a.T, MEM_D, "float32")
    rows = np.zeros((plan.num_rows, MEM_D), np.float32)
    tokens = np.zeros((a.T, MEM_D), np.float32)
    rows.fill(1.0)
    tokens.fill(1.0)  # touched: the measured calls write into resident pages
    perm_mb, _ = extra_mb(lambda: plan.permute(hidden, out=rows))
    comb_mb, _ = extra_mb(lambda: plan.combine(rows, out=tokens))
    out = {"plan_mb": plan_mb, "permute_out_mb": perm_mb, "combine_out_mb": comb_mb,
           "num_rows": plan.num_rows}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_mem_worker(T: int, E: int, k: int, threads: int) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mem-worker",
                        "--T", str(T), "--E", str(E), "--k", str(k), "--threads", str(threads)],
                       capture_output=True, text=True, env=env, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"memory worker T={T} E={E} k={k} failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
    return {}


# --------------------------------------------------------------------------
# worker: torch and Megatron-Core (run with the peers venv's Python)
# --------------------------------------------------------------------------
def torch_worker(a) -> int:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe import moe_utils as mu
    import megatron.core

    torch.set_num_threads(a.threads)
    spec = json.loads(Path(a.torch_worker).read_text())
    budget = spec["budget_s"]
    results: Dict[str, Any] = {"versions": {"torch": torch.__version__,
                                            "megatron-core": getattr(megatron.core, "__version__", "?")},
                               "cases": {}}
    ttype = {"float32": torch.float32, "float16": torch.float16}
    for T, D, dtype, shapes in spec["cases"]:
        hidden = torch.from_numpy(make_hidden(T, D, dtype))
        for E, k in shapes:
            z = np.load(Path(spec["dir"]) / f"decision_T{T}_E{E}_k{k}.npz")
            ids = torch.from_numpy(z["token_ids"])
            w = torch.from_numpy(z["weights"]).to(ttype[dtype])
            routing_map = torch.from_numpy(z["routing_map"])
            probs = torch.from_numpy(z["probs"])
            N = int(ids.numel())
            r: Dict[str, Any] = {}
            with torch.no_grad():
                rows = torch.index_select(hidden, 0, ids)
                permuted, _, sorted_indices = mu.permute(hidden, routing_map, probs=probs, num_out_tokens=N)
                r["same_rows"] = bool(torch.equal(sorted_indices, ids)) and bool(torch.equal(permuted, rows))
                del permuted
                dst = torch.empty_like(rows)
                r.update(time_group({
                    "torch_perm_out_s": lambda: torch.index_select(hidden, 0, ids, out=rows),
                    "torch_copy_s": lambda: dst.copy_(rows),
                }, budget))
                del dst
                r.update(time_group({
                    "torch_perm_s": lambda: hidden.index_select(0, ids),
                    "mcore_perm_s": lambda: mu.permute(hidden, routing_map, probs=probs, num_out_tokens=N),
                    "torch_comb_s": lambda: torch.zeros(T, D, dtype=hidden.dtype).index_add_(
                        0, ids, rows * w[:, None]),
                    "mcore_unperm_s": lambda: mu.unpermute(rows, sorted_indices, hidden.shape, probs=probs,
                                                           routing_map=routing_map),
                }, budget))
            del rows
            results["cases"][f"{T},{D},{dtype},{E},{k}"] = r
            print(f"torch T={T} D={D} {dtype} E={E} k={k}: " + ", ".join(
                f"{key} {v * 1e3:.3g} ms" if isinstance(v, float) else f"{key} {v}" for key, v in r.items()),
                file=sys.stderr, flush=True)
        del hidden
    Path(spec["out"]).write_text(json.dumps(results))
    return 0


def run_torch_worker(a, cases, tmp: Path, budget: float) -> Tuple[Optional[Dict], str]:
    py = Path(a.peers_venv) / "bin" / "python"
    if a.no_peers:
        return None, "torch / Megatron-Core not run (--no-peers)"
    if not py.exists():
        return None, f"peers venv not found ({py}): torch and Megatron-Core not measured"
    spec = {"dir": str(tmp), "out": str(tmp / "torch.json"), "budget_s": budget, "cases": cases}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env.pop("PYTHONPATH", None)
    cmd = [str(py), str(Path(__file__).resolve()), "--torch-worker", str(tmp / "spec.json"),
           "--threads", str(a.threads)]
    print("torch worker: " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=str(tmp))
    out = tmp / "torch.json"
    if p.returncode != 0 or not out.exists():
        return None, f"torch worker failed (exit {p.returncode})"
    return json.loads(out.read_text()), f"torch worker ran in {time.time() - t0:.0f} s"


# --------------------------------------------------------------------------
# formatting and machine facts
# --------------------------------------------------------------------------
def mv_order(item) -> Tuple[int, int, int, int, int]:
    (T, D, dtype, E, k), _ = item
    return (T, D, DTYPES.index(dtype), E, k)


def fms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    if ms < 0.1:
        return f"{ms:.3f}"
    if ms < 100:
        return f"{ms:.3g}"
    return f"{ms:.0f}"


def fx(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        parts = [fields.get("Model name", "?").strip()]
        for key in ("CPU family", "Model", "Hypervisor vendor", "L2 cache", "L3 cache"):
            if key in fields:
                parts.append(f"{key} {fields[key].strip()}")
        return ", ".join(parts)
    except (OSError, subprocess.SubprocessError, ValueError):
        return "?"


def simd_level() -> str:
    """The level the core's row kernels pick (``simd_level()`` in Rust): CPU flags, capped by MOE_ROUTER_SIMD."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    best = "avx512" if {"avx512f", "avx2", "fma"} <= flags else "avx2" if {"avx2", "fma"} <= flags else "portable"
    order = ["portable", "avx2", "avx512"]
    cap = {"avx512": "avx512", "avx2": "avx2", "off": "portable", "portable": "portable"}.get(
        os.environ.get("MOE_ROUTER_SIMD", "").strip().lower(), "avx512")
    level = order[min(order.index(best), order.index(cap))]
    f16c = "f16c" if "f16c" in flags else "no f16c"
    return f"{level} (CPU flags; MOE_ROUTER_SIMD={os.environ.get('MOE_ROUTER_SIMD', 'unset')}; {f16c})"


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{lscpu_model()}; nproc {os.cpu_count()}, {ram:.0f} GiB RAM; {platform.machine()}, "
            f"Python {platform.python_version()}, NumPy {np.__version__}")


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        branch = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--abbrev-ref", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head or '?'}{' (with uncommitted changes)' if dirty else ''} on {branch or '?'}"
    except (OSError, subprocess.SubprocessError):
        return "?"


def so_fingerprint() -> str:
    import moe_router

    so = sorted(Path(moe_router.__file__).parent.glob("_core*.so"))
    if not so:
        return "?"
    h = hashlib.sha256(so[0].read_bytes()).hexdigest()[:12]
    st = so[0].stat()
    return f"{so[0].name} sha256 {h} mtime {_dt.datetime.fromtimestamp(st.st_mtime):%Y-%m-%d %H:%M:%S}"


def cpu_snapshot() -> Tuple[float, float, float]:
    """(machine busy CPU-seconds, this process + its children's CPU-seconds, wall)."""
    import resource

    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy, own, time.time()


def other_cores(a: Tuple[float, float, float], b: Tuple[float, float, float]) -> float:
    wall = max(b[2] - a[2], 1e-9)
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / wall)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"small subset: T in {QUICK_TS}, D in {QUICK_DS}, short budgets")
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--threads", type=int, default=2, help="threads for moe_router and torch")
    ap.add_argument("--peers-venv", default=str(DEFAULT_VENV),
                    help="virtualenv with torch and megatron-core (../shared/peers/setup.sh)")
    ap.add_argument("--no-peers", action="store_true", help="skip torch and Megatron-Core")
    ap.add_argument("--no-mem", action="store_true", help="skip the extra-memory workers")
    ap.add_argument("--budget-s", type=float, default=2.0,
                    help="timing budget per call and case (at least 3 timed calls)")
    ap.add_argument("--evict-mib", type=int, default=96,
                    help="before each timed call against the copy floors, write a buffer of this "
                         "many MiB (above the last-level cache) so every call starts cold; 0: off")
    ap.add_argument("--max-gb", type=float, default=6.0,
                    help="skip cases whose hidden + [N, D] + [T, D] buffers exceed this (GB)")
    ap.add_argument("--max-peak-gb", type=float, default=7.5,
                    help="skip cases whose estimated peak (buffers + one [N, D]) exceeds this (GB)")
    ap.add_argument("--mem-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--E", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mem_worker:
        return mem_worker(a)
    if a.torch_worker:
        return torch_worker(a)

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import moe_router as mr

    t_all = time.time()
    Ts = QUICK_TS if a.quick else TS
    Ds = QUICK_DS if a.quick else DS
    budget = 0.3 if a.quick else a.budget_s
    started = _dt.datetime.now().astimezone()
    fp0, load0, commit = so_fingerprint(), loadavg(), git_commit()
    command = "python3 " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    mr.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="moe_router_dispatch_"))

    evict = CacheEvictor(a.evict_mib) if a.evict_mib > 0 else None
    snap0 = cpu_snapshot()
    PL: Dict[Tuple[int, int, int], Dict[str, Any]] = {}
    MV: Dict[Tuple[int, int, str, int, int], Dict[str, Any]] = {}
    skipped: List[str] = []
    torch_cases: List[Any] = []
    for T in Ts:
        plans = {}
        for E, k in SHAPES:
            cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=CF)
            x = make_logits(T, E)
            dec = mr.route_logits(x, cfg)
            r: Dict[str, Any] = time_group({"route_s": lambda: mr.route_logits(x, cfg),
                                            "plan_s": lambda: dec.dispatch_plan()}, budget)
            plan = dec.dispatch_plan()
            r["N"] = plan.num_rows
            PL[(T, E, k)] = r
            plans[(E, k)] = plan
            routing_map, probs = plan.megatron_routing_map()
            np.savez(tmp / f"decision_T{T}_E{E}_k{k}.npz", token_ids=plan.token_ids, weights=plan.weights,
                     routing_map=routing_map, probs=probs)
            del routing_map, probs, dec, x
            print(f"T={T:6d} E={E:3d} k={k}  route_logits {fms(r['route_s'])} ms  "
                  f"dispatch_plan {fms(r['plan_s'])} ms", file=sys.stderr, flush=True)
        for D in Ds:
            for dtype in DTYPES:
                shapes = []
                for E, k in SHAPES:
                    buf, peak = buffers_bytes(T, D, k, dtype)
                    if buf > a.max_gb * 1e9 or peak > a.max_peak_gb * 1e9:
                        skipped.append(f"T={T} D={D} E={E} k={k} {dtype} (buffers {buf / 1e9:.1f} GB, "
                                       f"peak {peak / 1e9:.1f} GB)")
                    else:
                        shapes.append((E, k))
                if not shapes:
                    continue
                torch_cases.append([T, D, dtype, shapes])
                hidden = make_hidden(T, D, dtype)
                for E, k in shapes:
                    plan = plans[(E, k)]
                    N = plan.num_rows
                    ids, w = plan.token_ids, plan.weights.astype(dtype)
                    r = {"N": N}
                    rows = np.empty((N, D), dtype)
                    tokens = np.empty((T, D), dtype)
                    scratch = np.empty_like(rows)
                    m = (N + T) // 2  # combine moves N*D + T*D elements: copy (N+T)/2 rows
                    r.update(time_group({
                        "perm_out_s": lambda: plan.permute(hidden, out=rows),
                        "floor_perm_s": lambda: np.copyto(scratch, rows),
                        "comb_out_s": lambda: plan.combine(rows, out=tokens),
                        "floor_comb_s": lambda: np.copyto(scratch[:m], rows[:m]),
                    }, budget, before=evict))
                    del scratch
                    r.update(time_group({"perm_s": lambda: plan.permute(hidden),
                                         "comb_s": lambda: plan.combine(rows)}, budget))
                    del tokens

                    def np_combine():
                        y = np.zeros((T, D), dtype)
                        np.add.at(y, ids, rows * w[:, None])
                        return y

                    r.update(time_group({"np_perm_s": lambda: hidden[ids], "np_comb_s": np_combine}, budget))
                    del rows
                    MV[(T, D, dtype, E, k)] = r
                    print(f"T={T:6d} D={D} {dtype} E={E:3d} k={k}  permute {fms(r['perm_out_s'])} "
                          f"(new {fms(r['perm_s'])}) floor {fms(r['floor_perm_s'])}  combine "
                          f"{fms(r['comb_out_s'])} (new {fms(r['comb_s'])}) floor {fms(r['floor_comb_s'])}  "
                          f"numpy {fms(r['np_perm_s'])} / {fms(r['np_comb_s'])} ms",
                          file=sys.stderr, flush=True)
                del hidden
        del plans
    snap1 = cpu_snapshot()
    fp1 = so_fingerprint()

    MEM: Dict[Tuple[int, int, int], Dict[str, Any]] = {}
    if not a.no_mem:
        print("extra peak memory workers ...", file=sys.stderr, flush=True)
        for T in Ts:
            for E, k in SHAPES:
                MEM[(T, E, k)] = run_mem_worker(T, E, k, a.threads)
    snap2 = cpu_snapshot()

    peers, peers_note = run_torch_worker(a, torch_cases, tmp, budget)
    snap3 = cpu_snapshot()
    print(peers_note, file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    PR = (peers or {}).get("cases", {})
    wall = time.time() - t_all

    def peer(T, D, dtype, E, k, key) -> Optional[float]:
        return PR.get(f"{T},{D},{dtype},{E},{k}", {}).get(key)

    # ---------------------------------------------------------------- report
    L: List[str] = []
    L.append(f"# moe_router dispatch-plan benchmark ({started:%Y-%m-%d %H:%M %Z})\n")
    L.append(f"Command: `{command}` (commit {commit})  ")
    L.append(f"Machine: {machine()}  ")
    L.append(f"SIMD level: {simd_level()}  ")
    L.append(f"moe_router {getattr(mr, '__version__', '?')}, extension {fp0}  ")
    if peers:
        L.append("Peers: " + ", ".join(f"{n} {v}" for n, v in peers.get("versions", {}).items()) + "  ")
    L.append(f"Load average (1/5/15 min) at start: {load0}; at end: {loadavg()}.  ")
    L.append(f"{a.threads} threads (moe_router.set_num_threads, torch.set_num_threads); NumPy is one thread. "
             f"Decisions: route_logits, capacity factor {CF}, float32 N(0,1) logits (seed {SEED}); "
             f"median of 3 to 51 calls (within about {budget:g} s per call and case) after one warm-up call; "
             "compared calls are timed interleaved (see the script's docstring).  ")
    L.append("Caches: " + (f"each `mr out=` and `floor` call starts after writing a {a.evict_mib} MiB buffer "
                           "(the caches evicted).  " if evict is not None else "not evicted between calls.  "))
    L.append(f"CPU used by other processes (average cores, /proc/stat minus this run's own CPU): "
             f"{other_cores(snap0, snap1):.2f} while moe_router / NumPy were timed, "
             f"{other_cores(snap1, snap2):.2f} during the memory workers, "
             f"{other_cores(snap2, snap3):.2f} during the torch worker.  ")
    L.append(f"Wall time of this run: {wall:.0f} s. {peers_note}.\n")
    if fp0 != fp1:
        L.append(f"**WARNING: the extension changed during the run** ({fp0} -> {fp1}).\n")

    L.append("## Plan building vs routing\n")
    L.append("`plan / route` = `dec.dispatch_plan()` / `mr.route_logits(logits, cfg)` (target <= "
             f"{PLAN_VS_ROUTE:g}). `plan extra MB` = peak RSS growth of one `dispatch_plan()` call in a "
             "fresh process (the plan's arrays included); `T*k*8` = one int64 per assignment; "
             "`B/assignment` = extra bytes / (T*k). `permute` / `combine extra MB` = the same for one "
             f"call with `out=` (D={MEM_D} float32).\n")
    L.append("| T | E | k | N | route_logits ms | dispatch_plan ms | plan / route | <= 2x | plan extra MB "
             "| T*k*8 MB | B/assignment | permute extra MB | combine extra MB |")
    L.append("|" + "---|" * 13)
    for (T, E, k), r in sorted(PL.items()):
        q = ratio(r["plan_s"], r["route_s"])
        mem = MEM.get((T, E, k), {})
        pm = mem.get("plan_mb")
        tk8 = T * k * 8 / 2**20
        bpa = pm * 2**20 / (T * k) if pm is not None else None
        L.append(f"| {T} | {E} | {k} | {r['N']} | {fms(r['route_s'])} | {fms(r['plan_s'])} | {fx(q)} "
                 f"| {verdict(None if q is None else q <= PLAN_VS_ROUTE)} | {fx(pm)} | {fx(tk8)} "
                 f"| {fx(bpa)} | {fx(mem.get('permute_out_mb'))} | {fx(mem.get('combine_out_mb'))} |")

    L.append("\n## permute: `[T, D]` -> `[N, D]` (ms)\n")
    L.append("`floor` = NumPy `np.copyto` of an `[N, D]` array into a preallocated one (1 thread; reads and "
             "writes N*D elements, as permute does). `mr out=` = `plan.permute(hidden, out=rows)`; `mr` = "
             "`plan.permute(hidden)` (new output). `numpy` = `hidden[plan.token_ids]`; `torch out=` = "
             "`torch.index_select(hidden, 0, ids, out=rows)`; `torch` = `index_select` (new output); `mcore` = Megatron-Core `moe_utils.permute` (new output, its "
             "sorted indices included); `torch copy_` = a 2-thread `copy_` of the `[N, D]` buffer. "
             f"Targets: `mr out= / floor` <= {MOVE_VS_FLOOR:g}, `mcore / mr` >= {MCORE_VS_MOVE:g} "
             "(both allocating).\n")
    L.append("| T | D | E | k | dtype | N | MB moved | floor | torch copy_ | mr out= | torch out= | mr | numpy "
             "| torch | mcore | mr out= / floor | mcore / mr | numpy / mr | torch / mr |")
    L.append("|" + "---|" * 19)
    for (T, D, dtype, E, k), r in sorted(MV.items(), key=mv_order):
        g = lambda key: peer(T, D, dtype, E, k, key)  # noqa: E731
        q = ratio(r["perm_out_s"], r["floor_perm_s"])
        mq = ratio(g("mcore_perm_s"), r["perm_s"])
        mb = 2 * r["N"] * D * itemsize(dtype) / 1e6
        L.append(f"| {T} | {D} | {E} | {k} | {dtype} | {r['N']} | {mb:.0f} | {fms(r['floor_perm_s'])} "
                 f"| {fms(g('torch_copy_s'))} | {fms(r['perm_out_s'])} | {fms(g('torch_perm_out_s'))} "
                 f"| {fms(r['perm_s'])} "
                 f"| {fms(r['np_perm_s'])} | {fms(g('torch_perm_s'))} | {fms(g('mcore_perm_s'))} "
                 f"| {fx(q)} {verdict(None if q is None else q <= MOVE_VS_FLOOR)} "
                 f"| {fx(mq)} {verdict(None if mq is None else mq >= MCORE_VS_MOVE)} "
                 f"| {fx(ratio(r['np_perm_s'], r['perm_s']))} | {fx(ratio(g('torch_perm_s'), r['perm_s']))} |")

    L.append("\n## combine (weighted): `[N, D]` -> `[T, D]` (ms)\n")
    L.append("`floor` = NumPy `np.copyto` of `(N+T)/2` rows into a preallocated buffer (1 thread; the N*D "
             "read + T*D written elements of combine). `mr out=` = `plan.combine(expert_out, out=y)`; `mr` = "
             "`plan.combine(expert_out)`. `numpy` = `np.add.at(zeros, token_ids, expert_out * w[:, None])`; "
             "`torch` = `zeros.index_add_(0, token_ids, expert_out * w[:, None])`; `mcore` = Megatron-Core "
             "`moe_utils.unpermute(..., probs, routing_map)` (its multiply in float32 and `scatter_add_`). "
             f"Targets: `mr out= / floor` <= {MOVE_VS_FLOOR:g}, `mcore / mr` >= {MCORE_VS_MOVE:g}.\n")
    L.append("| T | D | E | k | dtype | N | MB moved | floor | mr out= | mr | numpy | torch | mcore "
             "| mr out= / floor | mcore / mr | numpy / mr | torch / mr | same rows as mcore |")
    L.append("|" + "---|" * 18)
    for (T, D, dtype, E, k), r in sorted(MV.items(), key=mv_order):
        g = lambda key: peer(T, D, dtype, E, k, key)  # noqa: E731
        q = ratio(r["comb_out_s"], r["floor_comb_s"])
        mq = ratio(g("mcore_unperm_s"), r["comb_s"])
        mb = (r["N"] + T) * D * itemsize(dtype) / 1e6
        same = g("same_rows")
        L.append(f"| {T} | {D} | {E} | {k} | {dtype} | {r['N']} | {mb:.0f} | {fms(r['floor_comb_s'])} "
                 f"| {fms(r['comb_out_s'])} | {fms(r['comb_s'])} | {fms(r['np_comb_s'])} "
                 f"| {fms(g('torch_comb_s'))} | {fms(g('mcore_unperm_s'))} "
                 f"| {fx(q)} {verdict(None if q is None else q <= MOVE_VS_FLOOR)} "
                 f"| {fx(mq)} {verdict(None if mq is None else mq >= MCORE_VS_MOVE)} "
                 f"| {fx(ratio(r['np_comb_s'], r['comb_s']))} | {fx(ratio(g('torch_comb_s'), r['comb_s']))} "
                 f"| {'-' if same is None else 'yes' if same else 'NO'} |")
    if skipped:
        L.append(f"\nSkipped (buffers > {a.max_gb:g} GB or estimated peak > {a.max_peak_gb:g} GB): "
                 + "; ".join(skipped) + ".")

    # --------------------------------------------------------------- targets
    L.append("\n## Targets (issue 10, item 6)\n")

    def summary(name: str, values: List[Tuple[str, Optional[float]]], ok: Callable[[float], bool],
                worst_is_max: bool) -> None:
        got = [(c, v) for c, v in values if v is not None]
        if not got:
            L.append(f"- {name}: not measured -> n/a")
            return
        met = [c for c, v in got if ok(v)]
        worst = max(got, key=lambda cv: cv[1]) if worst_is_max else min(got, key=lambda cv: cv[1])
        best = min(got, key=lambda cv: cv[1]) if worst_is_max else max(got, key=lambda cv: cv[1])
        L.append(f"- {name}: met in {len(met)} of {len(got)} cases; worst {fx(worst[1])} ({worst[0]}), "
                 f"best {fx(best[1])} ({best[0]}) -> {verdict(len(met) == len(got))}")

    def case(key) -> str:
        return ", ".join(str(x) for x in key)

    summary(f"plan building <= {PLAN_VS_ROUTE:g}x routing (plan / route; T, E, k)",
            [(case(kk), ratio(r["plan_s"], r["route_s"])) for kk, r in sorted(PL.items())],
            lambda v: v <= PLAN_VS_ROUTE, True)
    summary(f"permute (out=) within {MOVE_VS_FLOOR:g}x of the memory-copy floor (T, D, dtype, E, k)",
            [(case(kk), ratio(r["perm_out_s"], r["floor_perm_s"])) for kk, r in sorted(MV.items(), key=mv_order)],
            lambda v: v <= MOVE_VS_FLOOR, True)
    summary(f"combine (out=) within {MOVE_VS_FLOOR:g}x of the memory-copy floor",
            [(case(kk), ratio(r["comb_out_s"], r["floor_comb_s"])) for kk, r in sorted(MV.items(), key=mv_order)],
            lambda v: v <= MOVE_VS_FLOOR, True)
    summary(f"permute >= {MCORE_VS_MOVE:g}x faster than Megatron-Core permute",
            [(case(kk), ratio(peer(*kk, "mcore_perm_s"), r["perm_s"])) for kk, r in sorted(MV.items(), key=mv_order)],
            lambda v: v >= MCORE_VS_MOVE, False)
    summary(f"combine >= {MCORE_VS_MOVE:g}x faster than Megatron-Core unpermute",
            [(case(kk), ratio(peer(*kk, "mcore_unperm_s"), r["comb_s"])) for kk, r in sorted(MV.items(), key=mv_order)],
            lambda v: v >= MCORE_VS_MOVE, False)
    bpa = [(case(kk), m["plan_mb"] * 2**20 / (kk[0] * kk[2])) for kk, m in sorted(MEM.items())
           if m.get("plan_mb") is not None]
    if bpa:
        lo, hi = min(v for _, v in bpa), max(v for _, v in bpa)
        worst = max(bpa, key=lambda cv: cv[1])
        moves = [m.get(key) for m in MEM.values() for key in ("permute_out_mb", "combine_out_mb")]
        moves = [v for v in moves if v is not None]
        ok = hi <= 4 * 8 and (not moves or max(moves) <= 1.0)
        L.append(f"- extra memory O(T*k): the plan's peak is {fx(lo)} to {fx(hi)} bytes per assignment "
                 f"({fx(hi / 8)}x T*k*8 at worst, {worst[0]}), flat in T; permute/combine with `out=` "
                 f"add at most {fx(max(moves) if moves else None)} MB -> {verdict(ok)} "
                 "(criterion: <= 4x T*k*8 bytes at every T, and <= 1 MB for the moves)")
    else:
        L.append("- extra memory O(T*k): not measured -> n/a")
    md = "\n".join(L) + "\n"
    print(md)
    if a.out:
        Path(a.out).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

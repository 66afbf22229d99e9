#!/usr/bin/env python3
"""Benchmark ``moe_router.route_logits`` against the peers, in one run.

For T in {64, 4096, 65536, 262144} and (E, k) in {(8,2), (64,2), (64,8), (256,8)},
capacity factor 1.25, float32 N(0,1) logits from a fixed seed, 2 threads:

* ``moe_router``: median time of ``moe_router.route_logits`` (end to end from
  Python, default drop policy) after a warm-up call; fewer repeats for big T.
* ``numpy-ref``: ``numpy_route`` imported from ``../shared/peers/bench.py``
  (vectorised softmax / argpartition top-k / cumsum position capacity / aux loss),
  timed in this process the same way.
* torch peers (Megatron-Core, DeepSpeed, Hugging Face): where the peers virtualenv
  exists (``bash ../shared/peers/setup.sh /work/peers-venv``), the peers harness
  ``../shared/peers/bench.py`` is run with that venv's Python as a subprocess
  (its own per-peer worker processes), and its JSON results are read back.
* floor: the time to read the logits once, the best of numpy ``x.sum()``
  (1 thread, this process) and the harness's ``membw`` figures (numpy / torch sum).
* extra peak memory of ONE call per shape, in a fresh process (this script with
  ``--worker``): reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5),
  call once, ``VmHWM`` minus ``VmRSS`` before the call (the harness's method;
  outputs alive at the end of the call are included).
* T=64 end-to-end latency per Python call (many repeats), 1 vs 2 threads at
  T=262144, linearity t(262144)/t(65536), and a stage split at T=262144
  (dropless vs capacity, core call vs Python wrapper).

Prints a markdown table and the performance targets with MET / NOT MET; ``--out PATH``
writes the same text to a file. ``--quick`` runs a small subset.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
PEERS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "peers"
sys.path.insert(0, str(PEERS_DIR))
sys.path.insert(0, str(HERE))
import bench as peerbench  # noqa: E402  (the peers harness: numpy_route, memory helpers)
from bench_dispatch import simd_level  # noqa: E402  (this directory: the level MOE_ROUTER_SIMD leaves)

numpy_route = peerbench.numpy_route

DEFAULT_VENV = Path("/work/peers-venv")
TS = [64, 4096, 65536, 262144]
SHAPES = [(8, 2), (64, 2), (64, 8), (256, 8)]
QUICK_TS = [64, 4096]
QUICK_SHAPES = [(64, 2), (256, 8)]
CF = 1.25
SEED = peerbench.SEED  # the same logits as the harness's workers
TORCH_PEERS = ["mcore", "mcore-sig-grp", "ds-topk", "ds-topk-dense", "ds-top2", "hf-mixtral",
               "hf-dsv3"]
TARGET_SHAPES = [(64, 2), (256, 8)]
BIG_T = 262144


def make_logits(T: int, E: int) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((T, E), dtype=np.float32)


def time_calls(fn: Callable[[], Any], budget_s: float, max_n: int, min_n: int = 3) -> Dict[str, float]:
    """One warm-up call, then the median of up to ``max_n`` timed calls within ``budget_s``."""
    t0 = time.perf_counter()
    r = fn()
    first = time.perf_counter() - t0
    del r
    n = max(min_n, min(max_n, int(budget_s / max(first, 1e-7))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = fn()
        ts.append(time.perf_counter() - t0)
        del r
    return {"median_s": statistics.median(ts), "min_s": min(ts), "runs": n, "first_s": first}


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], n: int) -> Dict[str, float]:
    """``fa`` and ``fb`` alternately, ``n`` times each after one warm-up call of each: their medians
    and the median of the paired differences ``fa - fb`` (adjacent calls see the same machine
    state, so a small difference between two long calls is resolved where separate medians are not)."""
    fa(), fb()
    ta, tb = [], []
    for i in range(n):
        for fn, ts in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t0)
            del r
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb),
            "diff_s": statistics.median(x - y for x, y in zip(ta, tb)), "runs": n}


def max_repeats(T: int) -> int:
    return {64: 501, 4096: 101, 65536: 21}.get(T, 9)


# --------------------------------------------------------------------------
# worker: extra peak memory of one call in a fresh process
# --------------------------------------------------------------------------
def worker(a) -> int:
    logits = make_logits(a.T, a.E)
    if a.worker == "moe_router":
        import moe_router as mr

        mr.set_num_threads(a.threads)
        cfg = mr.RouterConfig(num_experts=a.E, top_k=a.k, capacity_factor=CF)
        # a tiny call first: thread pool and lazy statics, not the big call's memory
        mr.route_logits(make_logits(64, a.E), cfg)
        fn = lambda: mr.route_logits(logits, cfg)  # noqa: E731
    elif a.worker == "numpy-ref":
        fn = lambda: numpy_route(logits, a.k, CF)  # noqa: E731
    elif a.worker == "time":
        # route_logits timed at the level MOE_ROUTER_SIMD forces in this process
        import moe_router as mr

        mr.set_num_threads(a.threads)
        cfg = mr.RouterConfig(num_experts=a.E, top_k=a.k, capacity_factor=CF)
        t = time_calls(lambda: mr.route_logits(logits, cfg), a.budget_s, max_repeats(a.T))
        print("RESULT " + json.dumps({"median_s": t["median_s"]}), flush=True)
        return 0
    else:
        raise SystemExit(f"unknown worker {a.worker}")
    rss0 = peerbench._status_kb("VmRSS")
    can_reset = peerbench._reset_peak()
    res = fn()
    hwm = peerbench._status_kb("VmHWM")
    del res
    out = {"extra_mb": (hwm - rss0) / 1024 if can_reset else None}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_worker(kind: str, T: int, E: int, k: int, threads: int, simd: Optional[str] = None,
               budget_s: float = 3.0) -> Optional[Dict[str, Any]]:
    """Run ``--worker kind`` in a fresh process (``MOE_ROUTER_SIMD=simd`` if given); its RESULT dict."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    if simd is not None:
        env["MOE_ROUTER_SIMD"] = simd
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                        "--T", str(T), "--E", str(E), "--k", str(k), "--threads", str(threads),
                        "--budget-s", str(budget_s)],
                       capture_output=True, text=True, env=env, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"worker {kind} (SIMD {simd or 'default'}) T={T} E={E} k={k} failed: "
          f"{p.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def run_mem_worker(kind: str, T: int, E: int, k: int, threads: int) -> Optional[float]:
    res = run_worker(kind, T, E, k, threads)
    return None if res is None else res["extra_mb"]


# --------------------------------------------------------------------------
# the peers harness, run with the peers venv's Python
# --------------------------------------------------------------------------
def run_peers(a, Ts: List[int], shapes: List[Tuple[int, int]]) -> Tuple[Optional[Dict], str]:
    py = Path(a.peers_venv) / "bin" / "python"
    if a.no_peers:
        return None, "peers not run (--no-peers)"
    if not py.exists():
        return None, f"peers venv not found ({py}); NumPy reference only"
    tmp = Path(tempfile.mkdtemp(prefix="moe_router_peers_"))
    out_md = tmp / "peers.md"
    cmd = [str(py), str(PEERS_DIR / "bench.py"), "--T", *map(str, Ts),
           "--shapes", *[f"{E}x{k}" for E, k in shapes], "--cf", str(CF),
           "--threads", str(a.threads), "--peers", *a.peers, "membw", "--out", str(out_md)]
    if a.quick:
        cmd += ["--repeats", "3", "--budget-s", "2"]
    print("peers: " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    js = out_md.with_suffix(".json")
    if p.returncode != 0 or not js.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return None, f"peers harness failed (exit {p.returncode}): {' | '.join(tail)}"
    with open(js) as f:
        res = json.load(f)
    return res, f"peers harness ran in {time.time() - t0:.0f} s (markdown: {out_md})"


# --------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------
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


def fmb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}" if abs(x) < 10 else f"{x:.0f}"


def so_fingerprint() -> str:
    import moe_router

    so = [p for p in Path(moe_router.__file__).parent.glob("_core*.so")]
    if not so:
        return "?"
    st = so[0].stat()
    h = hashlib.sha256(so[0].read_bytes()).hexdigest()[:12]
    return f"{so[0].name} sha256 {h} mtime {_dt.datetime.fromtimestamp(st.st_mtime):%Y-%m-%d %H:%M:%S}"


def machine() -> str:
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} {cpu}, nproc {os.cpu_count()}, {ram:.0f} GiB RAM, "
            f"Python {platform.python_version()}, NumPy {np.__version__}")


def cpu_snapshot() -> Tuple[float, float, float]:
    """(machine busy CPU-seconds from /proc/stat, this process + children CPU-seconds, wall)."""
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
    """Average cores used by OTHER processes between two snapshots (steal included)."""
    wall = max(b[2] - a[2], 1e-9)
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / wall)


def own_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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
                    help=f"small subset: T in {QUICK_TS}, (E,k) in {QUICK_SHAPES}, fewer repeats")
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--threads", type=int, default=2, help="threads for moe_router and torch")
    ap.add_argument("--peers-venv", default=str(DEFAULT_VENV),
                    help="virtualenv made by ../shared/peers/setup.sh")
    ap.add_argument("--no-peers", action="store_true", help="skip the torch peers")
    ap.add_argument("--simd-levels", nargs="*", default=["avx2", "off"],
                    help="MOE_ROUTER_SIMD levels also timed at T=262144, each in its own process "
                         "(default: avx2 and the portable path; none with --quick)")
    ap.add_argument("--peers", nargs="*", default=TORCH_PEERS, help="torch peers to run")
    ap.add_argument("--budget-s", type=float, default=3.0,
                    help="timing budget per (router, shape); fewer repeats for slow calls")
    ap.add_argument("--latency-calls", type=int, default=20000, help="calls for the T=64 latency")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--E", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import moe_router as mr
    from moe_router import _core

    t_all = time.time()
    Ts = QUICK_TS if a.quick else TS
    shapes = QUICK_SHAPES if a.quick else SHAPES
    budget = 0.5 if a.quick else a.budget_s
    lat_calls = min(a.latency_calls, 2000) if a.quick else a.latency_calls
    fp0, load0 = so_fingerprint(), loadavg()
    started = _dt.datetime.now().astimezone()

    snap0 = cpu_snapshot()
    mr.set_num_threads(a.threads)
    R: Dict[Tuple[int, int, int], Dict[str, Any]] = {}
    extra: Dict[str, Any] = {"threads1": {}, "threadsN": {}, "dropless": {}, "core": {}, "latency": {}}
    for E, k in shapes:
        cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=CF)
        for T in Ts:
            x = make_logits(T, E)
            r: Dict[str, Any] = {}
            r["mr"] = time_calls(lambda: mr.route_logits(x, cfg), budget, max_repeats(T))
            r["np"] = time_calls(lambda: numpy_route(x, k, CF), budget, max_repeats(T))
            r["sum"] = time_calls(lambda: x.sum(), budget / 3, max_repeats(T) * 4, min_n=5)
            if T == BIG_T and (E, k) in TARGET_SHAPES:
                # 1 thread vs the configured threads, back to back
                mr.set_num_threads(1)
                extra["threads1"][(E, k)] = time_calls(lambda: mr.route_logits(x, cfg), budget,
                                                       max_repeats(T))
                mr.set_num_threads(a.threads)
                c0, w0 = own_cpu(), time.perf_counter()
                extra["threadsN"][(E, k)] = time_calls(lambda: mr.route_logits(x, cfg), budget,
                                                       max_repeats(T))
                extra["threadsN"][(E, k)]["cores"] = (own_cpu() - c0) / (time.perf_counter() - w0)
                # stage split: the same call without capacity; the bare core call
                dl = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)
                extra["dropless"][(E, k)] = time_calls(lambda: mr.route_logits(x, dl), budget,
                                                       max_repeats(T))
                # the wrapper's cost: the package call against the bare core call, interleaved
                extra["core"][(E, k)] = time_pair(lambda: mr.route_logits(x, cfg),
                                                  lambda: _core.route_logits(x, cfg), 2 * max_repeats(T))
            if T == 64:
                xs = x
                ts = []
                for _ in range(200):
                    mr.route_logits(xs, cfg)
                for _ in range(lat_calls):
                    t0 = time.perf_counter()
                    mr.route_logits(xs, cfg)
                    ts.append(time.perf_counter() - t0)
                ts.sort()
                extra["latency"][(E, k)] = {"median_us": ts[len(ts) // 2] * 1e6,
                                            "p10_us": ts[len(ts) // 10] * 1e6,
                                            "p90_us": ts[len(ts) * 9 // 10] * 1e6,
                                            "mean_us": sum(ts) / len(ts) * 1e6, "n": len(ts)}
            R[(T, E, k)] = r
            print(f"T={T:6d} E={E:3d} k={k}  moe_router {fms(r['mr']['median_s']):>8s} ms  "
                  f"numpy-ref {fms(r['np']['median_s']):>8s} ms  sum {fms(r['sum']['median_s'])} ms",
                  file=sys.stderr, flush=True)
            del x

    print("extra peak memory workers ...", file=sys.stderr, flush=True)
    for (T, E, k), r in R.items():
        r["mr_mb"] = run_mem_worker("moe_router", T, E, k, a.threads)
        r["np_mb"] = run_mem_worker("numpy-ref", T, E, k, a.threads)
    levels = [] if a.quick else a.simd_levels
    for (T, E, k), r in R.items():
        if T == BIG_T:
            for level in levels:
                print(f"SIMD {level} worker T={T} E={E} k={k} ...", file=sys.stderr, flush=True)
                res = run_worker("time", T, E, k, a.threads, simd=level, budget_s=budget)
                r[f"mr_{level}"] = None if res is None else res["median_s"]
    fp1 = so_fingerprint()
    snap1 = cpu_snapshot()

    peers, peers_note = run_peers(a, Ts, shapes)
    snap2 = cpu_snapshot()
    print(peers_note, file=sys.stderr, flush=True)
    P: Dict[Tuple[int, int, int], Dict[str, Any]] = {}
    if peers:
        for row in peers["rows"]:
            P[(row["T"], row["E"], row["k"])] = row["peers"]
    fp2 = so_fingerprint()
    wall = time.time() - t_all

    # ---------------------------------------------------------------- table
    def pmed(T, E, k, name) -> Optional[float]:
        r = P.get((T, E, k), {}).get(name)
        return r.get("median_s") if r else None

    def pmb(T, E, k, name) -> Optional[float]:
        r = P.get((T, E, k), {}).get(name)
        return r.get("extra_mb") if r else None

    def floor_s(T, E, k) -> Tuple[float, str]:
        cands = [(R[(T, E, k)]["sum"]["median_s"], "np sum")]
        bw = P.get((T, E, k), {}).get("membw") or {}
        for key, name in (("np_sum_s", "membw np sum"), ("torch_sum_s", "membw torch sum")):
            if key in bw:
                cands.append((bw[key], name))
        return min(cands)

    def fastest_torch(T, E, k) -> Tuple[Optional[float], str]:
        best: Tuple[Optional[float], str] = (None, "-")
        for name in a.peers:
            t = pmed(T, E, k, name)
            if t is not None and (best[0] is None or t < best[0]):
                best = (t, name)
        return best

    L: List[str] = []
    L.append(f"# moe_router routing benchmark ({started:%Y-%m-%d %H:%M %Z})\n")
    L.append(f"Machine: {machine()}  ")
    L.append(f"moe_router {getattr(mr, '__version__', '?')}, extension {fp0}  ")
    if peers:
        L.append("Peers: " + ", ".join(f"{k} {v}" for k, v in peers.get("versions", {}).items())
                 + "  ")
    L.append(f"SIMD level of the main columns: {simd_level()}.  ")
    L.append(f"Load average (1/5/15 min) at start: {load0}; at end: {loadavg()}.  ")
    L.append(f"Capacity factor {CF}; logits float32 N(0,1), seed {SEED}; {a.threads} threads "
             f"(moe_router.set_num_threads, torch.set_num_threads); median of up to "
             f"{max_repeats(64)}/{max_repeats(4096)}/{max_repeats(65536)}/{max_repeats(BIG_T)} "
             f"calls (T=64/4096/65536/262144, within a {budget:g} s budget) after one warm-up "
             f"call; peers: median of up to {3 if a.quick else 7} calls (their harness).  ")
    L.append(f"CPU used by other processes (average cores, from /proc/stat minus this run's "
             f"own CPU): {other_cores(snap0, snap1):.2f} while moe_router / numpy-ref were "
             f"measured, {other_cores(snap1, snap2):.2f} during the peers harness.  ")
    L.append(f"Wall time of this run: {wall:.0f} s. {peers_note}.\n")
    if fp0 != fp1:
        L.append(f"**WARNING: the extension changed while moe_router was measured** ({fp0} -> "
                 f"{fp1}); in-process timings used the first build, the memory workers may have "
                 "loaded the second.\n")
    elif fp1 != fp2:
        L.append(f"Note: the extension was rebuilt later, during the peers stage ({fp2}); all "
                 "moe_router figures above are from the first build.\n")

    L.append("## Time per call (ms) and ratios\n")
    L.append("`floor` = reading the logits once (best of numpy `x.sum()` 1 thread and the peers "
             "harness's numpy/torch sum). `fastest torch` = the fastest of the torch peers "
             f"measured ({', '.join(a.peers)}). Ratios `peer / mr` > 1 mean moe_router is "
             "faster. `extra MB` = peak RSS growth during one call, in a fresh process.\n")
    L.append("| T | E | k | floor | moe_router | numpy-ref | mcore | fastest torch | hf-mixtral "
             "| mcore / mr | fastest / mr | hf-mixtral / mr | numpy / mr | mr / floor "
             "| mr extra MB | numpy extra MB | mcore extra MB | hf-mixtral extra MB | min torch extra MB |")
    L.append("|" + "---|" * 20)
    rows = sorted(R.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))
    for (T, E, k), r in rows:
        t_mr = r["mr"]["median_s"]
        t_np = r["np"]["median_s"]
        fl, _ = floor_s(T, E, k)
        mc = pmed(T, E, k, "mcore")
        hf = pmed(T, E, k, "hf-mixtral")
        ft, fname = fastest_torch(T, E, k)
        mbs = [pmb(T, E, k, n) for n in a.peers]
        mbs = [m for m in mbs if m is not None]
        L.append(
            f"| {T} | {E} | {k} | {fms(fl)} | {fms(t_mr)} | {fms(t_np)} | {fms(mc)} "
            f"| {fms(ft)}{'' if ft is None else ' (' + fname + ')'} | {fms(hf)} "
            f"| {fx(mc / t_mr) if mc else '-'} | {fx(ft / t_mr) if ft else '-'} "
            f"| {fx(hf / t_mr) if hf else '-'} | {fx(t_np / t_mr)} | {fx(t_mr / fl)} "
            f"| {fmb(r['mr_mb'])} | {fmb(r['np_mb'])} | {fmb(pmb(T, E, k, 'mcore'))} "
            f"| {fmb(pmb(T, E, k, 'hf-mixtral'))} | {fmb(min(mbs) if mbs else None)} |")

    if P:
        L.append("\nAll torch peers, median ms (from the peers harness in this run):\n")
        L.append("| T | E | k | " + " | ".join(a.peers) + " |")
        L.append("|" + "---|" * (3 + len(a.peers)))
        for (T, E, k), _ in rows:
            cells = []
            for n in a.peers:
                pr = P.get((T, E, k), {}).get(n)
                cells.append(peerbench._fmt_t(pr) if pr is not None else "-")
            L.append(f"| {T} | {E} | {k} | " + " | ".join(cells) + " |")

    if levels:
        L.append(f"\n## T={BIG_T} per SIMD level (ms)\n")
        L.append("The main table's column is the best level; each forced level "
                 "(`MOE_ROUTER_SIMD`) is timed in its own process. `read GB/s` = the logits' bytes "
                 "over the floor.\n")
        L.append("| E | k | read GB/s | " + " | ".join(["best"] + levels) + " | "
                 + " | ".join(f"fastest / mr {lv}" for lv in ["best"] + levels) + " | "
                 + " | ".join(f"mcore / mr {lv}" for lv in ["best"] + levels) + " | "
                 + " | ".join(f"mr {lv} / floor" for lv in ["best"] + levels) + " |")
        L.append("|" + "---|" * (3 + 4 * (1 + len(levels))))
        for (T, E, k), r in rows:
            if T != BIG_T:
                continue
            times = [r["mr"]["median_s"]] + [r.get(f"mr_{lv}") for lv in levels]
            fl, _ = floor_s(T, E, k)
            ft, _ = fastest_torch(T, E, k)
            mc = pmed(T, E, k, "mcore")
            ratio = lambda num, t: fx(num / t) if num and t else "-"  # noqa: E731
            L.append(f"| {E} | {k} | {T * E * 4 / fl / 1e9:.1f} | " + " | ".join(fms(t) for t in times)
                     + " | " + " | ".join(ratio(ft, t) for t in times)
                     + " | " + " | ".join(ratio(mc, t) for t in times)
                     + " | " + " | ".join(fx(t / fl) if t else "-" for t in times) + " |")

    # -------------------------------------------------------- extra figures
    L.append("\n## T=64 end-to-end latency per Python call (us)\n")
    L.append(f"Each call timed separately, {lat_calls} calls after 200 warm-up calls.\n")
    L.append("| E | k | median | p10 | p90 | mean |")
    L.append("|---|---|---|---|---|---|")
    for (E, k), v in extra["latency"].items():
        L.append(f"| {E} | {k} | {v['median_us']:.1f} | {v['p10_us']:.1f} | {v['p90_us']:.1f} "
                 f"| {v['mean_us']:.1f} |")

    if extra["threads1"]:
        L.append(f"\n## T={BIG_T}: threads, linearity and stage split (ms)\n")
        L.append("`1 thr` and `N thr` are measured back to back; `dropless` = the same call with "
                 "capacity_factor=None (no capacity assignment); `core` = the bare "
                 "`moe_router._core.route_logits` call without the Python wrapper, and `Python wrapper` = "
                 "the median difference of the two calls made alternately (`wrapper %` of the core call); "
                 "`t(4T)/t(T)` uses the main table's times at T=65536 and 262144; `cores busy` = "
                 "this process's CPU time / wall time over the 2-thread timing.\n")
        L.append(f"| E | k | 1 thr | {a.threads} thr | speed-up | cores busy ({a.threads} thr) "
                 "| dropless | capacity cost | core only | Python wrapper | wrapper % | t(4T)/t(T) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (E, k), v1 in extra["threads1"].items():
            vn = extra["threadsN"][(E, k)]["median_s"]
            dl = extra["dropless"][(E, k)]["median_s"]
            co = extra["core"][(E, k)]["b_s"]
            wrap = extra["core"][(E, k)]["diff_s"]
            full = R[(BIG_T, E, k)]["mr"]["median_s"]
            lin = (full / R[(65536, E, k)]["mr"]["median_s"]) if (65536, E, k) in R else None
            cores = extra["threadsN"][(E, k)]["cores"]
            L.append(f"| {E} | {k} | {fms(v1['median_s'])} | {fms(vn)} | {fx(v1['median_s'] / vn)} "
                     f"| {cores:.2f} | {fms(dl)} | {fms(vn - dl)} | {fms(co)} | {fms(wrap)} | {100 * wrap / co:.1f} "
                     f"| {fx(lin)} |")

    # --------------------------------------------------------------- targets
    L.append("\n## Performance targets\n")

    def verdict(ok: Optional[bool]) -> str:
        return "n/a (not measured)" if ok is None else ("MET" if ok else "NOT MET")

    for E, k in TARGET_SHAPES:
        key = (BIG_T, E, k)
        r = R.get(key)
        t_mr = r["mr"]["median_s"] if r else None
        mc = pmed(*key, "mcore")
        ft, fname = fastest_torch(*key)
        ratio = (mc / t_mr) if (mc and t_mr) else None
        L.append(f"- T=262144, E={E} k={k}: >= 25x faster than Megatron-Core: "
                 f"{fx(ratio)}x ({fms(mc)} / {fms(t_mr)} ms) -> "
                 f"{verdict(None if ratio is None else ratio >= 25)}")
        ratio = (ft / t_mr) if (ft and t_mr) else None
        L.append(f"- T=262144, E={E} k={k}: >= 10x faster than the fastest torch router ({fname}): "
                 f"{fx(ratio)}x ({fms(ft)} / {fms(t_mr)} ms) -> "
                 f"{verdict(None if ratio is None else ratio >= 10)}")
        if r:
            fl, flname = floor_s(*key)
            ratio = t_mr / fl
            L.append(f"- T=262144, E={E} k={k}: within 10x of the memory-read floor: "
                     f"{fx(ratio)}x ({fms(t_mr)} / {fms(fl)} ms, floor from {flname}) -> "
                     f"{verdict(ratio <= 10)}")
        else:
            L.append(f"- T=262144, E={E} k={k}: within 10x of the memory-read floor: -> "
                     f"{verdict(None)}")
    for E, k in TARGET_SHAPES:
        v = extra["latency"].get((E, k))
        L.append(f"- T=64, E={E} k={k}: <= 20 us per Python call: "
                 + (f"{v['median_us']:.1f} us (median of {v['n']}) -> {verdict(v['median_us'] <= 20)}"
                    if v else f"-> {verdict(None)}"))
    r = R.get((BIG_T, 256, 8))
    mb = r["mr_mb"] if r else None
    L.append("- Extra peak memory, one call at T=262144, E=256, k=8: <= 40 MB: "
             + (f"{mb:.1f} MB -> {verdict(mb <= 40)}" if mb is not None else f"-> {verdict(None)}"))
    for E, k in TARGET_SHAPES:
        v1 = extra["threads1"].get((E, k))
        if v1:
            vn = extra["threadsN"][(E, k)]["median_s"]
            s = v1["median_s"] / vn
            L.append(f"- T=262144, E={E} k={k}: {a.threads} threads >= 1.7x faster than 1 thread: "
                     f"{s:.2f}x ({fms(v1['median_s'])} / {fms(vn)} ms) -> {verdict(s >= 1.7)}")
        else:
            L.append(f"- T=262144, E={E} k={k}: {a.threads} threads >= 1.7x faster than 1 thread: "
                     f"-> {verdict(None)}")
    for E, k in TARGET_SHAPES:
        if (BIG_T, E, k) in R and (65536, E, k) in R:
            t4 = R[(BIG_T, E, k)]["mr"]["median_s"]
            t1 = R[(65536, E, k)]["mr"]["median_s"]
            L.append(f"- E={E} k={k}: linear in T, t(262144)/t(65536) <= 4.4: {t4 / t1:.2f} "
                     f"({fms(t4)} / {fms(t1)} ms) -> {verdict(t4 / t1 <= 4.4)}")
        else:
            L.append(f"- E={E} k={k}: linear in T, t(262144)/t(65536) <= 4.4: -> {verdict(None)}")
    for E, k in TARGET_SHAPES:
        pair = extra["core"].get((E, k))
        if pair:
            share = pair["diff_s"] / pair["a_s"]
            L.append(f"- T=262144, E={E} k={k}: the Python wrapper under 2% of the call: {100 * share:.1f}% "
                     f"({fms(pair['diff_s'])} of {fms(pair['a_s'])} ms, paired) -> {verdict(share < 0.02)}")
    L.append("- `route_tokens` at T=16384, D=4096, E=64 <= 1.15x NumPy `hidden @ W`: not measured "
             "by this script (route_logits only).")
    md = "\n".join(L) + "\n"
    print(md)
    if a.out:
        Path(a.out).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Balanced assignment (``routing="balanced"``, BASE layers): optimality gap of
fairseq's auction on the real router logits, and time per call at T=65536, E=64.

Usage (from the repository root, the package built)::

    python benches/bench_balanced.py            # both parts, Markdown on stdout
    python benches/bench_balanced.py --no-numpy # skip the slow NumPy transcription

Part 1, per real-router file and E: the total logit of the exact optimum
(``balanced_solver="exact"``), of fairseq's auction (``preset("base")``) and of a
greedy fill (tokens in order, each to its best expert with room), and their
relative gaps to the optimum. Part 2: seconds per training call of the exact
solver, of the auction, of the NumPy transcription of fairseq's C++
(``tests/balanced_reference.py``) and, for scale, of plain top-1 routing, on
seeded Gaussian logits with a per-expert offset (skewed loads).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np

import moe_router as mr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from balanced_reference import auction_experts, greedy_experts, total  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "real_router"


def balanced(E: int) -> mr.RouterConfig:
    return mr.RouterConfig(num_experts=E, top_k=1, routing="balanced")


def timed(call: Callable[[], np.ndarray], repeat: int) -> Tuple[np.ndarray, float]:
    """The result of the first call and the median seconds over ``repeat`` calls."""
    out, times = None, []
    for _ in range(repeat):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def route(x: np.ndarray, config: mr.RouterConfig) -> np.ndarray:
    return mr.route_logits(x, config, training=True).expert_indices[:, 0].astype(np.int64)


def gap_table() -> List[str]:
    lines = ["| file | E | exact total | auction total | greedy total | auction gap | greedy gap | "
             "exact s | auction s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("minilm_l3.npz", "minilm_l5.npz"):
        with np.load(DATA / name) as z:
            for E in (8, 64, 256):
                x = np.asarray(z[f"logits_e{E}"])
                exact, t_exact = timed(lambda: route(x, balanced(E)), 1)
                auction, t_auction = timed(lambda: route(x, mr.preset("base", E)), 1)
                best, a, g = total(x, exact), total(x, auction), total(x, greedy_experts(x))
                lines.append(f"| {name} | {E} | {best:.6g} | {a:.6g} | {g:.6g} | {(best - a) / abs(best):.3e} | "
                             f"{(best - g) / abs(best):.3e} | {t_exact:.3g} | {t_auction:.3g} |")
    return lines


def speed_table(numpy_reference: bool) -> List[str]:
    T, E = 65536, 64
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(T, E)) + np.linspace(0.0, 2.0, E)).astype(np.float32)
    rows = [("exact (`balanced_solver=\"exact\"`)", lambda: route(x, balanced(E)), 3),
            ("fairseq auction (`preset(\"base\")`)", lambda: route(x, mr.preset("base", E)), 3),
            ("plain top-1 (`token_choice`, dropless)",
             lambda: route(x, mr.RouterConfig(num_experts=E, top_k=1, capacity_factor=None)), 5)]
    if numpy_reference:
        rows.append(("NumPy transcription of fairseq's auction", lambda: auction_experts(x), 1))
    lines = [f"T={T}, E={E}, float32, seeded N(0,1) + linspace(0, 2, E) per expert; "
             f"{mr.get_num_threads()} threads.", "", "| solver | s per call | total logit |", "|---|---|---|"]
    results = {}
    for label, call, repeat in rows:
        out, seconds = timed(call, repeat)
        results[label] = out
        lines.append(f"| {label} | {seconds:.3g} | {total(x, out):.7g} |")
    if numpy_reference:
        same = np.array_equal(results[rows[1][0]], results[rows[-1][0]])
        lines += ["", f"The Rust auction and the NumPy transcription give the same assignment: {same}."]
    return lines


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"CPU: {model}, {len(__import__('os').sched_getaffinity(0))} usable cores; Python " \
           f"{platform.python_version()}, NumPy {np.__version__}; commit {commit} (quick profile)."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy transcription in part 2")
    args = p.parse_args()
    print(machine(), "", "### Optimality gap on the real router logits (T = 16384)", "", *gap_table(), "",
          "### Time per training call", "", *speed_table(not args.no_numpy), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

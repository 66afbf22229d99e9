#!/usr/bin/env python3
"""Expert parallelism at DeepSeek-V3 scale, on paper from measurements (issue 11, item 7).

E = 256 routed experts, top-8, hidden size D = 7168, R in {8, 64, 256} ranks, 1,048,576 tokens
per step in total (each rank routes 1,048,576 / R of them). Two things are reported:

1. **Bytes per rank per step** of the dispatch trip (the combine trip moves the same bytes the
   other way): every kept assignment is one row of D values. The routing is measured at
   ``--tokens`` tokens (default 262,144) and scaled to the step: dropless routing of random
   N(0, 1) logits (balanced) and of the real layer-5 MiniLM logits of ``../shared/data/real_router``
   resampled to that many tokens (skewed loads), under the contiguous placement and under
   ``plan_placement(load, R, num_replicas=E + R)``. A rank sends ``T/R * k`` rows; what it receives
   depends on the placement (``DispatchPlan.all_to_all(placement).send_counts`` of the whole batch,
   as shares); the cross-rank share leaves out rows whose expert is on the sending rank (the
   batch split into R contiguous chunks as the ranks' tokens).
2. **Plan-building time** on one rank: ``decision.dispatch_plan()`` + ``plan.all_to_all(placement)``
   + ``a2a.receive(counts, rank)`` (the counts as if every rank sent what this one sends), the least
   CPU time (and wall time) of repeated calls, 1 thread by default (``--threads``), at T in {0, 1024, 4096, 16384, 65536, 262144} local tokens, for each R. The
   measured growth between sizes (``log(t2/t1) / log(T2/T1)``, 1 = linear) and a third table across
   E, k and R show the cost is a fixed part in E + R plus a part linear in T*k; ``t = a + b*T``
   (a = t(0), b from the largest T) extrapolates to 1,048,576 tokens on one rank (``--check-1m``
   also measures it) and gives the per-rank time at 1,048,576 / R local tokens.

Prints markdown; ``--out PATH`` also writes it to a file.

    python benches/ep_scale.py [--tokens 262144] [--check-1m] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

import moe_router as mr

E, K, D = 256, 8, 7168
RANKS = (8, 64, 256)
STEP_TOKENS = 1 << 20
ROW_BYTES = D * 2  # bf16 / float16 rows; float32 doubles every byte figure
TIMED_T = (0, 1024, 4096, 16384, 65536, 262144)
REAL_L5 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_router" / "minilm_l5.npz"
CONFIG = mr.RouterConfig(num_experts=E, top_k=K, capacity_factor=None)


def random_logits(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, E), dtype=np.float32)


def real_like_logits(tokens: int, seed: int = 0) -> np.ndarray:
    with np.load(REAL_L5) as z:
        real = np.asarray(z[f"logits_e{E}"])
    return real[np.random.default_rng(seed).integers(0, real.shape[0], tokens)]


def destinations(dec: mr.RoutingDecision, placement: mr.ExpertPlacement, ranks: int) -> Tuple[np.ndarray, np.ndarray]:
    """(source rank, destination rank) of every kept assignment, the batch split into R contiguous chunks;
    a replicated expert's copy is ``local token % copies``, as the exchange chooses it."""
    t = dec.expert_indices.shape[0]
    per = -(-t // ranks)
    token = np.repeat(np.arange(t), K)[dec.kept.reshape(-1)]
    expert = dec.expert_indices.reshape(-1)[dec.kept.reshape(-1)]
    hosts = placement.expert_ranks
    width = max(len(h) for h in hosts)
    table = np.array([h + [h[0]] * (width - len(h)) for h in hosts])
    copies = placement.replica_counts
    source = token // per
    return source, table[expert, (token % per) % copies[expert]]


def bytes_table(tokens: int) -> str:
    lines = [f"Routing measured at T = {tokens:,} tokens (dropless), scaled to {STEP_TOKENS:,} tokens per step; "
             f"rows of D = {D} bf16 values ({ROW_BYTES:,} bytes). GB = 10^9 bytes, per rank per step, "
             "dispatch trip (the combine trip is the same bytes the other way).",
             "",
             "| routing | placement | R | tokens per rank | sent (GB) | received mean (GB) | received max (GB) "
             "| max / mean | cross-rank share |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    kinds: List[Tuple[str, Callable[[int], np.ndarray]]] = [("random N(0,1)", random_logits)]
    if REAL_L5.exists():
        kinds.append(("real layer 5, resampled", real_like_logits))
    for kind, make in kinds:
        dec = mr.route_logits(make(tokens), CONFIG)
        plan = dec.dispatch_plan()
        load = dec.tokens_per_expert
        assignments = STEP_TOKENS * K  # dropless: every token sends k rows
        for R in RANKS:
            layouts = [("contiguous", mr.ExpertPlacement(E, R))]
            layouts.append((f"planned, P = E + R = {E + R}", mr.plan_placement(load, R, num_replicas=E + R)))
            for name, placement in layouts:
                share = plan.all_to_all(placement).send_counts / plan.tokens_per_expert.sum()
                source, dest = destinations(dec, placement, R)
                cross = float(np.mean(source != dest))
                gb = assignments * ROW_BYTES / 1e9
                lines.append(f"| {kind} | {name} | {R} | {STEP_TOKENS // R:,} | {gb / R:.2f} | {gb / R:.2f} "
                             f"| {gb * share.max():.2f} | {share.max() * R:.3f} | {cross:.3f} |")
    return "\n".join(lines)


def timed(fn: Callable[[], object], budget_s: float = 2.0, max_reps: int = 201) -> Tuple[float, float]:
    """(wall, CPU) seconds of ``fn``: the least of each over repeats (at least 9) within a budget, after
    one warm-up call. CPU is the process's CPU time (``time.process_time``, every thread), which other
    processes on a shared machine disturb far less than the wall time."""
    fn()
    walls: List[float] = []
    cpus: List[float] = []
    start = time.perf_counter()
    while len(walls) < 9 or (len(walls) < max_reps and time.perf_counter() - start < budget_s):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def plan_steps(dec: mr.RoutingDecision, placement: mr.ExpertPlacement) -> Dict[str, Tuple[float, float]]:
    """(wall, CPU) seconds of the three plan-building steps of one rank (rank 0), and of the three in one go."""
    plan = dec.dispatch_plan()
    a2a = plan.all_to_all(placement)
    received = np.ascontiguousarray(np.stack([a2a.expert_counts[0]] * placement.num_ranks))
    return {
        "dispatch_plan": timed(dec.dispatch_plan),
        "all_to_all": timed(lambda: plan.all_to_all(placement)),
        "receive": timed(lambda: a2a.receive(received, 0)),
        "total": timed(lambda: dec.dispatch_plan().all_to_all(placement).receive(received, 0)),
    }


def exponent(t: Dict[int, float], lo: int, hi: int) -> float:
    """Measured growth ``log(t(hi) / t(lo)) / log(hi / lo)``: 1.0 is linear in T."""
    return float(np.log(t[hi] / t[lo]) / np.log(hi / lo))


def timing_tables(check_1m: bool) -> str:
    big = random_logits(max(TIMED_T))
    decisions = {t: mr.route_logits(big[:t], CONFIG) for t in TIMED_T}
    del big
    rows = ["| R | T (local tokens) | dispatch_plan | all_to_all | receive | total (CPU) | total (wall) "
            "| ns per token | ns per assignment |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    top = max(TIMED_T)
    growth = ["| R | fixed a = t(0) (us) | growth 4k->16k | growth 16k->65k | growth 65k->262k | b (ns per token) "
              f"| {STEP_TOKENS:,} tokens on one rank: a + b*T (ms) | measured (ms) "
              f"| {STEP_TOKENS:,} / R tokens per rank: a + b*T (ms) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    check = mr.route_logits(random_logits(STEP_TOKENS, seed=1), CONFIG) if check_1m else None
    for R in RANKS:
        placement = mr.ExpertPlacement(E, R)
        cpu = {}
        for t in TIMED_T:
            s = plan_steps(decisions[t], placement)
            cpu[t] = s["total"][1]
            per = f"{cpu[t] / t * 1e9:.1f}" if t else "-"
            per_a = f"{cpu[t] / (t * K) * 1e9:.2f}" if t else "-"
            rows.append(f"| {R} | {t:,} | " + " | ".join(f"{s[k][1] * 1e3:.3f}" for k in ("dispatch_plan", "all_to_all",
                                                                                          "receive", "total"))
                        + f" | {s['total'][0] * 1e3:.3f} | {per} | {per_a} |")
        a = cpu[0]
        b = (cpu[top] - a) / top
        measured = f"{plan_steps(check, placement)['total'][1] * 1e3:.1f}" if check is not None else "-"
        growth.append(f"| {R} | {a * 1e6:.1f} | {exponent(cpu, 4096, 16384):.2f} | {exponent(cpu, 16384, 65536):.2f} "
                      f"| {exponent(cpu, 65536, top):.2f} | {b * 1e9:.1f} | {(a + b * STEP_TOKENS) * 1e3:.1f} "
                      f"| {measured} | {(a + b * STEP_TOKENS / R) * 1e3:.2f} |")
    return (f"One rank, {mr.get_num_threads()} thread(s), random N(0,1) routing, dropless, contiguous placement; "
            "ms of CPU time (least of the repeats) unless marked wall. receive: the [R, L] counts as if every "
            "rank sent what this one sends, so it orders about T*k rows.\n\n"
            + "\n".join(rows)
            + f"\n\nGrowth ``log(t2/t1) / log(T2/T1)`` of the CPU total (1.00 = linear in T); a = t(0), "
            f"b = (t({top:,}) - a) / {top:,}:\n\n"
            + "\n".join(growth))


def shape_table() -> str:
    """The cost per assignment across k and E, and the fixed part across E and R."""
    lines = ["| E | k | R | t(0) (us CPU) | t(65,536) (ms CPU) | ns per assignment |", "|---:|---:|---:|---:|---:|---:|"]
    logits = {e: random_logits(65536, seed=2)[:, :e].copy() for e in (64, 256)}
    for experts, k, R in ((64, 2, 8), (256, 2, 8), (256, 8, 8), (256, 8, 256), (64, 8, 64)):
        cfg = mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=None)
        placement = mr.ExpertPlacement(experts, R)
        t0 = plan_steps(mr.route_logits(logits[experts][:0], cfg), placement)["total"][1]
        t1 = plan_steps(mr.route_logits(logits[experts], cfg), placement)["total"][1]
        lines.append(f"| {experts} | {k} | {R} | {t0 * 1e6:.1f} | {t1 * 1e3:.2f} | {t1 / (65536 * k) * 1e9:.1f} |")
    return "\n".join(lines)


def header() -> str:
    return (f"Machine: {platform.machine()} {platform.processor() or ''} nproc {os.cpu_count()}, "
            f"Python {platform.python_version()}, NumPy {np.__version__}, moe_router threads "
            f"{mr.get_num_threads()}; {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.")


def load_line(what: str) -> str:
    return f"{what}: " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + "."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=262144, help="tokens routed for the byte counts")
    p.add_argument("--check-1m", action="store_true", help="also time the plan at 1,048,576 tokens")
    p.add_argument("--threads", type=int, default=1, help="moe_router threads for the timings (default 1)")
    p.add_argument("--out", type=Path, help="also write the output to this file")
    a = p.parse_args(argv)
    mr.set_num_threads(a.threads)
    sections: List[str] = []

    def emit(text: str) -> None:
        """Print a section as soon as it is measured (the run takes minutes) and keep it for --out."""
        print(text + "\n", flush=True)
        sections.append(text)

    command = "python benches/ep_scale.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    emit(f"{header()} {load_line('Load average (1/5/15 min) at the start')} Command: `{command}`.")
    emit(f"### Bytes per rank per step (E = {E}, k = {K}, D = {D}, {STEP_TOKENS:,} tokens per step)")
    emit(bytes_table(a.tokens))
    emit("### Plan-building time: dispatch_plan + all_to_all(placement) + receive")
    emit(timing_tables(a.check_1m))
    emit("### The same cost across E, k and R (T = 0 and 65,536 local tokens)")
    emit(shape_table())
    emit(load_line("Load average (1/5/15 min) at the end"))
    if a.out:
        a.out.write_text("\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

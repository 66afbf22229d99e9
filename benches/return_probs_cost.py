"""The cost of ``return_probs=True``: time and extra peak memory of ``route_logits`` with and
without the ``[T, E]`` float32 probabilities, T=262144, E=256, k=8, float32 logits, 2 threads.

Each variant's peak memory is measured in a fresh child process (``VmHWM`` of
``/proc/self/status`` after the call minus before), the times in this process, interleaved,
median of ``--repeat`` calls. Targets (issue 8): at most 1.2x the time without, and at most the
output's own size (T * E * 4 bytes) in extra memory.

    python benches/return_probs_cost.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

import moe_router as mr

T, E, K = 262144, 256, 8


def logits() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((T, E), dtype=np.float32)


def high_water_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(return_probs: bool) -> None:
    """Print the peak-memory growth (bytes) of one call."""
    mr.set_num_threads(2)
    x, cfg = logits(), mr.RouterConfig(num_experts=E, top_k=K, capacity_factor=1.25)
    before = high_water_kib()
    d = mr.route_logits(x, cfg, return_probs=return_probs)
    print((high_water_kib() - before) * 1024, d.num_experts)


def peak(return_probs: bool) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", str(int(return_probs))],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--child", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        child(bool(a.child))
        return
    mr.set_num_threads(2)
    x, cfg = logits(), mr.RouterConfig(num_experts=E, top_k=K, capacity_factor=1.25)
    times: dict = {False: [], True: []}
    for flag in (False, True):
        mr.route_logits(x, cfg, return_probs=flag)
    for _ in range(a.repeat):
        for flag in (False, True):
            t0 = time.perf_counter()
            mr.route_logits(x, cfg, return_probs=flag)
            times[flag].append(time.perf_counter() - t0)
    t_off, t_on = (statistics.median(times[f]) * 1e3 for f in (False, True))
    m_off, m_on = peak(False), peak(True)
    out_mb = T * E * 4 / 2**20
    print(f"T={T} E={E} k={K} float32, 2 threads, median of {a.repeat}")
    print("| variant | ms | peak memory growth MiB |")
    print("|---|---|---|")
    print(f"| return_probs=False | {t_off:.1f} | {m_off / 2**20:.1f} |")
    print(f"| return_probs=True | {t_on:.1f} | {m_on / 2**20:.1f} |")
    print(f"time ratio {t_on / t_off:.2f}x (target <= 1.2x); extra memory {(m_on - m_off) / 2**20:.1f} MiB "
          f"against the output's {out_mb:.0f} MiB (target <= 1.0x: {(m_on - m_off) / 2**20 / out_mb:.2f}x)")


if __name__ == "__main__":
    main()

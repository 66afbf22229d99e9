"""Ctrl-C stops a long routing call within about 100 ms, not when the call ends.

A child process routes hidden states through a linear router (T tokens of
D = 256 against E = 4096 experts, sized to take about 4 s), and gets SIGINT
0.5 s into the call: it must see KeyboardInterrupt within a second of the
signal, and the next calls in that process must route exactly as before (the
pool and the buffers were released).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHILD = r"""
import signal, sys, time
# A parent that ignores SIGINT (a launcher, a CI runner) would pass that on: restore Python's handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
import moe_router as mr

D, E = 256, 4096
router = mr.ExpertRouter(mr.RouterConfig(num_experts=E, top_k=2), D, gate="linear")
block = np.random.default_rng(0).normal(size=(4096, D)).astype(np.float32)
times = []
for _ in range(3):  # several chunks: the pool path; the fastest run calibrates (a loaded machine slows some)
    start = time.perf_counter()
    before = router.route_tokens(block)
    times.append(time.perf_counter() - start)
per_token = min(times) / len(block)
tokens = int(min(400_000, max(16_384, 4.0 / per_token)))
hidden = np.tile(block, (tokens // len(block) + 1, 1))[:tokens]
print("ready", round(tokens * per_token, 2), flush=True)
try:
    router.route_tokens(hidden)
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
after = router.route_tokens(block)
same = all(np.array_equal(getattr(before, n), getattr(after, n))
           for n in ("expert_indices", "expert_weights", "expert_slots", "kept", "tokens_per_expert"))
print("same" if same else "different", flush=True)
"""


def _lines(proc: subprocess.Popen) -> "queue.Queue[str]":
    """The child's stdout lines, read by a thread so that waits can time out."""
    lines: "queue.Queue[str]" = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.timing
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_a_long_call_promptly() -> None:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=Path(__file__).parent)
    lines = _lines(proc)
    try:
        ready = lines.get(timeout=30).split()
        assert ready[0] == "ready", ready
        expected = float(ready[1])
        time.sleep(0.5)  # well inside the Rust call
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        outcome = lines.get(timeout=max(5.0, 2 * expected))
        delay = time.monotonic() - sent
        assert outcome == "interrupted", f"{outcome} (the call takes about {expected} s)"
        assert delay < 1.0, f"KeyboardInterrupt came {delay:.2f} s after SIGINT (the call takes {expected} s)"
        assert expected > 1.5, f"the call takes only {expected} s: too short to show the interrupt"
        assert lines.get(timeout=30) == "same"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr

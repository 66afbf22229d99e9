"""``moe-router ep``: the expert-parallel run on the embedded data, launched by the command itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_distributed import mpiexec


def run_ep(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "moe_router", "ep", *argv, "--json"], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("ranks,replicas", [(2, 0), (4, 6)])
def test_ep_over_mpi_passes_its_check(ranks, replicas):
    mpiexec()
    report = run_ep("--ranks", str(ranks), "--replicas", str(replicas), "-D", "32")
    assert report["check_passed"] and report["ranks"] == ranks and len(report["per_rank"]) == ranks
    assert sum(r["tokens"] for r in report["per_rank"]) == 4096
    sent = sum(sum(r["rows_sent"]) for r in report["per_rank"])
    received = sum(sum(r["rows_received"]) for r in report["per_rank"])
    assert sent == received > 0
    assert all(r["bytes_sent"] == sum(r["rows_sent"]) * 32 * 4 for r in report["per_rank"])


def test_ep_over_gloo_passes_its_check():
    pytest.importorskip("torch.distributed")
    report = run_ep("--ranks", "2", "--backend", "gloo", "-D", "16")
    assert report["check_passed"] and report["backend"] == "gloo"

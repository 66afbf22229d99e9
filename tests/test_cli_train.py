"""``moe-router train`` and examples/train_router.py: the loss falls, the loads even out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REAL_L5, needs_real_router
from helpers import cli_json, run_error


@needs_real_router
def test_training_balances_the_real_router(capsys):
    report = cli_json(capsys, "train", str(REAL_L5), "--bias-key", "router_bias_e64", "--steps", "12", "--json")
    h = report["history"]
    assert len(h) == 12 and report["command"] == "train"
    assert h[-1]["load_balance_loss"] < 0.5 * h[0]["load_balance_loss"]
    assert h[-1]["max_mean_load"] < 0.5 * h[0]["max_mean_load"]
    assert h[-1]["dropped_assignments"] < h[0]["dropped_assignments"]
    assert "no array" in run_error(capsys, "train", str(REAL_L5), "--weight-key", "nope")


@needs_real_router
def test_example_runs():
    example = Path(__file__).resolve().parents[1] / "examples" / "train_router.py"
    done = subprocess.run([sys.executable, str(example), "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "max/mean load" in done.stdout

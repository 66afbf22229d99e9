"""``moe-router balance``: per-step loads and drops with the expert-bias balancer, JSON, --plot, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest

import moe_router as mr
from moe_router.cli import main
from moe_router.data import default_logits
from helpers import balance_json, run_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reference_curve(logits: np.ndarray, cfg: mr.RouterConfig, steps: int, rate: float = None) -> List[dict]:
    """What the command must report: route in training mode, feed a LoadBalancer, repeat."""
    lb = mr.LoadBalancer(cfg.num_experts, bias_update_rate=rate)
    rows = []
    for step in range(steps):
        bias = lb.expert_bias
        dec = mr.route_logits(logits, cfg, training=True, expert_bias=bias if bias.any() else None, step=step)
        pre = dec.pre_drop_tokens_per_expert
        mean = dec.active_tokens * cfg.top_k / cfg.num_experts
        rows.append({"step": step, "max_load": int(pre.max()), "mean_load": mean,
                     "max_over_mean": int(pre.max()) / mean, "dropped_assignments": dec.dropped_assignments,
                     "tokens_dropped": dec.tokens_dropped, "pre_drop": pre.tolist()})
        lb.update(dec)
    rows[-1]["bias"] = lb.expert_bias.tolist()
    return rows


@pytest.fixture
def skewed(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(400, 8)).astype(np.float32)
    logits[:, 0] += 2.0
    path = tmp_path / "skewed.npy"
    np.save(path, logits)
    return path


def assert_rows_match(report: dict, ref: List[dict]) -> None:
    assert len(report["steps"]) == len(ref)
    for got, want in zip(report["steps"], ref):
        for key in ("step", "max_load", "mean_load", "max_over_mean", "dropped_assignments", "tokens_dropped"):
            assert got[key] == pytest.approx(want[key]), (got["step"], key)
    assert report["first"] == report["steps"][0] and report["last"] == report["steps"][-1]
    assert report["pre_drop_tokens_per_expert"]["first"] == ref[0]["pre_drop"]
    assert report["pre_drop_tokens_per_expert"]["last"] == ref[-1]["pre_drop"]
    np.testing.assert_allclose(report["expert_bias"], ref[-1]["bias"])


# --------------------------------------------------------------------------- output


def test_default_json_balances_the_embedded_sample(capsys: pytest.CaptureFixture) -> None:
    report = balance_json(capsys, "--steps", "20")
    assert report["command"] == "balance" and report["source"]["kind"] == "embedded"
    assert (report["tokens"], report["experts"], report["top_k"], report["capacity"]) == (4096, 64, 2, 160)
    assert report["rate"] == pytest.approx(0.1 / 64)
    assert report["config"]["training"] is True and report["plot"] is None
    logits, _ = default_logits()
    ref = reference_curve(logits, mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25), 20)
    assert_rows_match(report, ref)
    first, last = report["first"], report["last"]
    assert first["max_over_mean"] == pytest.approx(17.0)  # 2176 / 128: the real skew
    assert first["bias_spread"] == 0.0 and last["bias_spread"] > 0
    assert last["max_over_mean"] < first["max_over_mean"]
    assert last["dropped_assignments"] < first["dropped_assignments"]
    assert report["assignments"] == 8192
    assert isinstance(report["balancer"]["imbalanced"], bool)


def test_text_report(capsys: pytest.CaptureFixture, skewed: Path) -> None:
    assert main(["balance", str(skewed), "--steps", "6", "--rate", "0.02", "--top-k", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    ref = reference_curve(np.load(skewed), mr.RouterConfig(num_experts=8, top_k=1), 6, rate=0.02)
    lines = out.splitlines()
    assert lines[0].startswith("moe-router balance")
    assert any(line.startswith("bias rate") and "0.02 per step" in line for line in lines)
    header = [line for line in lines if line.split()[:1] == ["step"]]
    assert header and "max/mean" in header[0] and "dropped assignments" in header[0]
    table = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(cells[0]) for cells in table] == list(range(6))
    for cells, want in zip(table, ref):
        assert cells[1] == str(want["max_load"])
        assert cells[2] == f"{want['mean_load']:.1f}"
        assert cells[3] == f"{want['max_over_mean']:.2f}"
        assert cells[4] == str(want["dropped_assignments"])
        assert cells[5] == str(want["tokens_dropped"])
    summary = [line for line in lines if line.startswith("max/mean load")][0]
    assert f"{ref[0]['max_over_mean']:.2f} -> {ref[-1]['max_over_mean']:.2f}" in summary
    drops = [line for line in lines if line.startswith("dropped assignments")][0]
    assert f"{ref[0]['dropped_assignments']} -> {ref[-1]['dropped_assignments']}" in drops


def table_steps(out: str) -> List[int]:
    """The step numbers of the balance table's rows."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["step"])
    return [int(line.split()[0]) for line in lines[header + 1:] if line.split()[:1] and line.split()[0].isdigit()]


def test_long_runs_print_a_compact_table(capsys: pytest.CaptureFixture, skewed: Path) -> None:
    assert main(["balance", str(skewed), "--steps", "60"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no progress bar when standard error is not a terminal
    assert table_steps(out) == list(range(0, 60, 5)) + [59]
    assert "one row per 5 steps, and the last" in out
    assert main(["balance", str(skewed), "--steps", "20"]) == 0
    assert table_steps(capsys.readouterr().out) == list(range(20))  # short runs: every step
    assert main(["balance", str(skewed), "--steps", "30", "--every", "7"]) == 0
    assert table_steps(capsys.readouterr().out) == [0, 7, 14, 21, 28, 29]
    report = balance_json(capsys, str(skewed), "--steps", "60")
    assert len(report["steps"]) == 60 and report["table_every"] == 5  # JSON keeps every step
    assert "--every" in run_error(capsys, "balance", str(skewed), "--every", "0")


@pytest.mark.parametrize("steps, every", [(1, 1), (20, 1), (21, 2), (40, 2), (41, 5), (100, 5), (101, 10),
                                          (1000, 50), (1001, 100)])
def test_table_stride(steps: int, every: int) -> None:
    from moe_router.cli.render import table_every
    assert table_every(steps, None, 20) == every
    assert table_every(steps, 3, 20) == 3


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                    skewed: Path) -> None:
    import io
    from rich.console import Console
    from moe_router.cli import render
    screen = io.StringIO()
    monkeypatch.setattr(render, "progress_console",
                        lambda: Console(file=screen, force_terminal=True, force_interactive=True, width=100))
    assert main(["balance", str(skewed), "--steps", "25"]) == 0
    out, err = capsys.readouterr()
    assert "balancing" in screen.getvalue() and "25/25" in screen.getvalue()
    assert "balancing" not in out and err == ""  # the report itself is unchanged on stdout
    assert table_steps(out) == list(range(0, 25, 2))  # 24, the last, is on the stride


def test_npz_key_and_routing_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(2, 150, 16)).astype(np.float32)
    logits[..., 3] += 1.5
    path = tmp_path / "l.npz"
    np.savez(path, other=np.zeros((3, 3), np.float32), logits=logits)
    report = balance_json(capsys, str(path), "--key", "logits", "--steps", "8", "--rate", "0.01",
                      "--num-experts", "16", "--top-k", "2", "--capacity-factor", "1.1",
                      "--drop-policy", "rank", "--normalize-weights")
    cfg = mr.RouterConfig(num_experts=16, top_k=2, capacity_factor=1.1, drop_policy="rank",
                          normalize_weights=True)
    assert_rows_match(report, reference_curve(logits, cfg, 8, rate=0.01))
    assert report["capacity"] == 42  # ceil(11/10 * 300 * 2 / 16) = ceil(41.25)
    assert report["rate"] == 0.01 and report["source"]["key"] == "logits"
    assert report["config"]["drop_policy"] == "rank"


def test_dropless_and_zero_rate(capsys: pytest.CaptureFixture, skewed: Path) -> None:
    report = balance_json(capsys, str(skewed), "--steps", "3", "--capacity-factor", "none", "--rate", "0")
    assert report["dropless"] and report["rate"] == 0.0
    assert all(r["dropped_assignments"] == 0 and r["tokens_dropped"] == 0 for r in report["steps"])
    assert len({r["max_load"] for r in report["steps"]}) == 1  # no bias: the same routing every step
    assert report["last"]["bias_spread"] == 0.0


def test_help_lists_balance(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "balance" in capsys.readouterr().out
    assert main(["balance", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "--rate" in out and "--plot" in out and "moe_router[plot]" in out
    assert '".[plot]"' in out and "--every" in out


# --------------------------------------------------------------------------- --plot


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture, skewed: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "load.png"
    report = balance_json(capsys, str(skewed), "--steps", "4", "--plot", str(out))
    assert report["plot"] == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    # Text mode names the file too.
    out2 = tmp_path / "load2.png"
    assert main(["balance", str(skewed), "--steps", "2", "--plot", str(out2)]) == 0
    assert str(out2) in capsys.readouterr().out
    assert out2.read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    err = run_error(capsys, "balance", "--steps", "2", "--plot", str(tmp_path / "x.png"))
    assert "matplotlib" in err and "pip install 'moe_router[plot]'" in err
    assert 'from a source checkout: pip install ".[plot]"' in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("target, needle", [
    ("missing_dir/x.png", "no such directory"),
    (".", "is a directory"),
    ("x.notanimage", "unsupported image type"),
])
def test_plot_bad_targets(target: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    err = run_error(capsys, "balance", "--steps", "2", "--plot", str(tmp_path / target))
    assert needle in err


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps"),
    (["--steps", "many"], "--steps"),
    (["--rate", "-0.1"], "--rate"),
    (["--rate", "nan"], "--rate"),
    (["--rate", "inf"], "--rate"),
    (["--num-experts", "16"], "does not match"),
    (["--top-k", "9"], "top_k"),
    (["--capacity-factor", "0"], "none"),
    (["--key", "x"], "--key"),
    (["--repeat", "3"], "repeat"),
])
def test_error_bad_options(argv: list, needle: str, capsys: pytest.CaptureFixture, skewed: Path) -> None:
    err = run_error(capsys, "balance", str(skewed), *argv)
    assert needle in err


def test_error_missing_file_and_key_without_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no such file" in run_error(capsys, "balance", str(tmp_path / "nope.npy"))
    assert "--key" in run_error(capsys, "balance", "--key", "logits")


def test_error_nan_logits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = np.zeros((10, 4), np.float32)
    bad[6, 2] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, bad)
    err = run_error(capsys, "balance", str(path), "--steps", "2")
    assert "NaN" in err and "6" in err


def test_python_m_balance_json() -> None:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "moe_router", "balance", "--steps", "3", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["steps"]) == 3 and report["experts"] == 64

"""The ``moe-router`` command line: reports, inputs, options and error paths."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moe_router as mr
from moe_router.cli import main
from moe_router.data import default_logits
from conftest import REAL_L5, needs_real_router
from helpers import assert_matches, route_json, run_error, text_report


@pytest.fixture
def logits8(tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.normal(size=(300, 8)).astype(np.float32)


# --------------------------------------------------------------------------- embedded default


def test_default_data_is_the_real_sample() -> None:
    logits, meta = default_logits()
    assert logits.shape == (4096, 64) and logits.dtype == np.float32 and logits.flags.c_contiguous
    assert np.isfinite(logits).all()
    assert meta["layer"] == 5 and meta["num_experts"] == 64 and meta["tokens"] == 4096
    assert meta["key"] == "logits_e64" and meta["source"].endswith("minilm_l5.npz")


@needs_real_router
def test_default_data_equals_the_first_4096_shared_tokens() -> None:
    logits, _ = default_logits()
    with np.load(REAL_L5) as z:
        source = z["logits_e64"][:4096]
    assert source.dtype == logits.dtype
    assert np.array_equal(source.view(np.uint32), logits.view(np.uint32))  # bit for bit


def test_default_json_equals_route_logits(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys)
    assert (report["tokens"], report["experts"], report["top_k"]) == (4096, 64, 2)
    assert report["source"]["kind"] == "embedded"
    logits, _ = default_logits()
    decision = mr.route_logits(logits, mr.RouterConfig(num_experts=64, top_k=2))
    assert_matches(report, decision)
    assert report["capacity"] == 160 and not report["dropless"]  # ceil(1.25 * 4096 * 2 / 64)
    assert report["dropped_assignments"] > 0 and report["tokens_dropped"] > 0
    assert report["timing"]["calls"] == 1 and report["timing"]["min_ms"] > 0


def test_default_text_report(capsys: pytest.CaptureFixture) -> None:
    out, lines, row = text_report(capsys, "route", "--repeat", "2")
    logits, _ = default_logits()
    decision = mr.route_logits(logits, mr.RouterConfig(num_experts=64, top_k=2))

    assert row("tokens").split()[1] == "4096"
    assert row("experts").split()[1] == "64"
    assert row("top_k").split()[1] == "2"
    assert row("capacity").split()[1] == "160"
    assert row("dropped assignments").split()[2] == str(decision.dropped_assignments)
    assert row("tokens dropped").split()[2] == str(decision.tokens_dropped)
    assert row("routing efficiency").split()[2] == f"{decision.routing_efficiency():.4f}"
    assert row("load_balance_cv").split()[1] == f"{decision.load_balance_cv():.4f}"
    assert row("load_balance_loss").split()[1] == f"{decision.load_balance_loss:.6g}"
    assert row("router_z_loss").split()[1] == f"{decision.router_z_loss:.6g}"
    assert row("auxiliary_loss").split()[1] == f"{decision.auxiliary_loss:.6g}"
    assert "median of 2 calls" in row("routing time")
    # The chart names the busiest and the idlest expert with their routed counts.
    pre = decision.pre_drop_tokens_per_expert
    chart = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    shown = {int(cells[0]): int(cells[-2]) for cells in chart}  # expert -> routed count
    assert len(shown) == 16 and "48 more experts" in out
    busiest = int(np.argmax(pre))
    assert shown[busiest] == pre.max()
    assert min(shown.values()) == pre.min()
    assert all(shown[e] == pre[e] for e in shown)


def test_text_report_on_an_ascii_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["route", "--repeat", "1"]) == 0
    stream.flush()
    text = raw.getvalue().decode("ascii")  # nothing outside ASCII was written
    assert "| capacity" in text and "... 48 more experts ..." in text


def test_help_and_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["route", "--help"]) == 0
    assert "--capacity-factor" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert "moe-router" in capsys.readouterr().out
    assert main([]) == 2  # no command: usage on stderr
    assert "route" in capsys.readouterr().err


def test_bare_command_says_a_command_is_required(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[0] == ("moe-router: a command is required: route, balance, plan, ep, placement, train or "
                                      "replay-diff "
                                      "(see 'moe-router COMMAND --help')")
    assert lines[1].startswith("usage: moe-router")


def chart_rows(lines: list) -> list:
    """The expert rows of a route load chart: cells of the lines that start with an expert number."""
    return [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]


def test_all_experts_and_top(capsys: pytest.CaptureFixture) -> None:
    out, lines, _ = text_report(capsys, "route", "--repeat", "1", "--all-experts")
    rows = chart_rows(lines)
    assert sorted(int(r[0]) for r in rows) == list(range(64)) and "more experts" not in out
    assert "Per-expert load (every expert" in out
    report = route_json(capsys, "--all-experts")
    assert len(report["load_chart"]["experts"]) == 64 and report["load_chart"]["not_shown"] == 0
    pre = [r["pre_drop"] for r in report["load_chart"]["experts"]]
    assert pre == sorted(pre, reverse=True)
    out, lines, _ = text_report(capsys, "route", "--repeat", "1", "--top", "3")
    rows = chart_rows(lines)
    assert len(rows) == 6 and "58 more experts" in out
    # the gap line sits between the three busiest and the three idlest
    gap = next(i for i, line in enumerate(lines) if "more experts" in line)
    assert [i for i, line in enumerate(lines) if line.split()[:1] and line.split()[0].isdigit()][3] == gap + 1
    report = route_json(capsys, "--top", "30")
    assert len(report["load_chart"]["experts"]) == 60 and report["load_chart"]["not_shown"] == 4
    assert "--top" in run_error(capsys, "route", "--top", "0")
    assert "not allowed with" in run_error(capsys, "route", "--top", "2", "--all-experts")


def test_dropless_legend_names_no_drops_or_capacity(capsys: pytest.CaptureFixture) -> None:
    out, lines, _ = text_report(capsys, "route", "--repeat", "1", "--capacity-factor", "none")
    start = next(i for i, line in enumerate(lines) if line.startswith("Per-expert load"))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    chart = "\n".join(lines[start:end])
    assert "kept" in chart and "% cap" not in chart
    for word in ("drop", "capacity", "│", "░"):
        assert word not in chart, word
    # With a capacity, the legend explains drops and the capacity mark.
    out, lines, _ = text_report(capsys, "route", "--repeat", "1")
    assert any("dropped" in line and "capacity" in line and line.startswith("█ kept") for line in lines)
    assert "experts over capacity" in out


def test_route_json_names_its_command(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys)
    assert next(iter(report)) == "command" and report["command"] == "route"


# --------------------------------------------------------------------------- inputs and options


def test_npy_input(tmp_path: Path, capsys: pytest.CaptureFixture, logits8: np.ndarray) -> None:
    path = tmp_path / "logits.npy"
    np.save(path, logits8)
    report = route_json(capsys, str(path), "--top-k", "1", "--capacity-factor", "1.1")
    decision = mr.route_logits(logits8, mr.RouterConfig(num_experts=8, top_k=1, capacity_factor=1.1))
    assert_matches(report, decision)
    assert report["capacity"] == 42  # ceil(11/10 * 300 / 8) = ceil(41.25)
    assert report["source"]["path"] == str(path) and report["source"]["key"] is None


def test_npz_with_key(tmp_path: Path, capsys: pytest.CaptureFixture, logits8: np.ndarray) -> None:
    path = tmp_path / "many.npz"
    np.savez(path, first=logits8, second=logits8[::-1].copy(), ids=np.arange(5))
    report = route_json(capsys, str(path), "--key", "second", "--num-experts", "8",
                      "--drop-policy", "rank", "--normalize-weights")
    cfg = mr.RouterConfig(num_experts=8, top_k=2, drop_policy="rank", normalize_weights=True)
    assert_matches(report, mr.route_logits(logits8[::-1].copy(), cfg))
    assert report["source"]["key"] == "second"
    assert report["config"]["drop_policy"] == "rank" and report["config"]["normalize_weights"] is True


def test_npz_single_float_array_is_chosen(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         logits8: np.ndarray) -> None:
    path = tmp_path / "one.npz"
    batched = logits8.reshape(3, 100, 8)
    np.savez_compressed(path, logits=batched, token_ids=np.arange(300, dtype=np.int32))
    report = route_json(capsys, str(path), "--score-function", "sigmoid", "--capacity-factor", "none")
    cfg = mr.RouterConfig(num_experts=8, top_k=2, score_function="sigmoid", capacity_factor=None)
    decision = mr.route_logits(batched, cfg)
    assert_matches(report, decision)
    assert report["dropless"] and report["dropped_assignments"] == 0
    assert report["seq_load_balance_loss"] is not None  # [B, S, E] input
    assert report["source"]["key"] == "logits" and report["source"]["shape"] == [3, 100, 8]


@pytest.mark.parametrize("policy", ["position", "rank", "probs", "bpr"])
def test_drop_policies(policy: str, tmp_path: Path, capsys: pytest.CaptureFixture, logits8: np.ndarray) -> None:
    path = tmp_path / "l.npy"
    np.save(path, logits8 * 3)
    report = route_json(capsys, str(path), "--drop-policy", policy, "--capacity-factor", "0.8")
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.8, drop_policy=policy)
    assert_matches(report, mr.route_logits(logits8 * 3, cfg))


@needs_real_router
def test_real_data_e256_k8_drops_tokens(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys, str(REAL_L5), "--key", "logits_e256", "--num-experts", "256", "--top-k", "8")
    assert (report["tokens"], report["experts"], report["top_k"]) == (16384, 256, 8)
    assert report["capacity"] == 640  # ceil(1.25 * 16384 * 8 / 256)
    assert report["tokens_dropped"] > 0
    assert report["dropped_assignments"] > report["tokens_dropped"]
    assert report["experts_over_capacity"] > 0


def test_json_is_strict_for_an_infinite_loss(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch, logits8: np.ndarray) -> None:
    """An overflowing loss is null in --json (never Infinity) and inf in the text report."""
    from moe_router.cli import route as route_command
    configured = route_command.config_from_args
    monkeypatch.setattr(route_command, "config_from_args",
                        lambda *a: configured(*a).replace(load_balance_loss_coeff=1e308))
    skewed = logits8.astype(np.float64)
    skewed[:, 0] += 3.0
    path = tmp_path / "skewed.npy"
    np.save(path, skewed)
    assert main(["route", str(path), "--json", "--repeat", "1"]) == 0
    out = capsys.readouterr().out

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    report = json.loads(out, parse_constant=refuse)
    assert report["auxiliary_loss"] is None and report["load_balance_loss"] > 1.0
    assert main(["route", str(path), "--repeat", "1"]) == 0
    assert capsys.readouterr().out.count(" inf ") == 1  # the auxiliary_loss row


# --------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = run_error(capsys, "route", str(tmp_path / "nope.npy"))
    assert "no such file" in err


def test_error_unknown_key_lists_keys(tmp_path: Path, capsys: pytest.CaptureFixture, logits8: np.ndarray) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, alpha=logits8, beta=logits8)
    err = run_error(capsys, "route", str(path), "--key", "gamma")
    assert "'gamma'" in err and "alpha" in err and "beta" in err


def test_error_ambiguous_npz_lists_candidates(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              logits8: np.ndarray) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, alpha=logits8, beta=logits8, ids=np.arange(3))
    err = run_error(capsys, "route", str(path))
    assert "--key" in err and "alpha" in err and "beta" in err and "ids" not in err


def test_error_nan_logits_names_the_token(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          logits8: np.ndarray) -> None:
    bad = logits8.copy()
    bad[17, 3] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, bad)
    err = run_error(capsys, "route", str(path))
    assert "NaN" in err and "17" in err


@pytest.mark.parametrize("argv, needle", [
    (["--num-experts", "16"], "does not match"),
    (["--top-k", "9"], "top_k"),
    (["--top-k", "0"], "--top-k"),
    (["--capacity-factor", "0"], "none"),
    (["--capacity-factor", "-1.5"], "none"),
    (["--capacity-factor", "lots"], "--capacity-factor"),
    (["--drop-policy", "random"], "--drop-policy"),
    (["--score-function", "relu"], "--score-function"),
    (["--repeat", "0"], "--repeat"),
    (["--key", "x"], "--key"),
    (["--no-such-option"], "no-such-option"),
])
def test_error_bad_options(argv: list, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                           logits8: np.ndarray) -> None:
    path = tmp_path / "l.npy"
    np.save(path, logits8)
    err = run_error(capsys, "route", str(path), *argv)
    assert needle in err


@pytest.mark.parametrize("make, needle", [
    (lambda p: np.save(p / "i.npy", np.ones((3, 4), dtype=bool)), "floating-point or integer"),
    (lambda p: np.save(p / "i.npy", np.ones((3, 4), dtype=np.complex64)), "complex64"),
    (lambda p: np.save(p / "i.npy", np.zeros(5, dtype=np.float32)), "shape"),
    (lambda p: (p / "i.npz").write_bytes(b"not a zip"), "cannot read"),
    (lambda p: (p / "i.txt").write_text("1 2 3"), ".npy or .npz"),
])
def test_error_bad_files(make, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    err = run_error(capsys, "route", str(path))
    assert needle in err


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.float16, np.float64, np.bool_,
                                   np.complex128], ids=lambda d: np.dtype(d).name)
def test_file_dtypes_follow_the_api(dtype, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command routes a file exactly when route_logits accepts its array, with the same result."""
    logits = (np.arange(40).reshape(10, 4) % 7).astype(dtype)
    path = tmp_path / "l.npy"
    np.save(path, logits)
    cfg = mr.RouterConfig(num_experts=4, top_k=2)
    try:
        decision = mr.route_logits(logits, cfg)
    except TypeError:
        assert "router logits must be floating-point or integer" in run_error(capsys, "route", str(path))
        return
    report = route_json(capsys, str(path))
    assert_matches(report, decision)
    assert report["source"]["dtype"] == np.dtype(dtype).name


def test_integer_npz_is_chosen_when_no_float_array(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ints = np.arange(60, dtype=np.int32).reshape(3, 5, 4) % 5
    path = tmp_path / "ints.npz"
    np.savez(path, logits=ints, lengths=np.array([5, 5, 5]))
    report = route_json(capsys, str(path))
    assert report["source"]["key"] == "logits"
    assert_matches(report, mr.route_logits(ints, mr.RouterConfig(num_experts=4, top_k=2)))
    # With a float array there, the float array is the logits (an integer mask is not).
    np.savez(path, mask=np.ones((3, 5), np.int8), logits=ints.astype(np.float32))
    assert route_json(capsys, str(path))["source"]["key"] == "logits"


def test_error_key_without_file(capsys: pytest.CaptureFixture) -> None:
    assert "--key" in run_error(capsys, "route", "--key", "logits")


# --------------------------------------------------------------------------- as a process


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return env


def test_python_m_route_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "moe_router", "route", "--json", "--repeat", "1"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["tokens"], report["experts"], report["top_k"], report["capacity"]) == (4096, 64, 2, 160)


def test_python_m_error_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moe_router", "route", str(tmp_path / "missing.npz")],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("moe-router: error: no such file")

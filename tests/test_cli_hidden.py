"""``moe-router route --hidden``: the hidden-state path of the command line, against a direct
``ExpertRouter`` call."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import moe_router as mr
from moe_router.cli import main
from conftest import REAL_L5, needs_real_router
from helpers import assert_matches, route_json, run_error, text_report

E64 = ("--weight-key", "router_weight_e64", "--bias-key", "router_bias_e64")

_REAL = {}


def real(key: str) -> np.ndarray:
    if key not in _REAL:
        with np.load(REAL_L5) as z:
            _REAL[key] = z[key]
    return _REAL[key]


def direct(weight_key: str = "router_weight_e64", bias_key: Optional[str] = "router_bias_e64",
           router_dtype: Optional[str] = None, **config) -> mr.RoutingDecision:
    weight = real(weight_key)
    bias = None if bias_key is None else real(bias_key)
    cfg = mr.RouterConfig(num_experts=weight.shape[1], **{"top_k": 2, **config})
    router = mr.ExpertRouter(cfg, weight.shape[0], weight=weight, bias=bias, gate="linear",
                             router_dtype=router_dtype)
    return router.route_tokens(real("hidden"))


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    """float32 hidden states [4, 50, 12] under a custom key, a [12, 6] weight, a [6] bias."""
    rng = np.random.default_rng(5)
    path = tmp_path / "small.npz"
    np.savez(path, states=rng.normal(size=(4, 50, 12)).astype(np.float32),
             w=(rng.normal(size=(12, 6)) / 4).astype(np.float32), b=rng.normal(size=6).astype(np.float32),
             w_wide=np.zeros((13, 6), dtype=np.float32), w_int=np.zeros((12, 6), dtype=np.int32),
             flat=np.zeros(12, dtype=np.float32), hidden=np.zeros((3, 12), dtype=np.float32))
    return path


# --------------------------------------------------------------------------- real data


@needs_real_router
def test_json_equals_a_direct_expert_router_call(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys, "--hidden", str(REAL_L5), *E64)
    assert_matches(report, direct())
    assert (report["tokens"], report["experts"], report["top_k"]) == (16384, 64, 2)
    assert report["capacity"] == 640 and report["dropped_assignments"] > 0  # ceil(1.25 * 16384 * 2 / 64)
    assert report["router"] == {
        "kind": "linear", "input_dim": 384, "num_experts": 64, "dtype": "float64", "router_dtype": None,
        "weight_key": "router_weight_e64", "bias_key": "router_bias_e64", "hidden_key": "hidden"}
    src = report["source"]
    assert src["kind"] == "hidden" and src["key"] == "hidden" and src["path"] == str(REAL_L5)
    assert src["shape"] == [16384, 384] and src["dtype"] == "float16"
    assert "router_weight_e64" in src["label"] and "router_bias_e64" in src["label"]
    assert report["timing"]["calls"] == 1 and report["timing"]["min_ms"] > 0


@needs_real_router
def test_json_float32_router_dtype_and_options(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys, "--hidden", str(REAL_L5), *E64, "--router-dtype", "float32", "-k", "1",
                      "-c", "1.1", "--drop-policy", "probs")
    assert report["router"]["dtype"] == "float32" and report["router"]["router_dtype"] == "float32"
    assert_matches(report, direct(router_dtype="float32", top_k=1, capacity_factor=1.1, drop_policy="probs"))
    # float64 on request; no bias; dropless sigmoid with normalized weights.
    report = route_json(capsys, "--hidden", str(REAL_L5), "--weight-key", "router_weight_e256",
                      "--router-dtype", "float64", "-c", "none", "--score-function", "sigmoid",
                      "--normalize-weights", "--top-k", "8", "--threads", "1")
    assert report["router"]["bias_key"] is None and report["router"]["num_experts"] == 256
    assert report["dropless"] and report["dropped_assignments"] == 0
    assert_matches(report, direct("router_weight_e256", None, router_dtype="float64", top_k=8,
                                  capacity_factor=None, score_function="sigmoid", normalize_weights=True))
    mr.set_num_threads(0)


@needs_real_router
def test_text_report(capsys: pytest.CaptureFixture) -> None:
    out, lines, row = text_report(capsys, "route", "--hidden", str(REAL_L5), *E64, "--repeat", "2")
    decision = direct()

    assert row("router").split(None, 1)[1].strip() == "linear, D=384, dtype float64"
    assert "16384 x 384, float16" in row("tokens")
    assert row("experts").split()[1] == "64"
    assert row("capacity").split()[1] == "640"
    assert row("dropped assignments").split()[2] == str(decision.dropped_assignments)
    assert row("tokens dropped").split()[2] == str(decision.tokens_dropped)
    assert row("routing efficiency").split()[2] == f"{decision.routing_efficiency():.4f}"
    assert row("load_balance_loss").split()[1] == f"{decision.load_balance_loss:.6g}"
    assert row("router_z_loss").split()[1] == f"{decision.router_z_loss:.6g}"
    assert "median of 2 calls" in row("routing time")
    pre = decision.pre_drop_tokens_per_expert
    chart = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    shown = {int(cells[0]): int(cells[-2]) for cells in chart}
    assert shown[int(np.argmax(pre))] == pre.max()
    assert all(shown[e] == pre[e] for e in shown)


def test_logits_path_report_has_no_router_entry(capsys: pytest.CaptureFixture) -> None:
    report = route_json(capsys)
    assert "router" not in report and report["source"]["kind"] == "embedded"


# --------------------------------------------------------------------------- a small file


def test_hidden_key_batched_float32_without_bias(capsys: pytest.CaptureFixture, small_npz: Path) -> None:
    report = route_json(capsys, "--hidden", str(small_npz), "--hidden-key", "states", "--weight-key", "w",
                      "-k", "2", "-c", "1.0")
    with np.load(small_npz) as z:
        hidden, weight, bias = z["states"], z["w"], z["b"]
    cfg = mr.RouterConfig(num_experts=6, top_k=2, capacity_factor=1.0)
    decision = mr.ExpertRouter(cfg, 12, weight=weight).route_tokens(hidden)
    assert_matches(report, decision)
    assert report["router"]["dtype"] == "float32" and report["router"]["hidden_key"] == "states"
    assert report["source"]["shape"] == [4, 50, 12] and report["seq_load_balance_loss"] is not None
    # With the bias: the decision of hidden @ W + b, here equal to route_logits on float64 logits.
    report = route_json(capsys, "--hidden", str(small_npz), "--hidden-key", "states", "--weight-key", "w",
                      "--bias-key", "b", "--router-dtype", "float64")
    logits = hidden.astype(np.float64) @ weight.astype(np.float64) + bias
    assert_matches(report, mr.route_logits(logits, mr.RouterConfig(num_experts=6, top_k=2)))


def test_python_m_route_hidden(small_npz: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moe_router", "route", "--hidden", str(small_npz),
                           "--hidden-key", "states", "--weight-key", "w", "--json", "--repeat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["router"]["input_dim"] == 12


def test_help_lists_the_hidden_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["route", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--hidden", "--weight-key", "--bias-key", "--hidden-key", "--router-dtype"):
        assert flag in out


# --------------------------------------------------------------------------- errors (exit 2)


@pytest.mark.parametrize("argv,needle", [
    (["--hidden", "{f}"], "--weight-key"),
    (["--hidden", "{f}", "--weight-key", "nope"], "no array 'nope'"),
    (["--hidden", "{f}", "--weight-key", "w", "--hidden-key", "nope"], "no array 'nope'"),
    (["--hidden", "{f}", "--weight-key", "w", "--bias-key", "nope"], "no array 'nope'"),
    (["--hidden", "{f}", "--weight-key", "w_wide", "--hidden-key", "states"], r"\[13, 6\]"),
    (["--hidden", "{f}", "--weight-key", "w_int", "--hidden-key", "states"], "int32"),
    (["--hidden", "{f}", "--weight-key", "w", "--hidden-key", "flat"], r"\[12\]"),
    (["--hidden", "{f}", "--weight-key", "w", "--hidden-key", "states", "--bias-key", "flat"],
     r"\[12\].*\[6\]"),
    (["--hidden", "{f}", "--weight-key", "w", "--hidden-key", "states", "-E", "8"],
     "--num-experts 8 does not match"),
    (["--hidden", "{f}", "--weight-key", "w", "--hidden-key", "states", "--top-k", "7"], "top_k"),
    (["--hidden", "{f}", "--weight-key", "w", "--router-dtype", "float16"], "router-dtype"),
    (["--hidden", "{f}", "--weight-key", "w", "--key", "states"], "--key"),
    (["{f}", "--hidden", "{f}", "--weight-key", "w"], "not both"),
])
def test_errors_exit_2(argv: list, needle: str, capsys: pytest.CaptureFixture, small_npz: Path) -> None:
    argv = [a.replace("{f}", str(small_npz)) for a in argv]
    err = run_error(capsys, "route", *argv)
    assert re.search(needle, err), err


@pytest.mark.parametrize("flags", [["--weight-key", "w"], ["--bias-key", "b"], ["--hidden-key", "x"],
                                   ["--router-dtype", "float32"]])
def test_hidden_options_need_hidden(flags: list, capsys: pytest.CaptureFixture) -> None:
    err = run_error(capsys, "route", *flags)
    assert flags[0] in err and "--hidden" in err


def test_errors_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no such file" in run_error(capsys, "route", "--hidden", str(tmp_path / "missing.npz"), "--weight-key", "w")
    npy = tmp_path / "h.npy"
    np.save(npy, np.zeros((3, 4), dtype=np.float32))
    assert ".npz" in run_error(capsys, "route", "--hidden", str(npy), "--weight-key", "w")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    assert "cannot read" in run_error(capsys, "route", "--hidden", str(bad), "--weight-key", "w")
    assert ".npz" in run_error(capsys, "route", "--hidden", str(tmp_path), "--weight-key", "w")


def test_error_nan_hidden_names_the_token(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hidden = np.random.default_rng(1).normal(size=(700, 8))
    hidden[613, 2] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, hidden=hidden, w=np.ones((8, 4)))
    err = run_error(capsys, "route", "--hidden", str(path), "--weight-key", "w")
    assert "token 613" in err and "NaN" in err


def test_dtypes_follow_the_api(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Integer biases route as in ExpertRouter; integer hidden states and weights are refused by both."""
    rng = np.random.default_rng(3)
    hidden, weight = rng.normal(size=(40, 12)), rng.normal(size=(12, 6)) / 4
    bias = np.array([0, 1, 0, -1, 2, 0], dtype=np.int64)
    path = tmp_path / "mixed.npz"
    np.savez(path, hidden=hidden, w=weight, b=bias, h_int=np.ones((40, 12), np.int32),
             w_int=weight.astype(np.int32))
    report = route_json(capsys, "--hidden", str(path), "--weight-key", "w", "--bias-key", "b")
    cfg = mr.RouterConfig(num_experts=6, top_k=2)
    assert_matches(report, mr.ExpertRouter(cfg, 12, weight=weight, bias=bias, gate="linear").route_tokens(hidden))
    with pytest.raises(TypeError):
        mr.ExpertRouter(cfg, 12, weight=weight, gate="linear").route_tokens(np.ones((40, 12), np.int32))
    err = run_error(capsys, "route", "--hidden", str(path), "--weight-key", "w", "--hidden-key", "h_int")
    assert "int32" in err and "hidden states must be floating-point" in err
    with pytest.raises(TypeError):
        mr.ExpertRouter(cfg, 12, weight=weight.astype(np.int32), gate="linear")
    err = run_error(capsys, "route", "--hidden", str(path), "--weight-key", "w_int")
    assert "a router weight must be floating-point" in err

"""``moe-router plan``: the dispatch plan report against the plan itself."""

from __future__ import annotations

import numpy as np

import moe_router as mr
from helpers import cli_json, run_error, text_report
from moe_router.data import default_logits


def test_plan_report_equals_the_plan(capsys):
    report = cli_json(capsys, "plan", "--alignment", "16", "--json", "-D", "1024")
    logits, _ = default_logits()
    dec = mr.route_logits(logits, mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25))
    plan = dec.dispatch_plan(alignment=16)
    assert report["command"] == "plan" and report["num_rows"] == plan.num_rows
    assert report["padding_rows"] == plan.padding_rows and report["real_rows"] == dec.kept_assignments
    assert [r["rows"] for r in report["per_expert"]] == plan.rows_per_expert.tolist()
    assert [r["real"] for r in report["per_expert"]] == plan.tokens_per_expert.tolist()
    assert report["permute_bytes"] == (dec.kept_assignments + plan.num_rows) * 1024 * 2
    assert report["padding_percent"] == 100.0 * plan.padding_rows / plan.num_rows


def test_plan_pad_to_capacity_and_text(capsys, tmp_path):
    report = cli_json(capsys, "plan", "--pad-to-capacity", "--json")
    assert {r["rows"] for r in report["per_expert"]} == {report["capacity"]}
    _, _, row = text_report(capsys, "plan", "-a", "8")
    assert "padding" in row("rows") and "permute" in row("bytes moved")
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert "dropless" in run_error(capsys, "plan", str(tmp_path / "x.npy"), "-c", "none", "--pad-to-capacity")
    assert "--alignment" in run_error(capsys, "plan", "-a", "0")


def test_placement_report_equals_plan_placement(capsys):
    report = cli_json(capsys, "placement", "--ranks", "8", "--replicas", "72", "--json")
    logits, _ = default_logits()
    dec = mr.route_logits(logits, mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25))
    want = mr.plan_placement(dec.pre_drop_tokens_per_expert, 8, num_replicas=72)
    assert report["expert_ranks"] == want.expert_ranks and report["physical_slots"] == 72
    assert report["imbalance_after"] == want.imbalance_after < report["imbalance_before"]
    assert "--ranks" in run_error(capsys, "placement")
    assert "num_replicas" in run_error(capsys, "placement", "--ranks", "8", "--replicas", "70")

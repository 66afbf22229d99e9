"""``moe-router placement``: route logits, count each expert's load and print DeepSeek EPLB's placement advice."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from .. import plan_placement
from ..routing import route_logits
from .loading import load_logits
from .parsing import apply_threads, config_from_args, config_summary
from .render import emit, render_placement
from .route import report_head


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router placement``: loads are the routed (pre-drop) assignments per expert."""
    logits, source = load_logits(args)
    apply_threads(args)
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    decision = route_logits(logits, config)
    load = decision.pre_drop_tokens_per_expert
    placement = plan_placement(load, args.ranks, num_replicas=args.replicas)
    report: Dict[str, Any] = {
        "command": "placement", **report_head(decision, source, config_summary(config, False)),
        "ranks": args.ranks, "physical_slots": len(placement.physical),
        "imbalance_before": placement.imbalance_before, "imbalance_after": placement.imbalance_after,
        "rank_load_before": None if placement.rank_load_before is None else placement.rank_load_before.tolist(),
        "rank_load_after": placement.rank_load_after.tolist(),
        "expert_ranks": placement.expert_ranks, "expert_load": load.tolist(),
    }
    return emit(report, args.json, render_placement)

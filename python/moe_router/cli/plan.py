"""``moe-router plan``: route logits and report the dispatch plan (rows per expert, padding, bytes moved)."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from ..routing import route_logits
from .loading import load_logits
from .parsing import apply_threads, config_from_args, config_summary
from .render import emit, render_plan
from .route import report_head

#: Bytes per element of the float16/bfloat16 hidden states whose movement is reported.
HALF_BYTES = 2


def build_plan_report(decision: Any, plan: Any, config: Any, source: Dict[str, Any], hidden_dim: int) -> Dict[str, Any]:
    """The plan report as JSON-ready data: per-expert real and padded rows, padding overhead, bytes."""
    real = int(plan.tokens_per_expert.sum())
    rows = plan.num_rows
    per_expert = [{"expert": e, "rows": int(r), "real": int(n), "padding": int(r - n)}
                  for e, (r, n) in enumerate(zip(plan.rows_per_expert, plan.tokens_per_expert))]
    return {
        "command": "plan",
        **report_head(decision, source, config_summary(config, False)),
        "alignment": plan.alignment,
        "pad_to_capacity": plan.pad_to_capacity,
        "num_rows": rows,
        "real_rows": real,
        "padding_rows": plan.padding_rows,
        "padding_percent": 100.0 * plan.padding_rows / rows if rows else 0.0,
        "hidden_dim": hidden_dim,
        # permute reads each real row once and writes every row; combine reads every row and writes T rows
        "permute_bytes": (real + rows) * hidden_dim * HALF_BYTES,
        "combine_bytes": (rows + decision.total_tokens) * hidden_dim * HALF_BYTES,
        "per_expert": per_expert,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router plan``."""
    logits, source = load_logits(args)
    apply_threads(args)
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    decision = route_logits(logits, config)
    plan = decision.dispatch_plan(alignment=args.alignment, pad_to_capacity=args.pad_to_capacity)
    return emit(build_plan_report(decision, plan, config, source, args.hidden_dim), args.json, render_plan)

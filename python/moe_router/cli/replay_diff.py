"""``moe-router replay-diff A B``: how many tokens' expert sets differ between two replay recordings."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import numpy as np

from ..decision import RecordedRoute, RecordedRoutes
from .render import emit, render_replay_diff


def _shape_mismatch(a: RecordedRoute, b: RecordedRoute) -> Optional[str]:
    """What makes two layers incomparable (T, k, E differ), or None."""
    parts = [f"{name} {x} vs {y}" for name, x, y in (("T", a.num_tokens, b.num_tokens), ("k", a.top_k, b.top_k),
                                                     ("E", a.num_experts, b.num_experts)) if x != y]
    return "; ".join(parts) or None


def compare(a: RecordedRoutes, b: RecordedRoutes) -> Dict[str, Any]:
    """Per layer: tokens routed in either recording, how many differ (expert set, or routed in one
    only: :meth:`RecordedRoute.differing_tokens`) and their share; then the layers that differ and,
    when every layer has the same T, the tokens that differ in at least one layer."""
    layers: List[Dict[str, Any]] = []
    flags: List[np.ndarray] = []
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b):
            layers.append({"layer": i, "mismatch": f"only in {'A' if i < len(a) else 'B'}"})
            continue
        mismatch = _shape_mismatch(a[i], b[i])
        if mismatch is not None:
            layers.append({"layer": i, "mismatch": mismatch})
            continue
        differ = a[i].differing_tokens(b[i])
        routed = int(np.count_nonzero(a[i].token_mask | b[i].token_mask))
        n = int(np.count_nonzero(differ))
        layers.append({"layer": i, "mismatch": None, "tokens": a[i].num_tokens, "routed_tokens": routed,
                       "differing_tokens": n, "differing_share": n / routed if routed else 0.0})
        flags.append(differ)
    compared = [row for row in layers if row["mismatch"] is None]
    differing = sum(1 for row in compared if row["differing_tokens"] > 0)
    comparable = len(compared) == len(layers)
    any_layer = None
    if comparable and flags and len({f.shape for f in flags}) == 1:
        union = np.logical_or.reduce(flags)
        routed = np.logical_or.reduce([a[i].token_mask | b[i].token_mask for i in range(len(a))])
        n_routed = int(np.count_nonzero(routed))
        any_layer = {"differing_tokens": int(np.count_nonzero(union)), "routed_tokens": n_routed,
                     "differing_share": int(np.count_nonzero(union)) / n_routed if n_routed else 0.0}
    return {"layers": layers, "comparable": comparable, "layers_compared": len(compared),
            "layers_differing": differing, "layers_differing_share": differing / len(compared) if compared else 0.0,
            "any_layer": any_layer}


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router replay-diff``: load both recordings, compare them layer by layer, report."""
    a, b = RecordedRoutes.load(args.a), RecordedRoutes.load(args.b)
    report = {"command": "replay-diff", "a": {"path": args.a, "layers": len(a)},
              "b": {"path": args.b, "layers": len(b)}, **compare(a, b)}
    return emit(report, args.json, render_replay_diff)

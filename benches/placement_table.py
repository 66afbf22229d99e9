#!/usr/bin/env python3
"""Placement advice on the real router data: max/mean rank load before and after ``plan_placement``.

For layers 3 and 5 of ``../shared/data/real_router`` (``minilm_l3.npz``, ``minilm_l5.npz``: 16,384 tokens
of real text through MiniLM, MoEfication router logits) and (E, k) in {(64, 2), (256, 8)}, the load is
the dropless top-k routed count per expert::

    load = mr.route_logits(logits, mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)).tokens_per_expert

For R in {4, 8, 16} ranks it prints the rank imbalance ``max / mean`` of the expected per-rank load:

* ``contiguous``: rank r holds experts ``[r*E/R, (r+1)*E/R)`` (Megatron-Core's layout),
* ``planned``: ``plan_placement(load, R)`` (no replicas; E/R experts per rank, balanced packing),
* ``planned +R``: ``plan_placement(load, R, num_replicas=E + R)`` (one extra slot per rank), with
  ``bound`` = the best any packing of those copies can reach, ``max(mean, max_e load_e / copies_e) / mean``,
  and ``measured``: the rows each rank actually receives when these 16,384 tokens are sent through
  ``dispatch_plan().all_to_all(placement)`` (replicas chosen by ``token % copies``), as max/mean.

``expert`` is the experts' own imbalance ``max / mean`` over E. A second table plans on half of the
tokens and measures the rows received for the other half (advice from past load, as EPLB is used):
even vs odd sequences (same text mix), and sequences 0-63 vs 64-127 (other text: a shift in load).

    python benches/placement_table.py [--data DIR] [--out PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import moe_router as mr

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_router"
LAYERS = (("minilm_l3.npz", 3), ("minilm_l5.npz", 5))
SHAPES = ((64, 2), (256, 8))
RANKS = (4, 8, 16)


def ratio(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.max() / x.mean()) if x.sum() > 0 else 1.0


def received_rows(decision: mr.RoutingDecision, placement: mr.ExpertPlacement) -> np.ndarray:
    """Rows each rank receives when one process sends this decision's kept assignments."""
    return decision.dispatch_plan().all_to_all(placement).send_counts


def route(logits: np.ndarray, experts: int, k: int) -> mr.RoutingDecision:
    return mr.route_logits(logits, mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=None))


def layers(data: Path):
    """(layer, {E: logits [T, E]}, seq_ids [T]) of each real-router file."""
    for name, layer in LAYERS:
        with np.load(data / name) as z:
            yield layer, {e: np.asarray(z[f"logits_e{e}"]) for e, _ in SHAPES}, np.asarray(z["seq_ids"])


def in_sample(data: Path) -> str:
    lines = ["| layer | E | k | expert | R | contiguous | planned | planned +R | bound +R | measured +R |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, logits, _ in layers(data):
        for experts, k in SHAPES:
            dec = route(logits[experts], experts, k)
            load = dec.tokens_per_expert
            for R in RANKS:
                plain = mr.plan_placement(load, R)
                rep = mr.plan_placement(load, R, num_replicas=experts + R)
                mean = load.sum() / R
                bound = max(mean, float((load / rep.replica_counts).max())) / mean
                lines.append(
                    f"| {layer} | {experts} | {k} | {ratio(load):.2f} | {R} | {plain.imbalance_before:.3f} "
                    f"| {plain.imbalance_after:.3f} | {rep.imbalance_after:.3f} | {bound:.3f} "
                    f"| {ratio(received_rows(dec, rep)):.3f} |")
    return "\n".join(lines)


def out_of_sample(data: Path) -> str:
    lines = ["| layer | E | k | R | contiguous | planned | planned +R | contiguous | planned | planned +R |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, logits, seq in layers(data):
        splits = [(seq % 2 == 0, seq % 2 == 1), (seq < seq.max() // 2 + 1, seq >= seq.max() // 2 + 1)]
        for experts, k in SHAPES:
            cells = []
            for past_rows, future_rows in splits:
                past = route(logits[experts][past_rows], experts, k)
                future = route(logits[experts][future_rows], experts, k)
                cells.append([[ratio(received_rows(future, placement)) for placement in (
                    mr.ExpertPlacement(experts, R), mr.plan_placement(past.tokens_per_expert, R),
                    mr.plan_placement(past.tokens_per_expert, R, num_replicas=experts + R))] for R in RANKS])
            for i, R in enumerate(RANKS):
                values = cells[0][i] + cells[1][i]
                lines.append(f"| {layer} | {experts} | {k} | {R} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="the real_router folder (default: %(default)s)")
    p.add_argument("--out", type=Path, help="also write the tables to this file")
    a = p.parse_args(argv)
    if not (a.data / LAYERS[0][0]).exists():
        print(f"real router data not found in {a.data}", file=sys.stderr)
        return 1
    text = ("### Planned and measured on the same 16,384 tokens (max / mean rank load)\n\n" + in_sample(a.data)
            + "\n\n### Planned on half of the tokens, measured on the other half (max / mean rows received)\n\n"
            + "Columns 5-7: planned on the 64 even sequences (128 tokens each), measured on the 64 odd ones; "
            + "columns 8-10: planned on sequences 0-63, measured on 64-127 (other text).\n\n"
            + out_of_sample(a.data) + "\n")
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

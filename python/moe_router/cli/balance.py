"""``moe-router balance``: route one batch repeatedly with the load balancer's expert bias."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..balancer import LoadBalancer
from ..config import RouterConfig
from ..decision import RoutingDecision
from ..routing import route_logits
from .loading import load_logits
from .parsing import MAX_TABLE_ROWS, apply_threads, config_from_args, config_summary
from .plot import check_plot_path, figure_class, write_balance_plot
from .render import emit, progress, render_balance, table_every
from .route import report_head


def _balance_step(step: int, decision: RoutingDecision, bias: np.ndarray) -> Dict[str, Any]:
    """One row of the balance report: pre-drop load extremes, drops, the bias this step used."""
    pre = decision.pre_drop_tokens_per_expert
    num_experts = int(pre.shape[0])
    mean = (decision.active_tokens * decision.top_k) / num_experts if num_experts else 0.0
    max_load = int(pre.max()) if num_experts else 0
    return {
        "step": step,
        "max_load": max_load,
        "min_load": int(pre.min()) if num_experts else 0,
        "mean_load": mean,
        "max_over_mean": None if mean <= 0 else max_load / mean,
        "dropped_assignments": decision.dropped_assignments,
        "tokens_dropped": decision.tokens_dropped,
        "load_balance_loss": decision.load_balance_loss,
        "bias_spread": float(bias.max() - bias.min()) if num_experts else 0.0,
    }


def run_balance(logits: np.ndarray, config: RouterConfig, steps: int, balancer: LoadBalancer,
                on_step: Callable[[], None] = lambda: None) -> Tuple[List[Dict[str, Any]], RoutingDecision,
                                                                    RoutingDecision]:
    """Route ``logits`` ``steps`` times in training mode, feeding ``balancer`` after each step.

    Step ``i`` is routed with ``step=i`` and the bias the balancer holds after
    steps ``0 .. i-1``; an all-zero bias is passed as None, as ``ExpertRouter``
    does, so step 0 ranks by the logits. ``on_step`` is called after each step
    (the progress bar). Returns one row per step (see ``_balance_step``) and the
    first and last decisions.
    """
    rows: List[Dict[str, Any]] = []
    first: Optional[RoutingDecision] = None
    decision: Optional[RoutingDecision] = None
    for i in range(steps):
        bias = balancer.expert_bias
        decision = route_logits(logits, config, training=True,
                                expert_bias=bias if bias.any() else None, step=i)
        rows.append(_balance_step(i, decision, bias))
        balancer.update(decision)
        on_step()
        if first is None:
            first = decision
    assert first is not None and decision is not None
    return rows, first, decision


def build_balance_report(rows: List[Dict[str, Any]], first: RoutingDecision, last: RoutingDecision,
                         config: RouterConfig, balancer: LoadBalancer, source: Dict[str, Any],
                         plot: Optional[str], every: Optional[int] = None) -> Dict[str, Any]:
    """The balance run as JSON-ready data (the text and JSON renderings both read it).

    ``steps`` lists every step; the text table shows every ``table_every``-th of
    them and the last (``every``, or a stride chosen for long runs).
    """
    stats = balancer.get_stats()
    return {
        "command": "balance",
        **report_head(last, source, config_summary(config, True)),
        "rate": balancer.bias_update_rate,
        "steps": rows,
        "table_every": table_every(len(rows), every, MAX_TABLE_ROWS),
        "first": rows[0],
        "last": rows[-1],
        "pre_drop_tokens_per_expert": {"first": first.pre_drop_tokens_per_expert.tolist(),
                                       "last": last.pre_drop_tokens_per_expert.tolist()},
        "expert_bias": stats.expert_bias.tolist(),
        "balancer": {"ema_imbalance_ratio": stats.imbalance_ratio, "imbalanced": stats.imbalanced,
                     "load_cv": stats.load_cv(), "well_balanced": stats.is_well_balanced()},
        "plot": plot,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router balance``."""
    figure = None
    if args.plot is not None:
        figure = figure_class()
        check_plot_path(args.plot, figure)
    logits, source = load_logits(args)
    apply_threads(args)
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    balancer = LoadBalancer(config.num_experts, bias_update_rate=args.rate)
    with progress(args.steps, "balancing") as advance:
        rows, first, last = run_balance(logits, config, args.steps, balancer, advance)
    report = build_balance_report(rows, first, last, config, balancer, source, args.plot, args.every)
    if figure is not None:
        write_balance_plot(args.plot, report, figure)
    return emit(report, args.json, render_balance)

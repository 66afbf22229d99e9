"""``moe-router route``: route logits (or hidden states through a linear router) and report."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import get_num_threads
from ..decision import RecordedRoute, RoutingDecision
from ..router import ExpertRouter
from ..routing import route_logits
from .errors import CliError
from .loading import hidden_options_given, load_hidden, load_logits
from .parsing import DEFAULT_CHART_EDGE, apply_threads, config_from_args, config_summary
from .render import emit, render_route


def time_calls(call: Callable[[], RoutingDecision], repeat: int) -> Tuple[RoutingDecision, List[float]]:
    """Call once (warm-up; its decision is returned), then time ``repeat`` more calls.

    Returns the decision and the ``repeat`` wall-clock times in seconds
    (``time.perf_counter`` around each call).
    """
    decision = call()
    times: List[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return decision, times


def _chart_rows(decision: RoutingDecision, edge: Optional[int]) -> Tuple[List[int], int]:
    """Experts to chart (busiest first, by pre-drop load): the ``edge`` busiest and the
    ``edge`` idlest (every expert when ``edge`` is None), and how many are left out."""
    pre = decision.pre_drop_tokens_per_expert
    kept = decision.tokens_per_expert
    order = sorted(range(pre.shape[0]), key=lambda e: (-int(pre[e]), -int(kept[e]), e))
    if edge is None or len(order) <= 2 * edge:
        return order, 0
    return order[:edge] + order[-edge:], len(order) - 2 * edge


def report_head(decision: RoutingDecision, source: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    """The fields every command's report starts with: input, sizes, configuration, capacity."""
    return {
        "source": source,
        "tokens": decision.total_tokens,
        "active_tokens": decision.active_tokens,
        "experts": decision.num_experts,
        "top_k": decision.top_k,
        "config": config,
        "capacity": decision.capacity,
        "dropless": decision.dropless,
        "assignments": decision.active_tokens * decision.top_k,
    }


def build_report(decision: RoutingDecision, config: Any, source: Dict[str, Any],
                 times: List[float], edge: Optional[int] = DEFAULT_CHART_EDGE,
                 training: bool = False) -> Dict[str, Any]:
    """Everything the route report shows, as JSON-ready data (both renderings read this).

    The load chart holds the ``edge`` busiest and idlest experts, or every expert
    when ``edge`` is None.
    """
    d = decision.to_dict()
    capacity = decision.capacity
    kept = decision.tokens_per_expert
    pre = decision.pre_drop_tokens_per_expert
    chart, not_shown = _chart_rows(decision, edge)
    experts: List[Dict[str, Any]] = []
    for e in chart:
        n_kept, n_pre = int(kept[e]), int(pre[e])
        percent = None if decision.dropless or capacity == 0 else 100.0 * n_kept / capacity
        experts.append({"expert": e, "kept": n_kept, "pre_drop": n_pre, "dropped": n_pre - n_kept,
                        "capacity_percent": percent})
    report = {"command": "route", **report_head(decision, source, config_summary(
        config, training, "load_balance_loss_coeff", "router_z_loss_coeff"))}
    report.update({
        "kept_assignments": d["kept_assignments"],
        "dropped_assignments": d["dropped_assignments"],
        "tokens_dropped": d["tokens_dropped"],
        "routing_efficiency": d["routing_efficiency"],
        "experts_over_capacity": int(np.count_nonzero(pre > kept)),
        "experts_unused": int(np.count_nonzero(pre == 0)),
        "load_balance_cv": d["load_balance_cv"],
        # The losses as floats (to_dict has None for a non-finite one; the text report shows inf).
        "load_balance_loss": decision.load_balance_loss,
        "router_z_loss": decision.router_z_loss,
        "seq_load_balance_loss": decision.seq_load_balance_loss,
        "auxiliary_loss": decision.auxiliary_loss,
        "sinkhorn_iterations": d["sinkhorn_iterations"],
        "sinkhorn_converged": d["sinkhorn_converged"],
        "load_chart": {"experts": experts, "not_shown": not_shown, "edge": None if not_shown == 0 else edge,
                       "order": "pre_drop descending"},
        "tokens_per_expert": d["tokens_per_expert"],
        "pre_drop_tokens_per_expert": d["pre_drop_tokens_per_expert"],
        "timing": {
            "calls": len(times),
            "warmup_calls": 1,
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "threads": get_num_threads(),
        },
    })
    return report


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router route`` (the logits path, or the hidden-state path with ``--hidden``)."""
    if args.hidden is not None:
        return _run_hidden(args)
    given = hidden_options_given(args)
    if given:
        raise CliError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the hidden-state path; "
                       f"add --hidden FILE.npz")
    logits, source = load_logits(args)
    apply_threads(args)
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    replay = None if args.replay is None else RecordedRoute.load(args.replay)
    decision, times = time_calls(lambda: route_logits(logits, config, training=args.training, replay=replay),
                                 args.repeat)
    return _finish(args, decision, build_report(decision, config, source, times, _chart_edge(args), args.training))


def _finish(args: argparse.Namespace, decision: RoutingDecision, report: Dict[str, Any]) -> int:
    """Write ``--record``, note ``--replay`` and ``--record`` in the report, print it."""
    if args.record is not None:
        decision.record().save(args.record)
    report["replay"] = {"replayed": args.replay, "recorded": args.record}
    return emit(report, args.json, render_route)


def _chart_edge(args: argparse.Namespace) -> Optional[int]:
    """Experts per end of the load chart: ``--top N``, or None (all) for ``--all-experts``."""
    return None if args.all_experts else args.top


def _run_hidden(args: argparse.Namespace) -> int:
    hidden, weight, bias, source, router_info = load_hidden(args)
    apply_threads(args)
    config = config_from_args(args, router_info["num_experts"],
                              f"{args.hidden}[{args.weight_key}] {list(weight.shape)}")
    router = ExpertRouter(config, router_info["input_dim"], weight=weight, bias=bias, gate="linear",
                          router_dtype=args.router_dtype)
    replay = None if args.replay is None else RecordedRoute.load(args.replay)
    decision, times = time_calls(lambda: router.route_tokens(hidden, training=args.training, replay=replay),
                                 args.repeat)
    report = build_report(decision, config, source, times, _chart_edge(args), args.training)
    report["router"] = router_info
    return _finish(args, decision, report)

"""``moe-router train``: train a linear router with moe_router's gradients (NumPy Adam), on real hidden states.

The objective is ``load_balance_loss_coeff * load_balance_loss`` (Switch/GShard) plus
``task_weight * mean_t -log p_t(e0_t)``, a task proxy that keeps each token's initial
top-1 expert; its gradient is ``ExpertRouter.backward`` (closed form, in Rust): the first
term through ``grad_auxiliary_loss``, the second through ``grad_router_probs``. Adam:
Kingma and Ba 2015. ``examples/train_router.py`` runs the same loop.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import numpy as np

from ..config import RouterConfig
from ..router import ExpertRouter
from .errors import CliError
from .render import emit, progress, render_train


def train(hidden: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], steps: int, lr: float,
          coeff: float, task_weight: float, capacity_factor: Optional[float] = 1.25, top_k: int = 2) -> List[Dict[str, Any]]:
    """Train ``weight [D, E]`` and ``bias [E]`` in float64 for ``steps`` Adam steps; one row of figures per step."""
    cfg = RouterConfig(num_experts=weight.shape[1], top_k=top_k, capacity_factor=capacity_factor,
                       load_balance_loss_coeff=coeff)
    bias = np.zeros(weight.shape[1]) if bias is None else bias
    params = [weight.astype(np.float64), bias.astype(np.float64)]
    router = ExpertRouter(cfg, hidden.shape[1], weight=params[0], bias=params[1], gate="linear",
                          router_dtype="float64")
    target = router.route_tokens(hidden).expert_indices[:, 0]
    rows = np.arange(hidden.shape[0])
    m = [np.zeros_like(x) for x in params]
    v = [np.zeros_like(x) for x in params]
    history = []
    with progress(steps, "training") as advance:
        for step in range(1, steps + 1):
            dec = router.route_tokens(hidden, training=True, return_probs=True)
            p = np.maximum(dec.router_probs[rows, target].astype(np.float64), 1e-30)
            grad_probs = np.zeros(dec.router_probs.shape, np.float32)
            grad_probs[rows, target] = -task_weight / (p * len(rows))
            _, g_w, g_b = router.backward(dec, None, 1.0, grad_probs)
            for x, g, mi, vi in zip(params, (g_w, g_b), m, v):
                mi *= 0.9
                mi += 0.1 * g
                vi *= 0.999
                vi += 0.001 * g * g
                x -= lr * (mi / (1 - 0.9 ** step)) / (np.sqrt(vi / (1 - 0.999 ** step)) + 1e-8)
            router.update_router_weights(params[0], params[1])
            loads = dec.pre_drop_tokens_per_expert
            history.append({"step": step, "max_mean_load": float(loads.max() / loads.mean()),
                            "dropped_assignments": dec.dropped_assignments,
                            "load_balance_loss": dec.load_balance_loss, "task_loss": float(-np.log(p).mean())})
            advance()
    return history


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router train FILE.npz`` (hidden states and a router weight from one .npz file)."""
    with np.load(args.file) as z:
        for key in (args.hidden_key, args.weight_key):
            if key not in z.files:
                raise CliError(f"{args.file} has no array {key!r} (it has {', '.join(z.files)})")
        hidden = np.asarray(z[args.hidden_key], dtype=np.float32)
        weight = np.asarray(z[args.weight_key])
        bias = np.asarray(z[args.bias_key]) if args.bias_key else None
    figure = None
    if args.plot:
        from .plot import check_plot_path, figure_class

        figure = figure_class()
        check_plot_path(args.plot, figure)
    history = train(hidden, weight, bias, args.steps, args.lr, args.coeff, args.task_weight)
    report = {"command": "train", "file": args.file, "steps": args.steps, "lr": args.lr, "coeff": args.coeff,
              "task_weight": args.task_weight, "history": history}
    if figure is not None:
        fig = figure(figsize=(12, 3.2))
        for i, key in enumerate(("max_mean_load", "dropped_assignments", "load_balance_loss")):
            ax = fig.add_subplot(1, 3, i + 1)
            ax.plot([h["step"] for h in history], [h[key] for h in history])
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(args.plot)
    return emit(report, args.json, render_train)

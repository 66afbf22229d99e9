#!/usr/bin/env python3
"""Train a router with moe_router's gradients: real MiniLM hidden states (layer 5), NumPy Adam.

The router is the least-squares linear router that ships with the real data (E=64, k=2,
capacity factor 1.25): its loads are skewed (the busiest expert gets many times the mean),
so many assignments are dropped. The objective is

    load_balance_loss_coeff * load_balance_loss        (Switch/GShard; spreads the load)
  + task_weight * mean_t -log p_t(e0_t)                (task proxy: keep each token's initial top-1 expert)

whose gradient comes from ``ExpertRouter.backward`` (closed form, in Rust): the first term
through ``grad_auxiliary_loss``, the second through ``grad_router_probs``. Each step prints the
max/mean expert load, the dropped assignments and both losses.

    python examples/train_router.py [--steps 60] [--lr 0.02] [--coeff 1.0] [--task-weight 0.05] [--plot out.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

import moe_router as mr

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_router" / "minilm_l5.npz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="a real-router .npz (hidden, router_weight_e64, ...)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument("--coeff", type=float, default=1.0, help="load_balance_loss_coeff")
    p.add_argument("--task-weight", type=float, default=0.05, help="weight of the task proxy")
    p.add_argument("--plot", type=Path, help="write a PNG of the curves (needs matplotlib)")
    a = p.parse_args(argv)

    with np.load(a.data) as z:
        hidden = z["hidden"].astype(np.float32)
        weight, bias = z["router_weight_e64"].astype(np.float64), z["router_bias_e64"].astype(np.float64)
    cfg = mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25, load_balance_loss_coeff=a.coeff)
    router = mr.ExpertRouter(cfg, hidden.shape[1], weight=weight, bias=bias, gate="linear", router_dtype="float64")
    first = router.route_tokens(hidden, return_probs=True)
    target = first.expert_indices[:, 0]                      # each token's initial top-1 expert
    rows = np.arange(hidden.shape[0])

    params = [weight.copy(), bias.copy()]
    m = [np.zeros_like(x) for x in params]
    v = [np.zeros_like(x) for x in params]
    history = []
    for step in track(range(1, a.steps + 1), description="training", transient=True):
        dec = router.route_tokens(hidden, training=True, return_probs=True)
        p_target = dec.router_probs[rows, target].astype(np.float64)
        task = float(-np.log(np.maximum(p_target, 1e-30)).mean())
        grad_probs = np.zeros(dec.router_probs.shape, np.float32)
        grad_probs[rows, target] = -a.task_weight / (np.maximum(p_target, 1e-30) * len(rows))
        _, g_w, g_b = router.backward(dec, None, 1.0, grad_probs)
        for x, g, mi, vi in zip(params, (g_w, g_b), m, v):  # Adam (Kingma and Ba 2015)
            mi *= 0.9
            mi += 0.1 * g
            vi *= 0.999
            vi += 0.001 * g * g
            x -= a.lr * (mi / (1 - 0.9 ** step)) / (np.sqrt(vi / (1 - 0.999 ** step)) + 1e-8)
        router.update_router_weights(params[0], params[1])
        loads = dec.pre_drop_tokens_per_expert
        history.append((step, loads.max() / loads.mean(), dec.dropped_assignments, dec.load_balance_loss, task))

    table = Table(title=f"router training on {a.data.name} (E=64, k=2, cf=1.25)")
    for column in ("step", "max/mean load", "dropped", "load_balance_loss", "task (-log p)"):
        table.add_column(column, justify="right")
    for i, (step, ratio, dropped, lb, task) in enumerate(history):
        if i % max(1, len(history) // 12) == 0 or i == len(history) - 1:
            table.add_row(str(step), f"{ratio:.2f}", str(dropped), f"{lb:.4f}", f"{task:.4f}")
    Console().print(table)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = np.array(history, dtype=float)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        for ax, col, name in zip(axes, (1, 2, 3), ("max/mean load", "dropped assignments", "load_balance_loss")):
            ax.plot(h[:, 0], h[:, col])
            ax.set_xlabel("step")
            ax.set_title(name)
        fig.tight_layout()
        fig.savefig(a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Train a router with moe_router's gradients: real MiniLM hidden states (layer 5), NumPy Adam.

The router is the least-squares linear router that ships with the real data (E=64, k=2,
capacity factor 1.25); its loads are skewed (the busiest expert gets ~14x the mean), so many
assignments are dropped. The objective is

    coeff * load_balance_loss                            (Switch/GShard; spreads the load)
  + task_weight * mean_t -log p_t(e0_t)                  (task proxy: keep each token's initial top-1 expert)

and its gradient comes from ``ExpertRouter.backward`` (closed form, in Rust). The loop itself is
``moe_router.cli.train.train`` (also ``moe-router train FILE.npz``); read it for the three calls
that matter: ``router.route_tokens(hidden, training=True, return_probs=True)``,
``router.backward(decision, None, 1.0, grad_router_probs)`` and ``router.update_router_weights``.

    python examples/train_router.py [--steps 60] [--lr 0.02] [--coeff 1.0] [--task-weight 0.05]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moe_router.cli.train import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_router" / "minilm_l5.npz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="a real-router .npz (hidden, router_weight_e64, ...)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument("--coeff", type=float, default=1.0, help="load_balance_loss_coeff")
    p.add_argument("--task-weight", type=float, default=0.05, help="weight of the task proxy")
    a = p.parse_args(argv)
    with np.load(a.data) as z:
        hidden, weight, bias = z["hidden"].astype(np.float32), z["router_weight_e64"], z["router_bias_e64"]
    history = train(hidden, weight, bias, a.steps, a.lr, a.coeff, a.task_weight)
    print(f"{'step':>5} {'max/mean load':>14} {'dropped':>8} {'load_balance_loss':>18} {'task':>8}")
    for h in history[:: max(1, len(history) // 12)] + history[-1:]:
        print(f"{h['step']:>5} {h['max_mean_load']:>14.2f} {h['dropped_assignments']:>8} "
              f"{h['load_balance_loss']:>18.4f} {h['task_loss']:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

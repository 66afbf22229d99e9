"""Digests of the router backward's gradients, to check that a change keeps their bits.

A speed change to the backward (``RoutingDecision.backward``) should give the same
floating-point operations in the same order, hence the same bits. This prints one
line per configuration: the SHA-1 of ``decision.backward(...)``'s bytes at 1 and at 2
threads (which must agree). Run it with the build before and after a change, at each
SIMD level, and compare the outputs with ``diff``::

    PYTHONPATH=<old build> python3 benches/backward_digests.py --out old.txt
    PYTHONPATH=<new build> python3 benches/backward_digests.py --out new.txt
    MOE_ROUTER_SIMD=off PYTHONPATH=<new build> python3 benches/backward_digests.py --out new-off.txt
    diff old.txt new.txt

The configurations cover E in {8, 16, 64, 67, 256} and k from 1 to 16, float32 and
float64 logits, the z-loss, ``normalize_weights``, ``renormalize_after_drop`` with
drops, training jitter, sigmoid scores, token masks, with and without
``grad_expert_weights``, and seven presets. Inputs come from a fixed seed, so two
builds see the same logits. A configuration that raises prints the error in place of
its digests (which is a difference too).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any, Dict, Iterator, Optional, TextIO, Tuple

import numpy as np

import moe_router as mr

SHAPES = [(8, 2), (64, 2), (64, 8), (256, 8), (67, 3), (16, 16)]
OPTIONS: list = [
    {},
    {"router_z_loss_coeff": 1e-3},
    {"normalize_weights": True},
    {"renormalize_after_drop": True, "capacity_factor": 0.6},
    {"capacity_factor": 0.5},
    {"jitter_eps": 0.1},
    {"score_function": "sigmoid", "normalize_weights": True, "router_z_loss_coeff": 1e-3},
    {"weight_scale": 2.5, "router_z_loss_coeff": 1e-2, "load_balance_loss_coeff": 0.1},
]
PRESETS = ["megatron", "deepspeed", "mixtral", "qwen_moe", "deepseek_v3", "switch", "tutel"]
TOKENS = 1003  # not a multiple of a chunk or of the 8-row groups


def configurations() -> Iterator[Tuple[str, mr.RouterConfig, Any, bool, bool]]:
    """``(label, config, dtype, masked, with_weight_grads)`` for every case."""
    for e, k in SHAPES:
        for dtype in (np.float32, np.float64):
            for options in OPTIONS:
                kw: Dict[str, Any] = {"capacity_factor": 1.25, **options}
                cfg = mr.RouterConfig(num_experts=e, top_k=k, **kw)
                for masked in (False, True):
                    for weights in (True, False):
                        label = f"E={e} k={k} {np.dtype(dtype).name} {options} mask={masked} g={weights}"
                        yield label, cfg, dtype, masked, weights
    for name in PRESETS:
        for dtype in (np.float32, np.float64):
            cfg = mr.preset(name, num_experts=64)
            yield f"preset={name} E=64 {np.dtype(dtype).name}", cfg, dtype, False, True


def digest(cfg: mr.RouterConfig, x: np.ndarray, mask: Optional[np.ndarray], g: Optional[np.ndarray]) -> str:
    """SHA-1 (12 hex digits) of the gradient's bytes, or the error it raised."""
    try:
        dec = mr.route_logits(x, cfg, training=True, token_mask=mask)
        grad = dec.backward(grad_expert_weights=g, grad_auxiliary_loss=1.0)
        return hashlib.sha1(np.ascontiguousarray(grad).tobytes()).hexdigest()[:12]
    except mr.RouterError as err:
        return f"{type(err).__name__}: {err}"


def run(out: TextIO) -> int:
    """Write one line per configuration; return how many disagree across thread counts."""
    rng = np.random.default_rng(7)
    disagreeing = 0
    for label, cfg, dtype, masked, weights in configurations():
        x = (rng.standard_normal((TOKENS, cfg.num_experts)) * 2).astype(dtype)
        mask = rng.random(TOKENS) > 0.2 if masked else None
        g = rng.standard_normal((TOKENS, cfg.top_k)).astype(np.float32) if weights else None
        digests = []
        for threads in (1, 2):
            mr.set_num_threads(threads)
            digests.append(digest(cfg, x, mask, g))
        disagreeing += digests[0] != digests[1]
        out.write(f"{label}: {digests[0]} {digests[1]}\n")
    return disagreeing


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=argparse.FileType("w"), default=sys.stdout,
                        help="where to write the digests (default: standard output)")
    args = parser.parse_args(argv)
    disagreeing = run(args.out)
    if disagreeing:
        print(f"{disagreeing} configurations differ between 1 and 2 threads", file=sys.stderr)
    return 1 if disagreeing else 0


if __name__ == "__main__":
    sys.exit(main())

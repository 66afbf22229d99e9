"""One rank of the expert-parallel tests (run by tests/test_distributed.py under ``mpiexec -n R`` or as R
gloo processes). Every scenario checks this rank's output against the single-process forward of the same
tokens through the same experts, computed here without communication; exits non-zero on any mismatch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import moe_router as mr
from moe_router.distributed import ExpertParallelExchange, MPIBackend, TorchBackend, expert_parallel_forward

REAL_L5 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_router" / "minilm_l5.npz"


def elementwise_expert(e, x):
    """Bit-reproducible whatever rows it gets together."""
    return x * x.dtype.type(e + 1) + x.dtype.type(0.25 * e)


def ffn_expert(D, seed=0):
    weights = {}

    def run(e, x):
        if e not in weights:
            g = np.random.default_rng(seed + e)
            weights[e] = ((g.normal(size=(D, 16)) / np.sqrt(D)).astype(x.dtype), (g.normal(size=(16, D)) / 4).astype(x.dtype))
        w1, w2 = weights[e]
        return np.maximum(x @ w1, 0) @ w2

    return run


def single_process(decision, hidden, experts):
    """The same layer in one process: permute, experts per expert, combine."""
    plan = decision.dispatch_plan()
    rows = plan.permute(hidden)
    out = np.zeros_like(rows)
    for e in range(decision.num_experts):
        lo, hi = plan.expert_offsets[e], plan.expert_offsets[e + 1]
        if hi > lo:
            out[lo:hi] = experts(e, rows[lo:hi])
    return plan, out, plan.combine(out)


def slots(experts, size):
    """Physical slots for a plan with replicas: one more slot per rank than the experts need (none on one rank)."""
    return size * min(-(-experts // size) + 1, experts)


def scenarios(rank, size):
    """(name, hidden, decision, placement, experts, exact) for this rank; data differs per rank."""
    rng = np.random.default_rng(100 + rank)
    E, D = 8, 12
    cfg = mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=1.0)
    x = rng.normal(size=(200 + 37 * rank, E)).astype(np.float32)
    h = rng.normal(size=(x.shape[0], D)).astype(np.float32)
    contiguous = mr.ExpertPlacement(E, size) if E % size == 0 else None
    yield "capacity", h, mr.route_logits(x, cfg), contiguous, elementwise_expert, True
    mask = rng.random(x.shape[0]) > 0.3
    dropless = cfg.replace(capacity_factor=None)
    yield "dropless-masked", h, mr.route_logits(x, dropless, token_mask=mask), contiguous, elementwise_expert, True
    yield "ffn", h, mr.route_logits(x, cfg), contiguous, ffn_expert(D), False
    mapping = [(3 * e + 1) % size for e in range(E)]
    replicas = {0: [r for r in range(size) if r != mapping[0]], 5: [(mapping[5] + 1) % size] if size > 1 else []}
    yield "replicas", h, mr.route_logits(x, cfg), mr.ExpertPlacement(E, size, mapping, replicas), elementwise_expert, True
    # plan_placement's layout with replicas, planned by every rank on the same (skewed) load, so they agree
    skewed = np.random.default_rng(0).normal(size=(256, E)).astype(np.float32) + np.linspace(2, 0, E, dtype=np.float32)
    planned = mr.plan_placement(mr.route_logits(skewed, cfg).tokens_per_expert, size, num_replicas=slots(E, size))
    assert size == 1 or planned.replica_counts.sum() > E
    yield "planned", h, mr.route_logits(x, cfg), planned, elementwise_expert, True
    empty = x[:0] if rank == size - 1 else x[:50]
    yield "empty-rank", h[:empty.shape[0]], mr.route_logits(empty, cfg), contiguous, elementwise_expert, True
    h64 = rng.normal(size=(3, 40, D))
    x64 = rng.normal(size=(3, 40, E))
    yield "float64-batch", h64, mr.route_logits(x64, cfg), contiguous, elementwise_expert, True
    if REAL_L5.exists():
        with np.load(REAL_L5) as z:
            lo = 1024 * rank
            hidden = z["hidden"][lo:lo + 1024].astype(np.float32)
            weight, bias = z["router_weight_e64"], z["router_bias_e64"]
        router = mr.ExpertRouter(mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25), 384,
                                 weight=weight, bias=bias)
        yield "real-l5", hidden, router.route_tokens(hidden), mr.ExpertPlacement(64, size), ffn_expert(384), False
        with np.load(REAL_L5) as z:  # the load of the first 1024 tokens, the same on every rank
            first = router.route_tokens(z["hidden"][:1024].astype(np.float32)).tokens_per_expert
        planned = mr.plan_placement(first, size, num_replicas=slots(64, size))
        yield "real-l5-planned", hidden, router.route_tokens(hidden), planned, ffn_expert(384), False


def check(name, got, want, exact):
    if exact:
        ok = got.shape == want.shape and np.array_equal(got, want)
    else:
        ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5 * max(np.abs(want).max(), 1e-30))
    if not ok:
        raise AssertionError(f"{name}: mismatch (max abs diff {np.abs(got - want).max() if got.shape == want.shape else 'shape'})")


def run(backend):
    rank, size = backend.rank, backend.size
    for name, hidden, dec, placement, experts, exact in scenarios(rank, size):
        if placement is None:
            continue
        plan, rows_out, want = single_process(dec, hidden, experts)
        y, stats = expert_parallel_forward(hidden, dec, experts, placement, backend, return_stats=True)
        check(name, y, want, exact)
        assert stats["bytes_sent"] == int(plan.tokens_per_expert.sum()) * hidden.shape[-1] * hidden.dtype.itemsize
        assert len(stats["rows_processed_per_rank"]) == size and stats["rank_imbalance"] >= 1.0 - 1e-12
        # backward of the trips: dispatch_backward is the unweighted combine, combine_backward the weighted permute
        ex = ExpertParallelExchange(dec, placement, backend, hidden.shape[-1], hidden.dtype)
        mine = ex.dispatch(hidden)
        out = np.zeros_like(mine)
        for l, e in enumerate(ex.local_experts.tolist()):
            lo, hi = ex.expert_offsets[l], ex.expert_offsets[l + 1]
            if hi > lo:
                out[lo:hi] = experts(e, mine[lo:hi])
        check(name + "/dispatch_backward", ex.dispatch_backward(out).reshape(want.shape),
              plan.combine(rows_out, weighted=False).reshape(want.shape), exact)
        g = np.random.default_rng(7 + rank).normal(size=want.shape).astype(hidden.dtype)
        back = ex.combine(ex.combine_backward(g), weighted=False)
        rows = plan.permute(g) * plan.weights[:, None].astype(hidden.dtype)
        check(name + "/combine_backward", back, plan.combine(rows, weighted=False), exact)
    # disagreement: the last rank claims another D; every rank must raise before any token moves
    dec = mr.route_logits(np.ones((4, 8), np.float32), mr.RouterConfig(num_experts=8, top_k=2))
    d = 5 if rank == size - 1 and size > 1 else 4
    try:
        ExpertParallelExchange(dec, mr.ExpertPlacement(8, size) if 8 % size == 0 else mr.ExpertPlacement(
            8, size, [e % size for e in range(8)]), backend, d)
    except mr.ConfigError as err:
        assert size > 1 and "hidden_dim" in str(err), err
    else:
        assert size == 1, "a disagreement on D was not detected"
    print(f"rank {rank}/{size}: OK", flush=True)


def main(argv=None, scenario=None):
    """Set up the backend named on the command line and run ``scenario(backend)`` (default: this file's)."""
    p = argparse.ArgumentParser()
    p.add_argument("backend", choices=("mpi", "gloo"))
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--init", default="")
    a = p.parse_args(argv)
    if a.backend == "mpi":
        backend = MPIBackend()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world)
        backend = TorchBackend()
    try:
        (scenario or run)(backend)
    except Exception as err:  # report, then fail this rank
        print(f"rank {backend.rank}: FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    if a.backend == "gloo":
        # An orderly teardown: without it gloo's threads may still run at interpreter exit and
        # the process aborts ("terminate called without an active exception") after its OK.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

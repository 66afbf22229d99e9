"""One rank of the distributed global-balance tests (run by tests/test_global_balance.py under ``mpiexec -n R``
or as R gloo processes). Every rank makes every rank's micro-batches (seeded by rank), adds its own, all-reduces,
and checks the result against one accumulator over all ranks' data built here without communication."""

from __future__ import annotations

import numpy as np

import moe_router as mr
from ep_worker import main

E, K = 8, 2


def micro_batches(rank):
    """Rank ``rank``'s micro-batches: routed decisions (sizes differ per rank) and their scores."""
    rng = np.random.default_rng(200 + rank)
    cfg = mr.RouterConfig(num_experts=E, top_k=K, capacity_factor=1.0)
    out = []
    for m in range(2 + rank % 2):
        x = rng.normal(size=(16 * (2 + m + rank), E)) + np.linspace(0, 1, E)
        out.append(mr.route_logits(x, cfg, return_probs=True))
    return out


def check(got, want, what):
    np.testing.assert_array_equal(got.tokens_per_expert, want.tokens_per_expert, err_msg=what)
    assert (got.num_tokens, got.num_micro_batches, got.num_quantile_batches) == (
        want.num_tokens, want.num_micro_batches, want.num_quantile_batches), what
    np.testing.assert_allclose(got.prob_sums, want.prob_sums, rtol=1e-12, err_msg=what)
    np.testing.assert_allclose(got.quantile_sums, want.quantile_sums, rtol=1e-12, atol=1e-15, err_msg=what)
    np.testing.assert_allclose(got.load_balance_loss(), want.load_balance_loss(), rtol=1e-12, err_msg=what)


def run(backend):
    rank, size = backend.rank, backend.size
    acc, whole = mr.GlobalBalanceAccumulator(E, K), mr.GlobalBalanceAccumulator(E, K)
    for r in range(size):
        for dec in micro_batches(r):
            whole.add(dec)
            whole.add_quantiles(dec.router_probs)
            if r == rank:
                acc.add(dec)
                acc.add_quantiles(dec.router_probs)
    acc.all_reduce(backend)
    check(acc, whole, f"rank {rank}")
    bias = np.linspace(-0.01, 0.01, E)
    np.testing.assert_array_equal(acc.bias_update(bias, 1e-3), whole.bias_update(bias, 1e-3))
    np.testing.assert_allclose(acc.quantile_bias_update(bias, 0.5), whole.quantile_bias_update(bias, 0.5),
                               rtol=1e-12, atol=1e-15)
    # Every rank holds the same bits.
    states = backend.allgather_object(acc.__getstate__())
    assert all(repr(s) == repr(states[0]) for s in states), states
    print(f"rank {rank}/{size}: OK", flush=True)


if __name__ == "__main__":
    main(scenario=run)

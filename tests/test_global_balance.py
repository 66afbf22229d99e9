"""GlobalBalanceAccumulator: global-batch counts and loss, the sign bias update, quantile balancing, the
backward with global counts, and the all-reduce over MPI and gloo, against plain NumPy references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router import LoadBalancer
from test_distributed import free_port, mpiexec, run_ranks

WORKER = Path(__file__).resolve().parent / "global_balance_worker.py"


# ---------------------------------------------------------------------------------------------- references

def softmax(x):
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def topk_counts(x, k):
    """Routed assignments per expert of a plain top-k (distinct logits: no ties)."""
    top = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return np.bincount(top.ravel(), minlength=x.shape[1])


def global_loss(counts, prob_sums, tokens, k):
    """Megatron-Core ``switch_load_balancing_loss_func`` with global counts: E / (k N^2) * sum_e n_e S_e."""
    E = len(counts)
    return E / (k * tokens * tokens) * float(np.dot(counts.astype(np.float64), prob_sums))


def qb_quantiles(s, k, bias):
    """Megatron-Core ``qb_dual_update`` with ``beta = -bias``: per expert the (T*k/E + 1)-th largest of s - alpha."""
    T, E = s.shape
    alpha = -np.sort(-(s + bias), axis=1)[:, k]
    return -np.sort(-(s - alpha[:, None]), axis=0)[T * k // E]


def qb_update(quantiles, bias, ema):
    """Megatron-Core ``_update_router_qb_beta`` in bias terms: mean over micro-batches, EMA, mean-centred."""
    beta = ema * -bias + (1 - ema) * np.mean(quantiles, axis=0)
    return -(beta - beta.mean())


def batches(rng, sizes, E, shift=1.0):
    return [rng.normal(size=(t, E)) + np.linspace(0, shift, E) for t in sizes]


# ---------------------------------------------------------------------------------------------- sequential

@pytest.mark.parametrize("E,k", [(8, 2), (16, 1), (6, 6)])
def test_micro_batches_sum_to_the_big_batch(rng, E, k):
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0)
    xs = batches(rng, [40, 17, 64], E)
    acc = mr.GlobalBalanceAccumulator(E, k)
    for x in xs:
        acc.add(mr.route_logits(x, cfg))
    big = np.concatenate(xs)
    np.testing.assert_array_equal(acc.tokens_per_expert, topk_counts(big, k))
    np.testing.assert_allclose(acc.prob_sums, softmax(big).sum(axis=0), rtol=1e-12)
    assert (acc.num_tokens, acc.num_micro_batches, acc.num_experts, acc.top_k) == (121, 3, E, k)
    want = global_loss(topk_counts(big, k), softmax(big).sum(axis=0), len(big), k)
    assert acc.load_balance_loss() == pytest.approx(want, rel=1e-12)
    # The global-batch loss is the one-call loss of the whole batch (pre-capacity counts).
    assert acc.load_balance_loss() == pytest.approx(mr.route_logits(big, cfg).load_balance_loss, rel=1e-12)


def test_masked_tokens_and_add_counts(rng):
    E, k = 8, 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k)
    x = rng.normal(size=(30, E))
    mask = rng.random(30) < 0.7
    dec = mr.route_logits(x, cfg, token_mask=mask)
    acc = mr.GlobalBalanceAccumulator(E, k)
    acc.add(dec)
    np.testing.assert_array_equal(acc.tokens_per_expert, topk_counts(x[mask], k))
    np.testing.assert_allclose(acc.prob_sums, softmax(x[mask]).sum(axis=0), rtol=1e-12)
    assert acc.num_tokens == mask.sum()
    moved = mr.GlobalBalanceAccumulator(E, k)
    moved.add_counts(dec.pre_drop_tokens_per_expert, dec.expert_prob_mean * dec.active_tokens, dec.active_tokens)
    moved.add_counts(np.zeros(E, np.int32), np.zeros(E), 0, num_micro_batches=2)
    np.testing.assert_array_equal(moved.tokens_per_expert, acc.tokens_per_expert)
    np.testing.assert_array_equal(moved.prob_sums, acc.prob_sums)
    assert (moved.num_tokens, moved.num_micro_batches) == (acc.num_tokens, 3)
    acc.reset()
    assert (acc.num_tokens, acc.num_micro_batches, acc.load_balance_loss()) == (0, 0, 0.0)
    assert not acc.tokens_per_expert.any() and not acc.prob_sums.any()


def test_bias_update_is_the_sign_rule_and_load_balancer_shares_it(rng):
    E, k, rate = 8, 2, 1e-3
    cfg = mr.RouterConfig(num_experts=E, top_k=k)
    acc = mr.GlobalBalanceAccumulator(E, k)
    for x in batches(rng, [32, 32], E, shift=2.0):
        acc.add(mr.route_logits(x, cfg))
    bias = np.linspace(-0.1, 0.1, E)
    n = acc.tokens_per_expert.astype(np.float64)
    np.testing.assert_array_equal(acc.bias_update(bias, rate), bias + rate * np.sign(n.mean() - n))
    np.testing.assert_array_equal(mr._core.sign_bias_update(n, bias, rate), acc.bias_update(bias, rate))
    # LoadBalancer fed the accumulator: the global batch's counts, the same bias as the accumulator's rule.
    lb, by_load = LoadBalancer(E, bias_update_rate=rate), LoadBalancer(E, bias_update_rate=rate)
    lb.update(acc)
    by_load.update(acc.tokens_per_expert)
    np.testing.assert_array_equal(lb.expert_bias, acc.bias_update(np.zeros(E), rate))
    np.testing.assert_array_equal(lb.expert_loads, by_load.expert_loads)
    np.testing.assert_allclose(lb.expert_loads, n / n.sum())


@pytest.mark.parametrize("E,k,T", [(8, 2, 32), (4, 1, 12), (16, 4, 20)])
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_quantile_update_is_megatrons(rng, E, k, T, ema):
    scores = [softmax(x) for x in batches(rng, [T, T, 2 * T], E, shift=2.0)]
    bias = rng.normal(size=E) * 0.01
    acc = mr.GlobalBalanceAccumulator(E, k)
    for i, s in enumerate(scores):
        acc.add_quantiles(s, bias)
        if i == 0:  # one micro-batch: exactly Megatron's quantiles
            np.testing.assert_array_equal(acc.quantile_sums, qb_quantiles(s, k, bias))
    q = np.array([qb_quantiles(s, k, bias) for s in scores])
    np.testing.assert_allclose(acc.quantile_sums, q.sum(axis=0), rtol=1e-15, atol=1e-17)
    assert acc.num_quantile_batches == 3
    new = acc.quantile_bias_update(bias, ema)
    np.testing.assert_allclose(new, qb_update(q, bias, ema), rtol=1e-12, atol=1e-16)
    assert abs(new.sum()) < 1e-15


def test_single_quantile_exact(rng):
    s = softmax(rng.normal(size=(24, 6)))
    bias = rng.normal(size=6) * 0.05
    acc = mr.GlobalBalanceAccumulator(6, 2)
    acc.add_quantiles(s.astype(np.float32), bias)  # float32 scores are read as their float64 values
    np.testing.assert_array_equal(acc.quantile_sums, qb_quantiles(s.astype(np.float32).astype(np.float64), 2, bias))
    acc.add_quantiles(s.reshape(4, 6, 6), None)  # [B, S, E] as [T, E]; None is no bias
    np.testing.assert_array_equal(acc.quantile_sums - qb_quantiles(s.astype(np.float32).astype(np.float64), 2, bias),
                                  qb_quantiles(s, 2, np.zeros(6)))


def test_quantile_balancing_balances(rng):
    """Routing with the bias of the previous global batch: the loads approach T*k/E (the point of QB)."""
    E, k, T = 16, 2, 512
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)
    x = rng.normal(size=(T, E)) + np.linspace(0, 3, E)
    acc, bias = mr.GlobalBalanceAccumulator(E, k), np.zeros(E)
    first = mr.route_logits(x, cfg).pre_drop_tokens_per_expert
    for _ in range(5):
        dec = mr.route_logits(x, cfg, expert_bias=bias, return_probs=True)
        acc.add_quantiles(dec.router_probs.astype(np.float64), bias)
        bias = acc.quantile_bias_update(bias)
        acc.reset()
    last = mr.route_logits(x, cfg, expert_bias=bias).pre_drop_tokens_per_expert
    assert first.max() > 3 * T * k / E and last.max() <= 1.2 * T * k / E, (first, last)


# ---------------------------------------------------------------------------------------------- invariants

@settings(max_examples=40, deadline=None)
@given(st.integers(2, 9), st.data())
def test_invariants(E, data):
    k = data.draw(st.integers(1, E - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    cfg = mr.RouterConfig(num_experts=E, top_k=k)
    sizes = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
    decs = [mr.route_logits(rng.normal(size=(t, E)) * 3, cfg, return_probs=True) for t in sizes]
    forward, backward = mr.GlobalBalanceAccumulator(E, k), mr.GlobalBalanceAccumulator(E, k)
    for d in decs:
        forward.add(d)
    for d in reversed(decs):
        backward.add(d)
    np.testing.assert_array_equal(forward.tokens_per_expert, backward.tokens_per_expert)
    np.testing.assert_allclose(forward.prob_sums, backward.prob_sums, rtol=1e-12)
    assert forward.tokens_per_expert.sum() == k * forward.num_tokens == k * sum(sizes)
    assert 0.0 <= forward.load_balance_loss() <= E * (1 + 1e-12)
    halves = mr.GlobalBalanceAccumulator(E, k)
    halves.merge(forward)
    halves.merge(mr.GlobalBalanceAccumulator(E, k))
    np.testing.assert_array_equal(halves.prob_sums, forward.prob_sums)
    rate = data.draw(st.floats(0, 1))
    bias = rng.normal(size=E)
    new, n = forward.bias_update(bias, rate), forward.tokens_per_expert
    np.testing.assert_array_equal(new, bias + rate * np.sign(n.mean() - n))
    assert np.all(new[n > n.mean()] <= bias[n > n.mean()]) and np.all(new[n < n.mean()] >= bias[n < n.mean()])
    for d in decs:
        if d.active_tokens * k % E == 0 and d.active_tokens:
            s = d.router_probs.astype(np.float64)
            forward.add_quantiles(s, bias)
            q = qb_quantiles(s, k, bias)
            alpha = -np.sort(-(s + bias), axis=1)[:, k]
            # At most T*k/E tokens lie strictly above each expert's quantile.
            assert np.all(((s - alpha[:, None]) > q).sum(axis=0) <= len(s) * k // E)
    if forward.num_quantile_batches:
        assert abs(forward.quantile_bias_update(bias, data.draw(st.floats(0, 1))).sum()) < 1e-9


# ---------------------------------------------------------------------------------------------- gradient

def test_backward_with_global_counts(rng):
    E, k = 8, 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=1.0, router_z_loss_coeff=0.0)
    xs = batches(rng, [24, 40, 16], E)
    decs = [mr.route_logits(x, cfg) for x in xs]
    acc = mr.GlobalBalanceAccumulator(E, k)
    for d in decs:
        acc.add(d)
    n, N = acc.tokens_per_expert, acc.num_tokens
    x, d = xs[1], decs[1]
    g = d.backward(grad_auxiliary_loss=2.0, tokens_per_expert=n, num_tokens=N)

    def loss(z):  # this micro-batch's part of the global loss, counts held constant
        return 2.0 * E / (k * N * N) * float(np.dot(n, softmax(z).sum(axis=0)))

    c = 2.0 * E * n / (k * N * N)
    q = softmax(x)
    np.testing.assert_allclose(g, q * (c - (q * c).sum(axis=1, keepdims=True)), rtol=1e-10, atol=1e-15)
    h, fd = 1e-6, np.zeros_like(x)
    for t, e in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[t, e] += h
        down[t, e] -= h
        fd[t, e] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=1e-9)
    # The sum over micro-batches is the gradient of the global loss over the whole batch.
    whole = mr.route_logits(np.concatenate(xs), cfg).backward()
    parts = np.concatenate([dd.backward(tokens_per_expert=n, num_tokens=N) for dd in decs])
    np.testing.assert_allclose(parts, whole, rtol=1e-10, atol=1e-17)
    # The decision's own counts give the default gradient, bit for bit.
    np.testing.assert_array_equal(
        d.backward(tokens_per_expert=d.pre_drop_tokens_per_expert, num_tokens=d.active_tokens), d.backward())


def test_linear_router_backward_with_global_counts(rng):
    E, k, D = 8, 2, 6
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=1.0, router_z_loss_coeff=0.0)
    W, b = rng.normal(size=(D, E)), rng.normal(size=E)
    router = mr.ExpertRouter(cfg, input_dim=D, weight=W, bias=b, gate="linear")
    h = rng.normal(size=(20, D))
    dec = router.route_tokens(h, training=False)
    acc = mr.GlobalBalanceAccumulator(E, k)
    acc.add(dec)
    acc.add_counts(np.arange(E) * 3, np.full(E, 2.5), 60)
    n, N = acc.tokens_per_expert, acc.num_tokens
    gh, gw, gb = router.backward(dec, tokens_per_expert=n, num_tokens=N)
    q, c = softmax(h @ W + b), E * n / (k * N * N)
    G = q * (c - (q * c).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(gh, G @ W.T, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(gw, h.T @ G, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(gb, G.sum(axis=0), rtol=1e-9, atol=1e-15)


def test_quantiles_do_not_depend_on_the_thread_count(rng):
    s = softmax(rng.normal(size=(4096, 64)) * 2)
    bias = rng.normal(size=64) * 1e-3
    before = mr.get_num_threads()
    out = []
    try:
        for threads in (1, 2, 4):
            mr.set_num_threads(threads)
            acc = mr.GlobalBalanceAccumulator(64, 2)
            acc.add_quantiles(s, bias)
            out.append(acc.quantile_sums)
    finally:
        mr.set_num_threads(before)
    np.testing.assert_array_equal(out[0], qb_quantiles(s, 2, bias))
    assert all(np.array_equal(o, out[0]) for o in out)


def test_megatron_switch_loss_with_global_counts(rng):
    """Megatron-Core's own loss function, fed as ``_apply_global_aux_loss`` feeds it at the last micro-batch
    (counts summed over the M micro-batches, divided by M; each micro-batch's T and local probs), averaged
    over the micro-batches as gradient accumulation does: the value and the gradient of ours."""
    torch = pytest.importorskip("torch")
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    E, k, T = 8, 2, 32
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=1.0, router_z_loss_coeff=0.0)
    xs = batches(rng, [T, T, T], E)
    decs = [mr.route_logits(x, cfg) for x in xs]
    acc = mr.GlobalBalanceAccumulator(E, k)
    for d in decs:
        acc.add(d)
    n, N, M = acc.tokens_per_expert, acc.num_tokens, acc.num_micro_batches
    averaged = torch.tensor(n / M, dtype=torch.float64)
    total = 0.0
    for x, d in zip(xs, decs):
        logits = torch.tensor(x, requires_grad=True)
        loss = moe_utils.switch_load_balancing_loss_func(torch.softmax(logits, -1), averaged, T, k, E, 1.0) / M
        loss.backward()
        total += float(loss.detach())
        np.testing.assert_allclose(d.backward(tokens_per_expert=n, num_tokens=N), logits.grad.numpy(),
                                   rtol=1e-10, atol=1e-17)
    assert acc.load_balance_loss() == pytest.approx(total, rel=1e-12)


# ---------------------------------------------------------------------------------------------- errors

def test_errors_name_the_argument(rng):
    acc = mr.GlobalBalanceAccumulator(4, 2)
    dec8 = mr.route_logits(rng.normal(size=(4, 8)), mr.RouterConfig(num_experts=8, top_k=2))
    dec4k1 = mr.route_logits(rng.normal(size=(4, 4)), mr.RouterConfig(num_experts=4, top_k=1))
    dec = mr.route_logits(rng.normal(size=(4, 4)), mr.RouterConfig(num_experts=4, top_k=2))
    ok = (np.array([1, 1, 1, 1]), np.ones(4), 2)
    for call, error, name in [
        (lambda: mr.GlobalBalanceAccumulator(0, 1), mr.ConfigError, "num_experts"),
        (lambda: mr.GlobalBalanceAccumulator(4, 5), mr.ConfigError, "top_k"),
        (lambda: mr.GlobalBalanceAccumulator(4.0, 1), mr.ConfigTypeError, "num_experts"),
        (lambda: acc.add(dec8), mr.InputError, "^decision is inconsistent: it has num_experts = 8"),
        (lambda: acc.add(dec4k1), mr.InputError, "decision"),
        (lambda: acc.add(np.zeros(4)), mr.InputTypeError, "decision"),
        (lambda: acc.add_counts(np.array([1, 1, 1]), np.ones(4), 2), mr.InputError, "tokens_per_expert"),
        (lambda: acc.add_counts(np.array([1, -1, 1, 1]), np.ones(4), 2), mr.InputError, "tokens_per_expert"),
        (lambda: acc.add_counts(np.array([9, 0, 0, 0]), np.ones(4), 2), mr.InputError, "tokens_per_expert"),
        (lambda: acc.add_counts(np.ones(4), np.ones(4), 2), mr.InputTypeError, "tokens_per_expert"),
        (lambda: acc.add_counts(ok[0], np.array([1, np.nan, 1, 1]), 2), mr.InputError, "prob_sums"),
        (lambda: acc.add_counts(ok[0], -np.ones(4), 2), mr.InputError, "prob_sums"),
        (lambda: acc.add_counts(*ok, num_micro_batches=-1), mr.InputError, "num_micro_batches"),
        (lambda: acc.add_counts(ok[0], ok[1], -2), mr.InputError, "num_tokens"),
        (lambda: acc.add_quantiles(np.ones((3, 4))), mr.InputError, "scores"),
        (lambda: acc.add_quantiles(np.ones((2, 5))), mr.InputError, "scores"),
        (lambda: acc.add_quantiles(np.full((2, 4), np.inf)), mr.InputError, "scores"),
        (lambda: acc.add_quantiles(np.ones((2, 4)), np.ones(3)), mr.InputError, "expert_bias"),
        (lambda: mr.GlobalBalanceAccumulator(4, 4).add_quantiles(np.ones((2, 4))), mr.ConfigError, "top_k"),
        (lambda: acc.quantile_bias_update(), mr.InputError, "add_quantiles"),
        (lambda: acc.bias_update(np.zeros(4), -1.0), mr.ConfigError, "rate"),
        (lambda: acc.bias_update(np.array([0, np.nan, 0, 0]), 1.0), mr.InputError, "expert_bias"),
        (lambda: acc.bias_update(np.zeros(5), 1.0), mr.InputError, "expert_bias"),
        (lambda: acc.merge(mr.GlobalBalanceAccumulator(4, 1)), mr.InputError, "other"),
        (lambda: acc.merge(dec), mr.InputTypeError, "other"),
        (lambda: dec.backward(tokens_per_expert=np.ones(4, np.int64)), mr.InputError, "num_tokens"),
        (lambda: dec.backward(tokens_per_expert=np.ones(3, np.int64), num_tokens=4), mr.InputError,
         "tokens_per_expert"),
        (lambda: dec.backward(tokens_per_expert=-np.ones(4, np.int64), num_tokens=4), mr.InputError,
         "tokens_per_expert"),
    ]:
        with pytest.raises(error, match=name):
            call()
    assert acc.num_tokens == 0 and acc.num_micro_batches == 0  # nothing half-added
    acc.add_quantiles(np.ones((2, 4)))
    with pytest.raises(mr.ConfigError, match="ema"):
        acc.quantile_bias_update(None, 1.5)


def test_pickle_keeps_the_state(rng):
    import pickle

    acc = mr.GlobalBalanceAccumulator(4, 1)
    acc.add(mr.route_logits(rng.normal(size=(8, 4)), mr.RouterConfig(num_experts=4, top_k=1)))
    acc.add_quantiles(softmax(rng.normal(size=(8, 4))))
    back = pickle.loads(pickle.dumps(acc))
    assert type(back) is mr.GlobalBalanceAccumulator and back.__getstate__() == acc.__getstate__()


# ---------------------------------------------------------------------------------------------- distributed

def test_mpi_all_reduce_equals_one_process():
    launcher = mpiexec()
    env = dict(os.environ, MOE_ROUTER_NUM_THREADS="1")
    (code, out), = run_ranks([[launcher, "-n", "2", sys.executable, str(WORKER), "mpi"]], env)
    assert code == 0, out
    assert sorted(out.count(f"rank {r}/2: OK") for r in range(2)) == [1, 1], out


def test_gloo_all_reduce_equals_one_process():
    pytest.importorskip("torch.distributed")
    init = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, MOE_ROUTER_NUM_THREADS="1", OMP_NUM_THREADS="1")
    results = run_ranks([[sys.executable, str(WORKER), "gloo", "--rank", str(r), "--world", "2", "--init", init]
                         for r in range(2)], env)
    for r, (code, out) in enumerate(results):
        assert code == 0 and f"rank {r}/2: OK" in out, out


def test_concurrent_use_from_threads_is_serialized_not_refused() -> None:
    import threading

    rng = np.random.default_rng(3)
    e, k = 8, 2
    scores = rng.random((4096, e))
    acc = mr.GlobalBalanceAccumulator(e, k)
    errors: list = []

    def work() -> None:
        try:
            for _ in range(20):
                acc.add_quantiles(scores, None)
                acc.add_counts(np.ones(e, dtype=np.int64), np.full(e, 0.5), 4)
        except Exception as exc:  # any refusal is the failure under test
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert acc.num_tokens == 4 * 20 * 4 and int(acc.tokens_per_expert.sum()) == 4 * 20 * e

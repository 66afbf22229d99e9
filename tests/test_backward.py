"""``RoutingDecision.backward`` against float64 central finite differences of a NumPy forward written here
(the decision's selection held fixed, the balance-loss counts constant), and against finite differences of
the core's own float64 auxiliary loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from helpers import same_at_thread_counts, sigmoid, softmax

EPS = 1e-6


def scores_of(x, cfg):
    return sigmoid(x) if cfg.score_function == "sigmoid" else softmax(x)


def reference_objective(x, dec, cfg, g_w, g_aux, g_p, mask, seq_len):
    """sum(g_w * w) + g_aux * aux + sum(g_p * probs) in float64, for dec's choices."""
    T, k, E = dec.total_tokens, dec.top_k, dec.num_experts
    x = x.reshape(T, E)
    active = np.ones(T, bool) if mask is None else mask.reshape(T)
    s = scores_of(x, cfg)
    total = 0.0
    ws = cfg.weight_scale
    for t in np.flatnonzero(active):
        ex = dec.expert_indices[t]
        S = s[t, ex]
        n = np.where(dec.kept[t], np.where(dec.rerouted[t], cfg.reroute_weight_scale, 1.0), 0.0)
        if cfg.renormalize_after_drop:
            b = (n * S).sum()
            w = ws * n * S / b if b > 0 else np.zeros(k)
        elif cfg.normalize_weights:
            w = ws * n * S / S.sum()
        else:
            w = ws * n * S
        if g_w is not None:
            total += float((g_w.reshape(T, k)[t] * w).sum())
        if g_p is not None:
            total += float((g_p.reshape(T, E)[t] * s[t]).sum())
    ta = active.sum()
    if ta and g_aux:
        q = s / s.sum(1, keepdims=True)
        f = dec.pre_drop_tokens_per_expert / (ta * k)
        lb = E * (f * q[active].mean(0)).sum()
        z = (np.log(np.exp(x[active] - x[active].max(1, keepdims=True)).sum(1)) + x[active].max(1)) ** 2
        aux = cfg.load_balance_loss_coeff * lb + cfg.router_z_loss_coeff * z.mean()
        if seq_len is not None and cfg.seq_load_balance_loss_coeff:
            losses = []
            for lo in range(0, T, seq_len):
                a = active[lo:lo + seq_len]
                if a.any():
                    counts = np.zeros(E)
                    for t in np.flatnonzero(a) + lo:
                        np.add.at(counts, dec.expert_indices[t], 1)
                    fs = counts / (a.sum() * k)
                    losses.append(E * (fs * q[lo:lo + seq_len][a].mean(0)).sum())
            aux += cfg.seq_load_balance_loss_coeff * np.mean(losses)
        total += g_aux * aux
    return total


def central_differences(f, x):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + EPS
        up = f(x)
        x[i] = old - EPS
        down = f(x)
        x[i] = old
        grad[i] = (up - down) / (2 * EPS)
    return grad


def max_relative_error(a, b):
    scale = max(np.abs(b).max(), 1e-12)
    return float(np.abs(a - b).max() / scale)


OPTIONS = [
    dict(score_function=sf, normalize_weights=nw, renormalize_after_drop=rn, weight_scale=ws, capacity_factor=cf)
    for sf, nw, rn, ws, cf in itertools.product(["softmax", "sigmoid"], [False, True], [False, True], [1.0, 2.5],
                                                [None, 0.75])
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_backward_matches_finite_differences(rng, options):
    T, E, k = 14, 6, 2
    x = rng.normal(size=(T, E)) * 1.5
    mask = rng.random(T) > 0.2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=0.3, router_z_loss_coeff=0.05, **options)
    dec = mr.route_logits(x, cfg, token_mask=mask)
    g_w = rng.normal(size=(T, k))
    g_p = rng.normal(size=(T, E)).astype(np.float32)
    g_aux = 1.7
    # the reference is the decision's function: same weights and losses at x
    np.testing.assert_allclose(reference_objective(x.copy(), dec, cfg, None, 1.0, None, mask, None),
                               dec.auxiliary_loss, rtol=1e-12)
    got = dec.backward(grad_expert_weights=g_w, grad_auxiliary_loss=g_aux, grad_router_probs=g_p)
    assert got.dtype == np.float64 and got.shape == (T, E)
    assert (got[~mask] == 0).all()
    want = central_differences(lambda z: reference_objective(z, dec, cfg, g_w, g_aux, g_p, mask, None), x.copy())
    assert max_relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("options", [o for o in OPTIONS if o["score_function"] == "softmax"],
                         ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_softmax_without_probability_cotangent_matches_finite_differences(rng, options):
    """The softmax row without ``grad_router_probs`` (its own dense passes), with the sequence loss."""
    B, S, E, k = 2, 7, 6, 2
    x = rng.normal(size=(B, S, E)) * 1.5
    mask = rng.random((B, S)) > 0.2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=0.3, router_z_loss_coeff=0.05,
                          seq_load_balance_loss_coeff=0.2, **options)
    dec = mr.route_logits(x, cfg, token_mask=mask)
    g_w = rng.normal(size=(B, S, k))
    got = dec.backward(g_w, 1.3)
    assert (got[~mask] == 0).all()
    want = central_differences(lambda z: reference_objective(z, dec, cfg, g_w, 1.3, None, mask, S), x.copy())
    assert max_relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("extra", [{}, {"seq_load_balance_loss_coeff": 0.1, "normalize_weights": True},
                                   {"jitter_eps": 0.2, "renormalize_after_drop": True, "weight_scale": 2.5}])
def test_softmax_row_agrees_with_the_general_path_over_many_chunks(rng, extra):
    """A zero ``grad_router_probs`` routes the same gradient through the general code path."""
    B, S, E, k = 6, 500, 67, 3
    x = rng.normal(size=(B, S, E)).astype(np.float32)
    mask = rng.random((B, S)) > 0.1
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0, load_balance_loss_coeff=0.01,
                          router_z_loss_coeff=0.001, **extra)
    dec = mr.route_logits(x, cfg, training=True, token_mask=mask)
    g_w = rng.normal(size=(B, S, k))
    fast = dec.backward(g_w, 0.7)
    general = dec.backward(g_w, 0.7, np.zeros((B, S, E), np.float32))
    # float32 rows are scored in float32 on the fast path and in float64 on the general one:
    # entries that cancel to near 0 differ by float32 rounding of the whole row's scale
    np.testing.assert_allclose(fast, general, rtol=1e-5, atol=1e-6 * np.abs(general).max())
    assert np.abs(fast).max() > 0 and (fast[~mask] == 0).all()


def test_float32_logits_give_float32_gradients(rng):
    x = rng.normal(size=(20, 8)).astype(np.float32)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, normalize_weights=True, load_balance_loss_coeff=0.1)
    g = rng.normal(size=(20, 2))
    got = mr.route_logits(x, cfg).backward(g)
    assert got.dtype == np.float32
    want = mr.route_logits(x.astype(np.float64), cfg).backward(g)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_cotangent_of_any_real_dtype_gives_the_bits_of_its_float64_values(rng, dtype):
    # float32 cotangents are read in place, the others converted: both are the same float64 values
    x = rng.normal(size=(300, 16)).astype(dtype)
    cfg = mr.RouterConfig(num_experts=16, top_k=3, capacity_factor=0.9, normalize_weights=True,
                          router_z_loss_coeff=1e-3)
    dec = mr.route_logits(x, cfg, training=True)
    g32 = rng.normal(size=(300, 3)).astype(np.float32)
    want = dec.backward(g32.astype(np.float64))
    for g in [g32, g32.astype(np.float16).astype(np.float32), g32[:, ::-1].copy()[:, ::-1], g32.reshape(1, 300, 3)]:
        assert dec.backward(g).tobytes() == dec.backward(g.astype(np.float64)).tobytes()
    assert dec.backward(g32).tobytes() == want.tobytes()
    half = g32.astype(np.float16)
    assert dec.backward(half).tobytes() == dec.backward(half.astype(np.float64)).tobytes()
    ints = np.arange(900, dtype=np.int32).reshape(300, 3) % 5 - 2
    assert dec.backward(ints).tobytes() == dec.backward(ints.astype(np.float64)).tobytes()


def test_sequence_loss_groups_and_bias(rng):
    B, S, E, k = 3, 5, 8, 2
    x = rng.normal(size=(B, S, E))
    bias = rng.normal(size=E)
    cfg = mr.RouterConfig(num_experts=E, top_k=k, score_function="sigmoid", normalize_weights=True,
                          num_groups=4, group_top_k=2, capacity_factor=None, seq_load_balance_loss_coeff=0.2,
                          load_balance_loss_coeff=0.1, weight_scale=2.5)
    dec = mr.route_logits(x, cfg, expert_bias=bias)
    g_w = rng.normal(size=(B, S, k))
    got = dec.backward(g_w, 0.9)
    assert got.shape == (B, S, E)
    want = central_differences(lambda z: reference_objective(z, dec, cfg, g_w, 0.9, None, None, S), x.copy())
    assert max_relative_error(got, want) <= 1e-4


def test_training_noise_and_reroutes_through_the_cores_own_loss(rng):
    """With jitter and noise (reproduced by (seed, step)), the core's float64 auxiliary loss is the function."""
    T, E, k = 16, 6, 2
    x = rng.normal(size=(T, E))
    cfg = mr.RouterConfig(num_experts=E, top_k=k, jitter_eps=0.1, noise_std=0.3, load_balance_loss_coeff=0.5,
                          router_z_loss_coeff=0.1, capacity_factor=0.6, overflow="reroute")
    dec = mr.route_logits(x, cfg, training=True, step=3)

    def aux(z):
        d = mr.route_logits(z, cfg, training=True, step=3)
        assert np.array_equal(d.expert_indices, dec.expert_indices) and np.array_equal(d.kept, dec.kept)
        return d.auxiliary_loss

    got = dec.backward(grad_auxiliary_loss=1.0)
    want = central_differences(aux, x.copy())
    assert max_relative_error(got, want) <= 1e-4
    # the weights' gradient of a rerouted assignment goes to the expert whose score made it
    if dec.rerouted.any():
        t, j = np.argwhere(dec.rerouted)[0]
        g = np.zeros((T, k))
        g[t, j] = 1.0
        grad = dec.backward(g, 0.0)
        assert np.abs(grad[t]).sum() > 0 and (np.delete(grad, t, axis=0) == 0).all()


def test_gradients_do_not_depend_on_the_thread_count(rng, restore_threads):
    x = rng.normal(size=(5000, 32)).astype(np.float32)
    cfg = mr.RouterConfig(num_experts=32, top_k=4, normalize_weights=True, load_balance_loss_coeff=0.01,
                          router_z_loss_coeff=0.001)
    g = rng.normal(size=(5000, 4))
    got = []
    for n in (1, 2, 3):
        restore_threads(n)
        got.append(mr.route_logits(x, cfg).backward(g))
    for other in got[1:]:
        np.testing.assert_array_equal(got[0], other)


def test_backward_bad_input(rng):
    x = rng.normal(size=(10, 4))
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=4, top_k=2))
    for call, error, name in [
        (lambda: dec.backward(np.ones((10, 3))), mr.InputError, "grad_expert_weights"),
        (lambda: dec.backward(np.ones((9, 2))), mr.InputError, "grad_expert_weights"),
        (lambda: dec.backward(np.full((10, 2), np.nan)), mr.InputError, "grad_expert_weights"),
        (lambda: dec.backward(np.array([["a", "b"]] * 10)), TypeError, "grad_expert_weights"),
        (lambda: dec.backward(None, 1.0, np.ones((10, 5))), mr.InputError, "grad_router_probs"),
        (lambda: dec.backward(None, float("inf")), mr.InputError, "grad_auxiliary_loss"),
        (lambda: dec.backward(None, float("nan")), mr.InputError, "grad_auxiliary_loss"),
    ]:
        with pytest.raises(error, match=name):
            call()


def test_a_non_finite_cotangent_is_named_by_its_position(rng):
    x = rng.normal(size=(12, 4))
    dec = mr.route_logits(x.reshape(3, 4, 4), mr.RouterConfig(num_experts=4, top_k=2))
    g = np.zeros((12, 2))
    g[7, 1], g[9, 0] = np.nan, np.inf  # the first in C order is reported
    with pytest.raises(mr.InputError) as info:
        dec.backward(g)
    assert str(info.value) == ("grad_expert_weights[7, 1] is nan; every entry must be finite "
                               "(the first non-finite entry: token 7, column 1)")
    # In the caller's batch shape, with the flattened token as the logits errors name it.
    with pytest.raises(mr.InputError, match=r"grad_expert_weights\[2, 1, 0\] is -inf; .*token 9, column 0\)"):
        dec.backward(np.where(np.arange(24).reshape(3, 4, 2) == 18, -np.inf, 0.0))
    p = np.zeros((12, 4), np.float32)
    p[11, 3] = np.inf
    with pytest.raises(mr.InputError, match=r"^grad_router_probs\[11, 3\] is inf; .*token 11, column 3\)$"):
        dec.backward(None, 1.0, p)
    p = np.zeros((12, 4))
    p[5, 2] = -1e300  # finite as given, -inf in the float32 the probabilities are read in
    with np.errstate(over="ignore"), pytest.raises(mr.InputError) as info:
        dec.backward(None, 1.0, p)
    assert str(info.value).startswith("grad_router_probs[5, 2] is -1e+300; it overflows float32")
    assert "token 5, column 2" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 10), E=st.integers(2, 7), k=st.integers(1, 3), seed=st.integers(0, 2**31),
       sf=st.sampled_from(["softmax", "sigmoid"]), nw=st.booleans(), rn=st.booleans(),
       cf=st.sampled_from([None, 0.5, 1.0]))
def test_backward_property(T, E, k, seed, sf, nw, rn, cf):
    rng = np.random.default_rng(seed)
    k = min(k, E)
    x = rng.normal(size=(T, E)) * 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, score_function=sf, normalize_weights=nw, renormalize_after_drop=rn,
                          capacity_factor=cf, load_balance_loss_coeff=0.2, router_z_loss_coeff=0.01)
    dec = mr.route_logits(x, cfg)
    g_w = rng.normal(size=(T, k))
    got = dec.backward(g_w, 0.5)
    want = central_differences(lambda z: reference_objective(z, dec, cfg, g_w, 0.5, None, None, None), x.copy())
    assert max_relative_error(got, want) <= 1e-4


# --------------------------------------------------------------------------- hidden-state path

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [False, True])
def test_router_backward_is_the_logits_gradient_through_the_linear_map(rng, bias, batch):
    T, D, E, k = 1200, 24, 8, 2
    h = rng.normal(size=(T, D))
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0, normalize_weights=True,
                          load_balance_loss_coeff=0.05, router_z_loss_coeff=0.01)
    w = rng.normal(size=(D, E)) / np.sqrt(D)
    b = rng.normal(size=E) if bias else None
    router = mr.ExpertRouter(cfg, D, weight=w, bias=b, gate="linear")
    x_in = h.reshape(4, 300, D) if batch else h
    dec = router.route_tokens(x_in)
    g = rng.normal(size=(T, k))
    gh, gw, gb = router.backward(dec, g.reshape(*dec.batch_shape, k), 0.7)
    logits = h @ w + (b if bias else 0)
    ref = mr.route_logits(logits, cfg)
    np.testing.assert_array_equal(ref.expert_indices, dec.expert_indices)
    G = ref.backward(g, 0.7)
    assert gh.shape == x_in.shape and gw.shape == (D, E) and gb.shape == (E,)
    np.testing.assert_allclose(gh.reshape(T, D), G @ w.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, h.T @ G, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gb, G.sum(0), rtol=1e-9, atol=1e-12)


def test_router_backward_threads_and_errors(rng, restore_threads):
    T, D, E = 3000, 16, 8
    h = rng.normal(size=(T, D)).astype(np.float32)
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=E, top_k=2, load_balance_loss_coeff=0.1), D, gate="linear")
    dec = router.route_tokens(h)
    g = rng.normal(size=(T, 2))
    grads = same_at_thread_counts(lambda: router.backward(dec, g), restore_threads)
    assert grads[1].dtype == np.float32
    other = mr.ExpertRouter(router.config, D, gate="linear")
    with pytest.raises(mr.ConfigError, match="not routed by this router"):
        other.backward(dec, g)
    with pytest.raises(mr.InputTypeError, match="decision"):
        router.backward("dec", g)
    with pytest.raises(mr.ConfigError, match="not routed from hidden states"):
        router.backward(router.route_logits(rng.normal(size=(10, E))), None)
    with pytest.raises(mr.ConfigError, match="not routed from logits"):
        dec.backward(g)
    with pytest.raises(mr.InputError, match="grad_expert_weights"):
        router.backward(dec, g[:-1])
    gated = mr.ExpertRouter(mr.RouterConfig(num_experts=64, top_k=2), D, gate="hierarchical")
    with pytest.raises(mr.ConfigError, match="not routed from logits"):
        gated.route_tokens(h[:10]).backward()


@pytest.mark.parametrize("experts,k", [(8, 2), (64, 8)])
def test_backward_on_real_logits(real_logits, experts, k):
    x = real_logits("minilm_l5.npz", experts)[:24].astype(np.float64)
    cfg = mr.RouterConfig(num_experts=experts, top_k=k, capacity_factor=1.0, normalize_weights=True,
                          load_balance_loss_coeff=0.2, router_z_loss_coeff=0.01)
    dec = mr.route_logits(x, cfg)
    g_w = np.random.default_rng(2).normal(size=(24, k))
    got = dec.backward(g_w, 1.3)
    want = central_differences(lambda z: reference_objective(z, dec, cfg, g_w, 1.3, None, None, None), x.copy())
    assert max_relative_error(got, want) <= 1e-4

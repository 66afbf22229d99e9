"""``ExpertRouter``: the hidden-state path (fused GEMM + routing) against NumPy references.

The router's logits ``hidden @ W + b`` are never returned, so they are recovered
from what the decision does expose: with ``top_k = E`` and no capacity limit every
weight is a score, and with a token mask that keeps a single token,
``expert_prob_mean`` is that token's float64 softmax and ``router_z_loss`` its
``logsumexp(z)^2``. Decisions are compared with ``moe_router.route_logits`` on the
float64 NumPy logits.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

import moe_router as mr
from moe_router import ConfigError, InputError
from conftest import REAL_ROUTER_DIR, needs_real_router
from helpers import logsumexp, softmax

DECISION_ARRAYS = ("expert_indices", "expert_slots", "kept", "rerouted", "tokens_per_expert",
                   "pre_drop_tokens_per_expert")
DECISION_COUNTS = ("capacity", "dropless", "active_tokens", "kept_assignments", "dropped_assignments",
                   "tokens_dropped")


# --------------------------------------------------------------------------- helpers


def ref_logits(hidden: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    """``hidden @ W + b`` in float64 (the inputs converted exactly)."""
    z = hidden.astype(np.float64) @ weight.astype(np.float64)
    return z if bias is None else z + bias.astype(np.float64)


def assert_same_decision(got: mr.RoutingDecision, want: mr.RoutingDecision, weight_tol: float = 1e-6,
                         loss_rel: float = 1e-9) -> None:
    """Identical choices, slots and counts; weights within ``weight_tol``; losses close."""
    for name in DECISION_ARRAYS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for name in DECISION_COUNTS:
        assert getattr(got, name) == getattr(want, name), name
    np.testing.assert_allclose(got.expert_weights, want.expert_weights, rtol=0, atol=weight_tol)
    for name in ("load_balance_loss", "router_z_loss", "auxiliary_loss"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=loss_rel, abs=1e-12), name
    if want.seq_load_balance_loss is None:
        assert got.seq_load_balance_loss is None
    else:
        assert got.seq_load_balance_loss == pytest.approx(want.seq_load_balance_loss, rel=loss_rel)


def assert_bitwise_equal(a: mr.RoutingDecision, b: mr.RoutingDecision) -> None:
    for name in DECISION_ARRAYS + ("expert_weights", "expert_prob_mean"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    for name in DECISION_COUNTS + ("load_balance_loss", "router_z_loss"):
        assert getattr(a, name) == getattr(b, name), name


def random_problem(rng: np.random.Generator, tokens: int, dim: int, experts: int,
                   with_bias: bool) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    hidden = rng.normal(size=(tokens, dim))
    weight = rng.normal(size=(dim, experts)) / math.sqrt(dim)
    bias = rng.normal(size=experts) * 0.5 if with_bias else None
    return hidden, weight, bias


# --------------------------------------------------------------------------- (a) the GEMM


GEMM_T, GEMM_D, GEMM_E = 1300, 48, 12  # 1300 tokens span three 512-token chunks
#: Tokens whose logits are recovered one by one: chunk edges and the last token.
PROBE_TOKENS = (0, 1, 511, 512, 777, 1023, 1024, 1299)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batched", [False, True], ids=["TD", "BSD"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gemm_equals_numpy_float64(dtype: type, batched: bool, with_bias: bool) -> None:
    rng = np.random.default_rng(101)
    hidden, weight, bias = random_problem(rng, GEMM_T, GEMM_D, GEMM_E, with_bias)
    hidden, weight = hidden.astype(dtype), weight.astype(dtype)
    bias = None if bias is None else bias.astype(dtype)
    cfg = mr.RouterConfig(num_experts=GEMM_E, top_k=GEMM_E, capacity_factor=None, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, GEMM_D, weight=weight, bias=bias)
    assert router.weight.dtype == dtype
    z = ref_logits(hidden, weight, bias)  # [T, E] float64
    x = hidden.reshape(20, 65, GEMM_D) if batched else hidden
    # float32 hidden states are multiplied in float32: allow for its rounding.
    logit_tol, prob_tol, rel = (1e-9, 1e-7, 1e-12) if dtype == np.float64 else (3e-5, 2e-6, 2e-5)

    # Every weight is a softmax score when k = E and nothing is dropped.
    dec = router.route_tokens(x)
    assert dec.expert_indices.shape == (GEMM_T, GEMM_E) and dec.batch_shape == x.shape[:-1]
    probs = softmax(z)
    got = np.zeros_like(probs)
    np.put_along_axis(got, dec.expert_indices.astype(np.int64), dec.expert_weights.astype(np.float64), axis=1)
    np.testing.assert_allclose(got, probs, rtol=0, atol=prob_tol)
    # The float64 aggregates of the whole batch.
    np.testing.assert_allclose(dec.expert_prob_mean, probs.mean(axis=0), rtol=rel, atol=1e-15)
    assert dec.router_z_loss == pytest.approx(float(np.mean(logsumexp(z) ** 2)), rel=rel)

    # One token at a time (the mask keeps only it; the GEMM still runs over its chunk):
    # P = softmax(z_t) and z-loss = logsumexp(z_t)^2 give z_t back in float64.
    flat_mask_shape = (GEMM_T,)
    for t in PROBE_TOKENS:
        mask = np.zeros(flat_mask_shape, dtype=bool)
        mask[t] = True
        one = router.route_tokens(x, token_mask=mask.reshape(x.shape[:-1]))
        assert one.active_tokens == 1
        lse_ref = float(logsumexp(z[t]))
        lse = math.copysign(math.sqrt(one.router_z_loss), lse_ref)
        assert lse == pytest.approx(lse_ref, rel=rel, abs=logit_tol)
        recovered = lse + np.log(one.expert_prob_mean)
        np.testing.assert_allclose(recovered, z[t], rtol=0, atol=logit_tol, err_msg=f"token {t}")


@pytest.mark.parametrize("batched", [False, True], ids=["TD", "BSD"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_float64_decisions_equal_route_logits(batched: bool, with_bias: bool, with_mask: bool,
                                              training: bool) -> None:
    rng = np.random.default_rng(7)
    t, d, e = 1200, 32, 16
    hidden, weight, bias = random_problem(rng, t, d, e, with_bias)
    cfg = mr.RouterConfig(num_experts=e, top_k=2, capacity_factor=1.0, enable_load_balancing=False,
                          seq_load_balance_loss_coeff=0.1)
    router = mr.ExpertRouter(cfg, d, weight=weight, bias=bias)
    shape = (6, 200) if batched else (t,)
    mask = rng.random(shape) > 0.2 if with_mask else None
    x = hidden.reshape(*shape, d)
    dec = router.route_tokens(x, training=training, token_mask=mask)
    ref = mr.route_logits(ref_logits(hidden, weight, bias).reshape(*shape, e), cfg, training=training,
                          token_mask=mask)
    assert ref.dropped_assignments > 0  # capacity matters
    assert_same_decision(dec, ref)
    assert dec.batch_shape == shape
    if batched:
        assert dec.seq_load_balance_loss is not None


@pytest.mark.parametrize("policy", ["rank", "probs", "bpr"])
def test_float64_decisions_equal_route_logits_other_policies(policy: str) -> None:
    rng = np.random.default_rng(8)
    hidden, weight, bias = random_problem(rng, 900, 24, 8, True)
    weight[:, 0] *= 3.0
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0, drop_policy=policy,
                          normalize_weights=True, score_function="sigmoid", enable_load_balancing=False)
    dec = mr.ExpertRouter(cfg, 24, weight=weight, bias=bias).route_tokens(hidden)
    assert_same_decision(dec, mr.route_logits(ref_logits(hidden, weight, bias), cfg))


def test_float32_decisions_agree_with_float64_reference() -> None:
    """float32 hidden states are routed on float32 logits: near-ties may flip, nothing else."""
    rng = np.random.default_rng(9)
    hidden, weight, bias = random_problem(rng, 4000, 64, 16, True)
    h32, w32, b32 = hidden.astype(np.float32), weight.astype(np.float32), bias.astype(np.float32)
    cfg = mr.RouterConfig(num_experts=16, top_k=2, capacity_factor=None, enable_load_balancing=False)
    dec = mr.ExpertRouter(cfg, 64, weight=w32, bias=b32).route_tokens(h32)
    ref = mr.route_logits(ref_logits(h32, w32, b32), cfg)
    same = (dec.expert_indices == ref.expert_indices).all(axis=1)
    assert same.mean() >= 0.999
    np.testing.assert_allclose(dec.expert_weights[same], ref.expert_weights[same], atol=1e-6)
    # router_dtype="float64" computes the same float32 inputs in float64: identical decisions.
    dec64 = mr.ExpertRouter(cfg, 64, weight=w32, bias=b32, router_dtype="float64").route_tokens(h32)
    assert_same_decision(dec64, ref)


def test_non_contiguous_and_list_hidden_states() -> None:
    rng = np.random.default_rng(10)
    hidden, weight, bias = random_problem(rng, 300, 16, 8, True)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, 16, weight=weight, bias=bias)
    want = router.route_tokens(hidden)
    assert_bitwise_equal(router.route_tokens(np.asfortranarray(hidden)), want)
    wide = np.zeros((300, 32))
    wide[:, ::2] = hidden
    assert_bitwise_equal(router.route_tokens(wide[:, ::2]), want)
    assert_bitwise_equal(router.route_tokens(hidden.tolist()), want)
    empty = router.route_tokens(np.zeros((0, 16)))
    assert empty.total_tokens == 0 and empty.expert_indices.shape == (0, 2)


# --------------------------------------------------------------------------- (b) real data


_REAL: Dict[str, Dict[str, np.ndarray]] = {}


def real_arrays(name: str) -> Dict[str, np.ndarray]:
    if name not in _REAL:
        with np.load(REAL_ROUTER_DIR / name) as z:
            _REAL[name] = {k: z[k] for k in z.files if k == "hidden" or k.startswith("router_")}
    return _REAL[name]


#: Agreement figures measured by test_real_hidden_states_pick_the_float64_experts (printed with -s).
REAL_AGREEMENT: Dict[Tuple[str, int], Tuple[float, float]] = {}


@needs_real_router
@pytest.mark.parametrize("experts", [8, 64, 256])
@pytest.mark.parametrize("name", ["minilm_l3.npz", "minilm_l5.npz"])
def test_real_hidden_states_pick_the_float64_experts(name: str, experts: int) -> None:
    data = real_arrays(name)
    hidden, weight, bias = data["hidden"], data[f"router_weight_e{experts}"], data[f"router_bias_e{experts}"]
    assert hidden.dtype == np.float16 and hidden.shape == (16384, 384) and weight.shape == (384, experts)
    cfg = mr.RouterConfig(num_experts=experts, top_k=2, capacity_factor=1.25, enable_load_balancing=False)
    ref = mr.route_logits(ref_logits(hidden, weight, bias), cfg)

    # Default router_dtype: float16 hidden states are computed in float64 (float16 x float32
    # products are exact there), so the routing is the float64 reference's.
    dec = mr.ExpertRouter(cfg, 384, weight=weight, bias=bias).route_tokens(hidden)
    agreement = float((dec.expert_indices == ref.expert_indices).all(axis=1).mean())
    assert agreement == 1.0
    assert_same_decision(dec, ref, weight_tol=1e-5, loss_rel=1e-9)

    # router_dtype="float32": float32 logits are ill-conditioned on this data.
    dec32 = mr.ExpertRouter(cfg, 384, weight=weight, bias=bias, router_dtype="float32").route_tokens(hidden)
    same32 = (dec32.expert_indices == ref.expert_indices).all(axis=1)
    agreement32 = float(same32.mean())
    REAL_AGREEMENT[(name, experts)] = (agreement, agreement32)
    print(f"\n{name} E={experts} k=2: same experts as float64 route_logits: default dtype "
          f"{agreement:.2%}, router_dtype=float32 {agreement32:.2%} "
          f"({int((~same32).sum())} of {same32.size} tokens differ)")
    assert agreement32 >= 0.98
    # NumPy's own float32 product is no better: the logits are sums of large terms that
    # cancel (sum |h| |w| ~ 1e6 for logits ~ 10), so float32 loses about 0.1 in the logits.
    z32 = (hidden.astype(np.float32) @ weight + bias).astype(np.float64)
    numpy32 = mr.route_logits(z32, cfg)
    agreement_numpy32 = float((numpy32.expert_indices == ref.expert_indices).all(axis=1).mean())
    print(f"  NumPy float32 hidden @ W + b: {agreement_numpy32:.2%}")
    assert agreement32 >= agreement_numpy32 - 0.005
    # Where float32 picks the same experts, its scores are as far off as NumPy float32's.
    cfg_dropless = cfg.replace(capacity_factor=None)
    w32 = mr.ExpertRouter(cfg_dropless, 384, weight=weight, bias=bias,
                          router_dtype="float32").route_tokens(hidden).expert_weights
    w64 = mr.route_logits(ref_logits(hidden, weight, bias), cfg_dropless).expert_weights
    wnp = mr.route_logits(z32, cfg_dropless).expert_weights
    err_router = float(np.abs(w32[same32] - w64[same32]).max())
    same_np = (numpy32.expert_indices == ref.expert_indices).all(axis=1)
    err_numpy = float(np.abs(wnp[same_np] - w64[same_np]).max())
    print(f"  largest float32 weight error where the experts agree: router {err_router:.3g}, NumPy {err_numpy:.3g}")
    assert err_router <= 2 * err_numpy + 1e-4


# --------------------------------------------------------------------------- (c) init and gate choice


def test_default_init_is_normal_with_std_one_over_sqrt_d() -> None:
    d, e = 256, 64
    cfg = mr.RouterConfig(num_experts=e, top_k=2)
    router = mr.ExpertRouter(cfg, d, seed=17, gate="linear")
    w = router.weight.astype(np.float64)
    assert w.shape == (d, e) and router.bias is None
    n = w.size  # 16384 draws: the sample std is within ~1% of the true one (3 sigma ~ 1.7%)
    assert abs(w.mean()) < 4 / math.sqrt(d) / math.sqrt(n)
    assert w.std() * math.sqrt(d) == pytest.approx(1.0, abs=0.025)
    # Normal, not uniform or saturating: the fraction within one std and the kurtosis.
    z = w * math.sqrt(d)
    assert np.mean(np.abs(z) < 1) == pytest.approx(0.6827, abs=0.015)
    assert np.mean(z ** 4) == pytest.approx(3.0, abs=0.2)
    # A std of 1 would saturate the softmax; this init does not.
    x = np.random.default_rng(0).normal(size=(2000, d))
    dec = router.route_tokens(x)
    assert 0.02 < float(np.median(dec.expert_weights[:, 0])) < 0.5
    # The seeded RNG: same seed, same weights; another seed, other weights.
    again = mr.ExpertRouter(cfg, d, seed=17, gate="linear")
    assert np.array_equal(again.weight, router.weight)
    other = mr.ExpertRouter(cfg, d, seed=18, gate="linear")
    assert not np.array_equal(other.weight, router.weight)
    # Same weights, same decisions, bit for bit.
    assert_bitwise_equal(again.route_tokens(x), dec)


@pytest.mark.parametrize("experts,weight_given,expected", [
    (8, False, "linear"), (32, False, "linear"), (33, False, "hierarchical"), (64, False, "hierarchical"),
    (256, False, "hierarchical"), (64, True, "linear"), (33, True, "linear"),
])
def test_gate_auto(experts: int, weight_given: bool, expected: str) -> None:
    cfg = mr.RouterConfig(num_experts=experts, top_k=2)
    weight = np.zeros((16, experts), dtype=np.float32) if weight_given else None
    router = mr.ExpertRouter(cfg, 16, seed=0, weight=weight)
    if expected == "hierarchical":
        assert isinstance(router.gate, mr.GateNetwork) and router.weight is None
        g = router.gate
        assert g.num_groups() == math.ceil(math.sqrt(experts))
        assert g.experts_per_group() == math.ceil(experts / g.num_groups())
    else:
        assert router.gate is None and router.weight.shape == (16, experts)
    assert router.get_num_experts() == experts
    # An explicit gate overrides the rule.
    assert mr.ExpertRouter(cfg, 16, gate="linear").gate is None
    assert isinstance(mr.ExpertRouter(cfg, 16, gate="hierarchical").gate, mr.GateNetwork)


# --------------------------------------------------------------------------- (d) weights and accessors


def test_update_router_weights() -> None:
    rng = np.random.default_rng(12)
    hidden, weight, bias = random_problem(rng, 500, 16, 8, True)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, 16, weight=weight, bias=bias)
    new_w = rng.normal(size=(16, 8)) / 4
    router.update_router_weights(new_w)  # the bias is kept
    assert np.array_equal(router.weight, new_w) and np.array_equal(router.bias, bias)
    assert_same_decision(router.route_tokens(hidden), mr.route_logits(ref_logits(hidden, new_w, bias), cfg))
    new_b = rng.normal(size=8)
    router.update_router_weights(new_w, bias=new_b)
    assert_same_decision(router.route_tokens(hidden), mr.route_logits(ref_logits(hidden, new_w, new_b), cfg))


def test_update_router_weights_shape_check_names_both_shapes() -> None:
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), 16, gate="linear")
    before = router.weight.copy()
    for bad in (np.zeros((16, 9)), np.zeros((8, 16)), np.zeros((16,)), np.zeros((2, 16, 8))):
        with pytest.raises(InputError) as info:
            router.update_router_weights(bad)
        msg = str(info.value)
        assert str(list(bad.shape)) in msg and "[16, 8]" in msg, msg
    assert np.array_equal(router.weight, before)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_update_router_weights_refuses_non_finite(bad_value: float) -> None:
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), 16, gate="linear")
    before = router.weight.copy()
    w = np.ones((16, 8))
    w[3, 5] = bad_value
    with pytest.raises(InputError, match="NaN|infinite"):
        router.update_router_weights(w)
    b = np.zeros(8)
    b[2] = bad_value
    with pytest.raises(InputError, match="bias"):
        router.update_router_weights(np.ones((16, 8)), bias=b)
    assert np.array_equal(router.weight, before)
    with pytest.raises(InputError, match="NaN|infinite"):
        mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), 16, weight=w)


def test_update_router_weights_on_the_hierarchical_gate_is_refused() -> None:
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=64, top_k=2), 16)
    with pytest.raises(ConfigError, match="hierarchical"):
        router.update_router_weights(np.zeros((16, 64)))


def test_update_router_weights_with_another_dtype_keeps_routing() -> None:
    """A float64 weight replacing a float32 one keeps the old float32 bias, and route_hidden
    then refuses the mixed dtypes: every float64 call fails with a TypeError."""
    rng = np.random.default_rng(13)
    hidden, weight, bias = random_problem(rng, 50, 16, 8, True)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, 16, weight=weight.astype(np.float32), bias=bias.astype(np.float32))
    router.update_router_weights(weight)  # float64, bias kept
    dec = router.route_tokens(hidden)  # TypeError: bias must be ... of the hidden states' dtype
    assert_same_decision(dec, mr.route_logits(ref_logits(hidden, weight, bias.astype(np.float32)), cfg))


def test_float32_and_float64_hidden_states_use_the_same_weights_after_caller_mutation() -> None:
    """The router keeps the caller's weight array itself (no copy) but caches a converted copy
    per other dtype: after the caller changes its array in place, float32 hidden states are
    routed with the new weights and float64 ones with the stale cached copy."""
    rng = np.random.default_rng(20)
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), 16, weight=weight)
    hidden = rng.normal(size=(200, 16))
    router.route_tokens(hidden)  # caches the float64 copy
    weight *= -1.0
    a = router.route_tokens(hidden.astype(np.float32)).expert_indices
    b = router.route_tokens(hidden).expert_indices
    assert (a == b).all(axis=1).mean() > 0.99


def test_accessors_stats_and_balancer() -> None:
    rng = np.random.default_rng(14)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    balancer = mr.LoadBalancer(8)
    router = mr.ExpertRouter(cfg, 16, seed=1, gate="linear", balancer=balancer)
    assert router.get_num_experts() == 8
    assert router.get_load_balancer() is balancer
    stats = router.get_stats()
    assert isinstance(stats, mr.RoutingStats) and stats.calls == 0
    batches = [rng.normal(size=(n, 16)) for n in (100, 250, 40)]
    masks = [None, rng.random(250) > 0.3, None]
    decisions = [router.route_tokens(b, training=i != 1, token_mask=m)
                 for i, (b, m) in enumerate(zip(batches, masks))]
    assert router.get_stats() is stats
    assert stats.calls == 3 and stats.timed_calls == 3
    assert stats.total_tokens == 390
    assert stats.active_tokens == sum(d.active_tokens for d in decisions)
    assert stats.kept_assignments == sum(d.kept_assignments for d in decisions)
    assert stats.dropped_assignments == sum(d.dropped_assignments for d in decisions)
    assert stats.expert_token_counts.tolist() == sum(d.tokens_per_expert for d in decisions).tolist()
    assert stats.latency_p50 is not None and stats.latency_p50 > 0
    # Only training calls feed the balancer and advance the RNG step.
    assert balancer.steps == 2 and router.step == 2
    router.reset_stats()
    assert router.get_stats().calls == 0 and router.get_stats().active_tokens == 0
    assert balancer.steps == 2  # the balancer is not reset with the statistics
    with pytest.raises(ConfigError, match="balancer"):
        mr.ExpertRouter(cfg, 16, balancer=mr.LoadBalancer(7))


# --------------------------------------------------------------------------- (e) bad input


def _router() -> mr.ExpertRouter:
    return mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), 16, seed=2, gate="linear")


@pytest.mark.parametrize("make,exc,needle", [
    (lambda: np.zeros((10, 15)), InputError, r"\[10, 15\].*16"),
    (lambda: np.zeros((2, 5, 17)), InputError, r"\[2, 5, 17\].*16"),
    (lambda: np.zeros(16), InputError, r"\[16\]"),
    (lambda: np.zeros((2, 3, 4, 16)), InputError, r"\[2, 3, 4, 16\]"),
    (lambda: np.zeros((10, 16), dtype=np.int64), TypeError, "int64"),
    (lambda: np.zeros((10, 16), dtype=bool), TypeError, "bool"),
    (lambda: np.zeros((10, 16), dtype=np.complex128), TypeError, "complex128"),
    (lambda: np.array([["a"] * 16]), TypeError, "hidden"),
    (lambda: "hidden", TypeError, "hidden"),
    (lambda: None, TypeError, "hidden"),
])
def test_bad_hidden_states(make, exc: type, needle: str) -> None:
    with pytest.raises(exc, match=needle):
        _router().route_tokens(make())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("gate", ["linear", "hierarchical"])
def test_non_finite_hidden_names_the_token(dtype: type, bad: float, gate: str) -> None:
    cfg = mr.RouterConfig(num_experts=40, top_k=2)
    router = mr.ExpertRouter(cfg, 16, seed=2, gate=gate)
    hidden = np.random.default_rng(3).normal(size=(1500, 16)).astype(dtype)
    hidden[1037, 5] = bad
    hidden[1200, 0] = bad
    with pytest.raises(InputError, match=r"hidden.*token 1037\b"):
        router.route_tokens(hidden)
    with pytest.raises(InputError, match=r"token 1037\b"):
        router.route_tokens(hidden.reshape(3, 500, 16))
    # Padding is never read: masking the bad tokens routes the rest.
    mask = np.ones(1500, dtype=bool)
    mask[[1037, 1200]] = False
    assert router.route_tokens(hidden, token_mask=mask).active_tokens == 1498


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(weight=np.zeros((15, 8))), InputError, r"\[15, 8\].*\[16, 8\]"),
    (dict(weight=np.zeros((16, 7))), InputError, r"\[16, 7\].*\[16, 8\]"),
    (dict(weight=np.zeros((16, 8)), bias=np.zeros(7)), InputError, r"bias.*\[7\].*\[8\]"),
    (dict(weight=np.zeros((16, 8)), bias=np.zeros((1, 8))), InputError, "bias"),
    (dict(weight=np.zeros((16, 8), dtype=np.int32)), TypeError, "weight.*int32"),
    (dict(weight=np.zeros((16, 8)), bias=np.array(["x"] * 8)), TypeError, "bias"),
    (dict(weight=np.zeros((16, 8)), gate="hierarchical"), ConfigError, "hierarchical"),
    (dict(gate="linear", group_top_k=2), ConfigError, "group_top_k"),
    (dict(gate="sparse"), ConfigError, "gate"),
    (dict(router_dtype="float16"), ConfigError, "router_dtype"),
])
def test_bad_construction(kwargs: dict, exc: type, needle: str) -> None:
    with pytest.raises(exc, match=needle):
        mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), 16, **kwargs)


@pytest.mark.parametrize("input_dim", [0, -3, 2.5, True, "16", None])
def test_bad_input_dim(input_dim) -> None:
    with pytest.raises(ConfigError, match="input_dim"):
        mr.ExpertRouter(mr.RouterConfig(num_experts=8, top_k=2), input_dim)
    with pytest.raises(TypeError, match="RouterConfig"):
        mr.ExpertRouter({"num_experts": 8}, 16)


def test_odd_inputs_never_panic() -> None:
    """Whatever goes in, the router answers or raises a ValueError/TypeError: never a
    PanicException (a BaseException that pytest.raises(Exception) would not catch)."""
    rng = np.random.default_rng(4)
    cases = [
        np.zeros((0, 16)), np.zeros((3, 0, 16)), np.zeros((4, 16), dtype=np.float16),
        np.full((4, 16), 3e38, dtype=np.float32), np.full((4, 16), -1e308), np.full((4, 16), 1e-310),
        rng.normal(size=(4, 16)).astype(np.longdouble), rng.normal(size=(16, 4)).T, np.zeros((1, 1, 16)),
        np.zeros((5, 16, 1)), [[1.0] * 16] * 3, [[1.0] * 15], [],
    ]
    for gate in ("linear", "hierarchical"):
        router = mr.ExpertRouter(mr.RouterConfig(num_experts=40, top_k=3, capacity_factor=0.5), 16, gate=gate)
        for x in cases:
            for mask in (None, np.zeros(4, dtype=bool), np.ones(3, dtype=np.int8)):
                for training in (False, True):
                    try:
                        dec = router.route_tokens(x, training=training, token_mask=mask)
                    except (ValueError, TypeError):
                        continue
                    except BaseException as exc:  # pragma: no cover - the failure being tested for
                        pytest.fail(f"{gate} {np.asarray(x).shape}: {type(exc).__name__}: {exc}")
                    assert dec.expert_indices.shape == (dec.total_tokens, 3)


# --------------------------------------------------------------------------- (f) the RNG rule


NOISY = dict(jitter_eps=0.2, noise_std=0.5)
REROUTE = dict(overflow="reroute", expert_dropout=0.5, capacity_factor=1.0, reroute_weight_scale=0.5)


def _route_steps(cfg: mr.RouterConfig, hidden: np.ndarray, threads: int, calls: int, training: bool = True,
                 seed: int = 5) -> List[mr.RoutingDecision]:
    mr.set_num_threads(threads)
    try:
        router = mr.ExpertRouter(cfg, hidden.shape[-1], seed=seed, gate="linear")
        out = [router.route_tokens(hidden, training=training) for _ in range(calls)]
        assert router.step == (calls if training else 0)
        return out
    finally:
        mr.set_num_threads(0)


@pytest.mark.parametrize("extra", [NOISY, REROUTE, {**NOISY, **REROUTE}], ids=["noise", "reroute", "both"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_training_randomness_is_keyed_by_seed_and_step(extra: dict, dtype: type, restore_threads) -> None:
    hidden = np.random.default_rng(15).normal(size=(2600, 32)).astype(dtype)
    cfg = mr.RouterConfig(num_experts=16, top_k=2, enable_load_balancing=False, seed=3, **extra)
    one = _route_steps(cfg, hidden, threads=1, calls=3)
    four = _route_steps(cfg, hidden, threads=4, calls=3)
    for a, b in zip(one, four):  # same seed and step, any thread count: bit for bit
        assert_bitwise_equal(a, b)
    # The step counter advances per training call: each step draws anew.
    for a, b in ((one[0], one[1]), (one[1], one[2])):
        assert not np.array_equal(a.expert_weights, b.expert_weights)
    if "overflow" in extra:
        assert all(d.rerouted.any() for d in one)
        assert not np.array_equal(one[0].rerouted, one[1].rerouted)
        # About half of the overflowing assignments try a reroute (expert_dropout = 0.5).
        always = _route_steps(cfg.replace(expert_dropout=1.0), hidden, threads=2, calls=1)[0]
        assert 0.3 < one[0].rerouted.sum() / always.rerouted.sum() < 0.7
    # Another config seed, other draws.
    other = _route_steps(cfg.replace(seed=4), hidden, threads=2, calls=1)[0]
    assert not np.array_equal(other.expert_weights, one[0].expert_weights)


@pytest.mark.parametrize("extra", [NOISY, REROUTE], ids=["noise", "reroute"])
def test_router_step_is_the_route_logits_step(extra: dict) -> None:
    """With small dyadic values the GEMM is exact in both dtypes, so the router's
    call n must equal route_logits(..., training=True, step=n) bit for bit."""
    rng = np.random.default_rng(16)
    hidden = rng.integers(-4, 5, size=(1500, 24)).astype(np.float64)
    weight = rng.integers(-4, 5, size=(24, 16)) / 16.0
    bias = rng.integers(-8, 9, size=16) / 8.0
    logits = hidden @ weight + bias  # exact
    cfg = mr.RouterConfig(num_experts=16, top_k=2, enable_load_balancing=False, seed=9, **extra)
    for dtype in (np.float32, np.float64):
        router = mr.ExpertRouter(cfg, 24, weight=weight.astype(dtype), bias=bias.astype(dtype))
        for step in range(3):
            got = router.route_tokens(hidden.astype(dtype), training=True)
            want = mr.route_logits(logits.astype(dtype), cfg, training=True, step=step)
            assert_bitwise_equal(got, want)
        # Evaluation does not advance the step and equals route_logits in evaluation.
        assert_bitwise_equal(router.route_tokens(hidden.astype(dtype)), mr.route_logits(logits, cfg))
        assert router.step == 3


@pytest.mark.parametrize("extra", [NOISY, REROUTE, {**NOISY, **REROUTE}], ids=["noise", "reroute", "both"])
def test_evaluation_is_never_noisy(extra: dict) -> None:
    hidden = np.random.default_rng(17).normal(size=(2000, 32))
    cfg = mr.RouterConfig(num_experts=16, top_k=2, enable_load_balancing=False, seed=3, **extra)
    # The noiseless config; in evaluation every overflowing assignment tries a reroute.
    plain = cfg.replace(jitter_eps=0.0, noise_std=0.0, expert_dropout=1.0 if "overflow" in extra else 0.0)
    evals = _route_steps(cfg, hidden, threads=2, calls=3, training=False)
    reference = _route_steps(plain, hidden, threads=1, calls=1, training=False)[0]
    for dec in evals:
        assert_bitwise_equal(dec, reference)
    # Interleaved with training calls: evaluation stays noiseless whatever the step.
    router = mr.ExpertRouter(cfg, 32, seed=5, gate="linear")
    for _ in range(2):
        router.route_tokens(hidden, training=True)
        assert_bitwise_equal(router.route_tokens(hidden, training=False), reference)
    if "overflow" in extra:  # evaluation reroutes like training with expert_dropout = 1
        train_always = _route_steps(plain, hidden, threads=1, calls=1, training=True)[0]
        assert_bitwise_equal(train_always, reference)


# --------------------------------------------------------------------------- (g) Python threads


@pytest.mark.parametrize("gate", ["linear", "hierarchical"])
def test_eight_python_threads_share_one_router(gate: str) -> None:
    rng = np.random.default_rng(18)
    cfg = mr.RouterConfig(num_experts=40, top_k=2, capacity_factor=1.0, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, 32, seed=6, gate=gate)
    batches = [rng.normal(size=(int(n), 32)).astype(np.float32 if i % 2 else np.float64)
               for i, n in enumerate(rng.integers(200, 1400, size=8))]
    masks = [rng.random(len(b)) > 0.1 if i % 3 == 0 else None for i, b in enumerate(batches)]
    # Single-threaded answers first (evaluation and training give the same here: no noise).
    expected = [router.route_tokens(b, token_mask=m) for b, m in zip(batches, masks)]
    router.reset_stats()
    rounds = 6
    barrier = threading.Barrier(8)

    def work(i: int) -> List[mr.RoutingDecision]:
        barrier.wait()
        return [router.route_tokens(batches[i], training=bool(r % 2), token_mask=masks[i]) for r in range(rounds)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    for i, decs in enumerate(results):
        for dec in decs:
            assert_bitwise_equal(dec, expected[i])
    stats = router.get_stats()
    n = 8 * rounds
    assert stats.calls == n and stats.timed_calls == n
    assert stats.total_tokens == rounds * sum(len(b) for b in batches)
    assert stats.active_tokens == rounds * sum(d.active_tokens for d in expected)
    assert stats.total_assignments == 2 * stats.active_tokens
    assert stats.kept_assignments == rounds * sum(d.kept_assignments for d in expected)
    assert stats.dropped_assignments == rounds * sum(d.dropped_assignments for d in expected)
    assert stats.tokens_dropped == rounds * sum(d.tokens_dropped for d in expected)
    assert stats.expert_token_counts.tolist() == (rounds * sum(d.tokens_per_expert for d in expected)).tolist()
    assert stats.pre_drop_token_counts.tolist() == \
        (rounds * sum(d.pre_drop_tokens_per_expert for d in expected)).tolist()
    assert router.step == 8 * (rounds // 2)  # one step per training call, none lost


# --------------------------------------------------------------------------- (h) the balancer bias


def _skewed_router(expert_bias=None, enable: bool = True) -> Tuple[mr.ExpertRouter, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(19)
    d, e = 32, 8
    hidden = rng.normal(size=(3000, d))
    weight = rng.normal(size=(d, e)) / math.sqrt(d)
    bias = np.zeros(e)
    bias[:2] = 1.5  # experts 0 and 1 are overloaded
    cfg = mr.RouterConfig(num_experts=e, top_k=2, capacity_factor=None, enable_load_balancing=enable,
                          expert_bias=expert_bias)
    balancer = mr.LoadBalancer(e, bias_update_rate=0.05)
    router = mr.ExpertRouter(cfg, d, weight=weight, bias=bias, balancer=balancer)
    return router, hidden, ref_logits(hidden, weight, bias)


def test_balancer_bias_changes_the_next_selection_not_the_weights() -> None:
    router, hidden, logits = _skewed_router()
    cfg = router.config
    first = router.route_tokens(hidden, training=True)
    assert_same_decision(first, mr.route_logits(logits, cfg))  # no bias yet
    lb_bias = router.get_load_balancer().expert_bias
    assert lb_bias[0] < 0 and lb_bias[1] < 0 and (lb_bias[2:] > 0).all()
    second = router.route_tokens(hidden, training=True)
    # The next call ranks by score + balancer bias, exactly as route_logits with that bias.
    assert_same_decision(second, mr.route_logits(logits, cfg, expert_bias=lb_bias))
    changed = (np.sort(first.expert_indices, 1) != np.sort(second.expert_indices, 1)).any(axis=1)
    assert changed.sum() > 100
    assert second.pre_drop_tokens_per_expert[:2].sum() < first.pre_drop_tokens_per_expert[:2].sum()
    # Weights stay the unbiased scores: a (token, expert) pair chosen in both calls has the
    # same weight bit for bit, and every weight is the softmax score.
    p = softmax(logits)
    np.testing.assert_allclose(second.expert_weights,
                               np.take_along_axis(p, second.expert_indices.astype(np.int64), 1), atol=1e-7)
    w1 = {}
    for t in range(hidden.shape[0]):
        for e_, w in zip(first.expert_indices[t], first.expert_weights[t]):
            w1[(t, int(e_))] = w
    shared = 0
    for t in range(hidden.shape[0]):
        for e_, w in zip(second.expert_indices[t], second.expert_weights[t]):
            if (t, int(e_)) in w1:
                assert w == w1[(t, int(e_))]
                shared += 1
    assert shared > hidden.shape[0]
    # Evaluation calls use the learned bias too, but do not update it.
    bias_now = router.get_load_balancer().expert_bias
    ev = router.route_tokens(hidden)
    assert_same_decision(ev, mr.route_logits(logits, cfg, expert_bias=bias_now))
    assert np.array_equal(router.get_load_balancer().expert_bias, bias_now)


def test_static_expert_bias_adds_to_the_balancer_bias() -> None:
    static = np.linspace(-0.05, 0.05, 8)
    router, hidden, logits = _skewed_router(expert_bias=static)
    cfg = router.config
    first = router.route_tokens(hidden, training=True)
    assert_same_decision(first, mr.route_logits(logits, cfg, expert_bias=static))
    lb_bias = router.get_load_balancer().expert_bias
    assert lb_bias.any()
    second = router.route_tokens(hidden, training=True)
    assert_same_decision(second, mr.route_logits(logits, cfg, expert_bias=static + lb_bias))
    assert not np.array_equal(second.expert_indices,
                              mr.route_logits(logits, cfg, expert_bias=lb_bias).expert_indices)


def test_disabled_balancing_neither_learns_nor_applies_a_bias() -> None:
    router, hidden, logits = _skewed_router(enable=False)
    decs = [router.route_tokens(hidden, training=True) for _ in range(3)]
    assert router.get_load_balancer().steps == 0 and not router.get_load_balancer().expert_bias.any()
    for dec in decs:
        assert_same_decision(dec, mr.route_logits(logits, router.config))

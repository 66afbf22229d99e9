"""``score_precision``: the peers' float32 score arithmetic (the presets' mode) against a NumPy
float32 reference, and the native float64 semantics left as they were."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from helpers import sigmoid, softmax
from saturation import F32, SIGMOID_EPS, sigmoid32, softmax32


def saturated_logits(rng, T=64, E=8):
    """Magnitudes up to 200 with repeated row maxima: float32 softmax underflows, sigmoid saturates."""
    x = np.round(rng.uniform(-1, 1, size=(T, E)) * rng.choice([20.0, 80.0, 100.0, 200.0], size=(T, 1)), 1)
    x[::3, 1] = x[::3].max(axis=1)
    x[0] = [-50, 80, -30, -60, -70, -80, -90, -100]  # float32 ranks expert 0 second, the logits expert 2
    return x.astype(np.float32)


def topk_lower_index(values: np.ndarray, k: int) -> np.ndarray:
    """Sequential top-k: highest value first, ties to the lower expert index."""
    return np.stack([sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in values])


def normalized_choices(scores: np.ndarray, experts: np.ndarray, eps: np.float32) -> np.ndarray:
    """The chosen float32 scores divided by their float32 sum (in rank order) plus ``eps``."""
    chosen = np.take_along_axis(scores, experts, axis=1)
    total = np.zeros(len(scores), F32)
    for j in range(experts.shape[1]):
        total += chosen[:, j]
    return chosen / (total + eps)[:, None]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_float32_scores_rank_saturated_ties_to_the_lower_index(rng, k):
    x = saturated_logits(rng)
    cfg = mr.RouterConfig(8, k, capacity_factor=None, normalize_weights=True, score_precision="float32")
    dec = mr.route_logits(x, cfg, return_probs=True)
    p = softmax32(x)
    np.testing.assert_array_equal(dec.router_probs, p)  # bit for bit
    experts = topk_lower_index(p, k)
    np.testing.assert_array_equal(dec.expert_indices, experts)
    np.testing.assert_allclose(dec.expert_weights, normalized_choices(p, experts, F32(0)), rtol=1e-6, atol=0)
    # some choice here really differs from the exact ranking by logits
    native = mr.route_logits(x, cfg.replace(score_precision="float64"))
    if k > 1:
        assert (native.expert_indices != dec.expert_indices).any()


def test_float32_logits_ranks_the_logits_and_weighs_a_softmax_of_the_chosen(rng):
    x = saturated_logits(rng)
    cfg = mr.RouterConfig(8, 2, capacity_factor=None, normalize_weights=True, score_precision="float32_logits")
    dec = mr.route_logits(x, cfg)
    experts = topk_lower_index(x, 2)
    np.testing.assert_array_equal(dec.expert_indices, experts)
    np.testing.assert_array_equal(dec.expert_weights, softmax32(np.take_along_axis(x, experts, axis=1)))


def test_sigmoid_saturates_and_weights_carry_the_epsilon(rng):
    x = np.concatenate([saturated_logits(rng), rng.uniform(-60, -50, size=(8, 8)).astype(np.float32)])
    bias = np.linspace(-0.01, 0.01, 8)
    cfg = mr.RouterConfig(8, 2, capacity_factor=None, score_function="sigmoid", normalize_weights=True,
                          weight_scale=2.5, expert_bias=bias, score_precision="float32")
    dec = mr.route_logits(x, cfg)
    s = sigmoid32(x)
    experts = topk_lower_index(s + bias.astype(F32), 2)
    np.testing.assert_array_equal(dec.expert_indices, experts)
    chosen = np.take_along_axis(s, experts, axis=1)
    want = chosen / (chosen[:, 0] + chosen[:, 1] + SIGMOID_EPS)[:, None] * F32(2.5)
    np.testing.assert_allclose(dec.expert_weights, want, rtol=1e-6, atol=0)
    assert (dec.expert_weights[-8:].sum(axis=1) < 2.5 * 0.99).all()  # tiny scores: the epsilon matters


def test_renormalization_after_drop_clamps_at_the_float32_epsilon():
    # Token 1's first choice is dropped (capacity 1, token order); its survivor's gate is 0 in float32.
    x = np.array([[80.0, -80.0, 10.0, -80.0], [80.0, -40.0, -80.0, -80.0]], np.float32)
    cfg = mr.RouterConfig(4, 2, expert_capacity=1, drop_policy="position", renormalize_after_drop=True,
                          score_precision="float32")
    dec = mr.route_logits(x, cfg)
    np.testing.assert_array_equal(dec.expert_indices, [[0, 2], [0, 1]])
    np.testing.assert_array_equal(dec.kept, [[True, True], [False, True]])
    np.testing.assert_array_equal(dec.expert_weights[1], [0.0, 0.0])  # 0 / eps, not 1
    native = mr.route_logits(x, cfg.replace(score_precision="float64"))
    np.testing.assert_array_equal(native.expert_weights[1], [0.0, 1.0])


#: Logits from a few magnitudes far apart, so rows repeat values and saturate in float32.
SATURATING = st.sampled_from([-200.0, -104.0, -88.8, -80.0, -40.0, -17.0, 0.0, 16.7, 17.0, 40.0, 80.0, 88.8, 200.0])


@settings(deadline=None, max_examples=60, derandomize=True)
@given(rows=st.lists(st.lists(SATURATING, min_size=6, max_size=6), min_size=1, max_size=12),
       k=st.integers(1, 5), sigmoid=st.booleans())
def test_float32_selection_and_weights_match_the_reference(rows, k, sigmoid):
    x = np.array(rows, np.float32)
    function = "sigmoid" if sigmoid else "softmax"
    cfg = mr.RouterConfig(6, k, capacity_factor=None, score_function=function, normalize_weights=True,
                          score_precision="float32")
    dec = mr.route_logits(x, cfg)
    s = sigmoid32(x) if sigmoid else softmax32(x)
    experts = topk_lower_index(s, k)
    np.testing.assert_array_equal(dec.expert_indices, experts)
    want = normalized_choices(s, experts, SIGMOID_EPS if sigmoid else F32(0))
    np.testing.assert_allclose(dec.expert_weights, want, rtol=1e-6, atol=0)
    assert np.isfinite(dec.expert_weights).all()


def test_probs_drop_breaks_float32_ties_by_token(rng):
    # Each row repeats its maximum far above the rest: every token's two best probabilities are
    # exactly 0.5 in float32 whatever the row's level; the top-1 goes to the lower expert, and
    # expert 0 keeps its first C tokens.
    x = np.full((12, 4), -80.0, np.float32)
    x[:, 0] = x[:, 1] = 80.0 + rng.uniform(0, 1, size=12).astype(np.float32)
    cfg = mr.preset("megatron", 4, 1, pre_softmax=True, capacity_factor=0.5)
    dec = mr.route_logits(x, cfg, training=True)
    assert cfg.score_precision == "float32" and dec.capacity == 2
    np.testing.assert_array_equal(dec.expert_indices[:, 0], np.zeros(12))
    np.testing.assert_array_equal(dec.expert_weights[:2, 0], [0.5, 0.5])
    np.testing.assert_array_equal(dec.kept[:, 0], np.arange(12) < 2)


def test_native_float64_is_unchanged_by_the_field(rng):
    x = rng.normal(size=(50, 8)) * 30
    base = mr.RouterConfig(8, 2, normalize_weights=True)
    assert base.score_precision == "float64"
    dec = mr.route_logits(x, base, return_probs=True)
    np.testing.assert_allclose(dec.router_probs, softmax(x), rtol=1e-6, atol=1e-30)
    sig = mr.route_logits(x, base.replace(score_function="sigmoid"), return_probs=True)
    np.testing.assert_allclose(sig.router_probs, sigmoid(x), rtol=1e-6, atol=1e-30)


def test_presets_score_in_float32():
    expected = {"megatron": "float32_logits", "deepspeed": "float32_logits", "mixtral": "float32",
                "qwen_moe": "float32", "deepseek_v3": "float32", "switch": "float32"}
    for name, precision in expected.items():
        assert mr.preset(name, 8, 1 if name == "switch" else 2).score_precision == precision
    assert mr.preset("megatron", 8, 2, pre_softmax=True).score_precision == "float32"
    assert mr.preset("megatron", 8, 2, score_function="sigmoid").score_precision == "float32"
    assert mr.preset("deepspeed", 8, 4).score_precision == "float32"
    assert mr.preset("mixtral", 8, 2, score_precision="float64").score_precision == "float64"


def test_float32_mode_refuses_logits_beyond_the_float32_range():
    x = np.array([[1e39, 0.0]])
    with pytest.raises(mr.InputError, match="float32 range"):
        mr.route_logits(x, mr.RouterConfig(2, 1, score_precision="float32"))
    assert mr.route_logits(x, mr.RouterConfig(2, 1)).expert_indices[0, 0] == 0

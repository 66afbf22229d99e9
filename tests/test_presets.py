"""Compatibility presets: settings, overrides (ours and the peers' names), refusals,
documentation, the peers' load-balance losses, and the ``peer`` / ``expert_bias`` fields."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import moe_router as mr
from moe_router import presets
from helpers import sigmoid, softmax


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def fields(cfg: mr.RouterConfig, *names: str) -> dict:
    return {n: getattr(cfg, n) for n in names}


# ---------------------------------------------------------------------------
# what each preset sets
# ---------------------------------------------------------------------------
EXPECTED = {
    "megatron": dict(top_k=2, score_function="softmax", normalize_weights=True, weight_scale=1.0,
                     capacity_factor=None, capacity_rounding="megatron", min_capacity=0, drop_policy="probs",
                     renormalize_after_drop=False, num_groups=None, load_balance_loss_coeff=0.0,
                     router_z_loss_coeff=0.0, expert_bias=None, peer="megatron"),
    "deepspeed": dict(top_k=1, score_function="softmax", normalize_weights=False, capacity_factor=1.0,
                      eval_capacity_factor=1.0, capacity_rounding="deepspeed", min_capacity=4,
                      drop_policy="position", renormalize_after_drop=False, router_z_loss_coeff=0.0,
                      peer="deepspeed_top1"),
    "mixtral": dict(top_k=2, score_function="softmax", normalize_weights=True, weight_scale=1.0,
                    capacity_factor=None, expert_capacity=None, load_balance_loss_coeff=0.002,
                    router_z_loss_coeff=0.0, peer="mixtral"),
    "qwen_moe": dict(top_k=4, score_function="softmax", normalize_weights=False, capacity_factor=None,
                     load_balance_loss_coeff=0.004, router_z_loss_coeff=0.0, peer="qwen_moe"),
    "deepseek_v3": dict(top_k=8, score_function="sigmoid", normalize_weights=True, weight_scale=2.5,
                        num_groups=8, group_top_k=4, group_score="top2_sum", capacity_factor=None,
                        load_balance_loss_coeff=0.0, seq_load_balance_loss_coeff=0.001, router_z_loss_coeff=0.0,
                        peer="deepseek_v3"),
    "switch": dict(top_k=1, score_function="softmax", normalize_weights=False, capacity_factor=None,
                   expert_capacity=64, drop_policy="position", renormalize_after_drop=False,
                   load_balance_loss_coeff=0.001, router_z_loss_coeff=0.001, peer="switch"),
    "expert_choice": dict(top_k=1, routing="expert_choice", score_function="softmax", capacity_factor=1.0,
                          eval_capacity_factor=1.0, capacity_rounding="flaxformer", min_capacity=4,
                          load_balance_loss_coeff=0.0, router_z_loss_coeff=0.0, peer=None),
    "base": dict(top_k=1, routing="balanced", balanced_solver="fairseq_auction", score_function="sigmoid",
                 normalize_weights=False, capacity_factor=None, load_balance_loss_coeff=0.0,
                 router_z_loss_coeff=0.0, peer=None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_defaults(name):
    cfg = mr.preset(name, 64)
    assert isinstance(cfg, mr.RouterConfig) and cfg.num_experts == 64
    assert fields(cfg, *EXPECTED[name]) == EXPECTED[name]
    # the three spellings agree
    assert cfg == mr.RouterConfig.preset(name, 64) == getattr(presets, name)(64)


def test_presets_listed():
    assert mr.PRESETS == ("megatron", "deepspeed", "mixtral", "qwen_moe", "deepseek_v3", "switch", "tutel", "fairseq",
                          "expert_choice", "base")
    with pytest.raises(ValueError, match="unknown preset 'gshard'.*megatron"):
        mr.preset("gshard", 8, 2)


def test_deepspeed_gate_follows_k():
    top1, top2, topk = (mr.preset("deepspeed", 16, k) for k in (1, 2, 4))
    assert (top1.peer, top1.drop_policy, top1.renormalize_after_drop) == ("deepspeed_top1", "position", False)
    assert (top2.peer, top2.drop_policy, top2.renormalize_after_drop) == ("deepspeed_top2", "rank", True)
    assert (topk.peer, topk.drop_policy, topk.renormalize_after_drop) == ("deepspeed_topk", "probs", True)
    forced = mr.preset("deepspeed", 16, 2, gate="topk", drop_policy="position")
    assert (forced.peer, forced.drop_policy) == ("deepspeed_topk", "position")
    with pytest.raises(mr.ConfigError, match="gate='top2'.*top_k = 3"):
        mr.preset("deepspeed", 16, 3, gate="top2")
    # DeepSpeed's float32 capacity with min_capacity
    assert top2.capacity(100) == max(4, math.ceil(np.float32(100 / 16) * np.float32(2 * 1.0)))
    assert top1.capacity(8) == 4


def test_megatron_score_functions():
    post = mr.preset("megatron", 8, 2)
    pre = mr.preset("megatron", 8, 2, pre_softmax=True)
    sig1 = mr.preset("megatron", 8, 1, score_function="sigmoid")
    sig2 = mr.preset("megatron", 8, 2, moe_router_score_function="sigmoid")
    assert (post.normalize_weights, pre.normalize_weights) == (True, False)
    assert (sig1.normalize_weights, sig2.normalize_weights) == (False, True)
    assert sig2.score_function == "sigmoid"
    # Megatron's float64 capacity: ceil((200*1/4) * 1.1) = 56, the exact value is 55
    cfg = mr.preset("megatron", 4, 1, pre_softmax=True, capacity_factor=1.1)
    assert cfg.capacity(200) == 56 and mr.RouterConfig(4, 1, capacity_factor=1.1).capacity(200) == 55


def test_megatron_post_softmax_equals_softmax_over_the_chosen_logits(rng):
    x = rng.normal(size=(50, 8)).astype(np.float32)
    dec = mr.route_logits(x, mr.preset("megatron", 8, 3))
    chosen = np.take_along_axis(x.astype(np.float64), dec.expert_indices.astype(np.int64), axis=1)
    want = softmax(chosen)
    np.testing.assert_allclose(dec.expert_weights, want, rtol=1e-6)


# ---------------------------------------------------------------------------
# overrides: the peer's names and ours
# ---------------------------------------------------------------------------
def test_megatron_peer_names():
    cfg = mr.preset("megatron", 64, moe_router_topk=8, moe_router_pre_softmax=True,
                    moe_router_topk_scaling_factor=2.5, moe_router_num_groups=8, moe_router_group_topk=4,
                    moe_expert_capacity_factor=1.25, moe_token_drop_policy="position",
                    moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_pad_expert_input_to_capacity=True,
                    num_moe_experts=64)
    assert fields(cfg, "top_k", "normalize_weights", "weight_scale", "num_groups", "group_top_k", "group_score",
                  "capacity_factor", "drop_policy", "load_balance_loss_coeff", "router_z_loss_coeff") == dict(
        top_k=8, normalize_weights=False, weight_scale=2.5, num_groups=8, group_top_k=4, group_score="top2_sum",
        capacity_factor=1.25, drop_policy="position", load_balance_loss_coeff=0.01, router_z_loss_coeff=0.001)
    short = mr.preset("megatron", 64, 8, pre_softmax=True, scaling_factor=2.5, num_groups=8, group_topk=4,
                      capacity_factor=1.25, drop_policy="position", aux_loss_coeff=0.01, z_loss_coeff=0.001)
    assert short == cfg
    # group score = sum of the top topk // group_topk: 1 -> max
    assert mr.preset("megatron", 64, 4, num_groups=8, group_topk=4).group_score == "max"
    # negative capacity factor = dropless, as Megatron's config does
    assert mr.preset("megatron", 8, 2, capacity_factor=-1.0).capacity_factor is None
    # seq_aux_loss moves the coefficient to the sequence-level loss
    seq = mr.preset("megatron", 8, 2, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3)
    assert (seq.load_balance_loss_coeff, seq.seq_load_balance_loss_coeff) == (0.0, 1e-3)
    bias = [0.1, -0.1] * 4
    biased = mr.preset("megatron", 8, 2, score_function="sigmoid", expert_bias=bias)
    assert biased.expert_bias == tuple(bias)


def test_deepspeed_peer_names():
    cfg = mr.preset("deepspeed", 16, k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=8,
                    drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None)
    assert fields(cfg, "top_k", "capacity_factor", "eval_capacity_factor", "min_capacity", "peer") == dict(
        top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=8, peer="deepspeed_top2")
    nodrop = mr.preset("deepspeed", 16, 2, drop_tokens=False)
    assert nodrop.capacity_factor is None and nodrop.eval_capacity_factor is None
    x = np.random.default_rng(1).normal(size=(40, 16))
    assert mr.route_logits(x, nodrop).dropless


def test_hugging_face_peer_names():
    mix = mr.preset("mixtral", num_experts=8, num_experts_per_tok=2, num_local_experts=8,
                    router_aux_loss_coef=0.02, router_jitter_noise=0.0)
    assert (mix.top_k, mix.load_balance_loss_coeff) == (2, pytest.approx(0.04))
    qwen = mr.preset("qwen_moe", 60, num_experts_per_tok=4, norm_topk_prob=True)
    assert (qwen.top_k, qwen.normalize_weights) == (4, True)
    bias = np.linspace(-0.1, 0.1, 16)
    ds = mr.preset("deepseek_v3", 16, num_experts_per_tok=4, n_routed_experts=16, n_group=4, topk_group=2,
                   routed_scaling_factor=1.5, norm_topk_prob=False, e_score_correction_bias=bias,
                   scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=1e-4, seq_aux=False)
    assert fields(ds, "top_k", "num_groups", "group_top_k", "weight_scale", "normalize_weights",
                  "load_balance_loss_coeff", "seq_load_balance_loss_coeff") == dict(
        top_k=4, num_groups=4, group_top_k=2, weight_scale=1.5, normalize_weights=False,
        load_balance_loss_coeff=1e-4, seq_load_balance_loss_coeff=0.0)
    np.testing.assert_array_equal(ds.expert_bias, bias)
    sw = mr.preset("switch", 8, expert_capacity=12, router_z_loss_coef=0.01, router_aux_loss_coef=0.02)
    assert fields(sw, "expert_capacity", "router_z_loss_coeff", "load_balance_loss_coeff") == dict(
        expert_capacity=12, router_z_loss_coeff=0.01, load_balance_loss_coeff=0.02)


def test_our_names_override_defaults():
    cfg = mr.preset("megatron", 8, 2, drop_policy="probs", capacity_factor=1.5, normalize_weights=False,
                    capacity_rounding="exact", seed=3, jitter_eps=0.01)
    assert fields(cfg, "normalize_weights", "capacity_rounding", "seed", "jitter_eps", "peer") == dict(
        normalize_weights=False, capacity_rounding="exact", seed=3, jitter_eps=0.01, peer="megatron")
    assert mr.preset("mixtral", 8, top_k=4).top_k == 4
    assert mr.preset("switch", 8, expert_capacity=None, capacity_factor=1.0).capacity(80) == 10
    assert mr.preset("deepspeed", 8, 2, weight_scale=2.0, renormalize_after_drop=False).weight_scale == 2.0
    assert mr.preset("qwen_moe", 8, 2, num_experts_per_token=2).top_k == 2


def test_conflicting_names_are_refused():
    with pytest.raises(mr.ConfigError, match="pre_softmax=True sets normalize_weights=False"):
        mr.preset("megatron", 8, 2, pre_softmax=True, normalize_weights=True)
    with pytest.raises(mr.ConfigError, match="scaling_factor"):
        mr.preset("megatron", 8, 2, scaling_factor=2.0, weight_scale=3.0)
    with pytest.raises(mr.ConfigError, match="disagrees with top_k"):
        mr.preset("mixtral", 8, 2, num_experts_per_tok=4)
    with pytest.raises(mr.ConfigError, match="disagrees with num_experts"):
        mr.preset("deepseek_v3", 16, 4, n_routed_experts=32, n_group=4, topk_group=2)
    with pytest.raises(mr.ConfigError, match="and moe_router_pre_softmax=False both set"):
        mr.preset("megatron", 8, 2, pre_softmax=True, moe_router_pre_softmax=False)
    # the same value under two names is fine
    assert mr.preset("megatron", 8, 2, pre_softmax=True, normalize_weights=False).normalize_weights is False


def test_every_top_k_refusal_names_the_preset():
    out_of_range = "invalid top_k: got 8; must satisfy 1 <= top_k <= num_experts = 4"
    for name in mr.PRESETS:
        for call, origin in [(lambda: mr.preset(name, 4, 8), ""), (lambda: mr.preset(name, 4, top_k=8), ""),
                             (lambda: mr.preset(name, 4, num_experts_per_token=8),
                              "num_experts_per_token=8 sets top_k: ")]:
            with pytest.raises(mr.ConfigError) as info:
                call()
            message = str(info.value)
            assert message.startswith(f"preset '{name}': ") and ("top_k = 8" in message or "got 8" in message), message
            if name not in ("switch", "fairseq", "base"):  # their own k rules refuse 8 first
                assert message == f"preset '{name}': {origin}{out_of_range}", message
        with pytest.raises(mr.ConfigError, match=rf"^preset '{name}': invalid top_k: got 0; must be an integer"):
            mr.preset(name, 4, 0)
        with pytest.raises(mr.ConfigTypeError, match=rf"^preset '{name}': invalid top_k: got 2.0 \(float\)"):
            mr.preset(name, 4, 2.0)
    with pytest.raises(mr.ConfigError, match=r"^preset 'mixtral': num_experts_per_tok=8 sets top_k: invalid top_k"):
        mr.preset("mixtral", 4, num_experts_per_tok=8)
    # a field given under our own name is the preset's refusal too
    with pytest.raises(mr.ConfigError, match=r"^preset 'mixtral': invalid capacity_factor: got -1.0"):
        mr.preset("mixtral", 4, 2, capacity_factor=-1.0)


def test_unknown_names_are_refused_with_the_accepted_list():
    with pytest.raises(TypeError) as info:
        mr.preset("megatron", 8, 2, moe_router_pre_sofmax=True)
    msg = str(info.value)
    assert "moe_router_pre_sofmax" in msg and "moe_router_pre_softmax" in msg and "capacity_factor" in msg
    with pytest.raises(TypeError, match="norm_topk_prob") as info:
        mr.preset("qwen_moe", 8, 2, n_group=2)
    assert "n_group" in str(info.value).split("accepted")[0]
    assert "pre_softmax" not in presets.accepted_names("mixtral")
    assert {"norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor", "num_experts_per_tok",
            "e_score_correction_bias"} <= set(presets.accepted_names("deepseek_v3"))


@pytest.mark.parametrize("name,kwargs,text", [
    ("deepspeed", dict(top_k=1, use_rts=True), "random token selection"),
    ("deepspeed", dict(top_k=2, top2_2nd_expert_sampling=True), "Gumbel"),
    ("deepspeed", dict(top_k=2, noisy_gate_policy="RSample"), "RNG"),
    ("switch", dict(top_k=2), "top-1"),
    ("switch", dict(router_jitter_noise=0.01), "router input"),
    ("mixtral", dict(router_jitter_noise=0.1), "jitter"),
    ("megatron", dict(top_k=2, expert_bias=[0.0] * 8), "sigmoid"),
    ("megatron", dict(top_k=2, moe_router_load_balancing_type="global_aux_loss"), "global_aux_loss"),
    ("megatron", dict(top_k=2, num_groups=4, group_topk=4), "topk must be >= group_topk"),
    ("megatron", dict(top_k=2, num_groups=4), "go together"),
    ("megatron", dict(top_k=2, drop_policy="rank"), "'probs' or 'position'"),
    ("megatron", dict(top_k=2, moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.01), "requires 0"),
    ("megatron", dict(top_k=2, moe_input_jitter_eps=0.01), "jitter"),
    ("deepseek_v3", dict(top_k=4, scoring_func="softmax", n_group=4, topk_group=2), "sigmoid"),
])
def test_unreproducible_settings_are_refused(name, kwargs, text):
    with pytest.raises(mr.ConfigError, match=text):
        mr.preset(name, 8, **kwargs)


@pytest.mark.parametrize("pre_softmax,score,want_input", [
    (False, "softmax", "logits"), (True, "softmax", "scores"), (False, "sigmoid", "scores")])
def test_megatron_groups_sum_top_n_on_the_selection_tensor(pre_softmax, score, want_input):
    """Megatron scores a group by the sum of its top topk // group_topk values of the
    tensor selection runs on: raw logits in post-softmax mode."""
    cfg = mr.preset("megatron", 64, 8, num_groups=4, group_topk=2, pre_softmax=pre_softmax, score_function=score)
    assert (cfg.group_score, cfg.group_score_input) == ("top4_sum", want_input)
    assert mr.preset("megatron", 64, 4, num_groups=8, group_topk=4).group_score == "max"


# ---------------------------------------------------------------------------
# documentation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", mr.PRESETS)
def test_docstrings_state_every_behaviour(name):
    doc = " ".join(getattr(presets, name).__doc__.split()).lower()
    for topic in ("score function", "capacity", "loss normalization", "differences"):
        assert topic in doc, (name, topic)
    assert ("drop order" in doc) or ("no drop order applies" in doc), name
    assert "softmax" in doc or "sigmoid" in doc


def test_preset_docstring_points_to_each_function():
    doc = mr.preset.__doc__
    assert "function of the same name" in doc
    assert mr.RouterConfig.preset.__doc__ and "presets.preset" in mr.RouterConfig.preset.__doc__


# ---------------------------------------------------------------------------
# the peers' load-balance losses
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral", "qwen_moe"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_hugging_face_loss_is_k_times_ours(name, k, rng):
    x = rng.normal(size=(97, 16)).astype(np.float32) * 2
    cfg = mr.preset(name, 16, k)
    dec = mr.route_logits(x, cfg)
    assert dec.peer_load_balance_loss == pytest.approx(k * dec.load_balance_loss, rel=1e-12)
    assert mr.peer_load_balance_loss(dec, cfg) == dec.peer_load_balance_loss
    assert mr.peer_load_balance_loss(dec, name) == dec.peer_load_balance_loss
    # independent of the formula in the package: E * sum_e f_e P_e with f over all k choices
    p = softmax(x)
    f = np.bincount(dec.expert_indices.ravel(), minlength=16) / 97
    assert dec.peer_load_balance_loss == pytest.approx(16 * np.dot(f, p.mean(0)), rel=1e-6)


def test_hugging_face_loss_with_padding(rng):
    x = rng.normal(size=(4, 25, 8))
    mask = rng.random((4, 25)) < 0.7
    dec = mr.route_logits(x, mr.preset("mixtral", 8, 2), token_mask=mask)
    assert dec.peer_load_balance_loss == pytest.approx(2 * dec.load_balance_loss)


def test_deepspeed_top1_top2_count_first_choices(rng):
    x = rng.normal(size=(120, 8))
    mask = rng.random(120) < 0.8
    p = softmax(x)
    for k in (1, 2):
        cfg = mr.preset("deepspeed", 8, k, capacity_factor=1.0)
        dec = mr.route_logits(x, cfg, training=True, token_mask=mask)
        first = np.argmax(x[mask], axis=1)
        want = 8 * np.dot(np.bincount(first, minlength=8) / mask.sum(), p[mask].mean(0))
        # the preset scores in float32, as DeepSpeed does
        assert dec.peer_load_balance_loss == pytest.approx(want, rel=1e-6)
        # the decision carries its first-choice counts: the mask is not needed again
        assert mr.peer_load_balance_loss(dec, "deepspeed") == dec.peer_load_balance_loss
        assert mr.peer_load_balance_loss(dec, cfg) == dec.peer_load_balance_loss
    topk = mr.route_logits(x, mr.preset("deepspeed", 8, 4), training=True)
    assert topk.peer_load_balance_loss == topk.load_balance_loss


def test_megatron_counts_a_plain_topk_with_bias_or_groups(rng):
    E, k, T = 16, 4, 200
    x = rng.normal(size=(T, E))
    bias = rng.normal(size=E) * 0.5
    s = sigmoid(x)
    P = (s / s.sum(1, keepdims=True)).mean(0)
    plain = np.bincount(np.argsort(-x, axis=1, kind="stable")[:, :k].ravel(), minlength=E)
    want = E / (k * T) * np.dot(plain, P)
    cfg = mr.preset("megatron", E, k, score_function="sigmoid", num_groups=4, group_topk=2, expert_bias=bias)
    dec = mr.route_logits(x, cfg)
    assert dec.peer_load_balance_loss == pytest.approx(want, rel=1e-9)
    assert dec.load_balance_loss != pytest.approx(want, rel=1e-6)  # ours counts the routing used
    # the same from the function, given the logits; a call-time bias counts too
    assert mr.peer_load_balance_loss(dec, "megatron", logits=x) == pytest.approx(want, rel=1e-9)
    nobias = mr.preset("megatron", E, k, score_function="sigmoid", moe_router_enable_expert_bias=True)
    dec2 = mr.route_logits(x, nobias, expert_bias=bias)
    assert dec2.peer_load_balance_loss == pytest.approx(want, rel=1e-9)
    # without bias and groups it is ours
    dec3 = mr.route_logits(x, mr.preset("megatron", E, k, score_function="sigmoid"))
    assert dec3.peer_load_balance_loss == dec3.load_balance_loss == pytest.approx(want, rel=1e-9)


def test_megatron_plain_count_without_logits_on_the_hidden_state_path(rng):
    """A decision routed from hidden states keeps Megatron's plain counts: no logits needed."""
    E, k, T, D = 16, 4, 120, 6
    hidden = rng.normal(size=(T, D))
    cfg = mr.preset("megatron", E, k, score_function="sigmoid", num_groups=4, group_topk=2,
                    expert_bias=rng.normal(size=E) * 0.5)
    router = mr.ExpertRouter(cfg, D, gate="linear", weight=rng.normal(size=(D, E)))
    dec = router.route_tokens(hidden)
    x = hidden @ router.weight
    s = sigmoid(x)
    P = (s / s.sum(1, keepdims=True)).mean(0)
    plain = np.bincount(np.argsort(-x, axis=1, kind="stable")[:, :k].ravel(), minlength=E)
    want = E / (k * T) * np.dot(plain, P)
    assert dec.peer_load_balance_loss == pytest.approx(want, rel=1e-9)
    assert mr.peer_load_balance_loss(dec, cfg) == dec.peer_load_balance_loss
    assert mr.peer_load_balance_loss(dec, "megatron", logits=x) == pytest.approx(want, rel=1e-9)
    with pytest.raises(mr.InputError, match="batch shape"):
        mr.peer_load_balance_loss(dec, "megatron", logits=x.reshape(4, T // 4, E))


def test_native_configs_have_no_peer_loss(rng):
    cfg = mr.RouterConfig(8, 2)
    dec = mr.route_logits(rng.normal(size=(10, 8)), cfg)
    assert cfg.peer is None and dec.peer_load_balance_loss is None
    assert dec.to_dict()["peer_load_balance_loss"] is None
    with pytest.raises(ValueError, match="not made by a preset"):
        mr.peer_load_balance_loss(dec, cfg)
    with pytest.raises(ValueError, match="unknown peer"):
        mr.peer_load_balance_loss(dec, "fastmoe")
    # an explicit peer name still works on a native decision
    assert mr.peer_load_balance_loss(dec, "mixtral") == pytest.approx(2 * dec.load_balance_loss)


def test_peer_loss_in_to_dict_and_empty_batch():
    cfg = mr.preset("mixtral", 8, 2)
    assert mr.route_logits(np.zeros((0, 8)), cfg).peer_load_balance_loss == 0.0
    d = mr.route_logits(np.ones((3, 8)), cfg).to_dict()
    assert d["peer_load_balance_loss"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------
# the config fields: peer and expert_bias
# ---------------------------------------------------------------------------
def test_preset_round_trips_through_replace_and_pickle(rng):
    cfg = mr.RouterConfig.preset("deepseek_v3", 16, 4, n_group=4, topk_group=2,
                                 e_score_correction_bias=rng.normal(size=16) * 0.1)
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and hash(back) == hash(cfg) and back.peer == "deepseek_v3"
    assert back.expert_bias == cfg.expert_bias and len(back.expert_bias) == 16
    changed = cfg.replace(weight_scale=1.0)
    assert changed.peer == "deepseek_v3" and changed.expert_bias == cfg.expert_bias
    assert changed.to_dict()["peer"] == "deepseek_v3"
    assert cfg.replace(peer=None).peer is None
    x = rng.normal(size=(64, 16))
    a, b = mr.route_logits(x, cfg), mr.route_logits(x, back)
    np.testing.assert_array_equal(a.expert_indices, b.expert_indices)
    assert a.peer_load_balance_loss == b.peer_load_balance_loss
    assert "peer='deepseek_v3'" in repr(cfg)


def test_config_expert_bias_is_the_default_bias(rng):
    x = rng.normal(size=(80, 8))
    bias = np.array([2.0, 0, 0, 0, 0, 0, 0, -2.0])
    cfg = mr.RouterConfig(8, 2, capacity_factor=None, score_function="sigmoid", expert_bias=bias)
    plain = mr.RouterConfig(8, 2, capacity_factor=None, score_function="sigmoid")
    ours = mr.route_logits(x, cfg)
    np.testing.assert_array_equal(ours.expert_indices, mr.route_logits(x, plain, expert_bias=bias).expert_indices)
    assert (ours.expert_indices == 0).any(axis=1).all()
    # a call-time bias wins over the configured one
    other = mr.route_logits(x, cfg, expert_bias=np.zeros(8))
    np.testing.assert_array_equal(other.expert_indices, mr.route_logits(x, plain).expert_indices)


@pytest.mark.parametrize("bad,text", [
    ([0.0] * 7, "8 real numbers"),
    ([0.0] * 7 + [math.nan], "expert_bias\\[7\\]"),
    (["a"] * 8, "real numbers"),
])
def test_config_expert_bias_validated(bad, text):
    with pytest.raises(mr.ConfigError, match=text):
        mr.RouterConfig(8, 2, expert_bias=bad)


def test_config_peer_validated():
    with pytest.raises(mr.ConfigError, match="peer"):
        mr.RouterConfig(8, 2, peer="deepspeed")  # the gate must be named
    assert mr.RouterConfig(8, 2, peer="deepspeed_top2").peer == "deepspeed_top2"

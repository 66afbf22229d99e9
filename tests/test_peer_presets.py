"""The ``tutel`` and ``fairseq`` presets against NumPy transcriptions of the frameworks' routers.

Neither framework can be installed here (Tutel needs its CUDA/C++ extensions, fairseq's
``moe`` branch an old torch), so each rule is transcribed below from the cited source,
step by step, in plain NumPy:

- Tutel (microsoft/tutel @ 82af7aa): ``tutel/impls/moe_layer.py`` ``MOELayer.forward``
  (``routing()``: softmax, the alignment), ``tutel/impls/fast_dispatch.py``
  ``extract_critical`` and ``compute_sorted_location`` (top-k, rank-major ``cumsum - 1``
  locations, BPR, ``normalize_gate``, capacity), ``tutel/impls/losses.py`` ``gshard_loss``;
- fairseq (facebookresearch/fairseq, branch ``moe`` @ ebea007):
  ``fairseq/modules/moe/top1gate.py`` ``top1gating`` and ``top2gate.py`` ``top2gating``
  (``second_expert_policy='all'``).

Stated rules where torch leaves things open: ``torch.topk``/``argmax`` ties go to the
lower expert index (a stable argsort); BPR's ``argsort`` ties go to the lower token, on
float32 scores (the frameworks' fp32 gates). Scores are float64 here; the factor and the
fraction are exact rationals (``Fraction(repr(cf))``), where the frameworks multiply
Python floats. A token is dropped where its location is ``>= capacity`` (Tutel's kernels
skip it; fairseq's ``mask * lt(locations, capacity)``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, List

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def one_hot(idx: np.ndarray, E: int) -> np.ndarray:
    out = np.zeros((idx.size, E), dtype=np.int64)
    out[np.arange(idx.size), idx] = 1
    return out


def cumsum_sub_one(mask: np.ndarray) -> np.ndarray:
    return np.cumsum(mask, axis=0) - 1


def sorted_location(mask: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``compute_sorted_location``: the cumsum in the order of ``importance`` (ascending), un-sorted."""
    order = np.argsort(importance, kind="stable")
    ordered = mask[order]
    out = np.empty_like(mask)
    out[order] = cumsum_sub_one(ordered) * ordered
    return out


def first_choice_loss(scores: np.ndarray, first: np.ndarray) -> float:
    """Tutel ``gshard_loss`` / fairseq ``l_aux``: ``E^2 * mean_e(mean_t s * mean_t mask1)``."""
    T, E = scores.shape
    if T == 0:
        return 0.0
    return float(np.mean(scores.mean(axis=0) * one_hot(first, E).mean(axis=0)) * E * E)


def tutel_route(logits: np.ndarray, k: int, cf: float, bpr: bool, normalize_gate: bool,
                alignment: int) -> Dict[str, object]:
    T, E = logits.shape
    scores = softmax(logits)
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    masks = [one_hot(topk[:, j], E) for j in range(k)]
    gates = [scores[np.arange(T), topk[:, j]] for j in range(k)]
    if bpr:
        importance = -scores.astype(np.float32).max(axis=1)
        location = lambda m: sorted_location(m, importance)  # noqa: E731
    else:
        location = cumsum_sub_one
    locations = [(location(masks[0]) * masks[0]).sum(axis=1)]
    base = np.zeros(E, dtype=np.int64)
    for j in range(1, k):
        base = base + masks[j - 1].sum(axis=0)
        locations.append(((location(masks[j]) + base) * masks[j]).sum(axis=1))
    if k > 1 and normalize_gate:
        denom = np.maximum(sum(gates), np.finfo(np.float32).eps)
        gates = [g / denom for g in gates]
    samples_per_expert = (T + E - 1) // E
    capacity = k * math.floor(Fraction(repr(cf)) * samples_per_expert)
    if capacity % alignment:
        capacity += alignment - capacity % alignment
    kept = np.stack([loc < capacity for loc in locations], axis=1)
    return dict(indices=topk, kept=kept, slots=np.where(kept, np.stack(locations, axis=1), -1),
                weights=np.where(kept, np.stack(gates, axis=1), 0.0), capacity=capacity,
                loss=first_choice_loss(scores, topk[:, 0]))


def fairseq_route(logits: np.ndarray, k: int, cf: float, training: bool, fraction: float,
                  normalize_before: bool, bpr: bool) -> Dict[str, object]:
    T, E = logits.shape
    gates = softmax(logits)
    if fraction > 0 and not training:
        capacity = math.ceil(Fraction(repr(fraction)) * T)
    elif k == 1:
        capacity = math.floor(Fraction(repr(cf)) * math.ceil(Fraction(T, E)))
    else:
        capacity = 2 * math.ceil(Fraction(T, E))
    idx1 = np.argmax(gates, axis=1)
    mask1 = one_hot(idx1, E)
    loss = first_choice_loss(gates, idx1)
    g1 = gates[np.arange(T), idx1]
    if k == 1:
        loc1 = (cumsum_sub_one(mask1) * mask1).sum(axis=1)
        kept = (loc1 < capacity)[:, None]
        return dict(indices=idx1[:, None], kept=kept, slots=np.where(kept, loc1[:, None], -1),
                    weights=np.where(kept, g1[:, None], 0.0), capacity=capacity, loss=loss)
    idx2 = np.argmax(np.where(mask1 == 1, -np.inf, logits), axis=1)
    mask2 = one_hot(idx2, E)
    g2 = gates[np.arange(T), idx2]
    if normalize_before:
        denom = np.maximum(g1 + g2, np.finfo(np.float32).eps)
        g1, g2 = g1 / denom, g2 / denom
    if bpr:
        importance = -gates.astype(np.float32).max(axis=1)
        loc1 = sorted_location(mask1, importance)
        loc2 = sorted_location(mask2, importance) + mask1.sum(axis=0)
    else:
        loc1 = cumsum_sub_one(mask1)
        loc2 = cumsum_sub_one(mask2) + mask1.sum(axis=0)
    loc1, loc2 = (loc1 * mask1).sum(axis=1), (loc2 * mask2).sum(axis=1)
    k1, k2 = loc1 < capacity, loc2 < capacity
    g1, g2 = g1 * k1, g2 * k2
    if not normalize_before:
        denom = np.maximum(g1 + g2, np.finfo(np.float32).eps)
        g1, g2 = g1 / denom, g2 / denom
    kept = np.stack([k1, k2], axis=1)
    return dict(indices=np.stack([idx1, idx2], axis=1), kept=kept,
                slots=np.where(kept, np.stack([loc1, loc2], axis=1), -1), weights=np.stack([g1, g2], axis=1),
                capacity=capacity, loss=loss)


def assert_same(dec: mr.RoutingDecision, want: Dict[str, object]) -> None:
    np.testing.assert_array_equal(dec.expert_indices, want["indices"])
    np.testing.assert_array_equal(dec.kept, want["kept"])
    np.testing.assert_array_equal(dec.expert_slots, want["slots"])
    np.testing.assert_allclose(dec.expert_weights, want["weights"], rtol=0, atol=1e-6)
    assert dec.capacity == want["capacity"]
    assert dec.peer_load_balance_loss == pytest.approx(want["loss"], rel=1e-9, abs=1e-12)


def draw_logits(seed: int, T: int, E: int, coarse: bool) -> np.ndarray:
    """Gaussian logits; ``coarse`` rounds them to halves, so rows hold exact ties."""
    x = np.random.default_rng(seed).normal(scale=2.0, size=(T, E))
    return np.round(x * 2) / 2 if coarse else x


CASE = dict(seed=st.integers(0, 2**32 - 1), T=st.integers(0, 300), E=st.integers(2, 16), coarse=st.booleans())


@settings(deadline=None, max_examples=300, derandomize=True)
@given(**CASE, k=st.integers(1, 4), cf=st.sampled_from([1.0, 1.25, 0.5, 0.29, 2.0, 0.07]), bpr=st.booleans(),
       normalize_gate=st.booleans(), alignment=st.sampled_from([1, 1, 8, 24]))
def test_tutel_matches_its_transcription(seed, T, E, coarse, k, cf, bpr, normalize_gate, alignment):
    k = min(k, E)
    logits = draw_logits(seed, T, E, coarse)
    cfg = mr.preset("tutel", E, k, capacity_factor=cf, batch_prioritized_routing=bpr,
                    normalize_gate=normalize_gate, sharded_count=alignment)
    for training in (True, False):
        assert_same(mr.route_logits(logits, cfg, training=training),
                    tutel_route(logits, k, cf, bpr, normalize_gate, alignment))


@settings(deadline=None, max_examples=300, derandomize=True)
@given(**CASE, k=st.integers(1, 2), cf=st.sampled_from([1.0, 1.25, 0.5, 0.29, 2.0]), training=st.booleans(),
       fraction=st.sampled_from([0.25, 0.07, 1.0, -1.0]), before=st.booleans(), bpr=st.booleans())
def test_fairseq_matches_its_transcription(seed, T, E, coarse, k, cf, training, fraction, before, bpr):
    bpr = bpr and k == 2
    logits = draw_logits(seed, T, E, coarse)
    cfg = mr.preset("fairseq", E, k, capacity_factor=cf, moe_eval_capacity_token_fraction=fraction,
                    normalize_gate_prob_before_dropping=before, batch_prioritized_routing=bpr)
    assert_same(mr.route_logits(logits, cfg, training=training),
                fairseq_route(logits, k, cf, training, fraction, before, bpr))


def test_capacities_of_the_survey_table():
    """anchors.md 11.2: (T, E, k, cf) -> Tutel, fairseq."""
    rows = [((200, 4, 1, 1.1), 55, 55), ((320, 6, 1, 1.05), 56, 56), ((320, 6, 2, 1.05), 112, 108),
            ((4096, 64, 2, 1.25), 160, 128), ((100, 8, 2, 1.0), 26, 26), ((36, 8, 1, 1.0), 5, 5),
            ((20, 8, 1, 1.0), 3, 3)]
    for (T, E, k, cf), tutel, fairseq in rows:
        assert mr.preset("tutel", E, k, capacity_factor=cf).capacity(T) == tutel
        assert mr.preset("fairseq", E, k, capacity_factor=cf).capacity(T) == fairseq
    # fairseq's evaluation capacity: ceil(0.25 * T) whatever k and the factor.
    assert mr.preset("fairseq", 8, 2).capacity(101, training=False) == 26
    assert mr.preset("fairseq", 8, 2, moe_eval_capacity_token_fraction=-1).capacity(101, training=False) == 26
    assert mr.preset("fairseq", 8, 1, moe_eval_capacity_token_fraction=-1).capacity(101, training=False) == 13


def test_tutel_alignment_and_dynamic_capacity_factors():
    # MOELayer.forward: sharded_count * a2a_ffn_overlap_degree, up to megablocks_size, 128s above 256.
    align = lambda **kw: mr.preset("tutel", 8, 2, **kw).capacity_alignment  # noqa: E731
    assert align() == 1 and align(sharded_count=3, a2a_ffn_overlap_degree=2) == 6
    assert align(sharded_count=3, megablocks_size=16) == 16 and align(sharded_count=300) == 384
    assert mr.preset("tutel", 8, 2, sharded_count=3).capacity(100) == 27  # 26 up to 27
    assert mr.preset("tutel", 8, 2, capacity_factor=0).capacity_factor is None
    # cf < 0: min(needed, bound) keeps what the bound keeps.
    logits = draw_logits(3, 200, 8, False)
    neg = mr.route_logits(logits, mr.preset("tutel", 8, 2, capacity_factor=-0.5), training=True)
    want = tutel_route(logits, 2, 0.5, False, True, 1)
    np.testing.assert_array_equal(neg.kept, want["kept"])
    np.testing.assert_array_equal(neg.expert_slots, want["slots"])
    dropless = mr.route_logits(logits, mr.preset("tutel", 8, 2, capacity_factor=0))
    assert dropless.dropped_assignments == 0
    assert dropless.capacity == int(np.bincount(dropless.expert_indices.ravel(), minlength=8).max())


def test_tutel_gate_noise_is_training_only_and_scaled_by_experts():
    cfg = mr.preset("tutel", 8, 2, gate_noise=1.0)
    assert cfg.noise_std == pytest.approx(1.0 / 8) and mr.preset("tutel", 8, 2).noise_std == 0.0
    logits = draw_logits(5, 64, 8, False)
    quiet = mr.route_logits(logits, mr.preset("tutel", 8, 2), training=False)
    noisy_eval = mr.route_logits(logits, cfg, training=False)
    np.testing.assert_array_equal(quiet.expert_weights, noisy_eval.expert_weights)
    # In training the noisy scores make the weights and the loss (Tutel's routing()).
    noisy = mr.route_logits(logits, cfg, training=True, return_probs=True)
    assert not np.array_equal(noisy.router_probs, softmax(logits).astype(np.float32))
    np.testing.assert_allclose(noisy.expert_prob_mean, noisy.router_probs.mean(axis=0), atol=1e-6)


def test_padding_takes_no_capacity():
    """fairseq removes padding from mask1/mask2 before the cumsum: a padded token takes no slot."""
    logits = draw_logits(9, 40, 4, False)
    mask = np.ones(40, dtype=bool)
    mask[::3] = False
    dec = mr.route_logits(logits, mr.preset("fairseq", 4, 2), token_mask=mask, training=True)
    want = fairseq_route(logits[mask], 2, 1.0, True, 0.25, False, False)
    np.testing.assert_array_equal(dec.expert_slots[mask], want["slots"])
    assert not dec.kept[~mask].any()


BAD: List[tuple] = [
    ("fairseq", 3, {}, mr.ConfigError, "top_k"),
    ("fairseq", 2, {"second_expert_policy": "sampling"}, mr.ConfigError, "second_expert_policy"),
    ("fairseq", 2, {"moe_second_expert_policy": "random"}, mr.ConfigError, "second_expert_policy"),
    ("fairseq", 1, {"batch_prioritized_routing": True}, mr.ConfigError, "batch_prioritized_routing"),
    ("fairseq", 2, {"moe_eval_capacity_token_fraction": "0.25"}, mr.ConfigTypeError,
     "moe_eval_capacity_token_fraction"),
    ("fairseq", 2, {"normalize_gate_prob_before_dropping": 1}, mr.ConfigTypeError,
     "normalize_gate_prob_before_dropping"),
    ("fairseq", 2, {"use_fp32": True, "moe_gating_use_fp32": False}, mr.ConfigError, "use_fp32"),
    ("tutel", 2, {"is_gshard_loss": False}, mr.ConfigError, "is_gshard_loss"),
    ("tutel", 2, {"gate_noise": "1"}, mr.ConfigTypeError, "gate_noise"),
    ("tutel", 2, {"gate_noise": float("nan")}, mr.ConfigError, "gate_noise"),
    ("tutel", 2, {"gate_noise": -1.0}, mr.ConfigError, "gate_noise"),
    ("fairseq", 2, {"second_expert_policy": "alll"}, mr.ConfigError, "second_expert_policy"),
    ("fairseq", 2, {"second_expert_policy": 123}, mr.ConfigError, "second_expert_policy"),
    ("tutel", 2, {"sharded_count": 0}, mr.ConfigError, "sharded_count"),
    ("tutel", 2, {"megablocks_size": -1}, mr.ConfigError, "megablocks_size"),
    ("tutel", 2, {"normalize_gate": "yes"}, mr.ConfigTypeError, "normalize_gate"),
    ("tutel", 2, {"capacity_factor": "1.0"}, mr.ConfigTypeError, "capacity_factor"),
    ("tutel", 2, {"num_global_experts": 4}, mr.ConfigError, "num_global_experts"),
    ("tutel", 2, {"gate_type": "top2"}, mr.ConfigTypeError, "gate_type"),
]


@pytest.mark.parametrize("name, k, settings_, error, word", BAD)
def test_bad_settings_name_the_parameter(name, k, settings_, error, word):
    with pytest.raises(error, match=word) as info:
        mr.preset(name, 8, k, **settings_)
    assert f"preset {name!r}" in str(info.value) or "unknown setting" in str(info.value)


def test_settings_map_to_our_fields():
    t = mr.preset("tutel", 8, 2, batch_prioritized_routing=True, normalize_gate=False)
    assert (t.drop_policy, t.normalize_weights, t.peer, t.capacity_rounding) == ("bpr_rank", False, "tutel", "tutel")
    assert mr.preset("tutel", 8, 1).normalize_weights is False  # normalize_gate acts for k > 1 only
    f = mr.preset("fairseq", 8, 2, normalize_gate_prob_before_dropping=True)
    assert (f.normalize_weights, f.renormalize_after_drop, f.eval_capacity_token_fraction) == (True, False, 0.25)
    f1 = mr.preset("fairseq", 8, 1, moe_expert_count=8)
    assert (f1.drop_policy, f1.renormalize_after_drop, f1.peer) == ("position", False, "fairseq")
    assert mr.peer_load_balance_loss(mr.route_logits(draw_logits(1, 32, 8, False), f1), "fairseq") >= 0.0


def test_new_fields_are_checked():
    with pytest.raises(mr.ConfigError, match="eval_capacity_token_fraction"):
        mr.RouterConfig(eval_capacity_token_fraction=0.25, eval_capacity_factor=1.0)
    with pytest.raises(mr.ConfigError, match="eval_capacity_token_fraction"):
        mr.RouterConfig(eval_capacity_token_fraction=0.25, expert_capacity=4)
    with pytest.raises(mr.ConfigError, match="capacity_rounding"):
        mr.RouterConfig(num_experts=8, top_k=3, capacity_rounding="fairseq")
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_alignment=16, eval_capacity_token_fraction=0.07)
    assert cfg.capacity(100) == 32 and cfg.capacity(100, training=False) == 16  # ceil(7) = 7, up to 16
    assert mr.RouterConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("bpr", [False, True])
def test_batches_of_several_chunks(bpr):
    """The parallel passes (chunks of 512 tokens) give the transcription's sequential answer."""
    logits = draw_logits(11, 2500, 16, False)
    for k in (1, 2, 3):
        cfg = mr.preset("tutel", 16, k, capacity_factor=0.8, batch_prioritized_routing=bpr)
        assert_same(mr.route_logits(logits, cfg, training=True), tutel_route(logits, k, 0.8, bpr, True, 1))
    for k in (1, 2):
        cfg = mr.preset("fairseq", 16, k, batch_prioritized_routing=bpr and k == 2)
        assert_same(mr.route_logits(logits, cfg, training=True),
                    fairseq_route(logits, k, 1.0, True, 0.25, False, bpr and k == 2))

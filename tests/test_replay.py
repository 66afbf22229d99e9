"""Router replay: ``decision.record()``, ``route_logits(..., replay=)`` against a NumPy reference written
here (gather the recorded experts' scores, normalize, scale, then capacity by the drop policy), the
backward of a replayed decision against finite differences of that reference, and the ``.npz`` format."""

from __future__ import annotations

import itertools
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from helpers import logsumexp, scores
from reference import capacity_of

ARRAYS = ("expert_indices", "expert_weights", "expert_slots", "kept", "rerouted", "tokens_per_expert",
          "pre_drop_tokens_per_expert", "expert_prob_mean")
SCALARS = ("capacity", "active_tokens", "kept_assignments", "dropped_assignments", "tokens_dropped",
           "load_balance_loss", "router_z_loss", "auxiliary_loss", "seq_load_balance_loss")


def replay_reference(x, idx, mask, cfg):
    """Route float64 ``x [T, E]`` with the recorded experts ``idx [T, k]``; dict of float64 weights
    before drops (``raw``), float32 ``weights``, ``kept``, ``slots``, counts and losses."""
    T, E = x.shape
    k = idx.shape[1]
    active = np.ones(T, bool) if mask is None else np.asarray(mask, bool)
    s = scores(x, cfg.score_function)
    routed = np.zeros((T, k), bool)
    raw = np.zeros((T, k))
    for t in np.flatnonzero(active):
        routed[t] = x[t, idx[t]] > -np.inf
        w = np.where(routed[t], s[t, idx[t]], 0.0)
        if cfg.normalize_weights:
            w = w / w.sum() if w.sum() > 0 else w
        raw[t] = cfg.weight_scale * w
    w32 = raw.astype(np.float32)
    n_active = int(active.sum())
    cap = capacity_of(cfg.capacity_factor, "exact", cfg.min_capacity, n_active, k, E)
    pairs = [(t, j) for t in range(T) for j in range(k) if routed[t, j]]
    if cfg.drop_policy == "rank":
        pairs.sort(key=lambda p: (p[1], p[0]))
    elif cfg.drop_policy == "bpr":
        top1 = [float(np.float32(s[t, idx[t, 0]])) if routed[t, 0] else 0.0 for t in range(T)]
        pairs.sort(key=lambda p: (-top1[p[0]], p[0], p[1]))
    winners = set(pairs)
    if cfg.drop_policy == "probs" and cap is not None:
        winners = set()
        for e in range(E):
            mine = sorted((p for p in pairs if idx[p] == e), key=lambda p: (-float(w32[p]), p[0]))
            winners.update(mine[:cap])
    kept = np.zeros((T, k), bool)
    slots = np.full((T, k), -1)
    load = np.zeros(E, np.int64)
    for p in pairs:
        e = idx[p]
        if p in winners and (cap is None or load[e] < cap):
            kept[p], slots[p] = True, load[e]
            load[e] += 1
    pre = np.zeros(E, np.int64)
    for p in pairs:
        pre[idx[p]] += 1
    q = s / s.sum(1, keepdims=True)
    prob_mean = q[active].mean(0) if n_active else np.zeros(E)
    lb = E * float((pre / max(n_active * k, 1) * prob_mean).sum())
    z = float((logsumexp(x[active]) ** 2).mean()) if n_active else 0.0
    return {"raw": raw, "weights": np.where(kept, w32, np.float32(0)), "kept": kept, "slots": slots,
            "tokens_per_expert": load, "pre_drop": pre, "expert_prob_mean": prob_mean, "load_balance_loss": lb,
            "router_z_loss": z,
            "auxiliary_loss": cfg.load_balance_loss_coeff * lb + cfg.router_z_loss_coeff * z}


def assert_matches_reference(dec, ref, idx):
    np.testing.assert_array_equal(dec.expert_indices, idx)
    np.testing.assert_array_equal(dec.kept, ref["kept"])
    np.testing.assert_array_equal(dec.expert_slots, ref["slots"])
    np.testing.assert_array_equal(dec.tokens_per_expert, ref["tokens_per_expert"])
    np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, ref["pre_drop"])
    np.testing.assert_allclose(dec.expert_weights, ref["weights"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dec.expert_prob_mean, ref["expert_prob_mean"], rtol=1e-6, atol=1e-9)
    for name in ("load_balance_loss", "router_z_loss", "auxiliary_loss"):
        np.testing.assert_allclose(getattr(dec, name), ref[name], rtol=1e-6, atol=1e-9)


def assert_same_decision(a, b):
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in SCALARS:
        assert getattr(a, name) == getattr(b, name), name


SELF_REPLAY = [
    dict(drop_policy=p, score_function=sf, normalize_weights=nw, capacity_factor=cf)
    for p, sf, nw, cf in itertools.product(["position", "rank", "probs", "bpr"], ["softmax", "sigmoid"],
                                           [False, True], [None, 0.8])
] + [
    dict(overflow="reroute", capacity_factor=0.7),
    dict(num_groups=4, group_top_k=2, score_function="sigmoid", normalize_weights=True, weight_scale=2.5),
    dict(renormalize_after_drop=True, capacity_factor=0.6, drop_policy="probs"),
    dict(jitter_eps=0.1, noise_std=0.3, capacity_factor=0.9),
]


@pytest.mark.parametrize("options", SELF_REPLAY, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_own_recording_replays_bit_for_bit(rng, options):
    T, E, k = 300, 8, 2
    x = rng.normal(size=(T, E)).astype(np.float32)
    x[5, 3] = -np.inf
    mask = rng.random(T) > 0.1
    bias = rng.normal(size=E) * 0.3
    cfg = mr.RouterConfig(num_experts=E, top_k=k, **options)
    dec = mr.route_logits(x, cfg, training=True, token_mask=mask, expert_bias=bias, step=7)
    again = mr.route_logits(x, cfg, training=True, token_mask=mask, expert_bias=bias, step=7, replay=dec.record())
    assert_same_decision(dec, again)
    # The recording's mask is used when the call passes none; the bias only selects, so it changes nothing.
    without = mr.route_logits(x, cfg, training=True, step=7, replay=dec.record())
    assert_same_decision(dec, without)


def test_replay_is_the_same_at_any_thread_count(rng, restore_threads):
    x = rng.normal(size=(3000, 16)).astype(np.float32)  # several chunks
    cfg = mr.RouterConfig(num_experts=16, top_k=4, capacity_factor=0.8, drop_policy="probs", normalize_weights=True)
    rec = mr.route_logits(rng.normal(size=(3000, 16)), cfg).record()
    restore_threads(1)
    one = mr.route_logits(x, cfg, replay=rec)
    restore_threads(2)
    assert_same_decision(one, mr.route_logits(x, cfg, replay=rec))


def test_megatron_preset_self_replay_keeps_its_plain_top_k_loss(rng):
    # Megatron counts its loss on a fresh plain top-k; under a bias it differs from the routing used.
    cfg = mr.preset("megatron", 8, 2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    bias = rng.normal(size=8)
    dec = mr.route_logits(x, cfg, expert_bias=bias)
    again = mr.route_logits(x, cfg, expert_bias=bias, replay=dec.record())
    assert_same_decision(dec, again)
    assert again.peer_load_balance_loss == dec.peer_load_balance_loss
    assert dec.peer_load_balance_loss != dec.load_balance_loss


def test_record_holds_the_selection_compactly(rng):
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    x[..., 0] += 4  # every token's first choice: expert 0 overflows, its assignments move
    mask = np.ones((2, 5), bool)
    mask[1, 4] = False
    cfg = mr.RouterConfig(num_experts=8, top_k=3, capacity_factor=1.0, overflow="reroute")
    dec = mr.route_logits(x, cfg, token_mask=mask)
    rec = dec.record()
    assert (rec.num_tokens, rec.top_k, rec.num_experts, rec.batch_shape) == (10, 3, 8, (2, 5))
    assert rec.expert_indices.dtype == np.int8 and rec.expert_indices.shape == (10, 3)
    np.testing.assert_array_equal(rec.token_mask, mask.reshape(-1))
    # The experts as selected, before reroutes: the plain top-k of the logits.
    want = np.argsort(-x.reshape(10, 8), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(rec.expert_indices[mask.reshape(-1)], want[mask.reshape(-1)])
    assert dec.rerouted.any() and (rec.expert_indices != dec.expert_indices).any()
    with pytest.raises(ValueError):
        rec.expert_indices[0, 0] = 1  # read-only


REPLAY_OPTIONS = [
    dict(drop_policy=p, score_function=sf, normalize_weights=nw, capacity_factor=cf, weight_scale=ws)
    for p, sf, nw, cf, ws in itertools.product(["position", "rank", "probs", "bpr"], ["softmax", "sigmoid"],
                                               [False, True], [None, 0.75, 1.25], [1.0, 2.5])
]


@pytest.mark.parametrize("options", REPLAY_OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_replay_on_new_logits_matches_reference(rng, options):
    T, E, k = 64, 6, 2
    old = rng.normal(size=(T, E))
    new = rng.normal(size=(T, E)) * 2.0
    mask = rng.random(T) > 0.15
    cfg = mr.RouterConfig(num_experts=E, top_k=k, load_balance_loss_coeff=0.3, router_z_loss_coeff=0.05,
                          **options)
    rec = mr.route_logits(old, cfg, token_mask=mask).record()
    dec = mr.route_logits(new, cfg, token_mask=mask, replay=rec)
    idx = rec.expert_indices.astype(np.int64)
    assert_matches_reference(dec, replay_reference(new, idx, mask, cfg), idx)
    # A fresh routing of the new logits chooses differently: the replay did not re-select.
    assert (mr.route_logits(new, cfg, token_mask=mask).expert_indices[mask] != idx[mask]).any()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_replay_reference_property(data):
    T = data.draw(st.integers(0, 40))
    E = data.draw(st.integers(1, 12))
    k = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cfg = mr.RouterConfig(num_experts=E, top_k=k,
                          drop_policy=data.draw(st.sampled_from(["position", "rank", "probs", "bpr"])),
                          score_function=data.draw(st.sampled_from(["softmax", "sigmoid"])),
                          normalize_weights=data.draw(st.booleans()),
                          capacity_factor=data.draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
                          min_capacity=data.draw(st.integers(0, 3)))
    idx = np.array([rng.permutation(E)[:k] for _ in range(T)], dtype=np.int64).reshape(T, k)
    mask = rng.random(T) > 0.2
    x = rng.normal(size=(T, E)) * 3
    x[rng.random((T, E)) < 0.1] = -np.inf
    x[np.arange(T), rng.integers(0, E, T) if E else []] = 0.5  # every row keeps an eligible expert
    rec = mr.RecordedRoute(idx, E, token_mask=mask)
    dec = mr.route_logits(x.astype(np.float32), cfg, token_mask=mask, replay=rec)
    ref = replay_reference(x.astype(np.float32).astype(np.float64), idx, mask, cfg)
    want_idx = np.where(mask[:, None], idx, np.arange(k)[None, :])  # padding reports fillers 0..k-1
    assert_matches_reference(dec, ref, want_idx)


def test_ineligible_recorded_expert_gets_no_weight_and_no_capacity():
    cfg = mr.RouterConfig(num_experts=4, top_k=2, capacity_factor=None, normalize_weights=True)
    rec = mr.RecordedRoute(np.array([[0, 1], [2, 3]]), 4)
    x = np.array([[-np.inf, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    dec = mr.route_logits(x, cfg, replay=rec)
    assert dec.kept.tolist() == [[False, True], [True, True]]
    np.testing.assert_allclose(dec.expert_weights, [[0.0, 1.0], [0.5, 0.5]], rtol=1e-6)
    assert dec.tokens_per_expert.tolist() == [0, 1, 1, 1] and dec.tokens_dropped == 0


def objective(x, idx, mask, cfg, g_w, g_aux):
    ref = replay_reference(x, idx, mask, cfg)
    return float((g_w * ref["raw"] * ref["kept"]).sum()) + g_aux * ref["auxiliary_loss"]


@pytest.mark.parametrize("sf,nw,cf", list(itertools.product(["softmax", "sigmoid"], [False, True], [None, 0.75])))
def test_backward_of_a_replay_matches_finite_differences(rng, sf, nw, cf):
    T, E, k = 12, 6, 2
    cfg = mr.RouterConfig(num_experts=E, top_k=k, score_function=sf, normalize_weights=nw, capacity_factor=cf,
                          load_balance_loss_coeff=0.3, router_z_loss_coeff=0.05, weight_scale=1.5)
    mask = rng.random(T) > 0.2
    rec = mr.route_logits(rng.normal(size=(T, E)), cfg, token_mask=mask).record()
    idx = rec.expert_indices.astype(np.int64)
    x = rng.normal(size=(T, E)) * 1.5
    dec = mr.route_logits(x, cfg, replay=rec)
    g_w, g_aux = rng.normal(size=(T, k)), 1.7
    got = dec.backward(grad_expert_weights=g_w, grad_auxiliary_loss=g_aux)
    assert (got[~mask] == 0).all()
    eps = 1e-6
    want = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        want[i] = (objective(up, idx, mask, cfg, g_w, g_aux) - objective(down, idx, mask, cfg, g_w, g_aux)) / (2 * eps)
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0)


def test_expert_router_replays_through_new_weights(rng):
    D, E = 16, 8
    cfg = mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=None, enable_load_balancing=False)
    router = mr.ExpertRouter(cfg, D, seed=1)
    hidden = rng.normal(size=(40, D)).astype(np.float32)
    rec = router.route_tokens(hidden).record()
    router.update_router_weights(rng.normal(size=(D, E)).astype(np.float32))
    dec = router.route_tokens(hidden, replay=rec)
    logits = hidden.astype(np.float64) @ router.weight.astype(np.float64)
    ref = replay_reference(logits, rec.expert_indices.astype(np.int64), None, cfg)
    np.testing.assert_array_equal(dec.expert_indices, rec.expert_indices)
    np.testing.assert_allclose(dec.expert_weights, ref["weights"], rtol=1e-5)
    assert_same_decision(router.route_logits(logits, replay=rec), mr.route_logits(logits, cfg, replay=rec))


@pytest.mark.parametrize("gate", ["linear", "hierarchical"])
def test_expert_router_self_replay_and_backward(rng, gate):
    D, E = 12, 36
    cfg = mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=0.9, load_balance_loss_coeff=0.1)
    router = mr.ExpertRouter(cfg, D, seed=2, gate=gate)
    hidden = rng.normal(size=(3, 30, D))
    mask = rng.random((3, 30)) > 0.1
    dec = router.route_tokens(hidden, token_mask=mask)
    again = router.route_tokens(hidden, token_mask=mask, replay=dec.record())
    assert_same_decision(dec, again)
    if gate == "linear":
        g = rng.normal(size=(90, 2))
        for a, b in zip(router.backward(dec, g), router.backward(again, g)):
            np.testing.assert_array_equal(a, b)


def test_recorded_route_num_experts_is_bounded_like_the_config():
    with pytest.raises(mr.InputError, match=r"num_experts"):
        mr.RecordedRoute(np.zeros((2, 1), np.int64), 2**31)
    assert mr.RecordedRoute(np.zeros((2, 1), np.int64), 2**31 - 1).num_experts == 2**31 - 1


def test_mismatched_replay_is_an_input_error_naming_replay(rng):
    cfg = mr.RouterConfig(num_experts=8, top_k=2)
    x = rng.normal(size=(10, 8))
    rec = mr.route_logits(x, cfg).record()
    for bad_x, bad_cfg in [(x[:9], cfg), (x, mr.RouterConfig(num_experts=8, top_k=3)),
                           (np.zeros((10, 9)), mr.RouterConfig(num_experts=9, top_k=2))]:
        with pytest.raises(mr.InputError, match=r"^replay has shape"):
            mr.route_logits(bad_x, bad_cfg, replay=rec)
    padded = mr.RecordedRoute(rec.expert_indices, 8, token_mask=np.arange(10) != 4)
    with pytest.raises(mr.InputError, match=r"replay token 4 .*padding in the recording"):
        mr.route_logits(x, cfg, token_mask=np.ones(10, bool), replay=padded)
    with pytest.raises(mr.InputTypeError, match="replay must be a moe_router.RecordedRoute"):
        mr.route_logits(x, cfg, replay=mr.RecordedRoutes([rec]))
    # Only token choice has a top-k to replace.
    chooser = mr.RouterConfig(num_experts=8, top_k=2, routing="expert_choice")
    with pytest.raises(mr.ConfigError, match="routing: got 'expert_choice'; must be 'token_choice' or 'sinkhorn' to replay"):
        mr.route_logits(x, chooser, replay=rec)


@pytest.mark.parametrize("ids,e,message", [
    ([[0, 0]], 4, r"expert_indices: replay\[0, 1\] is 0; a token's recorded experts must be distinct"),
    ([[0, 4]], 4, r"expert_indices: replay\[0, 1\] is 4; expert ids must be in \[0, 4\)"),
    ([[-1, 2]], 4, r"replay\[0, 0\] is -1"),
    ([[2**40, 1]], 4, r"replay\[0, 0\] is -1"),
    ([0, 1], 4, r"expert_indices: shape \[2\]; expected \[T, k\]"),
    (np.zeros((3, 0), int), 4, r"k must be at least 1"),
])
def test_constructor_checks_ids(ids, e, message):
    with pytest.raises(mr.InputError, match=message):
        mr.RecordedRoute(np.asarray(ids), e)


def test_constructor_checks_mask_and_shape():
    ids = np.array([[0, 1], [1, 2]])
    with pytest.raises(mr.InputError, match=r"token_mask: 3 flags, expected 2"):
        mr.RecordedRoute(ids, 4, token_mask=np.ones(3, bool))
    with pytest.raises(mr.InputTypeError, match="token_mask must be a bool array"):
        mr.RecordedRoute(ids, 4, token_mask=np.ones(2))
    with pytest.raises(mr.InputTypeError, match="expert_indices must be an integer array"):
        mr.RecordedRoute(ids.astype(float), 4)
    with pytest.raises(mr.InputError, match=r"batch_shape: \[3\] does not hold the 2 tokens"):
        mr.RecordedRoute(ids, 4, batch_shape=(3,))
    assert mr.RecordedRoute(ids, 4, batch_shape=(1, 2)).batch_shape == (1, 2)


@pytest.mark.parametrize("e,dtype", [(1, np.int8), (127, np.int8), (128, np.int16), (32767, np.int16),
                                     (32768, np.int32), (70000, np.int32)])
def test_save_load_round_trip_at_dtype_thresholds(tmp_path, rng, e, dtype):
    T, k = 9, min(3, e)
    ids = np.array([rng.choice(e, size=k, replace=False) for _ in range(T)])
    ids[0, 0] = e - 1
    mask = rng.random(T) > 0.3
    rec = mr.RecordedRoute(ids, e, token_mask=mask, batch_shape=(3, 3))
    assert rec.expert_indices.dtype == dtype
    rec.save(tmp_path / "one.npz")
    with np.load(tmp_path / "one.npz") as f:
        assert sorted(f.files) == ["layer_000_batch_shape", "layer_000_experts", "layer_000_num_experts",
                                   "layer_000_token_mask", "num_layers", "version"]
        assert int(f["version"]) == 1 and int(f["num_layers"]) == 1 and f["layer_000_experts"].dtype == dtype
    back = mr.RecordedRoute.load(tmp_path / "one.npz")
    assert back.expert_indices.dtype == dtype
    np.testing.assert_array_equal(back.expert_indices, ids)
    np.testing.assert_array_equal(back.token_mask, mask)
    assert (back.batch_shape, back.num_experts, back.top_k) == ((3, 3), e, k)


def test_many_layers_round_trip(tmp_path, rng):
    cfg = mr.RouterConfig(num_experts=16, top_k=2)
    decisions = [mr.route_logits(rng.normal(size=(2, 6, 16)), cfg) for _ in range(3)]
    routes = mr.RecordedRoutes(decisions[:2] + [decisions[2].record()])
    assert len(routes) == 3 and len(routes.layers) == 3 and routes[-1].batch_shape == (2, 6)
    routes.save(tmp_path / "model")  # NumPy adds .npz
    back = mr.RecordedRoutes.load(tmp_path / "model.npz")
    for dec, layer in zip(decisions, back.layers):
        np.testing.assert_array_equal(layer.expert_indices, dec.expert_indices)
    with pytest.raises(mr.InputError, match="num_layers is 3; RecordedRoute.load reads a file of one layer"):
        mr.RecordedRoute.load(tmp_path / "model.npz")
    with pytest.raises(IndexError):
        routes[3]
    with pytest.raises(mr.InputTypeError, match="layers must be an iterable of RecordedRoute or RoutingDecision"):
        mr.RecordedRoutes([1])
    mr.RecordedRoutes([]).save(tmp_path / "empty.npz")
    assert len(mr.RecordedRoutes.load(tmp_path / "empty.npz")) == 0


def good_arrays():
    return {"version": np.int64(1), "num_layers": np.int64(1),
            "layer_000_experts": np.array([[0, 1], [2, 3]], np.int8),
            "layer_000_token_mask": np.array([True, False]),
            "layer_000_batch_shape": np.array([2], np.int64), "layer_000_num_experts": np.int64(4)}


CORRUPTIONS = [
    ("version", np.int64(2), r"version: 2; this build reads version 1"),
    ("version", np.array([1]), r"version: int64 of shape \[1\]; expected an int64 scalar"),
    ("version", None, r"version: missing"),
    ("num_layers", np.int64(2), r"layer_001_num_experts: missing"),
    ("num_layers", np.int64(-1), r"num_layers: -1; expected at least 0"),
    ("layer_000_experts", np.array([[0, 1], [2, 3]], np.int32), r"layer_000_experts: dtype int32; expected int8"),
    ("layer_000_experts", np.array([[0, 1], [2, 3]], np.float32), r"layer_000_experts: dtype float32"),
    ("layer_000_experts", np.array([0, 1], np.int8), r"layer_000_experts: shape \[2\]; expected \[T, k\]"),
    ("layer_000_experts", np.array([[0, 1], [2, 4]], np.int8), r"layer_000_experts: replay\[1, 1\] is 4"),
    ("layer_000_experts", np.array([[0, 1], [3, 3]], np.int8), r"layer_000_experts: replay\[1, 1\] is 3; .*distinct"),
    ("layer_000_experts", None, r"layer_000_experts: missing"),
    ("layer_000_token_mask", np.array([1, 0], np.int8), r"layer_000_token_mask: int8 of shape \[2\]; expected a 1-D bool"),
    ("layer_000_token_mask", np.array([True]), r"layer_000_token_mask: 1 flags, expected 2"),
    ("layer_000_batch_shape", np.array([3], np.int64), r"layer_000_batch_shape: \[3\] does not hold the 2 tokens"),
    ("layer_000_batch_shape", np.array([-2, -1], np.int64), r"layer_000_batch_shape: \[-2, -1\] has a negative"),
    ("layer_000_batch_shape", np.array([2.0]), r"layer_000_batch_shape: float64 of shape \[1\]"),
    ("layer_000_num_experts", np.int64(0), r"layer_000_num_experts: 0; expected at least 1"),
    ("layer_000_num_experts", np.int64(200), r"layer_000_experts: dtype int8; expected int16 for 200 experts"),
    ("layer_000_weights", np.zeros(2), r"layer_000_weights: unexpected key \(the file has num_layers = 1\)"),
]


@pytest.mark.parametrize("key,value,message", CORRUPTIONS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPTIONS)])
def test_corrupted_files_name_the_key(tmp_path, key, value, message):
    arrays = good_arrays()
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    path = tmp_path / "bad.npz"
    np.savez_compressed(path, **arrays)
    with pytest.raises(mr.InputError, match=f"^{path}: {message}"):
        mr.RecordedRoutes.load(path)


def test_unreadable_files(tmp_path):
    np.savez_compressed(tmp_path / "ok.npz", **good_arrays())
    assert mr.RecordedRoute.load(tmp_path / "ok.npz").token_mask.tolist() == [True, False]
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(mr.InputError, match=r"junk.npz is not a replay .npz file \(not a NumPy .npy/.npz file\)$"):
        mr.RecordedRoutes.load(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(mr.InputError, match="single.npy is not a replay .npz file .a single array"):
        mr.RecordedRoutes.load(tmp_path / "single.npy")
    arrays = good_arrays()
    arrays["layer_000_experts"] = np.array([[0, 1], [2, 3]], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(mr.InputError, match=r"layer_000_experts: unreadable"):
        mr.RecordedRoutes.load(tmp_path / "pickled.npz")
    with zipfile.ZipFile(tmp_path / "ok.npz") as z:
        names = z.namelist()
    data = bytearray((tmp_path / "ok.npz").read_bytes())
    at = data.find(b"layer_000_experts.npy") + 60  # inside that member's compressed bytes
    data[at:at + 8] = b"\xff" * 8
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    assert "layer_000_experts.npy" in names
    with pytest.raises(mr.InputError, match="flipped.npz"):
        mr.RecordedRoutes.load(tmp_path / "flipped.npz")
    with pytest.raises(FileNotFoundError):
        mr.RecordedRoutes.load(tmp_path / "absent.npz")


def test_differing_tokens_compares_sets(rng):
    a = mr.RecordedRoute(np.array([[0, 1], [2, 3], [4, 5], [0, 1]]), 6, token_mask=np.array([1, 1, 0, 1], bool))
    b = mr.RecordedRoute(np.array([[1, 0], [2, 4], [0, 1], [0, 1]]), 6, token_mask=np.array([1, 1, 0, 0], bool))
    assert a.differing_tokens(b).tolist() == [False, True, False, True]
    with pytest.raises(mr.InputError, match="^replay has shape"):
        a.differing_tokens(mr.RecordedRoute(np.array([[0, 1]] * 4), 7))


def test_torch_bridge_passes_replay(rng):
    torch = pytest.importorskip("torch")
    from moe_router.torch import route

    cfg = mr.RouterConfig(num_experts=6, top_k=2, normalize_weights=True, capacity_factor=None)
    rec = mr.route_logits(rng.normal(size=(10, 6)), cfg).record()
    x = torch.tensor(rng.normal(size=(10, 6)), requires_grad=True)
    indices, weights, aux, dec = route(x, cfg, replay=rec)
    assert (indices.numpy() == rec.expert_indices).all()
    g = torch.tensor(rng.normal(size=(10, 2)))
    ((weights.double() * g).sum() + aux).backward()
    np.testing.assert_allclose(x.grad.numpy(), dec.backward(g.numpy(), 1.0), rtol=1e-6, atol=1e-9)

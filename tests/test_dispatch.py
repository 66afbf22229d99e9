"""The dispatch plan (``RoutingDecision.dispatch_plan``), its moves and the frameworks' layouts,
against plain loops over the decision written here."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router._core import gather_rows  # the exchange's row gather (moe_router.distributed)
from conftest import REAL_L5, needs_real_router

POLICIES = ("probs", "position", "rank")


def decide(rng, T=97, E=8, k=2, cf=1.0, policy="probs", mask=False, batch=None, **kw):
    x = rng.normal(size=(T, E)).astype(np.float32)
    if batch is not None:
        x = x.reshape(*batch, E)
    token_mask = rng.random(x.shape[:-1]) > 0.2 if mask else None
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy, **kw)
    return mr.route_logits(x, cfg, token_mask=token_mask)


def reference_plan(dec, alignment=1, pad_to_capacity=False):
    """The plan by its definition, one assignment at a time."""
    E, k = dec.num_experts, dec.top_k
    real = np.zeros(E, dtype=np.int64)
    for t in range(dec.total_tokens):
        for j in range(k):
            if dec.kept[t, j]:
                real[dec.expert_indices[t, j]] += 1
    size = np.full(E, dec.capacity) if pad_to_capacity else real
    rows = -(-size // alignment) * alignment
    offsets = np.concatenate([[0], np.cumsum(rows)])
    n = int(offsets[-1])
    token_ids, ranks, weights = np.full(n, -1), np.full(n, -1), np.zeros(n, np.float32)
    row_of = np.full((dec.total_tokens, k), -1)
    for t in range(dec.total_tokens):
        for j in range(k):
            if dec.kept[t, j]:
                r = offsets[dec.expert_indices[t, j]] + dec.expert_slots[t, j]
                assert token_ids[r] == -1
                token_ids[r], ranks[r], weights[r], row_of[t, j] = t, j, dec.expert_weights[t, j], r
    return dict(expert_offsets=offsets, token_ids=token_ids, ranks=ranks, weights=weights, row_of=row_of,
                tokens_per_expert=real, rows_per_expert=rows)


def reference_combine(dec, expert_out, plan, weighted=True):
    out = np.zeros((dec.total_tokens, expert_out.shape[1]), dtype=np.float64)
    for t in range(dec.total_tokens):
        for j in range(dec.top_k):
            if dec.kept[t, j]:
                w = float(dec.expert_weights[t, j]) if weighted else 1.0
                out[t] += w * expert_out[plan.row_of[t, j]].astype(np.float64)
    return out


def assert_plan_is(plan, want):
    for name, value in want.items():
        np.testing.assert_array_equal(getattr(plan, name), value, err_msg=name)
    assert plan.num_rows == want["expert_offsets"][-1]
    assert plan.padding_rows == plan.num_rows - want["tokens_per_expert"].sum()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cf", [0.5, 1.25, None])
@pytest.mark.parametrize("alignment", [1, 4, 16])
def test_plan_matches_its_definition(rng, policy, cf, alignment):
    dec = decide(rng, cf=cf, policy=policy, k=3, mask=True)
    assert_plan_is(dec.dispatch_plan(alignment=alignment), reference_plan(dec, alignment))
    if cf is not None:
        plan = dec.dispatch_plan(alignment=alignment, pad_to_capacity=True)
        assert_plan_is(plan, reference_plan(dec, alignment, pad_to_capacity=True))
        assert set(plan.rows_per_expert.tolist()) == {-(-dec.capacity // alignment) * alignment}


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_rows_are_in_token_order_within_an_expert_for_megatrons_policies(rng, policy):
    dec = decide(rng, T=300, E=6, k=2, cf=0.8, policy=policy)
    plan = dec.dispatch_plan()
    for e in range(dec.num_experts):
        seg = plan.token_ids[plan.expert_offsets[e]:plan.expert_offsets[e + 1]]
        assert (np.diff(seg) > 0).all()


def test_rank_policy_rows_are_rank_major_within_an_expert(rng):
    dec = decide(rng, T=300, E=6, k=2, cf=0.8, policy="rank")
    plan = dec.dispatch_plan()
    for e in range(dec.num_experts):
        lo, hi = plan.expert_offsets[e], plan.expert_offsets[e + 1]
        key = plan.ranks[lo:hi].astype(np.int64) * 10**6 + plan.token_ids[lo:hi]
        assert (np.diff(key) > 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("pad", [False, True])
def test_permute_combine_unpermute_against_loops(rng, dtype, pad):
    dec = decide(rng, T=150, E=8, k=2, cf=1.0, mask=True)
    plan = dec.dispatch_plan(alignment=8, pad_to_capacity=pad)
    D = 7
    hidden = rng.normal(size=(150, D)).astype(dtype)
    rows = plan.permute(hidden)
    assert rows.dtype == dtype and rows.shape == (plan.num_rows, D)
    for r in range(plan.num_rows):
        t = plan.token_ids[r]
        np.testing.assert_array_equal(rows[r], hidden[t] if t >= 0 else 0)
    expert_out = rng.normal(size=rows.shape).astype(dtype)
    for weighted in (True, False):
        y = plan.combine(expert_out, weighted=weighted)
        want = reference_combine(dec, expert_out, plan, weighted)
        if dtype == np.float16:
            np.testing.assert_allclose(y.astype(np.float64), want, rtol=2e-3, atol=2e-3)
        else:
            # same additions in the same (rank) order in the input's precision
            ref = np.zeros((150, D), dtype=dtype)
            for t in range(150):
                for j in range(2):
                    if dec.kept[t, j]:
                        w = dtype(dec.expert_weights[t, j]) if weighted else dtype(1)
                        ref[t] = ref[t] + w * expert_out[plan.row_of[t, j]]
            np.testing.assert_array_equal(y, ref)
    u = plan.unpermute(expert_out)
    assert u.shape == (150, 2, D)
    for t in range(150):
        for j in range(2):
            np.testing.assert_array_equal(u[t, j], expert_out[plan.row_of[t, j]] if dec.kept[t, j] else 0)


def test_batch_shape_and_out_arrays(rng):
    dec = decide(rng, T=64, E=4, k=2, cf=1.25, batch=(4, 16), mask=True)
    plan = dec.dispatch_plan()
    assert plan.batch_shape == (4, 16)
    hidden = rng.normal(size=(4, 16, 5)).astype(np.float32)
    rows = plan.permute(hidden)
    np.testing.assert_array_equal(rows, plan.permute(hidden.reshape(64, 5)))
    masked = ~np.asarray(dec.kept).any(axis=1)
    assert not np.isin(np.flatnonzero(masked), plan.token_ids).any()
    y = plan.combine(rows)
    assert y.shape == (4, 16, 5)
    out = np.empty((4, 16, 5), np.float32)
    assert plan.combine(rows, out=out) is out
    np.testing.assert_array_equal(out, y)
    buf = np.full((plan.num_rows, 5), 7.0, np.float32)
    plan.permute(hidden, out=buf)
    np.testing.assert_array_equal(buf, rows)
    assert plan.unpermute(rows).shape == (4, 16, 2, 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_large_fresh_moves_reuse_dropped_outputs_and_never_show_their_contents(rng, dtype, no_gc):
    # outputs of 4 MiB or more come from recycled memory; drops, padding and masked tokens
    # are the elements a kernel could leave unwritten
    T, D = 6000, 512
    dec = decide(rng, T=T, E=16, k=2, cf=0.5, mask=True)
    plan = dec.dispatch_plan(alignment=16)
    assert plan.padding_rows > 0 and not np.asarray(dec.kept).all()
    hidden = rng.normal(size=(T, D)).astype(dtype)
    expert_out = rng.normal(size=(plan.num_rows, D)).astype(dtype)
    moves = {
        "permute": (lambda: plan.permute(hidden), (plan.num_rows, D)),
        "combine": (lambda: plan.combine(expert_out), (T, D)),
        "unpermute": (lambda: plan.unpermute(expert_out), (T, 2, D)),
        "gather_rows": (lambda: gather_rows(hidden, plan.token_ids), (plan.num_rows, D)),
    }
    for name, (move, shape) in moves.items():
        want = np.zeros(shape, dtype)
        if name == "gather_rows":
            gather_rows(hidden, plan.token_ids, out=want)
        else:
            getattr(plan, name)(hidden if name == "permute" else expert_out, out=want)
        assert want.nbytes >= 4 << 20, name
        first = move()
        np.testing.assert_array_equal(first, want, err_msg=name)
        assert first.flags.c_contiguous and first.flags.writeable and first.dtype == dtype
        address = first.__array_interface__["data"][0]
        first[:] = np.nan  # what the caller leaves in it must not reach the next output
        del first
        second = move()
        assert second.__array_interface__["data"][0] == address, name  # the dropped one's memory
        np.testing.assert_array_equal(second, want, err_msg=name)
        third = move()  # one still alive is never handed out again
        assert not np.shares_memory(second, third)
        np.testing.assert_array_equal(third, want, err_msg=name)


@pytest.mark.skipif(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") < 4 * (700 << 20),
                    reason="the package holds freed outputs up to a quarter of the memory")
def test_a_dropped_output_beyond_512_mib_is_reused(no_gc):
    # a MoE step at D = 4096 drops permute outputs of gigabytes; one above the
    # former 512 MiB bound must come back instead of faulting in fresh pages
    D = 1024
    rows = (520 << 20) // (4 * D)
    src = np.arange(2 * D, dtype=np.float32).reshape(2, D)
    index = (np.arange(rows) % 2).astype(np.int64)
    first = gather_rows(src, index)
    address = first.__array_interface__["data"][0]
    first[:] = np.nan
    del first
    second = gather_rows(src, index)
    assert second.__array_interface__["data"][0] == address
    np.testing.assert_array_equal(second[::4097], src[index[::4097]])
    assert not np.isnan(second).any()


def test_release_memory_gives_the_held_buffers_back(rng, no_gc):
    src = rng.normal(size=(3, 1024)).astype(np.float32)
    index = np.arange(3000, dtype=np.int64) % 3  # a 12 MB output: recycled when dropped
    first = gather_rows(src, index)
    nbytes = first.nbytes
    del first
    assert mr.release_memory() >= nbytes
    assert mr.release_memory() == 0
    kept = gather_rows(src, index)
    assert mr.release_memory() == 0  # a live output is not held
    np.testing.assert_array_equal(kept, src[index])


def test_results_do_not_depend_on_the_thread_count(rng, restore_threads):
    dec = decide(rng, T=20000, E=16, k=4, cf=1.0)
    hidden = rng.normal(size=(20000, 33)).astype(np.float32)
    got = []
    for n in (1, 2, 3):
        restore_threads(n)
        plan = dec.dispatch_plan(alignment=8)
        rows = plan.permute(hidden)
        got.append((plan.token_ids.copy(), rows, plan.combine(rows * 1.5)))
    for other in got[1:]:
        for a, b in zip(got[0], other):
            np.testing.assert_array_equal(a, b)


def test_plan_arrays_are_read_only(rng):
    plan = decide(rng).dispatch_plan()
    for name in ("expert_offsets", "token_ids", "ranks", "weights", "row_of", "tokens_per_expert"):
        with pytest.raises(ValueError):
            getattr(plan, name)[0] = 1


def test_bad_input_is_refused_naming_the_argument(rng):
    dec = decide(rng, T=40, E=4, k=2, cf=1.0)
    plan = dec.dispatch_plan()
    hidden = rng.normal(size=(40, 6)).astype(np.float32)
    rows = plan.permute(hidden)
    cases = [
        (lambda: dec.dispatch_plan(alignment=0), mr.ConfigError, "alignment"),
        (lambda: dec.dispatch_plan(alignment=-3), mr.ConfigError, "alignment"),
        (lambda: decide(rng, cf=None).dispatch_plan(pad_to_capacity=True), mr.ConfigError, "pad_to_capacity"),
        (lambda: plan.permute(hidden[:39]), mr.InputError, "hidden"),
        (lambda: plan.permute(hidden.astype(np.int64)), TypeError, "hidden"),
        (lambda: plan.permute(np.asfortranarray(hidden)), mr.InputError, "hidden"),
        (lambda: plan.permute(hidden[:, ::2]), mr.InputError, "hidden"),
        (lambda: plan.permute(hidden, out=np.zeros((plan.num_rows, 5), np.float32)), mr.InputError, "out"),
        (lambda: plan.permute(hidden, out=np.zeros((plan.num_rows, 6), np.float64)), TypeError, "out"),
        (lambda: plan.combine(rows[:-1]), mr.InputError, "expert_out"),
        (lambda: plan.combine(rows[:, None]), mr.InputError, "expert_out"),
        (lambda: plan.unpermute(rows.astype(np.int32)), TypeError, "expert_out"),
        (lambda: plan.combine("rows"), TypeError, "expert_out"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()
    ro = np.zeros((plan.num_rows, 6), np.float32)
    ro.setflags(write=False)
    with pytest.raises(mr.InputError, match=r"^out is read-only \(not writeable"):
        plan.permute(hidden, out=ro)
    ro = np.zeros((40, 6), np.float32)
    ro.setflags(write=False)
    with pytest.raises(mr.InputError, match=r"^out is read-only"):
        plan.combine(rows, out=ro)


def test_out_of_another_dtype_is_named_in_numpys_terms(rng):
    plan = decide(rng, T=40, E=4, k=2, cf=1.0).dispatch_plan()
    for dtype, other in [(np.float32, np.float64), (np.float64, np.float32), (np.float16, np.float32)]:
        hidden = rng.normal(size=(40, 6)).astype(dtype)
        rows = plan.permute(hidden)
        want, got = np.dtype(dtype).name, np.dtype(other).name
        for call, input_name in [
            (lambda: plan.permute(hidden, out=np.zeros(rows.shape, other)), "hidden"),
            (lambda: plan.combine(rows, out=np.zeros(hidden.shape, other)), "expert_out"),
            (lambda: plan.unpermute(rows, out=np.zeros((40, 2, 6), other)), "expert_out"),
        ]:
            with pytest.raises(mr.InputTypeError) as info:
                call()
            assert str(info.value) == (f"out must be a C-contiguous {want} NumPy array (the dtype of {input_name}), "
                                       f"got ndarray of dtype {got}")


def test_out_that_overlaps_the_input_is_refused_naming_both(rng):
    # Top-1, dropless, no padding: N == T, so out=hidden has the right shape and dtype.
    dec = decide(rng, T=40, E=4, k=1, cf=None)
    plan = dec.dispatch_plan()
    hidden = rng.normal(size=(40, 6)).astype(np.float32)
    rows = plan.permute(hidden)
    for call, input_name in [
        (lambda: plan.permute(hidden, out=hidden), "hidden"),
        (lambda: plan.permute(hidden, out=hidden[:, :]), "hidden"),
        (lambda: plan.combine(rows, out=rows), "expert_out"),
        (lambda: plan.unpermute(rows, out=rows.reshape(40, 1, 6)), "expert_out"),
    ]:
        with pytest.raises(mr.InputError) as info:
            call()
        assert str(info.value).startswith(f"out overlaps {input_name}, an input of this call"), str(info.value)
    np.testing.assert_array_equal(plan.permute(hidden), rows)  # the refused calls wrote nothing


def test_weighted_must_be_a_bool(rng):
    plan = decide(rng, T=40, E=4, k=2, cf=1.0).dispatch_plan()
    rows = plan.permute(rng.normal(size=(40, 6)).astype(np.float32))
    for value, shown in [(None, "None (NoneType)"), (1, "1 (int)"), ("yes", "'yes' (str)")]:
        with pytest.raises(mr.InputTypeError) as info:
            plan.combine(rows, weighted=value)
        assert str(info.value) == f"invalid weighted: got {shown}; must be True or False (a bool)"
    np.testing.assert_array_equal(plan.combine(rows), plan.combine(rows, weighted=True))


def test_a_decision_cannot_be_tampered_with(rng):
    dec = decide(rng, T=40, E=4, k=2, cf=1.0)
    want = reference_plan(dec)
    kept = np.argwhere(dec.kept)
    (t0, j0), (t1, j1) = kept[0], kept[1]
    slots = dec.expert_slots
    with pytest.raises(ValueError, match="read-only"):
        slots[t1, j1] = 10**6
    with pytest.raises(ValueError, match="read-only"):
        dec.expert_indices[t0, j0] = 99
    with pytest.raises(ValueError):
        slots.flags.writeable = True
    assert_plan_is(dec.dispatch_plan(), want)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 60), E=st.integers(1, 9), k=st.integers(1, 4), cf=st.sampled_from([None, 0.3, 1.0, 2.0]),
       policy=st.sampled_from(POLICIES), alignment=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_plan_invariants(T, E, k, cf, policy, alignment, seed):
    rng = np.random.default_rng(seed)
    k = min(k, E)
    dec = decide(rng, T=T, E=E, k=k, cf=cf, policy=policy, mask=True)
    plan = dec.dispatch_plan(alignment=alignment)
    assert_plan_is(plan, reference_plan(dec, alignment))
    real = plan.token_ids >= 0
    assert real.sum() == dec.kept_assignments
    assert (plan.weights[~real] == 0).all() and (plan.ranks[~real] == -1).all()
    assert (plan.rows_per_expert % alignment == 0).all()
    # permute then unweighted combine counts each token's kept choices
    hidden = rng.normal(size=(T, 3))
    y = plan.combine(plan.permute(hidden), weighted=False)
    np.testing.assert_allclose(y, hidden * dec.kept.sum(axis=1, keepdims=True), rtol=1e-12)


# --------------------------------------------------------------------------- layouts

def test_megatron_routing_map_and_dense_masks(rng):
    dec = decide(rng, T=60, E=5, k=2, cf=1.0, policy="rank")
    plan = dec.dispatch_plan()
    routing_map, probs = plan.megatron_routing_map()
    combine, dispatch = plan.dense_masks()
    assert routing_map.shape == probs.shape == (60, 5) and combine.shape == (60, 5, dec.capacity)
    want_map = np.zeros((60, 5), bool)
    want_probs = np.zeros((60, 5), np.float32)
    want_combine = np.zeros((60, 5, dec.capacity), np.float32)
    for t in range(60):
        for j in range(2):
            if dec.kept[t, j]:
                e = dec.expert_indices[t, j]
                want_map[t, e], want_probs[t, e] = True, dec.expert_weights[t, j]
                want_combine[t, e, dec.expert_slots[t, j]] = dec.expert_weights[t, j]
    np.testing.assert_array_equal(routing_map, want_map)
    np.testing.assert_array_equal(probs, want_probs)
    np.testing.assert_array_equal(combine, want_combine)
    np.testing.assert_array_equal(dispatch, want_combine != 0)


def test_tutel_encoding(rng):
    dec = decide(rng, T=50, E=4, k=2, cf=0.75, policy="rank")
    indices, locations, gates, capacity = dec.dispatch_plan().tutel_encoding()
    assert capacity == dec.capacity and len(indices) == len(locations) == len(gates) == 2
    for j in range(2):
        np.testing.assert_array_equal(indices[j], dec.expert_indices[:, j])
        np.testing.assert_array_equal(locations[j], np.where(dec.kept[:, j], dec.expert_slots[:, j], capacity))
        np.testing.assert_array_equal(gates[j], dec.expert_weights[:, j])
    # Tutel's encode: disp[idx * C + loc] = x for loc < C
    x = rng.normal(size=(50, 3))
    disp = np.zeros((4 * capacity, 3))
    for j in range(2):
        for t in range(50):
            if locations[j][t] < capacity:
                disp[indices[j][t] * capacity + locations[j][t]] = x[t]
    plan = dec.dispatch_plan(pad_to_capacity=True)
    np.testing.assert_array_equal(disp, plan.permute(x))


def reference_align(ids, block, E, pad_sorted_ids=False):
    T, k = ids.shape
    flat = ids.reshape(-1)
    numel = flat.size
    max_padded = numel + E * (block - 1)
    if pad_sorted_ids:
        max_padded = -(-max_padded // block) * block
    if numel < E:
        max_padded = min(numel * block, max_padded)
    sorted_ids = [numel] * max_padded
    expert_ids = [0] * (-(-max_padded // block))
    pos = 0
    for e in range(E):
        mine = [i for i in range(numel) if flat[i] == e]
        for n, i in enumerate(mine):
            sorted_ids[pos + n] = i
        padded = -(-len(mine) // block) * block
        for b in range(padded // block):
            expert_ids[pos // block + b] = e
        pos += padded
    return np.array(sorted_ids), np.array(expert_ids), pos


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 40), E=st.integers(1, 12), k=st.integers(1, 3), block=st.integers(1, 20),
       pad=st.booleans(), seed=st.integers(0, 2**31))
def test_moe_align_block_size_matches_vllms_definition(T, E, k, block, pad, seed):
    ids = np.random.default_rng(seed).integers(0, E, size=(T, k))
    sorted_ids, expert_ids, post = mr.moe_align_block_size(ids, block, E, pad_sorted_ids=pad)
    want_sorted, want_experts, want_post = reference_align(ids, block, E, pad)
    assert sorted_ids.dtype == expert_ids.dtype == post.dtype == np.int32
    np.testing.assert_array_equal(sorted_ids, want_sorted)
    np.testing.assert_array_equal(expert_ids, want_experts)
    assert post.tolist() == [want_post]


def test_moe_align_block_size_bad_input():
    ids = np.array([[0, 1], [2, 3]])
    for call, error, name in [
        (lambda: mr.moe_align_block_size(ids, 0, 4), mr.ConfigError, "block_size"),
        (lambda: mr.moe_align_block_size(ids, 4, 3), mr.InputError, "expert_indices"),
        (lambda: mr.moe_align_block_size(ids - 1, 4, 4), mr.InputError, "expert_indices"),
        (lambda: mr.moe_align_block_size(ids.astype(np.float32), 4, 4), TypeError, "expert_indices"),
        (lambda: mr.moe_align_block_size(ids.ravel(), 4, 4), mr.InputError, "expert_indices"),
    ]:
        with pytest.raises(error, match=name):
            call()


# --------------------------------------------------------------------------- a whole MoE layer

def ffn(x, w1, w2):
    return np.maximum(x @ w1, 0.0) @ w2


@needs_real_router
@pytest.mark.parametrize("layout", [dict(), dict(pad_to_capacity=True), dict(alignment=16)])
def test_reference_moe_layer_forward_on_real_hidden_states(layout):
    with np.load(REAL_L5) as z:
        hidden = z["hidden"][:4096].astype(np.float32)
        weight, bias = z["router_weight_e64"], z["router_bias_e64"]
    E, D, H = 64, hidden.shape[1], 32
    router = mr.ExpertRouter(mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=1.25), D, weight=weight,
                             bias=bias)
    dec = router.route_tokens(hidden)
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(E, D, H)).astype(np.float32) / np.sqrt(D)
    w2 = rng.normal(size=(E, H, D)).astype(np.float32) / np.sqrt(H)
    plan = dec.dispatch_plan(**layout)
    rows = plan.permute(hidden)
    expert_out = np.zeros_like(rows)
    for e in range(E):
        lo, hi = plan.expert_offsets[e], plan.expert_offsets[e + 1]
        expert_out[lo:hi] = ffn(rows[lo:hi], w1[e], w2[e])
    y = plan.combine(expert_out)
    want = np.zeros((hidden.shape[0], D), np.float64)
    for t in range(hidden.shape[0]):
        for j in range(2):
            if dec.kept[t, j]:
                e = dec.expert_indices[t, j]
                want[t] += dec.expert_weights[t, j] * ffn(hidden[t:t + 1].astype(np.float64), w1[e], w2[e])[0]
    assert dec.dropped_assignments > 0  # the real loads are skewed: capacity binds
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_new_entry_points_follow_the_type_rule(rng):
    dec = decide(rng, T=20, E=4, k=2, cf=1.0)
    plan = dec.dispatch_plan()
    rows = np.zeros((plan.num_rows, 3), np.float32)
    for call, error, name in [
        (lambda: dec.dispatch_plan(alignment=2.0), mr.ConfigTypeError, "alignment"),
        (lambda: dec.dispatch_plan(alignment=2**70), mr.ConfigError, "alignment"),
        (lambda: dec.dispatch_plan(pad_to_capacity=1), mr.ConfigTypeError, "pad_to_capacity"),
        (lambda: mr.moe_align_block_size(dec.expert_indices, "4", 4), mr.ConfigTypeError, "block_size"),
        (lambda: mr.moe_align_block_size(dec.expert_indices, 4, 4, pad_sorted_ids=0), mr.ConfigTypeError,
         "pad_sorted_ids"),
        (lambda: mr.ExpertPlacement(4.0, 2), mr.ConfigTypeError, "num_experts"),
        (lambda: mr.ExpertPlacement(4, -1), mr.ConfigError, "num_ranks"),
        (lambda: mr.ExpertPlacement(4, 2).local_experts(True), mr.ConfigTypeError, "rank"),
        (lambda: dec.backward(None, "1"), mr.InputTypeError, "grad_auxiliary_loss"),
        (lambda: plan.combine(rows, weighted=1), mr.InputTypeError, "weighted"),
    ]:
        with pytest.raises(error, match=name):
            call()


def test_outputs_too_large_for_memory_are_errors_not_aborts(rng):
    dec = decide(rng, T=64, E=64, k=2, cf=1.0)
    for call, name in [
        (lambda: dec.dispatch_plan(alignment=2**40), "alignment"),
        (lambda: mr.moe_align_block_size(dec.expert_indices, 1, 2**40), "num_experts"),
        (lambda: mr.ExpertPlacement(num_experts=2**31 - 1, num_ranks=1), "num_experts"),
    ]:
        with pytest.raises(mr.InputError, match=name):
            call()
    with pytest.raises(mr.ConfigError, match="num_experts"):
        mr.ExpertPlacement(num_experts=2**31, num_ranks=1)
    with pytest.raises(mr.ConfigError, match="block_size"):
        mr.moe_align_block_size(dec.expert_indices, 2**31, 64)


def test_an_empty_batch_goes_through_every_new_path():
    cfg = mr.RouterConfig(num_experts=4, top_k=2, load_balance_loss_coeff=0.1)
    dec = mr.route_logits(np.zeros((0, 4), np.float32), cfg)
    plan = dec.dispatch_plan(alignment=4)
    assert plan.num_rows == 0 and plan.expert_offsets.tolist() == [0] * 5
    empty = np.zeros((0, 3), np.float32)
    assert plan.permute(empty).shape == (0, 3) and plan.combine(empty).shape == (0, 3)
    assert plan.unpermute(empty).shape == (0, 2, 3)
    assert dec.backward(np.zeros((0, 2))).shape == (0, 4)
    assert plan.megatron_routing_map()[0].shape == (0, 4) and plan.dense_masks()[0].shape == (0, 4, 0)
    assert mr.moe_align_block_size(np.zeros((0, 2), np.int64), 4, 4)[2].tolist() == [0]
    assert plan.all_to_all(mr.ExpertPlacement(4, 2)).send_counts.tolist() == [0, 0]
    router = mr.ExpertRouter(cfg, 3, gate="linear")
    gh, gw, gb = router.backward(router.route_tokens(empty))
    assert gh.shape == (0, 3) and (gw == 0).all() and (gb == 0).all()


MOVES_RUN = """
import sys
import numpy as np
import moe_router as mr
rng = np.random.default_rng(5)
special = np.array([np.inf, -np.inf, np.nan, -0.0, 3e38, 65504.0, 1e-40])
out = {}
# D=1037 misaligns every row; at T=4096 the f32/f64 outputs pass the streaming threshold (16 MiB)
for T, D in [(300, 37), (4096, 1037)]:
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.25)
    plan = mr.route_logits(rng.normal(size=(T, 8)).astype(np.float32), cfg).dispatch_plan(alignment=4)
    base = rng.normal(size=(T, D))
    flat = base.reshape(-1)
    flat[::23] = np.resize(special, flat[::23].size)
    for dtype in ("float32", "float64", "float16"):
        with np.errstate(over="ignore"):
            hidden = base.astype(dtype)
        for threads in (1, 2):
            mr.set_num_threads(threads)
            rows = plan.permute(hidden)
            key = f"{T}_{dtype}_{threads}"
            out[key + "_permute"] = rows
            out[key + "_combine"] = plan.combine(rows)
            out[key + "_sum"] = plan.combine(rows, weighted=False)
            out[key + "_unpermute"] = plan.unpermute(rows)
np.savez(sys.argv[1], **out)
"""


def test_moves_are_the_same_bits_at_every_simd_level_streaming_or_not(tmp_path):
    got = {}
    for level in ("avx512", "avx2", "off"):
        path = tmp_path / f"{level}.npz"
        subprocess.run([sys.executable, "-c", MOVES_RUN, str(path)], env=dict(os.environ, MOE_ROUTER_SIMD=level),
                       check=True)
        got[level] = dict(np.load(path))
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}
    for level in ("avx512", "avx2"):
        for name, want in got["off"].items():
            have = got[level][name]
            assert have.dtype == want.dtype and have.shape == want.shape, name
            np.testing.assert_array_equal(have.view(uint[want.itemsize]), want.view(uint[want.itemsize]),
                                          err_msg=f"{level} {name}")
    for name, two in got["avx512"].items():
        if name.split("_")[2] == "2":
            one = got["avx512"][name.replace("_2_", "_1_")]
            np.testing.assert_array_equal(two.view(uint[two.itemsize]), one.view(uint[one.itemsize]), err_msg=name)

"""The dispatch plan against the frameworks' own functions (Megatron-Core ``permute``/``unpermute``,
DeepSpeed's dense gating masks). Runs where torch and the peers are installed (the peers venv,
``../shared/peers/setup.sh``); skips elsewhere."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import moe_router as mr

torch = pytest.importorskip("torch")


def megatron_utils():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def deepspeed_moe():
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("deepspeed.moe.sharded_moe")


def continuous_logits(seed, T, E):
    """Logits without ties (so torch's tie order cannot matter)."""
    return np.random.default_rng(seed).normal(size=(T, E)).astype(np.float32)


@pytest.mark.parametrize("T,E,k", [(64, 8, 2), (200, 16, 4), (333, 64, 8)])
@pytest.mark.parametrize("pre_softmax", [False, True])
def test_megatron_dropless_permute_and_unpermute(T, E, k, pre_softmax):
    mu = megatron_utils()
    x = continuous_logits(T + E, T, E)
    lg = torch.from_numpy(x)
    with torch.no_grad():
        probs_m, map_m = mu.topk_routing_with_score_function(lg, k, use_pre_softmax=pre_softmax)
    dec = mr.route_logits(x, mr.preset("megatron", E, k, pre_softmax=pre_softmax))
    plan = dec.dispatch_plan()
    routing_map, probs = plan.megatron_routing_map()
    np.testing.assert_array_equal(routing_map, map_m.numpy())
    np.testing.assert_allclose(probs, probs_m.numpy(), rtol=1e-6, atol=1e-7)

    hidden = np.random.default_rng(1).normal(size=(T, 24)).astype(np.float32)
    tokens = torch.from_numpy(hidden)
    permuted, permuted_probs, sorted_indices = mu.permute(
        tokens, map_m, probs=probs_m, num_out_tokens=int(map_m.sum()))
    np.testing.assert_array_equal(plan.permute(hidden), permuted.numpy())
    np.testing.assert_array_equal(plan.token_ids, sorted_indices.numpy())
    np.testing.assert_allclose(plan.weights, permuted_probs.numpy(), rtol=1e-6, atol=1e-7)

    expert_out = np.random.default_rng(2).normal(size=permuted.shape).astype(np.float32)
    out = torch.from_numpy(expert_out)
    want = mu.unpermute(out, sorted_indices, tokens.shape, probs=probs_m, routing_map=map_m)
    np.testing.assert_allclose(plan.combine(expert_out), want.numpy(), rtol=1e-5, atol=1e-6)
    want_plain = mu.unpermute(out, sorted_indices, tokens.shape)
    np.testing.assert_allclose(plan.combine(expert_out, weighted=False), want_plain.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,E,k,cf", [(128, 8, 2, 1.0), (300, 16, 4, 0.5), (100, 8, 2, 1.25)])
def test_megatron_drop_and_pad(T, E, k, cf):
    mu = megatron_utils()
    x = continuous_logits(7 * T + E, T, E)
    lg = torch.from_numpy(x)
    with torch.no_grad():
        probs0, map0 = mu.topk_routing_with_score_function(lg, k)
        probs_m, map_m = mu.apply_router_token_dropping(probs0, map0, router_topk=k, capacity_factor=cf,
                                                        drop_policy="probs", pad_to_capacity=True)
    capacity = int(map_m.sum(0)[0])
    dec = mr.route_logits(x, mr.preset("megatron", E, k, capacity_factor=cf, pad_to_capacity=True))
    assert dec.capacity == capacity
    plan = dec.dispatch_plan(pad_to_capacity=True)
    assert plan.num_rows == E * capacity

    hidden = np.random.default_rng(3).normal(size=(T, 16)).astype(np.float32)
    tokens = torch.from_numpy(hidden)
    permuted, permuted_probs, sorted_indices = mu.permute(
        tokens, map_m, probs=probs_m, num_out_tokens=E * capacity, drop_and_pad=True)
    ours = plan.permute(hidden)
    # Megatron fills the unused capacity with further tokens at weight 0, interleaved in token order;
    # the real rows (weight > 0) are the same tokens, in the same order, with the same vectors.
    idx = sorted_indices.numpy().reshape(E, capacity)
    pp = permuted_probs.numpy().reshape(E, capacity)
    for e in range(E):
        lo, n = plan.expert_offsets[e], plan.tokens_per_expert[e]
        real = pp[e] > 0
        np.testing.assert_array_equal(plan.token_ids[lo:lo + n], idx[e][real])
        np.testing.assert_array_equal(ours[lo:lo + n], permuted.numpy().reshape(E, capacity, -1)[e][real])
        assert (plan.token_ids[lo + n:plan.expert_offsets[e + 1]] == -1).all()

    # the experts' outputs, as each layout holds them, combine to the same tokens
    rng = np.random.default_rng(4)
    table = rng.normal(size=(E, T, 16)).astype(np.float32)  # expert e's output for token t
    theirs = np.stack([table[e, idx[e]] for e in range(E)]).reshape(E * capacity, 16)
    mine = np.zeros((plan.num_rows, 16), np.float32)
    for r in range(plan.num_rows):
        if plan.token_ids[r] >= 0:
            mine[r] = table[np.searchsorted(plan.expert_offsets, r, side="right") - 1, plan.token_ids[r]]
    want = mu.unpermute(torch.from_numpy(theirs), sorted_indices, tokens.shape, probs=probs_m,
                        routing_map=map_m, drop_and_pad=True)
    np.testing.assert_allclose(plan.combine(mine), want.numpy(), rtol=1e-5, atol=1e-6)


# top1 only where no expert overflows: DeepSpeed's top1gating keeps an overflowing expert's tokens by
# torch.topk over tied 0/1 values, whose order torch does not define.
@pytest.mark.parametrize("gate,k,cf,min_capacity", [("top2", 2, 1.0, 4), ("topk", 3, 1.25, 2), ("top1", 1, 3.0, 4),
                                                    ("topk", 2, 0.5, 1), ("top2", 2, 0.5, 4)])
def test_deepspeed_dense_masks(gate, k, cf, min_capacity):
    sm = deepspeed_moe()
    T, E = 96, 8
    x = continuous_logits(11 * k, T, E)
    lg = torch.from_numpy(x)
    with torch.no_grad():
        if gate == "top1":
            out = sm.top1gating(lg.clone(), cf, min_capacity, used_token=None, noisy_gate_policy=None,
                                drop_tokens=True, use_rts=False)
        elif gate == "top2":
            out = sm.top2gating(lg.clone(), cf, min_capacity, drop_tokens=True, top2_2nd_expert_sampling=False)
        else:
            out = sm.topkgating(lg.clone(), k, cf, min_capacity, drop_tokens=True, drop_policy="probs")
    _, combine_ds, dispatch_ds = out[0], out[1], out[2]
    # the gating functions take the factor as given; the preset applies eval_capacity_factor in evaluation
    dec = mr.route_logits(x, mr.preset("deepspeed", E, k, gate=gate, capacity_factor=cf, eval_capacity_factor=cf,
                                       min_capacity=min_capacity))
    assert gate != "top1" or dec.dropped_assignments == 0
    combine, dispatch = dec.dispatch_plan().dense_masks()
    assert combine.shape == tuple(combine_ds.shape)
    np.testing.assert_array_equal(dispatch, dispatch_ds.numpy())
    np.testing.assert_allclose(combine, combine_ds.float().numpy(), rtol=1e-5, atol=1e-7)
    # and DeepSpeed's einsum dispatch equals our padded permute
    hidden = np.random.default_rng(9).normal(size=(T, 12)).astype(np.float32)
    dispatched = torch.einsum("sec,sm->ecm", dispatch_ds.float(), torch.from_numpy(hidden)).numpy()
    rows = dec.dispatch_plan(pad_to_capacity=True).permute(hidden)
    np.testing.assert_allclose(rows.reshape(dispatched.shape), dispatched, rtol=1e-6, atol=1e-6)


def test_torch_tensors_move_through_the_plan():
    x = continuous_logits(0, 50, 4)
    plan = mr.route_logits(x, mr.RouterConfig(num_experts=4, top_k=2, capacity_factor=1.0)).dispatch_plan()
    hidden = torch.randn(50, 6)
    rows = plan.permute(hidden)
    np.testing.assert_array_equal(rows, plan.permute(hidden.numpy()))
    np.testing.assert_array_equal(plan.permute(hidden.to(torch.bfloat16)), plan.permute(
        hidden.to(torch.bfloat16).float().numpy()))
    np.testing.assert_array_equal(plan.combine(torch.from_numpy(rows)), plan.combine(rows))

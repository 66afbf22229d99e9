"""NumPy masked arrays as router input: their mask is the token mask.

A token (a row along the last axis) with any masked entry is padding, as where
``token_mask`` is False; with an explicit ``token_mask`` as well, a token is
routed only where both allow it. The masked values are never read.
"""

from __future__ import annotations

import numpy as np
import pytest

import moe_router as mr

CFG = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)


def assert_same(a: mr.RoutingDecision, b: mr.RoutingDecision) -> None:
    for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "tokens_per_expert",
                 "pre_drop_tokens_per_expert"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.capacity, a.active_tokens, a.load_balance_loss, a.router_z_loss) == \
        (b.capacity, b.active_tokens, b.load_balance_loss, b.router_z_loss)


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(600, 8)).astype(np.float32)


def masked(logits: np.ndarray, entries: np.ndarray) -> np.ma.MaskedArray:
    """``logits`` with ``entries`` masked, and NaN under the mask (it must never be read)."""
    poisoned = logits.copy()
    poisoned[entries] = np.nan
    return np.ma.masked_array(poisoned, mask=entries)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 1.0])
def test_a_row_with_any_masked_entry_is_padding(logits: np.ndarray, fraction: float) -> None:
    rng = np.random.default_rng(int(fraction * 100))
    entries = rng.random(logits.shape) < fraction / 8
    entries[5, 3] = fraction > 0  # one masked entry in a row is enough
    rows = ~entries.any(axis=1)
    dec = mr.route_logits(masked(logits, entries), CFG)
    assert_same(dec, mr.route_logits(logits, CFG, token_mask=rows))
    assert dec.active_tokens == int(rows.sum())
    assert not dec.kept[~rows].any()


def test_combined_with_token_mask_by_and(logits: np.ndarray) -> None:
    entries = np.zeros(logits.shape, bool)
    entries[:100, 0] = True
    explicit = np.ones(600, bool)
    explicit[50:200] = False
    dec = mr.route_logits(masked(logits, entries), CFG, token_mask=explicit)
    both = explicit & ~entries.any(axis=1)
    assert dec.active_tokens == 400
    assert_same(dec, mr.route_logits(logits, CFG, token_mask=both))


def test_batched_and_unmasked(logits: np.ndarray) -> None:
    x = logits.reshape(3, 200, 8)
    entries = np.zeros(x.shape, bool)
    entries[1, -20:, :] = True  # right padding of the second sequence
    dec = mr.route_logits(np.ma.masked_array(x, mask=entries), CFG)
    assert dec.batch_shape == (3, 200) and dec.active_tokens == 580
    assert_same(dec, mr.route_logits(x, CFG, token_mask=~entries.any(axis=2)))
    # A masked array with nothing masked routes as the plain array.
    assert_same(mr.route_logits(np.ma.masked_array(logits), CFG), mr.route_logits(logits, CFG))
    # So does a masked token_mask entry: it is False.
    flags = np.ma.masked_array(np.ones(600, bool), mask=np.arange(600) < 10)
    assert mr.route_logits(logits, CFG, token_mask=flags).active_tokens == 590


def test_every_routing_entry_point(logits: np.ndarray) -> None:
    entries = np.zeros(logits.shape, bool)
    entries[::7, 2] = True
    rows = ~entries.any(axis=1)
    m = masked(logits, entries)
    # ExpertRouter.route_logits, and the hidden-state paths (linear and hierarchical gate)
    r1, r2 = mr.ExpertRouter(CFG, 8, gate="linear"), mr.ExpertRouter(CFG, 8, gate="linear")
    assert_same(r1.route_logits(m, training=True), r2.route_logits(logits, training=True, token_mask=rows))
    assert_same(r1.route_tokens(m, training=True), r2.route_tokens(logits, training=True, token_mask=rows))
    assert r1.get_stats().active_tokens == r2.get_stats().active_tokens == 2 * int(rows.sum())
    big = mr.RouterConfig(num_experts=40, top_k=2)
    g1, g2 = mr.ExpertRouter(big, 8, gate="hierarchical"), mr.ExpertRouter(big, 8, gate="hierarchical")
    assert_same(g1.route_tokens(m), g2.route_tokens(logits, token_mask=rows))
    # Megatron's plain count in peer_load_balance_loss reads the same mask.
    cfg = mr.preset("megatron", 8, 2, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    bias = np.linspace(-0.1, 0.1, 8)
    dec = mr.route_logits(m, cfg, expert_bias=bias)
    assert mr.peer_load_balance_loss(dec, cfg, logits=m) == \
        mr.peer_load_balance_loss(dec, cfg, logits=logits, token_mask=rows)


def test_gate_forward_refuses_masked_entries(logits: np.ndarray) -> None:
    gate = mr.GateNetwork(8, 40)
    entries = np.zeros(logits.shape, bool)
    entries[0, 0] = True
    with pytest.raises(mr.InputTypeError, match="masked"):
        gate.forward(np.ma.masked_array(logits, mask=entries))
    np.testing.assert_array_equal(gate.forward(np.ma.masked_array(logits)), gate.forward(logits))

"""The bindings' input readers (``_core.read_rows``, ``read_weight``) and the scalar readers
``_inputs`` names, against the rules the Python layer documents."""

from __future__ import annotations

import numpy as np
import pytest

import moe_router as mr
from moe_router import _core, _inputs

CFG = mr.RouterConfig(num_experts=8, top_k=2)


def test_contiguous_float_rows_are_the_callers_array():
    for dtype in (np.float32, np.float64):
        x = np.zeros((5, 8), dtype=dtype)
        rows, batch, mask = _core.read_rows(x, "logits", 8, "num_experts")
        assert rows is x and batch == (5,) and mask is None
    # A forced dtype of another kind converts; a batched input is a view.
    rows, _, _ = _core.read_rows(np.zeros((5, 8), dtype=np.float32), "hidden", 8, "input_dim", None, "float64")
    assert rows.dtype == np.float64
    base = np.arange(48.0).reshape(2, 3, 8)
    rows, batch, _ = _core.read_rows(base, "logits", 8, "num_experts")
    assert np.shares_memory(rows, base) and rows.shape == (6, 8) and batch == (2, 3)


def test_token_mask_rules():
    x = np.zeros((2, 3, 8))
    _, _, mask = _core.read_rows(x, "logits", 8, "num_experts", np.array([[1, 0, 1], [0, 0, 1]], dtype=np.uint8))
    assert mask.dtype == np.bool_ and mask.tolist() == [True, False, True, False, False, True]
    with pytest.raises(mr.InputTypeError, match="token_mask.*values other than 0 and 1"):
        _core.read_rows(x, "logits", 8, "num_experts", np.array([0, 2, 1, 1, 1, 1]))
    with pytest.raises(mr.InputError, match=r"token_mask has shape \[5\], expected \[6\] or \[2, 3\]"):
        _core.read_rows(x, "logits", 8, "num_experts", np.ones(5, dtype=bool))


def test_integers_the_float_dtype_would_round_are_refused():
    x = np.zeros((3, 8), dtype=np.uint64)
    x[2, 5] = 2**53 + 1
    with pytest.raises(mr.InputError, match=r"logits holds the integer 9007199254740993 at token 2"):
        mr.route_logits(x, CFG)
    x[2, 5] = 2**60  # a power of two: exact
    assert mr.route_logits(x, CFG).expert_indices[2, 0] == 5
    with pytest.raises(mr.InputError, match=r"bias\[1\]"):
        _core.read_weight(np.array([0, 2**24 + 1]), "bias", (2,), "", np.float32, "fiu")


def test_weights_are_private_read_only_copies():
    w = np.ones((4, 8), dtype=np.float32)
    got = _core.read_weight(w, "weight", (4, 8))
    assert not np.shares_memory(got, w) and not got.flags.writeable and got.dtype == np.float32
    assert _core.read_weight(w.astype(np.float16), "weight", (4, 8)).dtype == np.float32
    with pytest.raises(mr.InputError, match="weight contains NaN"):
        _core.read_weight(np.full((4, 8), np.nan), "weight", (4, 8))


def test_a_refused_training_call_uses_up_no_step():
    router = mr.ExpertRouter(CFG, 4, gate="linear")
    router.route_tokens(np.ones((3, 4)), training=True)
    with pytest.raises(mr.InputError):
        router.route_tokens(np.ones((3, 5)), training=True)
    assert router.step == 1


def test_scalar_readers_keep_their_names_and_families():
    assert _inputs.integer(np.int64(3), "n", 1, 5) == 3
    with pytest.raises(mr.ConfigError, match=r"invalid n: got 6; must be an integer in \[1, 5\]"):
        _inputs.integer(6, "n", 1, 5)
    with pytest.raises(mr.InputTypeError, match="invalid flag: got 1"):
        _inputs.flag(1, "flag")
    with pytest.raises(mr.ConfigTypeError, match="must be one of 'a', 'b'"):
        _inputs.choice(3, "pick", ("a", "b"))
    assert _inputs.real(2, "x") == 2.0 and _inputs.is_int(np.uint8(1)) and not _inputs.is_int(True)
    assert isinstance(_inputs.wrong_type("x", 1.5, "must be an int", mr.InputError), mr.InputTypeError)
    with pytest.raises(mr.ConfigTypeError, match="config must be a RouterConfig, got dict"):
        _inputs.instance({}, "config", mr.RouterConfig)
    assert _inputs.U64_MAX == 2**64 - 1 and _inputs.I32_MAX == 2**31 - 1

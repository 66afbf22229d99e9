"""Input interop: NumPy views, ``__array__`` and ``__dlpack__`` producers, torch CPU tensors.

C-contiguous float32/float64 input must reach the Rust core without a copy. The
check is direct: the array handed to the compiled core function is spied on and
must start at the same address as the caller's buffer (``np.shares_memory`` and
the same data pointer), and the routing must equal that of a private copy.
"""

from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest

import moe_router as mr
from moe_router import _core

CFG = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.25)


class ArrayOnly:
    """Exposes a buffer through ``__array__`` only (like many array libraries)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if dtype is not None and np.dtype(dtype) != self._a.dtype:
            if copy is False:
                raise ValueError("a copy would be needed")
            return self._a.astype(dtype)
        return self._a


class DLPackOnly:
    """Exposes a buffer through the DLPack protocol only (no ``__array__``)."""

    def __init__(self, a: Any) -> None:
        self._a = a

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> Any:
        return self._a.__dlpack_device__()


@pytest.fixture
def spy(monkeypatch) -> List[np.ndarray]:
    """Records the logits/hidden arrays the compiled core routes.

    The entry points read their argument with the bindings' input reader
    (``_core.read_rows``); the spy runs that reader itself, records the rows it
    makes, and routes them (with the mask and batch shape it found).
    """
    seen: List[np.ndarray] = []
    for fn, name, kinds in (("route_logits", "logits", "fiu"), ("route_hidden", "hidden", "f")):
        original = getattr(_core, fn)

        def wrapper(x, *args, _original=original, _name=name, _kinds=kinds, **kwargs):
            width = args[0].num_experts if _name == "logits" else args[0].shape[0]
            rows, batch, mask = _core.read_rows(x, _name, width, "width", kwargs.pop("token_mask", None),
                                                kwargs.get("dtype"), _kinds)
            seen.append(rows)
            return _original(rows, *args, token_mask=mask, batch_shape=batch,
                             sequence_length=batch[1] if len(batch) == 2 else None, **kwargs)

        monkeypatch.setattr(_core, fn, wrapper)
    return seen


def same_buffer(received: np.ndarray, source: np.ndarray) -> bool:
    return (np.shares_memory(received, source)
            and received.__array_interface__["data"][0] == source.__array_interface__["data"][0]
            and received.size == source.size)


def assert_same_routing(a: mr.RoutingDecision, b: mr.RoutingDecision) -> None:
    for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "tokens_per_expert"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.load_balance_loss == b.load_balance_loss and a.router_z_loss == b.router_z_loss


@pytest.fixture
def big() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(200, 8)).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_view_is_read_in_place(big, spy, dtype):
    base = big.astype(dtype)
    view = base[37:161]  # a C-contiguous slice of a larger array
    assert view.flags.c_contiguous and not view.flags.owndata
    dec = mr.route_logits(view, CFG, training=True)
    assert len(spy) == 1 and same_buffer(spy[0], view)
    assert_same_routing(dec, mr.route_logits(view.copy(), CFG, training=True))


def test_batched_view_is_read_in_place(spy):
    base = np.random.default_rng(3).normal(size=(6, 20, 8))
    view = base[2:5]  # [3, 20, 8], contiguous
    dec = mr.route_logits(view, CFG)
    assert same_buffer(spy[0], view) and dec.batch_shape == (3, 20)
    assert_same_routing(dec, mr.route_logits(view.reshape(60, 8).copy(), CFG))


def test_strided_view_is_converted_once(big, spy):
    wide = np.random.default_rng(5).normal(size=(120, 16)).astype(np.float32)
    view = wide[:, ::2]  # not C-contiguous
    dec = mr.route_logits(view, CFG)
    assert spy[0].flags.c_contiguous and not np.shares_memory(spy[0], wide)
    assert_same_routing(dec, mr.route_logits(np.ascontiguousarray(view), CFG))


def test_float16_is_converted(big):
    half = big.astype(np.float16)
    assert_same_routing(mr.route_logits(half, CFG), mr.route_logits(half.astype(np.float32), CFG))


def test_array_protocol_object_is_read_in_place(big, spy):
    view = big[10:90]
    dec = mr.route_logits(ArrayOnly(view), CFG)
    assert same_buffer(spy[0], view)
    assert_same_routing(dec, mr.route_logits(view.copy(), CFG))


def test_dlpack_object_is_read_in_place(big, spy):
    view = big[10:90]
    obj = DLPackOnly(view)
    assert not hasattr(obj, "__array__")
    dec = mr.route_logits(obj, CFG)
    assert same_buffer(spy[0], view)
    assert_same_routing(dec, mr.route_logits(view.copy(), CFG))


def test_mask_and_bias_through_the_protocols(big):
    mask = np.arange(200) % 3 != 0
    bias = np.linspace(-0.5, 0.5, 8)
    want = mr.route_logits(big, CFG, token_mask=mask, expert_bias=bias)
    got = mr.route_logits(ArrayOnly(big), CFG, token_mask=ArrayOnly(mask), expert_bias=DLPackOnly(bias))
    assert_same_routing(got, want)


def test_non_arrays_are_refused_with_the_argument_named():
    with pytest.raises(TypeError, match="logits"):
        mr.route_logits(object(), CFG)
    with pytest.raises(TypeError, match="logits"):
        mr.route_logits(np.zeros((4, 8), dtype=np.complex64), CFG)
    with pytest.raises(TypeError, match="hidden"):
        mr.ExpertRouter(CFG, input_dim=8, gate="linear").route_tokens(np.zeros((4, 8), dtype=np.int32))


def test_route_tokens_reads_hidden_states_in_place(spy):
    router = mr.ExpertRouter(CFG, input_dim=12, seed=1, gate="linear")
    base = np.random.default_rng(11).normal(size=(90, 12)).astype(np.float32)
    view = base[5:70]
    want = router.route_tokens(view.copy())
    for source in (view, ArrayOnly(view), DLPackOnly(view)):
        spy.clear()
        dec = router.route_tokens(source)
        assert spy and same_buffer(spy[-1], view), type(source).__name__
        assert_same_routing(dec, want)


# ---------------------------------------------------------------------------
# torch (only where it is installed)
# ---------------------------------------------------------------------------
def test_torch_cpu_tensors(spy, fresh_warning):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(150, 8, generator=gen)
    for t in (full, full[20:120], full.double()):
        spy.clear()
        dec = mr.route_logits(t, CFG)
        assert same_buffer(spy[0], t.numpy())
        assert_same_routing(dec, mr.route_logits(t.numpy().copy(), CFG))
    # a tensor in an autograd graph is read without copying (detach shares memory), with one warning
    leaf = torch.randn(40, 8, generator=gen, requires_grad=True)
    spy.clear()
    with pytest.warns(mr.GradientWarning):
        dec = mr.route_logits(leaf * 1.0, CFG)
    assert_same_routing(dec, mr.route_logits(leaf.detach().numpy().copy(), CFG))
    spy.clear()
    mr.route_logits(leaf, CFG)
    assert same_buffer(spy[0], leaf.detach().numpy())
    # through DLPack only, and the batched layout
    spy.clear()
    dec = mr.route_logits(DLPackOnly(full), CFG)
    assert same_buffer(spy[0], full.numpy())
    batched = full.reshape(3, 50, 8)
    assert mr.route_logits(batched, CFG).batch_shape == (3, 50)
    # non-contiguous and half precision are converted once
    assert_same_routing(mr.route_logits(full.t().contiguous().t(), CFG), mr.route_logits(full.numpy(), CFG))
    assert_same_routing(mr.route_logits(full.half(), CFG), mr.route_logits(full.half().float().numpy(), CFG))
    mask = torch.arange(150) % 2 == 0
    assert mr.route_logits(full, CFG, token_mask=mask).active_tokens == 75


def test_torch_hidden_states(spy):
    torch = pytest.importorskip("torch")
    router = mr.ExpertRouter(CFG, input_dim=12, seed=1, gate="linear")
    hidden = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    spy.clear()
    dec = router.route_tokens(hidden)
    assert same_buffer(spy[-1], hidden.numpy())
    assert_same_routing(dec, router.route_tokens(hidden.numpy().copy()))


def test_torch_bfloat16_is_widened_once():
    torch = pytest.importorskip("torch")
    t = torch.randn(300, CFG.num_experts).to(torch.bfloat16)
    want = mr.route_logits(t.float().numpy(), CFG)
    got = mr.route_logits(t, CFG)
    np.testing.assert_array_equal(got.expert_indices, want.expert_indices)
    np.testing.assert_array_equal(got.expert_weights, want.expert_weights)


# ---------------------------------------------------------------------------
# tensors that require grad: read detached, with one GradientWarning
# ---------------------------------------------------------------------------
class GradTensor:
    """The part of a torch tensor's interface the router uses: ``requires_grad``,
    ``detach()`` (sharing memory) and the array protocol of the detached tensor."""

    def __init__(self, a: np.ndarray, requires_grad: bool = True) -> None:
        self._a, self.requires_grad = a, requires_grad
        self.detached = 0

    def detach(self) -> "GradTensor":
        self.detached += 1
        return GradTensor(self._a, requires_grad=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad")
        return self._a if dtype is None else self._a.astype(dtype)


@pytest.fixture
def fresh_warning(monkeypatch):
    """As if no GradientWarning had been emitted in this process yet."""
    from moe_router import _inputs
    monkeypatch.setattr(_inputs, "_gradient_warned", False)


def test_requires_grad_warns_once_and_reads_in_place(big, spy, fresh_warning):
    assert issubclass(mr.GradientWarning, UserWarning) and "GradientWarning" in mr.__all__
    t = GradTensor(big)
    with pytest.warns(mr.GradientWarning, match="logits requires grad.*no gradient flows") as record:
        dec = mr.route_logits(t, CFG)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's line
    assert t.detached == 1 and same_buffer(spy[-1], big)
    assert_same_routing(dec, mr.route_logits(big.copy(), CFG))
    # Once per process: later calls, and other entry points, are silent.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.route_logits(GradTensor(big), CFG)
        mr.ExpertRouter(CFG, input_dim=8, gate="linear").route_tokens(GradTensor(big))


def test_requires_grad_warning_from_every_entry_point(big, fresh_warning, monkeypatch):
    from moe_router import _inputs
    router = mr.ExpertRouter(CFG, input_dim=8, gate="linear")
    calls = {
        "hidden": lambda t: router.route_tokens(t),
        "logits": lambda t: router.route_logits(t),
        "expert_bias": lambda t: mr.route_logits(big, CFG, expert_bias=t),
        "new_weights": lambda t: router.update_router_weights(t),
    }
    arrays = {"hidden": big, "logits": big, "expert_bias": np.zeros(8), "new_weights": np.eye(8, dtype=np.float32)}
    for name, call in calls.items():
        monkeypatch.setattr(_inputs, "_gradient_warned", False)
        with pytest.warns(mr.GradientWarning, match=f"{name} requires grad"):
            call(GradTensor(arrays[name]))
    # A tensor that does not require grad is read silently.
    monkeypatch.setattr(_inputs, "_gradient_warned", False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.route_logits(GradTensor(big, requires_grad=False), CFG)

"""``RoutingDecision.backward``'s buffers: the ``out=`` gradient buffer, the accepted forms of the
cotangents (borrowed or converted, same gradient), and the same bits at every SIMD level."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moe_router as mr


def routed(rng, dtype=np.float32, T=1500, E=24, k=3, **extra):
    x = rng.normal(size=(T, E)).astype(dtype)
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0, load_balance_loss_coeff=0.01,
                          router_z_loss_coeff=0.001, **extra)
    return x, mr.route_logits(x, cfg, training=True, **({"token_mask": np.arange(T) % 7 != 0}))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_is_written_in_place_and_returned(rng, dtype):
    x, dec = routed(rng, dtype)
    g = rng.normal(size=(x.shape[0], 3))
    fresh = dec.backward(g, 0.5)
    out = np.full(x.shape, np.nan, dtype)  # garbage everywhere, masked rows included
    got = dec.backward(g, 0.5, out=out)
    assert got is out
    np.testing.assert_array_equal(out, fresh)
    assert (out[::7] == 0).all()
    np.testing.assert_array_equal(dec.backward(g, 0.5, out=None), fresh)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_large_fresh_gradient_reuses_a_dropped_one_and_never_shows_its_contents(rng, dtype, no_gc):
    # [16384, 64] float32 is 4 MiB, the size from which fresh gradients come from recycled memory
    x, dec = routed(rng, dtype, T=16384, E=64, k=2)
    g = rng.normal(size=(x.shape[0], 2))
    want = dec.backward(g, 0.5, out=np.zeros(x.shape, dtype))
    first = dec.backward(g, 0.5)
    np.testing.assert_array_equal(first, want)
    assert first.flags.c_contiguous and first.flags.writeable and first.dtype == dtype
    address = first.__array_interface__["data"][0]
    first[:] = np.nan  # what the caller leaves in it must not leak into the next gradient
    del first
    second = dec.backward(g, 0.5)
    assert second.__array_interface__["data"][0] == address  # the dropped one's memory
    np.testing.assert_array_equal(second, want)
    assert (second[::7] == 0).all()  # masked rows written, not left over
    # a gradient still alive is never handed out again
    third = dec.backward(g, 0.5)
    assert not np.shares_memory(second, third)
    np.testing.assert_array_equal(third, want)
    # views keep the memory alive after the array's own name is gone
    view = third[5:9]
    del third
    fourth = dec.backward(g, 0.25)
    assert not np.shares_memory(view, fourth)
    np.testing.assert_array_equal(view, want[5:9])


def test_out_bad_input(rng):
    x, dec = routed(rng)
    g = rng.normal(size=(x.shape[0], 3))
    read_only = np.zeros(x.shape, np.float32)
    read_only.flags.writeable = False
    for out, error, message in [
        (np.zeros((x.shape[0], 23), np.float32), mr.InputError, r"^out has shape"),
        (np.zeros(x.shape, np.float64), mr.InputTypeError,
         r"^out must be a C-contiguous float32 NumPy array \(the dtype of logits\), got ndarray of dtype float64$"),
        (np.zeros((x.shape[1], x.shape[0]), np.float32).T, mr.InputError, r"^out .*C-contiguous"),
        (read_only, mr.InputError, r"^out is read-only \(not writeable"),
        (x, mr.InputError, r"^out overlaps logits, an input of this call"),  # the logits the backward reads
        (x[:, :], mr.InputError, r"^out overlaps logits"),  # a view of them
        ([[0.0] * x.shape[1]] * x.shape[0], mr.InputTypeError, r"^out must be"),
    ]:
        with pytest.raises(error, match=message):
            dec.backward(g, 1.0, out=out)
    p = np.zeros(x.shape, np.float32)
    with pytest.raises(mr.InputError, match=r"^out overlaps grad_router_probs, an input of this call"):
        dec.backward(None, 1.0, p, out=p)
    x64, dec64 = routed(rng, np.float64)
    with pytest.raises(mr.InputTypeError, match=r"float64 NumPy array \(the dtype of logits\), got .* float32$"):
        dec64.backward(g, 1.0, out=np.zeros(x64.shape, np.float32))


def test_cotangents_in_any_real_form_give_the_same_gradient(rng):
    x, dec = routed(rng)
    g = rng.normal(size=(x.shape[0], 3))
    want = dec.backward(g, 1.0)
    for form in (np.asfortranarray(g), g.astype(np.float32).astype(np.float64), g[::-1][::-1]):
        np.testing.assert_array_equal(dec.backward(form, 1.0), dec.backward(np.ascontiguousarray(form), 1.0))
    np.testing.assert_array_equal(dec.backward(np.asfortranarray(g), 1.0), want)
    ints = rng.integers(-3, 4, size=g.shape)
    np.testing.assert_array_equal(dec.backward(ints, 1.0), dec.backward(ints.astype(np.float64), 1.0))
    p = rng.normal(size=x.shape)
    np.testing.assert_array_equal(dec.backward(None, 1.0, p), dec.backward(None, 1.0, p.astype(np.float32)))


def test_cotangents_that_overflow_their_dtype_are_refused(rng):
    x, dec = routed(rng)
    p = np.zeros(x.shape)
    p[3, 4] = 1e300  # finite in float64, inf as the float32 the probabilities are
    with np.errstate(over="ignore"), pytest.raises(mr.InputError, match="grad_router_probs"):
        dec.backward(None, 1.0, p)


SIMD_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    import moe_router as mr
    rng = np.random.default_rng(5)
    out = {}
    for name, extra in [("softmax", {}), ("sequence", {"seq_load_balance_loss_coeff": 0.1}),
                        ("jitter", {"jitter_eps": 0.1, "normalize_weights": True}),
                        ("sigmoid", {"score_function": "sigmoid", "normalize_weights": True})]:
        E = 67 if name == "softmax" else 32
        x = rng.normal(size=(7, 100, E)).astype(np.float32)
        cfg = mr.RouterConfig(num_experts=E, top_k=4, load_balance_loss_coeff=0.01, router_z_loss_coeff=0.001,
                              **extra)
        dec = mr.route_logits(x, cfg, training=True)
        out[name] = dec.backward(rng.normal(size=(7, 100, 4)), 1.0)
    np.savez(sys.argv[1], **out)
""")


def test_gradients_are_the_same_bits_at_every_simd_level(tmp_path):
    got = {}
    for level in ("avx512", "avx2", "off"):
        path = tmp_path / f"{level}.npz"
        env = dict(os.environ, MOE_ROUTER_SIMD=level)
        subprocess.run([sys.executable, "-c", SIMD_RUN, str(path)], env=env, check=True)
        got[level] = dict(np.load(path))
    for level in ("avx2", "off"):
        for name, grad in got["avx512"].items():
            np.testing.assert_array_equal(got[level][name], grad, err_msg=f"{level} {name}")

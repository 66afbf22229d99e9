"""Bad input gets a clear Python exception naming the argument; never a panic.

Also the accepted-but-converted inputs (float16, non-contiguous, Fortran order,
views) and the RouterConfig API: validation messages, the ``num_experts_per_token``
alias, ``replace``, immutability, pickling and ``capacity``.
"""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest

import moe_router as mr
from moe_router import _inputs

CFG = mr.RouterConfig(num_experts=4, top_k=2)


def raised(fn, *args, **kwargs) -> BaseException:
    """The exception ``fn`` raises; fails if it is a Rust panic or if nothing is raised."""
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # pyo3_runtime.PanicException derives from BaseException
        name = type(exc).__name__
        assert "Panic" not in name and isinstance(exc, Exception), f"panic: {name}: {exc}"
        return exc
    pytest.fail(f"{getattr(fn, '__name__', fn)} did not raise")


def route_error(logits, config=CFG, **call) -> BaseException:
    return raised(mr.route_logits, logits, config, **call)


def config_error(**kwargs) -> BaseException:
    exc = raised(mr.RouterConfig, **kwargs)
    assert isinstance(exc, mr.ConfigError) and isinstance(exc, ValueError), type(exc)
    return exc


# --------------------------------------------------------------------------
# logits: rank, shape, dtype
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (2, 3, 5, 4), (1, 1, 1, 1), ()], ids=str)
def test_wrong_rank(shape):
    exc = route_error(np.zeros(shape, np.float32))
    assert isinstance(exc, ValueError) and isinstance(exc, mr.InputError)
    msg = str(exc)
    assert "logits" in msg and str(list(shape)) in msg and "[T, 4]" in msg, msg


@pytest.mark.parametrize("shape", [(3, 5), (3, 3), (2, 2, 8), (0, 3)], ids=str)
def test_wrong_last_dimension(shape):
    exc = route_error(np.zeros(shape))
    assert isinstance(exc, mr.InputError)
    msg = str(exc)
    assert "logits" in msg and str(list(shape)) in msg and "4" in msg and "num_experts" in msg, msg


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.complex128, object],
                         ids=lambda d: np.dtype(d).name)
def test_non_float_dtypes_are_type_errors(dtype):
    exc = route_error(np.zeros((3, 4), dtype=dtype))
    assert isinstance(exc, TypeError), type(exc)
    msg = str(exc)
    assert "logits" in msg and np.dtype(dtype).name in msg, msg


@pytest.mark.parametrize("value", ["abc", None, 3.0, {"a": 1}])
def test_non_array_logits(value):
    exc = route_error(value)
    assert isinstance(exc, (TypeError, ValueError))
    assert "logits" in str(exc)


def test_python_lists_are_accepted():
    rows = [[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 0.0, 0.0]]
    dec = mr.route_logits(rows, CFG)
    assert dec.expert_indices.tolist() == [[1, 3], [0, 1]]
    # Integer logits (JSON numbers, say) are exact in float64 and route like floats.
    ints = mr.route_logits([[1, 2, 3, 4], [4, 0, 0, 4]], CFG)
    floats = mr.route_logits(np.array([[1, 2, 3, 4], [4, 0, 0, 4]], dtype=np.float64), CFG)
    assert ints.expert_indices.tolist() == floats.expert_indices.tolist() == [[3, 2], [0, 3]]
    np.testing.assert_array_equal(ints.expert_weights, floats.expert_weights)
    for dtype in (np.int8, np.int32, np.int64, np.uint8):
        d = mr.route_logits(np.array([[1, 2, 3, 4]], dtype=dtype), CFG)
        assert d.expert_indices.tolist() == [[3, 2]]
    # An empty list is zero tokens.
    empty = mr.route_logits([], CFG)
    assert empty.total_tokens == 0 and empty.expert_indices.shape == (0, CFG.top_k)


def test_config_must_be_a_router_config():
    exc = route_error(np.zeros((2, 4)), config={"num_experts": 4})
    assert isinstance(exc, TypeError) and "config" in str(exc)


@pytest.mark.parametrize("step", [-1, 1.5, True, "0"])
def test_bad_step(step):
    exc = route_error(np.zeros((2, 4)), step=step)
    # A negative step is a bad value (InputError, a ValueError); the others have the wrong type.
    assert isinstance(exc, mr.InputError if step == -1 else TypeError) and "step" in str(exc)


@pytest.mark.parametrize("value", ["no", 2, None, 0.5])
def test_training_and_return_probs_must_be_flags(value):
    for name in ("training", "return_probs"):
        exc = route_error(np.zeros((2, 4)), **{name: value})
        assert isinstance(exc, TypeError) and name in str(exc)


@pytest.mark.parametrize("n", [-1, 1025, 10**20, "2", 2.0, True])
def test_thread_counts_are_bounded(n, restore_threads):
    with pytest.raises(mr.ConfigError, match="num_threads"):
        mr.set_num_threads(n)


def test_hidden_messages_name_the_computed_logits():
    router = mr.ExpertRouter(CFG, input_dim=3, gate="linear", weight=np.ones((3, 4), np.float32))
    for bad, text in ((np.inf, r"\+inf router logit"), (np.nan, "NaN router logit")):
        h = np.zeros((2, 3), np.float32)
        h[1, 0] = bad
        with pytest.raises(mr.InputError, match=f"hidden gives a {text}.*token 1"):
            router.route_tokens(h)
    gate = mr.GateNetwork(3, 40)
    with pytest.raises(mr.InputError, match="hidden contains NaN or infinite values at token 1"):
        gate.forward(np.array([[0.0, 0, 0], [np.nan, 0, 0]]))


def test_jitter_overflow_is_an_error_not_nan():
    cfg = mr.RouterConfig(num_experts=4, top_k=2, jitter_eps=0.5)
    x = np.array([[1.7e308, 0.0, 0.0, 0.0]])
    with pytest.raises(mr.InputError, match="training noise"):
        mr.route_logits(x, cfg, training=True)
    # No noise in evaluation; such logits are refused there for their z-loss term (logsumexp^2 > f64 max).
    with pytest.raises(mr.InputError, match="z-loss term"):
        mr.route_logits(x, cfg)


# --------------------------------------------------------------------------
# Accepted with a conversion: float16, longdouble, layouts, views
# --------------------------------------------------------------------------


def assert_same_decision(a, b):
    for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "tokens_per_expert",
                 "pre_drop_tokens_per_expert"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("capacity", "load_balance_loss", "router_z_loss", "dropped_assignments"):
        assert getattr(a, name) == getattr(b, name), name


def test_float16_is_converted(rng):
    x16 = (rng.normal(size=(700, 8)) * 3).astype(np.float16)
    x16[5, 2] = -np.inf
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0)
    assert_same_decision(mr.route_logits(x16, cfg), mr.route_logits(x16.astype(np.float32), cfg))
    assert_same_decision(mr.route_logits(x16, cfg), mr.route_logits(x16.astype(np.float64), cfg))
    rows, batch = _inputs.float_rows(x16, "logits", 8, "num_experts")
    assert rows.dtype in (np.float32, np.float64) and batch == (700,)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 here")
def test_longdouble_is_converted(rng):
    x = rng.normal(size=(50, 4))
    cfg = mr.RouterConfig(num_experts=4, top_k=2)
    assert_same_decision(mr.route_logits(x.astype(np.longdouble), cfg), mr.route_logits(x, cfg))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_and_fortran_layouts_route_like_the_copy(dtype, rng):
    cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=0.8, drop_policy="probs")
    wide = rng.normal(size=(1408, 12)).astype(dtype)
    layouts = {
        "column slice": wide[:, 2:10],
        "row stride": wide[::2, :8],
        "fortran": np.asfortranarray(wide[:, :8]),
        "negative stride": wide[::-1, :8],
        "3-D transposed": np.ascontiguousarray(wide[:, :8].reshape(22, 64, 8).transpose(1, 0, 2)).transpose(1, 0, 2),
    }
    for name, view in layouts.items():
        assert not view.flags.c_contiguous, name
        copy = np.ascontiguousarray(view)
        a = mr.route_logits(view, cfg)
        b = mr.route_logits(copy, cfg)
        assert_same_decision(a, b)
        assert a.batch_shape == view.shape[:-1]
    # Converted once; the input itself is left untouched.
    before = wide.copy()
    mr.route_logits(wide[:, 2:10], cfg)
    np.testing.assert_array_equal(wide, before)


def test_contiguous_views_are_read_in_place(rng):
    base = rng.normal(size=(2000, 8)).astype(np.float32)
    view = base[300:1700]  # a C-contiguous slice of a larger buffer
    assert view.flags.c_contiguous and not view.flags.owndata
    rows, batch = _inputs.float_rows(view, "logits", 8, "num_experts")
    assert np.shares_memory(rows, base), "a contiguous float32 view must not be copied"
    assert batch == (1400,)
    rows3, batch3 = _inputs.float_rows(base.reshape(20, 100, 8), "logits", 8, "num_experts")
    assert np.shares_memory(rows3, base) and batch3 == (20, 100)
    for dtype in (np.float64,):
        b64 = base.astype(dtype)
        r64, _ = _inputs.float_rows(b64[10:20], "logits", 8, "num_experts")
        assert np.shares_memory(r64, b64)
    # Non-contiguous input is copied (and must be, for the core to read rows).
    rows_nc, _ = _inputs.float_rows(base[::2], "logits", 8, "num_experts")
    assert rows_nc.flags.c_contiguous
    cfg = mr.RouterConfig(num_experts=8, top_k=2)
    assert_same_decision(mr.route_logits(view, cfg), mr.route_logits(view.copy(), cfg))
    # Reading in place does not write to the caller's buffer.
    snapshot = base.copy()
    mr.route_logits(view, cfg, training=True)
    np.testing.assert_array_equal(base, snapshot)


# --------------------------------------------------------------------------
# Bad values in logits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (np.inf, "+inf")])
def test_nan_and_posinf_name_the_token(value, word, dtype):
    for token, col in ((0, 0), (9, 3), (777, 1)):
        x = np.zeros((1000, 4), dtype)
        x[token, col] = value
        x[token + 1:, :] = np.nan  # later offenders must not win
        exc = route_error(x)
        assert isinstance(exc, mr.InputError)
        msg = str(exc)
        assert "logits" in msg and word in msg and f"token {token}" in msg, msg


def test_all_neg_inf_row_names_the_token():
    x = np.zeros((600, 3))
    x[513] = -np.inf
    exc = route_error(x, mr.RouterConfig(num_experts=3, top_k=1))
    msg = str(exc)
    assert isinstance(exc, mr.InputError) and "token 513" in msg and "-inf" in msg, msg
    # Masking the row out makes the input valid.
    mask = np.ones(600, bool)
    mask[513] = False
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=3, top_k=1), token_mask=mask)
    assert dec.active_tokens == 599


def test_neg_inf_in_some_entries_is_allowed():
    x = np.array([[-np.inf, 0.0, -np.inf, 1.0]])
    dec = mr.route_logits(x, CFG)
    assert dec.expert_indices.tolist() == [[3, 1]]
    assert np.isfinite(dec.router_z_loss)


# --------------------------------------------------------------------------
# token_mask and expert_bias
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [np.ones(4, bool), np.ones(6, bool), np.ones((5, 1), bool), np.ones((1, 5), bool),
                                  np.ones((), bool)], ids=lambda m: str(m.shape))
def test_token_mask_wrong_shape(mask):
    exc = route_error(np.zeros((5, 4)), token_mask=mask)
    assert isinstance(exc, ValueError)
    msg = str(exc)
    assert "token_mask" in msg and "[5]" in msg, msg


@pytest.mark.parametrize("mask", [np.ones(5, np.float32), np.array([0, 1, 2, 1, 0]), np.array(["a"] * 5),
                                  np.ones(5, np.complex64)], ids=lambda m: m.dtype.name)
def test_token_mask_wrong_dtype(mask):
    exc = route_error(np.zeros((5, 4)), token_mask=mask)
    assert isinstance(exc, TypeError)
    assert "token_mask" in str(exc) and "bool" in str(exc)


def test_token_mask_forms_accepted(rng):
    x = rng.normal(size=(2, 5, 4))
    m = rng.random((2, 5)) < 0.5
    a = mr.route_logits(x, CFG, token_mask=m)
    b = mr.route_logits(x, CFG, token_mask=m.reshape(-1))
    c = mr.route_logits(x, CFG, token_mask=m.astype(np.int8))  # 0/1 integers read as bools
    d = mr.route_logits(x, CFG, token_mask=m.tolist())
    for other in (b, c, d):
        assert_same_decision(a, other)
    assert a.active_tokens == int(m.sum())


@pytest.mark.parametrize("bias", [np.zeros(3), np.zeros(5), np.zeros((4, 1)), np.zeros(())], ids=lambda b: str(b.shape))
def test_expert_bias_wrong_shape(bias):
    exc = route_error(np.zeros((5, 4)), expert_bias=bias)
    assert isinstance(exc, ValueError)
    msg = str(exc)
    assert "expert_bias" in msg and "[4]" in msg, msg


@pytest.mark.parametrize("value,text", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "inf")])
def test_expert_bias_non_finite(value, text):
    bias = np.zeros(4)
    bias[2] = value
    exc = route_error(np.zeros((5, 4)), expert_bias=bias)
    assert isinstance(exc, mr.InputError)
    msg = str(exc)
    assert "expert_bias[2]" in msg and text in msg.lower(), msg


def test_expert_bias_wrong_dtype():
    exc = route_error(np.zeros((5, 4)), expert_bias=np.array(["a", "b", "c", "d"]))
    assert isinstance(exc, TypeError) and "expert_bias" in str(exc)
    # Integer and float32 biases are fine (read as float64).
    a = mr.route_logits(np.zeros((5, 4)), CFG, expert_bias=np.array([0, 0, 1, 0]))
    b = mr.route_logits(np.zeros((5, 4)), CFG, expert_bias=np.array([0, 0, 1, 0], np.float32))
    assert_same_decision(a, b)
    assert (a.expert_indices[:, 0] == 2).all()


# --------------------------------------------------------------------------
# RouterConfig validation: the message names the field
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=-3), "num_experts"),
    (dict(num_experts=2.5), "num_experts"),
    (dict(num_experts=True), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, top_k=-1), "top_k"),
    (dict(score_function="softmx"), "score_function"),
    (dict(score_function=None), "score_function"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(drop_policy="Position"), "drop_policy"),
    (dict(capacity_rounding="up"), "capacity_rounding"),
    (dict(group_score="sum"), "group_score"),
    (dict(overflow="spill"), "overflow"),
    (dict(num_experts=6, num_groups=4, group_top_k=1), "num_groups"),
    (dict(num_experts=8, num_groups=4, group_top_k=5), "group_top_k"),
    (dict(num_experts=8, num_groups=4, group_top_k=0), "group_top_k"),
    (dict(num_experts=8, top_k=3, num_groups=4, group_top_k=1), "top_k"),
    (dict(num_experts=8, num_groups=4), "group_top_k"),
    (dict(num_experts=8, group_top_k=2), "num_groups"),
    (dict(weight_scale=0.0), "weight_scale"),
    (dict(weight_scale=-1.0), "weight_scale"),
    (dict(weight_scale=math.inf), "weight_scale"),
    (dict(weight_scale=math.nan), "weight_scale"),
    (dict(weight_scale=1e39), "weight_scale"),
    (dict(reroute_weight_scale=1e39), "reroute_weight_scale"),
    (dict(weight_scale=1e38, reroute_weight_scale=4.0), "reroute_weight_scale"),
    (dict(expert_dropout=-0.1), "expert_dropout"),
    (dict(expert_dropout=1.5), "expert_dropout"),
    (dict(expert_dropout=math.nan), "expert_dropout"),
    (dict(min_capacity=-1), "min_capacity"),
    (dict(jitter_eps=1.0), "jitter_eps"),
    (dict(jitter_eps=-0.1), "jitter_eps"),
    (dict(noise_std=-1.0), "noise_std"),
    (dict(reroute_weight_scale=-0.5), "reroute_weight_scale"),
    (dict(load_balance_loss_coeff=-1.0), "load_balance_loss_coeff"),
    (dict(router_z_loss_coeff=math.nan), "router_z_loss_coeff"),
    (dict(seed=-1), "seed"),
    (dict(eval_capacity_factor="sometimes"), "eval_capacity_factor"),
])
def test_config_errors_name_the_field(kwargs, field):
    exc = config_error(**kwargs)
    assert field in str(exc), str(exc)


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, -0.5, -math.inf, math.nan])
def test_bad_capacity_factor_suggests_none(field, value):
    exc = config_error(**{field: value})
    msg = str(exc)
    assert field in msg and "None" in msg, msg


def test_capacity_factor_none_is_dropless_and_inf_is_refused():
    assert mr.RouterConfig(capacity_factor=None).capacity(100) is None
    dec = mr.route_logits(np.zeros((10, 8)), mr.RouterConfig(capacity_factor=None))
    assert dec.dropless and dec.kept.all()
    # +inf is not a spelling of dropless: it is refused with the one that is.
    with pytest.raises(mr.ConfigError, match=r"capacity_factor.*capacity_factor=None"):
        mr.RouterConfig(capacity_factor=math.inf)


def test_config_error_is_a_value_error():
    assert issubclass(mr.ConfigError, ValueError) and issubclass(mr.InputError, ValueError)
    assert issubclass(mr.ConfigError, mr.RouterError) and issubclass(mr.InputError, mr.RouterError)


# --------------------------------------------------------------------------
# RouterConfig API
# --------------------------------------------------------------------------


def test_num_experts_per_token_alias():
    cfg = mr.RouterConfig(num_experts=8, num_experts_per_token=3)
    assert cfg.top_k == 3 and cfg.num_experts_per_token == 3
    assert cfg == mr.RouterConfig(num_experts=8, top_k=3)
    assert mr.RouterConfig(num_experts=8, top_k=3, num_experts_per_token=3).top_k == 3
    exc = config_error(num_experts=8, top_k=2, num_experts_per_token=3)
    assert "num_experts_per_token" in str(exc) and "top_k" in str(exc)
    exc = config_error(num_experts=4, num_experts_per_token=5)
    assert "top_k" in str(exc)
    assert cfg.replace(num_experts_per_token=1).top_k == 1
    dec = mr.route_logits(np.zeros((3, 8)), cfg)
    assert dec.expert_indices.shape == (3, 3)


def test_defaults_follow_the_seed():
    cfg = mr.RouterConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.capacity_factor) == (8, 2, 1.25)
    assert (cfg.load_balance_loss_coeff, cfg.router_z_loss_coeff, cfg.expert_dropout) == (0.01, 0.001, 0.0)
    assert cfg.enable_load_balancing is True and cfg.min_capacity == 0
    assert (cfg.drop_policy, cfg.overflow, cfg.score_function) == ("position", "drop", "softmax")
    assert cfg.normalize_weights is False and cfg.weight_scale == 1.0


def test_replace():
    cfg = mr.RouterConfig(num_experts=16, top_k=4, capacity_factor=1.1, drop_policy="probs")
    new = cfg.replace(top_k=2, capacity_factor=None)
    assert (new.top_k, new.capacity_factor, new.drop_policy, new.num_experts) == (2, None, "probs", 16)
    assert (cfg.top_k, cfg.capacity_factor) == (4, 1.1), "replace must not change the original"
    assert new != cfg
    assert cfg.replace() == cfg
    exc = raised(cfg.replace, top_k=17)
    assert isinstance(exc, mr.ConfigError) and "top_k" in str(exc)
    exc = raised(cfg.replace, no_such_field=1)
    assert isinstance(exc, TypeError) and "no_such_field" in str(exc)


def test_immutable():
    cfg = mr.RouterConfig(num_experts=8, top_k=2)
    for name, value in (("top_k", 3), ("num_experts", 1), ("new_attribute", 1)):
        exc = raised(setattr, cfg, name, value)
        assert isinstance(exc, AttributeError)
    assert cfg.top_k == 2 and cfg.num_experts == 8
    assert hash(cfg) == hash(mr.RouterConfig(num_experts=8, top_k=2))


def test_pickle_round_trip(rng):
    cfg = mr.RouterConfig(num_experts=16, top_k=3, capacity_factor=1.1, eval_capacity_factor="dropless",
                          drop_policy="bpr", score_function="sigmoid", normalize_weights=True, weight_scale=2.5,
                          num_groups=4, group_top_k=2, group_score="top2_sum", min_capacity=2,
                          capacity_rounding="megatron", seed=7)
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and hash(back) == hash(cfg) and back.to_dict() == cfg.to_dict()
    x = rng.normal(size=(300, 16))
    for training in (True, False):
        assert_same_decision(mr.route_logits(x, cfg, training=training), mr.route_logits(x, back, training=training))
    assert back.capacity(300) == cfg.capacity(300) == math.ceil((300 * 3 / 16) * 1.1)


def test_capacity_against_the_exact_formula(rng):
    for _ in range(400):
        E = int(rng.integers(1, 300))
        k = int(rng.integers(1, E + 1))
        T = int(rng.integers(0, 200_000))
        cf = float(rng.choice([1.1, 1.25, 0.3, 2.675, 1e-4, round(float(rng.uniform(0.05, 4.0)), 3),
                               float(rng.uniform(0.05, 4.0))]))
        min_capacity = int(rng.integers(0, 6))
        cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=min_capacity)
        want = max(min_capacity, math.ceil(Fraction(repr(cf)) * T * k / E))
        assert cfg.capacity(T) == want, (E, k, T, cf)
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=1.0, eval_capacity_factor=0.5)
    assert cfg.capacity(100, training=True) == 25 and cfg.capacity(100, training=False) == 13
    dl = mr.RouterConfig(num_experts=4, top_k=1, eval_capacity_factor="dropless")
    assert dl.capacity(100, training=False) is None and dl.capacity(100, training=True) == 32
    exc = raised(cfg.capacity, -1)
    assert isinstance(exc, ValueError) and "num_tokens" in str(exc)


def test_decimal_capacity_factor_is_exact():
    from decimal import Decimal
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=Decimal("1.1"))
    assert cfg.capacity(200) == 55


# --------------------------------------------------------------------------- found by a new user's probes


def test_router_probs_cannot_be_made_writeable() -> None:
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    d = mr.route_logits(x, CFG, return_probs=True)
    p = d.router_probs
    with pytest.raises(ValueError):
        p.flags.writeable = True
    with pytest.raises(ValueError):
        p[0, 0] = 0.5
    assert np.array_equal(d.router_probs, p) and p[0].sum() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("where", ["grad_expert_weights", "grad_auxiliary_loss"])
def test_a_gradient_that_overflows_float32_is_refused_not_inf(where: str) -> None:
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    d = mr.route_logits(x, CFG, training=True)
    g = np.ones((64, 2))
    if where == "grad_expert_weights":
        g[5, 0] = 1e300
        exc = raised(d.backward, g, 1.0)
    else:
        exc = raised(d.backward, g, 1e300)
    assert isinstance(exc, mr.InputError) and "overflow" in str(exc), exc
    # The same cotangents on float64 logits are representable.
    d64 = mr.route_logits(x.astype(np.float64), CFG, training=True)
    assert np.isfinite(d64.backward(np.ones((64, 2)), 1e30)).all()


@pytest.mark.parametrize("preset, name", [
    ("megatron", "moe_token_drop_policy"), ("megatron", "drop_policy"), ("megatron", "moe_router_score_function"),
    ("megatron", "moe_router_load_balancing_type"), ("deepspeed", "noisy_gate_policy"),
    ("fairseq", "second_expert_policy"), ("deepseek_v3", "scoring_func"),
])
def test_a_preset_choice_of_the_wrong_type_is_a_type_error(preset: str, name: str) -> None:
    exc = raised(mr.presets.preset, preset, 64, 2, **{name: 3})
    assert isinstance(exc, mr.ConfigTypeError) and "must be a string" in str(exc), exc


def test_load_balancer_refusals_name_their_argument() -> None:
    lb = mr.LoadBalancer(8)
    exc = raised(lb.update, "x")
    assert isinstance(exc, mr.InputTypeError) and "decision" in str(exc) and "RoutingDecision" in str(exc), exc
    st = lb.get_stats()
    assert isinstance(raised(st.is_well_balanced, "x"), mr.InputTypeError)
    exc = raised(st.is_well_balanced, -1.0)
    assert isinstance(exc, mr.InputError) and "max_cv" in str(exc), exc
    assert st.is_well_balanced() is False and st.is_well_balanced(0.5) is False  # nothing seen yet


@pytest.mark.parametrize("preset, setting, value, field", [
    ("deepseek_v3", "n_group", 7, "num_groups"), ("deepseek_v3", "topk_group", 9, "group_top_k"),
    ("deepseek_v3", "routed_scaling_factor", float("nan"), "weight_scale"),
    ("megatron", "moe_router_topk_scaling_factor", -1.0, "weight_scale"),
])
def test_a_preset_refusal_names_the_framework_setting_first(preset: str, setting: str, value, field: str) -> None:
    exc = raised(mr.presets.preset, preset, 256, 8, **{setting: value})
    assert isinstance(exc, mr.ConfigError) and not isinstance(exc, TypeError), exc
    assert str(exc).startswith(f"preset '{preset}': {setting}=") and f"sets {field}: invalid {field}" in str(exc), exc


def test_an_unknown_simd_level_is_warned_about_at_import() -> None:
    import os
    import subprocess
    import sys

    def run(value: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MOE_ROUTER_SIMD": value}
        code = "import moe_router as mr, numpy as np; print(mr.route_logits(np.eye(4), mr.RouterConfig(num_experts=4, top_k=1)).expert_indices.ravel().tolist())"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)

    bad = run("avx-2")
    assert "RuntimeWarning" in bad.stderr and 'MOE_ROUTER_SIMD="avx-2" is not a level' in bad.stderr, bad.stderr
    good = run("avx2")
    assert "MOE_ROUTER_SIMD" not in good.stderr and good.stdout == bad.stdout == "[0, 1, 2, 3]\n"

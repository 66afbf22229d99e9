"""Numerical edge cases, one kind per section, checked by value.

Every kind is a range of inputs (logit magnitudes and gaps, scale factors,
capacity factors, integer sizes, k), so most tests draw from that whole range
with hypothesis and compare each output with its formula computed here in
float64, not only with "finite".
"""

from __future__ import annotations

import decimal
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_router as mr

SETTINGS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)
F32_MAX = float(np.finfo(np.float32).max)
POLICIES = ["position", "rank", "probs", "bpr"]


# --------------------------------------------------------------------------
# Kind: normalization of chosen scores that are subnormal or 0
# --------------------------------------------------------------------------


def log_scores(z: np.ndarray, score_function: str) -> np.ndarray:
    """log of each score up to a per-row constant (-inf for ineligible experts)."""
    if score_function == "softmax":
        return z
    with np.errstate(over="ignore"):
        return -np.logaddexp(0.0, -z)


def normalized(logs: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Per row, exp(l - max) / sum exp(l - max) over the entries where ``use``; 0 elsewhere and in empty rows."""
    logs = np.where(use, logs, -np.inf)
    top = logs.max(axis=1, keepdims=True)
    rel = np.exp(logs - np.where(np.isfinite(top), top, 0.0))
    total = rel.sum(axis=1, keepdims=True)
    return np.divide(rel, total, out=np.zeros_like(rel), where=total > 0)


def expected_weights(cfg: mr.RouterConfig, z: np.ndarray, chosen: np.ndarray, dec: mr.RoutingDecision) -> np.ndarray:
    """The weights of docs/semantics.md items 6, 10 and 13, exactly (float64), for selection ``chosen``."""
    ls = np.take_along_axis(log_scores(z, cfg.score_function), chosen, axis=1)
    routed = np.isfinite(ls)
    if cfg.normalize_weights:
        pre = normalized(ls, routed)
    elif cfg.score_function == "softmax":
        pre = np.take_along_axis(normalized(z, np.isfinite(z)), chosen, axis=1)
    else:
        pre = np.exp(ls)
    rerouted = np.asarray(dec.rerouted) if dec.rerouted is not None else np.zeros_like(dec.kept)
    rws = cfg.reroute_weight_scale
    w = cfg.weight_scale * pre * np.where(rerouted, rws, 1.0)
    if cfg.renormalize_after_drop:
        # Relative to the largest kept log-score first: a large logit would absorb log(rws).
        top = np.where(dec.kept, ls, -np.inf).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            logw = (ls - top) + np.where(rerouted, math.log(rws) if rws > 0 else -np.inf, 0.0)
        w = cfg.weight_scale * normalized(logw, dec.kept)
    return np.where(dec.kept, w, 0.0)


def scales_within_the_bound(draw) -> dict:
    """weight_scale and reroute_weight_scale anywhere up to the float32 bound on their product."""
    rws = draw(st.sampled_from([0.0, 1e-30, 0.5, 1.0, 2.0, 1e10]))
    top = math.log10(F32_MAX / max(1.0, rws))
    ws = min(10.0 ** draw(st.floats(-30, top)), F32_MAX / max(1.0, rws))
    return dict(weight_scale=ws, reroute_weight_scale=rws)


@st.composite
def extreme_rows(draw, dtype):
    """Logits anywhere in the dtype's range, with gaps up to 1e4 inside a row, and options that choose low scores."""
    E = draw(st.integers(2, 10))
    k = draw(st.integers(1, E))
    T = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = F32_MAX / 4 if dtype == np.float32 else 1e150
    base = draw(st.sampled_from([0.0, 1.0, -1.0])) * 10.0 ** draw(st.floats(-3, math.log10(top)))
    gaps = np.abs(rng.normal(size=(T, E))) * 10.0 ** rng.uniform(-1, 4, size=(T, 1))
    z = (base - gaps).astype(dtype)
    z[rng.random((T, E)) < draw(st.sampled_from([0.0, 0.2]))] = -np.inf
    z[np.isneginf(z).all(axis=1), 0] = dtype(base)
    cfg = mr.RouterConfig(
        num_experts=E, top_k=k,
        score_function=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.booleans()),
        renormalize_after_drop=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.0])),
        drop_policy=draw(st.sampled_from(POLICIES)),
        overflow=draw(st.sampled_from(["drop", "reroute"])),
        **scales_within_the_bound(draw),
    )
    # A bias of up to 10 outweighs every score in [0, 1]: experts far below the best get chosen.
    bias = rng.normal(size=E) * draw(st.sampled_from([0.01, 1.0, 10.0])) if draw(st.booleans()) else None
    return cfg, z, bias


def check_weights_exact(cfg: mr.RouterConfig, z: np.ndarray, bias) -> None:
    dec = mr.route_logits(z, cfg, expert_bias=bias)
    w = dec.expert_weights
    assert np.isfinite(w).all(), w
    # At most weight_scale (times reroute_weight_scale once rerouted), up to the float32
    # rounding of the pre-drop weight that a reroute multiplies.
    bound = cfg.weight_scale * max(1.0, cfg.reroute_weight_scale) * (1 + 2.0**-23)
    assert ((w >= 0) & (w.astype(np.float64) <= bound)).all(), (w, bound)
    # The selection without capacity: the chosen experts before any reroute.
    chosen = mr.route_logits(z, cfg.replace(capacity_factor=None), expert_bias=bias).expert_indices.astype(np.int64)
    want = expected_weights(cfg, z.astype(np.float64), chosen, dec)
    # float32 rounding of the pre-drop weights and of the result, and one float32 subnormal step.
    np.testing.assert_allclose(w, want.astype(np.float32), rtol=3e-6, atol=1e-44)


@SETTINGS
@given(extreme_rows(np.float64))
def test_weights_are_exact_for_any_float64_logits(problem):
    check_weights_exact(*problem)


@SETTINGS
@given(extreme_rows(np.float32))
def test_weights_are_exact_for_any_float32_logits(problem):
    check_weights_exact(*problem)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bias_choosing_underflowing_scores_normalizes_exactly(dtype):
    """A bias picks experts 720 and 800 below the best (softmax scores subnormal and 0 in float64)."""
    z = np.array([[800.0, 80.0, 0.0]], dtype=dtype)
    cfg = mr.RouterConfig(num_experts=3, top_k=2, normalize_weights=True, capacity_factor=None)
    dec = mr.route_logits(z, cfg, expert_bias=[0.0, 2.0, 2.0])
    assert dec.expert_indices.tolist() == [[1, 2]]
    np.testing.assert_allclose(dec.expert_weights, [[1.0, math.exp(-80.0)]], rtol=1e-6)
    # Renormalized after drops: every row keeps a weight of exactly weight_scale in total.
    z2 = np.repeat(z, 4, axis=0)
    renorm = mr.route_logits(z2, cfg.replace(renormalize_after_drop=True, capacity_factor=0.5),
                             expert_bias=[0.0, 2.0, 2.0])
    assert np.isfinite(renorm.expert_weights).all()
    np.testing.assert_allclose(renorm.expert_weights.sum(axis=1)[renorm.kept.any(axis=1)], 1.0, rtol=1e-6)
    # Sigmoid: sigmoid(-800) is 0 in float64, sigmoid(-720) subnormal; their ratio is e^80.
    sig = mr.route_logits(np.array([[0.0, -720.0, -800.0]], dtype=dtype),
                          cfg.replace(score_function="sigmoid"), expert_bias=[0.0, 2.0, 2.0])
    np.testing.assert_allclose(sig.expert_weights, [[1.0, math.exp(-80.0)]], rtol=1e-6)


# --------------------------------------------------------------------------
# Kind: weight factors beyond what float32 weights hold
# --------------------------------------------------------------------------


@SETTINGS
@given(ws=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
       rws=st.floats(min_value=0.0, allow_infinity=False))
def test_weight_factors_are_accepted_exactly_when_every_weight_fits_float32(ws, rws):
    fits = ws <= F32_MAX and rws <= F32_MAX and ws * max(1.0, rws) <= F32_MAX
    if fits:
        cfg = mr.RouterConfig(num_experts=4, top_k=2, weight_scale=ws, reroute_weight_scale=rws,
                              capacity_factor=0.5, overflow="reroute", renormalize_after_drop=False)
        dec = mr.route_logits(np.array([[3.0, 0.0, 0.0, 0.0]] * 4), cfg)
        assert np.isfinite(dec.expert_weights).all()
        assert (dec.expert_weights.astype(np.float64) <= ws * max(1.0, rws) * (1 + 2.0**-23)).all()
        return
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(weight_scale=ws, reroute_weight_scale=rws)
    field = "weight_scale" if ws > F32_MAX else "reroute_weight_scale"
    assert f"invalid {field}" in str(info.value) and "float32" in str(info.value), str(info.value)


@pytest.mark.parametrize("rws", [1.0, 1.15984, 1.324675, 3.0, 7.0, 1e10, 3.0e38])
def test_rerouted_weights_at_the_bound_stay_finite(rws):
    """weight_scale * reroute_weight_scale = f32 max: the float32 rounding of the pre-drop weight
    (weight_scale itself, not a float32 value) must not carry the rerouted one to inf."""
    ws = F32_MAX / rws
    cfg = mr.RouterConfig(num_experts=2, top_k=1, normalize_weights=True, capacity_factor=0.5,
                          overflow="reroute", weight_scale=ws, reroute_weight_scale=rws)
    dec = mr.route_logits(np.array([[1.0, 0.0], [1.0, 0.0]]), cfg)
    assert dec.rerouted[1, 0]
    assert np.isfinite(dec.expert_weights).all() and dec.expert_weights[1, 0] >= np.float32(F32_MAX) * (1 - 2**-22)


def test_reroute_factor_does_not_scale_up_float32_rounding():
    """A pre-drop weight of e^-102 (a float32 subnormal with 3 bits) rerouted with factor 1e10:
    the moved weight is e^-102 * 1e10 to float32 precision, not the subnormal's rounding times 1e10."""
    cfg = mr.RouterConfig(num_experts=2, top_k=1, score_function="sigmoid", capacity_factor=0.5,
                          overflow="reroute", reroute_weight_scale=1e10)
    dec = mr.route_logits(np.array([[5.0, 0.0], [-102.0, -132.0]]), cfg)
    assert dec.rerouted[1, 0] and dec.expert_indices[1, 0] == 1
    want = 1e10 / (1 + math.exp(102.0))
    assert dec.expert_weights[1, 0] == pytest.approx(want, rel=1e-6)


def test_largest_weight_scale_gives_the_float32_maximum():
    cfg = mr.RouterConfig(num_experts=2, top_k=1, weight_scale=F32_MAX, normalize_weights=True,
                          capacity_factor=None)
    assert mr.route_logits(np.array([[1.0, 0.0]]), cfg).expert_weights.tolist() == [[F32_MAX]]
    with pytest.raises(mr.ConfigError, match="weight_scale"):
        cfg.replace(weight_scale=np.nextafter(F32_MAX, math.inf))
    with pytest.raises(mr.ConfigError, match="reroute_weight_scale"):
        cfg.replace(weight_scale=F32_MAX / 2, reroute_weight_scale=2.5)


# --------------------------------------------------------------------------
# Kind: capacity factors at the ends of the float range
# --------------------------------------------------------------------------

CAPACITY_MAX = 2**64 - 1


def exact_capacity(cf: float, min_capacity: int, T: int, k: int, E: int):
    """docs/semantics.md item 8 with its no-limit rule: None when the value exceeds 2**64 - 1."""
    c = max(min_capacity, math.ceil(Fraction(repr(cf)) * T * k / E))
    return None if c > CAPACITY_MAX else c


@SETTINGS
@given(exponent=st.floats(-320, 308.25), mantissa=st.sampled_from([1.0, 1.1, 2.5, 9.999999999999998]),
       T=st.integers(0, 3000), k=st.integers(1, 4), E=st.integers(4, 300), min_capacity=st.sampled_from([0, 5]))
def test_capacity_is_the_exact_formula_or_no_limit(exponent, mantissa, T, k, E, min_capacity):
    cf = mantissa * 10.0 ** exponent
    if not (0 < cf < math.inf):
        return
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=min_capacity)
    want = exact_capacity(cf, min_capacity, T, k, E)
    assert cfg.capacity(T) == want
    if T <= 600:
        dec = mr.route_logits(np.random.default_rng(T).normal(size=(T, E)), cfg)
        assert dec.dropless == (want is None)
        if want is None:
            assert dec.kept.all() and dec.capacity == int(dec.tokens_per_expert.max(initial=0))
        else:
            assert dec.capacity == want


@pytest.mark.parametrize("cf,want", [(1e18, 2_500_000_000_000_000_000), (7.37869762948382e18, 18_446_744_073_709_550_000),
                                     (7.378697629483821e18, None), (1e30, None), (1e308, None)])
def test_huge_capacity_factor_is_exact_up_to_the_capacity_type(cf, want):
    """T*k/E = 10/4: the exact value while it fits in 64 bits, then no limit (not 2**64 - 1 for every factor)."""
    cfg = mr.RouterConfig(num_experts=4, top_k=1, capacity_factor=cf)
    assert cfg.capacity(10) == want == exact_capacity(cf, 0, 10, 1, 4)
    for rounding in ("megatron", "deepspeed"):
        if cf >= 1e30:
            assert cfg.replace(capacity_rounding=rounding).capacity(10) is None


@pytest.mark.parametrize("field,hint", [("capacity_factor", "capacity_factor=None"),
                                        ("eval_capacity_factor", "eval_capacity_factor='dropless'")])
@pytest.mark.parametrize("value", [math.inf, np.float64(np.inf), decimal.Decimal("Infinity")])
def test_infinite_capacity_factor_is_refused_with_the_dropless_spelling(field, hint, value):
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(**{field: value})
    assert f"invalid {field}" in str(info.value) and hint in str(info.value), str(info.value)


# --------------------------------------------------------------------------
# Kind: integer inputs that the float dtype would round
# --------------------------------------------------------------------------

INT_DTYPES = [np.int64, np.uint64, np.int32, np.uint32, np.int16]


@st.composite
def integer_logits(draw):
    dtype = draw(st.sampled_from(INT_DTYPES))
    info = np.iinfo(dtype)
    E, T = draw(st.integers(2, 6)), draw(st.integers(1, 6))
    # Around 2**53 and 2**24 (where rounding starts), near the dtype's ends, and small.
    centers = [0, 2**24, 2**53, 2**62, int(info.max), int(info.min)]
    values = [[min(max(draw(st.sampled_from(centers)) + draw(st.integers(-3, 3)) * draw(st.sampled_from([1, 2**11])),
                       int(info.min)), int(info.max)) for _ in range(E)] for _ in range(T)]
    return np.array(values, dtype=dtype), draw(st.integers(1, E))


@SETTINGS
@given(integer_logits())
def test_integer_logits_route_exactly_or_are_refused(problem):
    x, k = problem
    E = x.shape[1]
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None)
    exact = np.array([[int(float(v)) == int(v) for v in row] for row in x.tolist()])
    if not exact.all():
        first = int(np.argmax(~exact.all(axis=1)))
        with pytest.raises(mr.InputError, match=rf"logits holds the integer -?\d+ at token {first} "):
            mr.route_logits(x, cfg)
        return
    dec = mr.route_logits(x, cfg)
    # The exact integer order: value descending, then expert index ascending.
    for t, row in enumerate(x.tolist()):
        want = sorted(range(E), key=lambda e: (-int(row[e]), e))[:k]
        assert dec.expert_indices[t].tolist() == want


def test_integer_logits_beyond_2_53_are_refused_not_rounded():
    x = np.array([[2**53, 2**53 + 1, 0, 0]])
    with pytest.raises(mr.InputError, match=r"logits holds the integer 9007199254740993 at token 0"):
        mr.route_logits(x, mr.RouterConfig(num_experts=4, top_k=1))
    # Exactly representable large integers route by their exact order.
    x = np.array([[2**60, 2**60 + 2**8, 0, 0]])
    assert mr.route_logits(x, mr.RouterConfig(num_experts=4, top_k=1)).expert_indices.tolist() == [[1]]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_biases_beyond_the_float_mantissa_are_refused(dtype):
    """expert_bias is float64 (2**53); a router bias takes the float32 weight's dtype (2**24)."""
    cfg = mr.RouterConfig(num_experts=4, top_k=1)
    if dtype is np.int64:
        with pytest.raises(mr.InputError, match=r"expert_bias\[2\]"):
            mr.route_logits(np.zeros((1, 4)), cfg, expert_bias=np.array([0, 0, 2**53 + 1, 0], dtype=dtype))
    w = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(mr.InputError, match=r"bias\[1\], which float32"):
        mr.ExpertRouter(cfg, input_dim=3, weight=w, bias=np.array([0, 2**24 + 1, 0, 0], dtype=dtype))
    router = mr.ExpertRouter(cfg, input_dim=3, weight=w, bias=np.array([0, 2**24, 2**24 - 1, 0], dtype=dtype))
    assert router.route_tokens(np.zeros((1, 3), np.float32)).expert_indices.tolist() == [[1]]


# --------------------------------------------------------------------------
# Kind: losses of logits near the ends of the float range
# --------------------------------------------------------------------------

SQRT_MAX = math.sqrt(np.finfo(np.float64).max)  # 1.34e154: |logsumexp| beyond it squares to inf


def row_logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # z - m is -inf for gaps beyond float64
        return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def mean_of_squares(v: np.ndarray) -> float:
    """mean(v**2), exactly rounded (no overflow in the sum)."""
    return float(sum(Fraction(float(x)) ** 2 for x in v) / len(v))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 30), E=st.integers(1, 8),
       exponent=st.floats(0, 308.25), dtype=st.sampled_from([np.float64, np.float32]),
       score_function=st.sampled_from(["softmax", "sigmoid"]))
def test_losses_are_finite_and_exact_or_the_row_is_refused(seed, T, E, exponent, dtype, score_function):
    """Any finite logits: the z-loss is mean(logsumexp^2), finite, unless a row's square overflows float64."""
    rng = np.random.default_rng(seed)
    top = float(np.finfo(dtype).max)
    with np.errstate(over="ignore"):  # clipped to the dtype's range right away
        z = np.clip(rng.normal(size=(T, E)) * 10.0 ** exponent, -top, top).astype(dtype)
    cfg = mr.RouterConfig(num_experts=E, top_k=1, score_function=score_function, capacity_factor=None)
    lse = row_logsumexp(z.astype(np.float64))
    over = np.abs(lse) > SQRT_MAX
    if np.abs(np.abs(lse) / SQRT_MAX - 1).min() < 1e-9:
        return  # too close to the bound to say which side the core's rounding lands on
    if over.any():
        assert dtype is np.float64  # float32 logsumexps stay below 3.5e38
        with pytest.raises(mr.InputError, match=rf"logits has a logsumexp whose square .*token {int(np.argmax(over))} "):
            mr.route_logits(z, cfg)
        return
    dec = mr.route_logits(z, cfg)
    assert math.isfinite(dec.router_z_loss) and dec.router_z_loss == pytest.approx(mean_of_squares(lse), rel=1e-9)
    assert 0.0 <= dec.load_balance_loss <= E * (1 + 1e-12)
    assert math.isfinite(dec.auxiliary_loss)


def test_z_loss_sum_beyond_float64_still_gives_the_finite_mean():
    """Every token's square is finite (|lse| = 1e154), their sum is not: the mean is."""
    z = np.full((600, 2), 1e154)
    dec = mr.route_logits(z, mr.RouterConfig(num_experts=2, top_k=1, capacity_factor=None))
    assert dec.router_z_loss == pytest.approx(mean_of_squares(row_logsumexp(z)), rel=1e-12)
    with pytest.raises(mr.InputError, match="token 3 .*1.34e154"):
        mr.route_logits(np.vstack([z[:3], [[-2e154, -2e154]]]), mr.RouterConfig(num_experts=2, top_k=1))


@pytest.mark.parametrize("gate", ["linear", "hierarchical"])
def test_hidden_states_whose_router_logits_overflow_the_z_loss_are_refused(gate):
    cfg = mr.RouterConfig(num_experts=36, top_k=2)
    router = mr.ExpertRouter(cfg, input_dim=4, seed=1, gate=gate)
    hidden = np.ones((5, 4))
    hidden[3] = 1e200  # logits of about 1e200: finite, but their logsumexp squared is not
    with pytest.raises(mr.InputError, match=r"hidden gives router logits whose logsumexp squared .*token 3 "):
        router.route_tokens(hidden)
    dec = router.route_tokens(hidden[:3] * 1e150)
    assert math.isfinite(dec.router_z_loss) and np.isfinite(dec.expert_weights).all()


# --------------------------------------------------------------------------
# Kind: top-k with large k (selection by partition above k = 64)
# --------------------------------------------------------------------------


@st.composite
def wide_rows(draw):
    E = draw(st.integers(65, 700))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    T = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["ties", "normal", "zeros"]))
    if kind == "ties":
        z = rng.integers(-3, 3, size=(T, E)).astype(np.float64)
    elif kind == "zeros":
        z = rng.choice([-0.0, 0.0, 1.0], size=(T, E))  # -0.0 and 0.0 are equal keys: a tie
    else:
        z = rng.normal(size=(T, E))
    z[rng.random((T, E)) < draw(st.sampled_from([0.0, 0.3, 0.95]))] = -np.inf
    z[np.isneginf(z).all(axis=1), -1] = 0.0
    return z, draw(st.integers(65, E))


@SETTINGS
@given(wide_rows())
def test_large_k_selection_follows_the_tie_rule(problem):
    """Key descending, then the lower expert index; ineligible fillers lowest index first."""
    z, k = problem
    E = z.shape[1]
    dec = mr.route_logits(z, mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=None))
    for t, row in enumerate(z):
        eligible = [e for e in range(E) if row[e] > -np.inf]
        want = sorted(eligible, key=lambda e: (-row[e], e))[:k]
        fillers = [e for e in range(E) if row[e] == -np.inf][:k - len(want)]
        assert dec.expert_indices[t].tolist() == want + fillers
        assert dec.kept[t].tolist() == [True] * len(want) + [False] * len(fillers)


@SETTINGS
@given(wide_rows(), st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.booleans())
def test_large_k_selection_extends_the_small_k_one(problem, score_function, bias, groups):
    """The top 64 (insertion) are a prefix of the top k > 64 (partition), also with a bias and groups."""
    z, k = problem
    E = z.shape[1]
    options = dict(num_experts=E, score_function=score_function, capacity_factor=None)
    if groups and E % 5 == 0 and 4 * E // 5 >= 65:
        options.update(num_groups=5, group_top_k=4)
        k = min(k, 4 * E // 5)
    b = np.random.default_rng(E).normal(size=E) * 0.1 if bias else None
    small = mr.route_logits(z, mr.RouterConfig(top_k=64, **options), expert_bias=b)
    large = mr.route_logits(z, mr.RouterConfig(top_k=max(k, 65), **options), expert_bias=b)
    routed = small.kept  # dropless: kept = routed
    assert (large.kept[:, :64] == routed).all()
    assert (np.where(routed, large.expert_indices[:, :64], -1) == np.where(routed, small.expert_indices, -1)).all()


def test_top_k_of_every_expert_is_not_quadratic():
    """T=1, E=k=100,000 took 7-12 s with insertion; the partition takes milliseconds."""
    import time
    z = np.random.default_rng(0).normal(size=(1, 100_000)).astype(np.float32)
    cfg = mr.RouterConfig(num_experts=100_000, top_k=100_000, capacity_factor=None)
    start = time.perf_counter()
    dec = mr.route_logits(z, cfg)
    assert time.perf_counter() - start < 2.0
    assert dec.expert_indices[0].tolist() == np.lexsort((np.arange(100_000), -z[0])).tolist()

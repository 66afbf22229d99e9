"""One rule for argument errors at every entry point (README, "Errors").

- A wrong *type* is a ``TypeError``: ``ConfigTypeError`` (also a ``ConfigError``)
  for configuration values, ``InputTypeError`` (also an ``InputError``) for arrays
  and per-call values.
- A wrong *value* of the right type is a ``ConfigError`` / ``InputError`` and not a
  ``TypeError``; integers too large for their target type (``2**64`` and beyond,
  negative ones for unsigned arguments) are such values, never a bare
  ``OverflowError``.
- Every message names the argument.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router import _core

X = np.zeros((4, 8), np.float32)
CFG = mr.RouterConfig(num_experts=8, top_k=2)


def refusal(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # a panic would be a BaseException
        assert isinstance(exc, Exception) and "Panic" not in type(exc).__name__, repr(exc)
        return exc
    pytest.fail("no exception")


def assert_wrong_type(fn: Callable[[], Any], family: type, name: str) -> None:
    exc = refusal(fn)
    typed = mr.ConfigTypeError if family is mr.ConfigError else mr.InputTypeError
    assert type(exc) is typed, f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, TypeError) and isinstance(exc, family) and isinstance(exc, mr.RouterError)
    assert name in str(exc), str(exc)


def assert_bad_value(fn: Callable[[], Any], family: type, name: str) -> None:
    exc = refusal(fn)
    assert isinstance(exc, family) and not isinstance(exc, TypeError), f"{type(exc).__name__}: {exc}"
    assert name in str(exc), str(exc)


# --------------------------------------------------------------------------- the classes


def test_the_two_type_error_classes() -> None:
    for typed, family in ((mr.ConfigTypeError, mr.ConfigError), (mr.InputTypeError, mr.InputError)):
        assert issubclass(typed, family) and issubclass(typed, TypeError)
        assert issubclass(typed, mr.RouterError) and issubclass(typed, ValueError)
        assert typed.__module__ == "moe_router" and typed.__name__ in mr.__all__
    assert not issubclass(mr.ConfigTypeError, mr.InputError) and not issubclass(mr.InputTypeError, mr.ConfigError)
    # Code written against ConfigError keeps catching wrong-type configuration values.
    with pytest.raises(mr.ConfigError):
        mr.RouterConfig(top_k=2.0)
    with pytest.raises(TypeError):
        mr.RouterConfig(top_k=2.0)


# --------------------------------------------------------------------------- RouterConfig fields

#: Each field's kind; the test fails when a field is added without a kind here.
KINDS: Dict[str, str] = {
    "num_experts": "int", "top_k": "int", "capacity_factor": "factor", "eval_capacity_factor": "eval_factor",
    "min_capacity": "int", "expert_capacity": "int", "capacity_rounding": "choice", "drop_policy": "choice",
    "renormalize_after_drop": "flag", "score_function": "choice", "normalize_weights": "flag",
    "weight_scale": "real", "load_balance_loss_coeff": "real", "router_z_loss_coeff": "real",
    "seq_load_balance_loss_coeff": "real", "expert_dropout": "real", "enable_load_balancing": "flag",
    "overflow": "choice", "reroute_weight_scale": "real", "num_groups": "int", "group_top_k": "int",
    "group_score": "choice", "group_score_input": "choice", "jitter_eps": "real", "noise_std": "real",
    "seed": "int", "expert_bias": "reals", "peer": "choice", "routing": "choice",
    "capacity_alignment": "int", "eval_capacity_token_fraction": "factor", "expert_choice_cap": "int", "score_precision": "choice",
    "sinkhorn_tolerance": "real", "sinkhorn_max_iterations": "int", "balanced_solver": "choice",
}
WRONG_TYPES: Dict[str, List[Any]] = {
    "int": [2.0, np.float64(3.0), True, np.bool_(True), "2", [2], object()],
    "flag": [1, 0, np.int64(1), "True", 1.0, [True]],
    "real": ["0.5", True, np.bool_(False), [0.5], {"x": 1}],
    "factor": ["1.25", "dropless", True, [1.25]],
    "eval_factor": [True, [1.25], object()],  # a string is a (misspelt) choice: 'dropless'

    "choice": [1, True, 1.5, ["position"], b"position"],
    "reals": ["abc", 1.0, [0.0] * 7 + ["x"], [True] * 8],
}
#: A value of the right type outside each field's range (or set of spellings).
BAD_VALUES: Dict[str, List[Any]] = {
    "num_experts": [0, -1, 2**31], "top_k": [0, 9], "capacity_factor": [0, -1.0],
    "eval_capacity_factor": [0, "sometimes", "1.25"], "min_capacity": [-1], "expert_capacity": [0],
    "capacity_rounding": ["up"], "drop_policy": ["Position"], "score_function": ["relu"],
    "weight_scale": [-1.0, 0], "load_balance_loss_coeff": [-1], "router_z_loss_coeff": [-0.5],
    "seq_load_balance_loss_coeff": [float("nan")], "expert_dropout": [2], "overflow": ["spill"],
    "reroute_weight_scale": [-1], "num_groups": [0, 3], "group_top_k": [0], "group_score": ["sum"],
    "group_score_input": ["probs"], "jitter_eps": [1], "noise_std": [-1.0], "seed": [-1],
    "expert_bias": [[0.0] * 3], "peer": ["torch"], "routing": ["token-choice"],
    "expert_choice_cap": [0, 9], "score_precision": ["float16"], "balanced_solver": ["auction"],
    "renormalize_after_drop": [], "normalize_weights": [], "enable_load_balancing": [],
    "capacity_alignment": [0, -8], "eval_capacity_token_fraction": [0, -0.25, float("nan"), float("inf")],
    "sinkhorn_tolerance": [0, -1e-4, float("nan"), float("inf")], "sinkhorn_max_iterations": [0, -1],
}
#: Fields whose check needs another field set (a lone ``group_top_k`` needs ``num_groups``).
CONTEXT = {"num_groups": {"group_top_k": 1}, "group_top_k": {"num_groups": 4},
           # a routing algorithm's own fields need that algorithm
           "expert_choice_cap": {"routing": "expert_choice"}, "sinkhorn_tolerance": {"routing": "sinkhorn"},
           "sinkhorn_max_iterations": {"routing": "sinkhorn"}, "balanced_solver": {"routing": "balanced"}}


def test_every_field_has_a_kind() -> None:
    assert list(KINDS) == list(mr.RouterConfig.FIELDS)
    assert set(BAD_VALUES) == set(mr.RouterConfig.FIELDS)


@pytest.mark.parametrize("field", mr.RouterConfig.FIELDS)
def test_wrong_type_is_a_config_type_error(field: str) -> None:
    for value in WRONG_TYPES[KINDS[field]]:
        kwargs = {field: value, **CONTEXT.get(field, {})}
        assert_wrong_type(lambda: mr.RouterConfig(**kwargs), mr.ConfigError, field)
        assert_wrong_type(lambda: CFG.replace(**kwargs), mr.ConfigError, field)


@pytest.mark.parametrize("field", mr.RouterConfig.FIELDS)
def test_bad_value_is_a_config_error(field: str) -> None:
    for value in BAD_VALUES[field]:
        kwargs = {field: value, **CONTEXT.get(field, {})}
        assert_bad_value(lambda: mr.RouterConfig(**kwargs), mr.ConfigError, field)
        assert_bad_value(lambda: CFG.replace(**kwargs), mr.ConfigError, field)


@pytest.mark.parametrize("field", [f for f in mr.RouterConfig.FIELDS if KINDS[f] in ("real", "factor", "eval_factor")])
def test_reals_accept_ints_and_numpy_scalars(field: str) -> None:
    value = {"expert_dropout": 0, "jitter_eps": 0}.get(field, 1)
    for v in (value, float(value), np.float32(value), np.int64(value)):
        assert float(getattr(mr.RouterConfig(**CONTEXT.get(field, {}), **{field: v}), field)) == float(value)


@pytest.mark.parametrize("field", [f for f in mr.RouterConfig.FIELDS if KINDS[f] == "flag"])
def test_flags_accept_bools_only(field: str) -> None:
    assert getattr(mr.RouterConfig(**{field: True}), field) is True
    assert getattr(mr.RouterConfig(**{field: np.bool_(False)}), field) is False


def test_unknown_field_is_a_config_type_error() -> None:
    assert_wrong_type(lambda: mr.RouterConfig(no_such_field=1), mr.ConfigError, "no_such_field")
    assert_wrong_type(lambda: CFG.replace(topk=1), mr.ConfigError, "topk")


# --------------------------------------------------------------------------- integers of every size

HUGE = [2**64, 2**64 + 1, 2**127, 2**200, -(2**64), -(2**200)]
INT_FIELDS = [f for f in mr.RouterConfig.FIELDS if KINDS[f] == "int"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", HUGE, ids=lambda v: f"{'-' if v < 0 else ''}2**{abs(v).bit_length() - 1}")
def test_huge_integer_fields_are_config_errors(field: str, value: int) -> None:
    kwargs = {field: value, **CONTEXT.get(field, {})}
    for fn in (lambda: mr.RouterConfig(**kwargs), lambda: CFG.replace(**kwargs)):
        assert_bad_value(fn, mr.ConfigError, field)
        assert str(value) in str(refusal(fn))


def test_largest_integers_that_fit() -> None:
    assert mr.RouterConfig(seed=2**64 - 1).seed == 2**64 - 1
    assert mr.RouterConfig(seed=np.uint64(2**64 - 1)).seed == 2**64 - 1
    assert mr.RouterConfig(min_capacity=2**64 - 1).capacity(10) == 2**64 - 1
    assert mr.RouterConfig(expert_capacity=2**64 - 1).capacity(10) == 2**64 - 1
    assert mr.RouterConfig(num_experts=np.int64(8), top_k=np.uint8(2)).top_k == 2
    assert_bad_value(lambda: mr.RouterConfig(num_experts=np.uint64(2**64 - 1)), mr.ConfigError, "num_experts")


#: Every integer argument outside RouterConfig: (name, call with the value, family, a valid value).
INTEGER_ARGUMENTS: List[Tuple[str, Callable[[Any], Any], type]] = [
    ("step", lambda v: mr.route_logits(X, CFG, step=v), mr.InputError),
    ("num_tokens", lambda v: CFG.capacity(v), mr.ConfigError),
    ("num_threads", lambda v: mr.set_num_threads(v), mr.ConfigError),
    ("input_dim", lambda v: mr.ExpertRouter(CFG, v), mr.ConfigError),
    ("seed", lambda v: mr.ExpertRouter(CFG, 4, seed=v), mr.ConfigError),
    ("input_dim", lambda v: mr.GateNetwork(v, 40), mr.ConfigError),
    ("num_experts", lambda v: mr.GateNetwork(4, v), mr.ConfigError),
    ("group_top_k", lambda v: mr.GateNetwork(4, 40, group_top_k=v), mr.ConfigError),
    ("seed", lambda v: mr.GateNetwork(4, 40, seed=v), mr.ConfigError),
    ("window", lambda v: mr.RoutingStats(window=v), mr.ConfigError),
    ("history", lambda v: mr.RoutingStats(history=v), mr.ConfigError),
    ("num_experts", lambda v: mr.LoadBalancer(v), mr.ConfigError),
    ("history", lambda v: mr.LoadBalancer(4, history=v), mr.ConfigError),
    ("warmup_steps", lambda v: mr.LoadBalancer(4, warmup_steps=v), mr.ConfigError),
    ("num_experts", lambda v: mr.preset("mixtral", v, 2), mr.ConfigError),
    ("top_k", lambda v: mr.preset("mixtral", 8, v), mr.ConfigError),
    ("group_topk", lambda v: mr.preset("megatron", 8, 2, num_groups=4, group_topk=v), mr.ConfigError),
    ("expert_id", lambda v: mr.ExpertAssignment(v, 0.5, 0, 0), mr.InputError),
    ("token_idx", lambda v: mr.ExpertAssignment(0, 0.5, v, 0), mr.InputError),
    ("expert_rank", lambda v: mr.ExpertAssignment(0, 0.5, 0, v), mr.InputError),
    # The compiled functions the wrappers call, for callers that use them directly.
    ("step", lambda v: _core.route_logits(X, CFG, step=v), mr.InputError),
    ("sequence_length", lambda v: _core.route_logits(X, CFG, sequence_length=v), mr.InputError),
    ("batch_shape", lambda v: _core.route_logits(X, CFG, batch_shape=(v,)), mr.InputError),
    ("num_experts", lambda v: _core.gate_layout(v), mr.ConfigError),
]
ARGUMENT_IDS = [f"{i}-{name}" for i, (name, _, _) in enumerate(INTEGER_ARGUMENTS)]


@pytest.mark.parametrize("name, call, family", INTEGER_ARGUMENTS, ids=ARGUMENT_IDS)
def test_huge_integer_arguments_name_the_argument(name: str, call: Callable[[Any], Any], family: type,
                                                  restore_threads: Any) -> None:
    for value in HUGE:
        assert_bad_value(lambda: call(value), family, name)


@pytest.mark.parametrize("name, call, family", INTEGER_ARGUMENTS, ids=ARGUMENT_IDS)
def test_integer_arguments_refuse_other_types(name: str, call: Callable[[Any], Any], family: type,
                                              restore_threads: Any) -> None:
    for value in (2.0, True, "3", np.float32(1)):
        assert_wrong_type(lambda: call(value), family, name)


# --------------------------------------------------------------------------- flags, reals, choices


def _router(**kwargs: Any) -> mr.ExpertRouter:
    return mr.ExpertRouter(CFG, 4, gate="linear", **kwargs)


DEC = mr.route_logits(X, CFG)
PLAN = DEC.dispatch_plan()
ROWS = PLAN.permute(np.zeros((4, 3), np.float32))

#: Flags of the per-call APIs and the constructors: (name, call with the value, family).
FLAGS: List[Tuple[str, Callable[[Any], Any], type]] = [
    ("training", lambda v: mr.route_logits(X, CFG, training=v), mr.InputError),
    ("return_probs", lambda v: mr.route_logits(X, CFG, return_probs=v), mr.InputError),
    ("training", lambda v: _router().route_tokens(np.zeros((2, 4)), training=v), mr.InputError),
    ("return_probs", lambda v: _router().route_tokens(np.zeros((2, 4)), return_probs=v), mr.InputError),
    ("training", lambda v: _router().route_logits(X, training=v), mr.InputError),
    ("training", lambda v: _core.route_logits(X, CFG, training=v), mr.InputError),
    ("return_probs", lambda v: _core.route_hidden(np.zeros((2, 4)), np.zeros((4, 8)), None, CFG,
                                                  return_probs=v), mr.InputError),
    ("training", lambda v: CFG.capacity(10, training=v), mr.ConfigError),
    ("enabled", lambda v: mr.LoadBalancer(4, enabled=v), mr.ConfigError),
    ("norm_topk_prob", lambda v: mr.preset("qwen_moe", 8, 2, norm_topk_prob=v), mr.ConfigError),
    ("drop_tokens", lambda v: mr.preset("deepspeed", 8, 2, drop_tokens=v), mr.ConfigError),
    ("pad_to_capacity", lambda v: DEC.dispatch_plan(pad_to_capacity=v), mr.ConfigError),
    ("weighted", lambda v: PLAN.combine(ROWS, weighted=v), mr.InputError),
    ("pad_sorted_ids", lambda v: mr.moe_align_block_size(DEC.expert_indices, 4, 8, pad_sorted_ids=v),
     mr.ConfigError),
]


@pytest.mark.parametrize("name, call, family", FLAGS, ids=[f"{i}-{n}" for i, (n, _, _) in enumerate(FLAGS)])
def test_flags_must_be_bools(name: str, call: Callable[[Any], Any], family: type) -> None:
    for value in (1, 0, np.int64(1), "yes", 1.0):
        assert_wrong_type(lambda: call(value), family, name)
    call(True)
    call(np.bool_(False))


def test_none_is_not_a_flag() -> None:
    # An explicit None is the wrong type, not the default (which applies when the flag is left out).
    for name, call, family in FLAGS:
        assert_wrong_type(lambda: call(None), family, name)
        assert f"invalid {name}: got None" in str(refusal(lambda: call(None)))


def test_a_flag_left_out_takes_its_default() -> None:
    cfg = CFG.replace(capacity_factor=2.0, eval_capacity_factor=1.0)
    assert cfg.capacity(10) == cfg.capacity(10, training=True) == 5 and cfg.capacity(10, training=False) == 3
    assert DEC.dispatch_plan().pad_to_capacity is False
    np.testing.assert_array_equal(PLAN.combine(ROWS), PLAN.combine(ROWS, weighted=True))
    np.testing.assert_array_equal(mr.moe_align_block_size(DEC.expert_indices, 4, 8)[0],
                                  mr.moe_align_block_size(DEC.expert_indices, 4, 8, pad_sorted_ids=False)[0])


def test_balancer_enabled_setter() -> None:
    lb = mr.LoadBalancer(4)
    lb.enabled = False
    assert lb.enabled is False
    with pytest.raises(mr.ConfigTypeError, match="enabled"):
        lb.enabled = 1
    assert lb.enabled is False


#: Real-valued arguments outside RouterConfig: (name, call, family, a value of the right type out of range).
REALS: List[Tuple[str, Callable[[Any], Any], type, Any]] = [
    ("ema_decay", lambda v: mr.LoadBalancer(4, ema_decay=v), mr.ConfigError, 1),
    ("imbalance_threshold", lambda v: mr.LoadBalancer(4, imbalance_threshold=v), mr.ConfigError, -1),
    ("bias_update_rate", lambda v: mr.LoadBalancer(4, bias_update_rate=v), mr.ConfigError, float("inf")),
    ("latency_s", lambda v: mr.RoutingStats().record(mr.route_logits(X, CFG), v), mr.InputError, -1),
    ("q", lambda v: mr.RoutingStats().latency_percentile(v), mr.InputError, 101),
    ("probability", lambda v: mr.ExpertAssignment(0, v, 0, 0), mr.InputError, None),
    ("aux_loss_coeff", lambda v: mr.preset("megatron", 8, 2, moe_aux_loss_coeff=v), mr.ConfigError, None),
]


@pytest.mark.parametrize("name, call, family, bad", REALS, ids=[r[0] for r in REALS])
def test_reals_refuse_strings_and_bools(name: str, call: Callable[[Any], Any], family: type, bad: Any) -> None:
    for value in ("0.5", True, [0.5]):
        assert_wrong_type(lambda: call(value), family, name)
    for value in ([bad] if bad is not None else []) + [10**400]:
        assert_bad_value(lambda: call(value), family, name)


def test_choices_are_strings() -> None:
    assert_wrong_type(lambda: mr.ExpertRouter(CFG, 4, gate=1), mr.ConfigError, "gate")
    assert_bad_value(lambda: mr.ExpertRouter(CFG, 4, gate="dense"), mr.ConfigError, "gate")
    assert_wrong_type(lambda: mr.ExpertRouter(CFG, 4, router_dtype=np.float32), mr.ConfigError, "router_dtype")
    assert_bad_value(lambda: mr.ExpertRouter(CFG, 4, router_dtype="float16"), mr.ConfigError, "router_dtype")
    assert_wrong_type(lambda: mr.GateNetwork(4, 40, dtype=np.int32), mr.ConfigError, "dtype")


def test_presets() -> None:
    exc = refusal(lambda: mr.preset("gshard", 8, 2))
    assert type(exc) is mr.ConfigError and all(name in str(exc) for name in mr.PRESETS)
    assert_wrong_type(lambda: mr.preset(None, 8, 2), mr.ConfigError, "preset")
    assert_wrong_type(lambda: mr.RouterConfig.preset(3, 8), mr.ConfigError, "preset")
    assert_wrong_type(lambda: mr.preset("mixtral", 8, 2, no_such_setting=1), mr.ConfigError, "no_such_setting")
    assert_wrong_type(lambda: mr.preset("mixtral", 8.0, 2), mr.ConfigError, "num_experts")
    assert_wrong_type(lambda: mr.preset("megatron", 8, 2, moe_router_pre_softmax=1), mr.ConfigError,
                      "pre_softmax")


def test_objects_of_the_wrong_class() -> None:
    assert_wrong_type(lambda: mr.route_logits(X, {"num_experts": 8}), mr.ConfigError, "config")
    assert_wrong_type(lambda: mr.ExpertRouter({"num_experts": 8}, 4), mr.ConfigError, "config")
    assert_wrong_type(lambda: mr.ExpertRouter(CFG, 4, balancer=object()), mr.ConfigError, "balancer")
    assert_wrong_type(lambda: mr.peer_load_balance_loss(object(), "mixtral"), mr.InputError, "decision")
    dec = mr.route_logits(X, CFG)
    assert_wrong_type(lambda: mr.peer_load_balance_loss(dec, 3), mr.ConfigError, "config_or_preset_name")
    stats = mr.RoutingStats()
    assert_wrong_type(lambda: stats.record({"tokens_per_expert": [1, 2]}), mr.InputError, "decision")
    assert_wrong_type(lambda: mr.LoadBalancer(4).update("load"), mr.InputError, "load")
    assert stats.calls == 0


@pytest.mark.parametrize("value", [np.zeros((4, 8), bool), np.zeros((4, 8), complex), np.array([["a"] * 8]),
                                   "logits", None, object()], ids=lambda v: type(v).__name__)
def test_arrays_of_the_wrong_type_are_input_type_errors(value: Any) -> None:
    assert_wrong_type(lambda: mr.route_logits(value, CFG), mr.InputError, "logits")
    assert_wrong_type(lambda: _router().route_tokens(value), mr.InputError, "hidden")
    assert_wrong_type(lambda: mr.route_logits(X, CFG, token_mask=np.full(4, 0.5)), mr.InputError, "token_mask")
    assert_wrong_type(lambda: mr.route_logits(X, CFG, expert_bias=np.array(["a"] * 8)), mr.InputError,
                      "expert_bias")
    assert_wrong_type(lambda: _router(weight=np.zeros((4, 8), np.int32)), mr.InputError, "weight")


# --------------------------------------------------------------------------- the whole integer range

#: Integers of every size: small ones near the bounds and huge ones far beyond them.
ANY_INT = st.one_of(st.integers(-(2**8), 2**8), st.integers(-(2**70), 2**70), st.integers(-(2**300), 2**300),
                    st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]))
#: Fields whose only bound is their integer type, with that range.
UNSIGNED = {"seed": 2**64 - 1, "min_capacity": 2**64 - 1, "expert_capacity": 2**64 - 1}


@settings(deadline=None, max_examples=300, derandomize=True)
@given(value=ANY_INT, field=st.sampled_from(sorted(UNSIGNED)))
def test_integer_fields_accept_exactly_their_range(value: int, field: str) -> None:
    low = 1 if field == "expert_capacity" else 0
    if low <= value <= UNSIGNED[field]:
        assert getattr(mr.RouterConfig(**{field: value}), field) == value
    else:
        assert_bad_value(lambda: mr.RouterConfig(**{field: value}), mr.ConfigError, field)


@settings(deadline=None, max_examples=300, derandomize=True)
@given(value=ANY_INT)
def test_step_accepts_exactly_64_bits(value: int) -> None:
    if 0 <= value <= 2**64 - 1:
        assert mr.route_logits(X, CFG, step=value).total_tokens == 4
        assert _core.route_logits(X, CFG, step=value).total_tokens == 4
    else:
        assert_bad_value(lambda: mr.route_logits(X, CFG, step=value), mr.InputError, "step")
        assert_bad_value(lambda: _core.route_logits(X, CFG, step=value), mr.InputError, "step")


@settings(deadline=None, max_examples=200, derandomize=True)
@given(value=ANY_INT)
def test_expert_counts_accept_exactly_int32(value: int) -> None:
    """Expert ids are int32: RouterConfig and LoadBalancer take 1 <= E <= 2**31 - 1."""
    if 1 <= value <= 2**31 - 1:
        assert mr.RouterConfig(num_experts=value, top_k=1).num_experts == value
        assert mr.preset("mixtral", value, 1).num_experts == value
        if value <= 2**16:  # the balancer allocates [E] arrays
            assert mr.LoadBalancer(value).num_experts == value
    else:
        assert_bad_value(lambda: mr.RouterConfig(num_experts=value, top_k=1), mr.ConfigError, "num_experts")
        assert_bad_value(lambda: mr.preset("mixtral", value, 1), mr.ConfigError, "num_experts")
        assert_bad_value(lambda: mr.LoadBalancer(value), mr.ConfigError, "num_experts")


#: Fields that belong to one routing algorithm, with a non-default value, and that algorithm.
ALGORITHM_FIELDS = [("expert_choice_cap", 2, "expert_choice"), ("sinkhorn_tolerance", 1e-3, "sinkhorn"),
                    ("sinkhorn_max_iterations", 50, "sinkhorn"), ("balanced_solver", "fairseq_auction", "balanced")]


@pytest.mark.parametrize("field,value,owner", ALGORITHM_FIELDS)
def test_an_algorithms_field_set_under_another_algorithm_is_refused(field, value, owner):
    for routing in ("token_choice", "expert_choice", "sinkhorn", "balanced"):
        kwargs = {"num_experts": 8, "top_k": 1, "routing": routing, field: value}
        if routing == owner:
            assert getattr(mr.RouterConfig(**kwargs), field) == value
        else:
            with pytest.raises(mr.ConfigError, match=rf"^invalid {field}: .*applies to routing='{owner}' only"):
                mr.RouterConfig(**kwargs)

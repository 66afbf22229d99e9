"""The one place where loose Python input becomes what the Rust core reads.

Arrays that are already float32/float64 and C-contiguous pass through without
a copy (NumPy arrays and views, torch CPU tensors through ``__array__``, any
``__dlpack__`` producer). Other float dtypes (float16, longdouble), integer
arrays and other layouts are converted once; an empty 1-D input is zero
tokens. An integer is accepted only if the float dtype it becomes holds it
exactly (float64: up to 2**53 in magnitude, float32: 2**24, and beyond that
the multiples of the spacing): a rounded logit can lose the argmax. Everything
else is refused with an exception that names the argument.
"""

from __future__ import annotations

import os
import sys
import warnings
from numbers import Integral, Real
from types import FrameType
from typing import Any, Dict, Optional, Tuple, Type

import numpy as np

from ._core import ConfigError, ConfigTypeError, InputError, InputTypeError

_FLOAT_OK = (np.dtype(np.float32), np.dtype(np.float64))
#: The largest value of a 64-bit unsigned argument (``step``, seeds).
U64_MAX = 2**64 - 1
#: The largest expert count (expert ids are int32), and so of D and of group counts.
I32_MAX = 2**31 - 1
_TYPE_ERRORS: Dict[type, Type[Exception]] = {ConfigError: ConfigTypeError, InputError: InputTypeError}

#: NumPy dtype kinds each array argument accepts (the command line reads files by the
#: same rule). Logits and biases may be integers (logits read from JSON, say), which are
#: converted to float64; hidden states and router weights must be floating point.
LOGITS_KINDS = "fiu"
HIDDEN_KINDS = "f"
WEIGHT_KINDS = "f"
BIAS_KINDS = "fiu"


def kinds_text(kinds: str) -> str:
    """What an array of ``kinds`` may hold, as messages say it."""
    return "floating-point or integer" if "i" in kinds else "floating-point"


# --------------------------------------------------------------------------- scalars
#
# One rule for every scalar argument of the package, the same as the bindings'
# (``rust/moe_router_py/src/args.rs``): a flag is a bool, an integer an int (not
# a bool, not a float), a real an int or a float (not a bool, not a string);
# NumPy scalars of those kinds count. A wrong type raises the TypeError of the
# argument's family (ConfigTypeError or InputTypeError), a value out of range
# its ConfigError or InputError; the message names the argument.


def _bound(n: int) -> str:
    """``n`` as messages print it: ``2**64 - 1`` rather than its 20 digits."""
    p = (n + 1).bit_length() - 1
    return f"2**{p} - 1" if p >= 31 and n == 2**p - 1 else str(n)


def wrong_type(name: str, value: Any, expected: str, error: type = ConfigError) -> Exception:
    """The TypeError of family ``error`` for ``value`` given as ``name``; ``expected`` reads "must be ..."."""
    return _TYPE_ERRORS[error](f"invalid {name}: got {value!r} ({type(value).__name__}); {expected}")


def is_int(value: Any) -> bool:
    """An ``int`` or NumPy integer, not a bool."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """An ``int``, ``float`` or NumPy real, not a bool."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def flag(value: Any, name: str, error: type = InputError) -> bool:
    """``value`` as a flag: ``True`` or ``False`` (or ``numpy.bool_``); 1 and 0 are the wrong type."""
    if not isinstance(value, (bool, np.bool_)):
        raise wrong_type(name, value, "must be True or False (a bool)", error)
    return bool(value)


def integer(value: Any, name: str, minimum: int = 0, maximum: int = U64_MAX, error: type = ConfigError) -> int:
    """``value`` as an integer in ``[minimum, maximum]``.

    Raises
    ------
    ConfigTypeError or InputTypeError
        Not an int (a float, a bool, a string, ...).
    ConfigError or InputError
        An int outside the range (family ``error``).
    """
    if not is_int(value):
        raise wrong_type(name, value, "must be an int (not a float or a bool)", error)
    if not minimum <= value <= maximum:
        raise error(f"invalid {name}: got {value!r}; must be an integer in [{_bound(minimum)}, {_bound(maximum)}]")
    return int(value)


def real(value: Any, name: str, error: type = ConfigError) -> float:
    """``value`` as a float64: an int or a float (range checks are the caller's).

    Raises
    ------
    ConfigTypeError or InputTypeError
        Not a real number (a bool, a string, None, ...).
    ConfigError or InputError
        An int too large for a float64.
    """
    if not is_real(value):
        raise wrong_type(name, value, "must be a real number (an int or a float)", error)
    try:
        return float(value)
    except OverflowError:
        raise error(f"invalid {name}: got {value!r}; must be a finite real number") from None


def choice(value: Any, name: str, allowed: Tuple[Any, ...], error: type = ConfigError) -> Any:
    """``value`` if it is one of ``allowed`` (strings, maybe None); a non-string is the wrong type."""
    spelled = ", ".join(repr(a) for a in allowed)
    if not isinstance(value, str) and not (value is None and None in allowed):
        raise wrong_type(name, value, f"must be one of {spelled}", error)
    if value not in allowed:
        raise error(f"invalid {name}: got {value!r}; must be one of {spelled}")
    return value


def instance(value: Any, name: str, cls: type, error: type = ConfigError) -> Any:
    """``value`` if it is a ``cls``, else the TypeError of family ``error``."""
    if not isinstance(value, cls):
        raise _TYPE_ERRORS[error](f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- arrays


class GradientWarning(UserWarning):
    """A tensor that requires grad was routed: the router reads its values only.

    The NumPy-level API is not part of an autograd graph, so nothing flows back
    from the decision's weights or losses to the tensor; for gradients use
    ``moe_router.torch.route`` (or ``RoutingDecision.backward``). Emitted once per process, under Python's warning filters (turn it
    into an error with ``warnings.simplefilter("error", GradientWarning)``, or
    off with ``"ignore"``).
    """


#: Whether the GradientWarning was emitted in this process.
_gradient_warned = False
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _warn_no_gradient(name: str) -> None:
    global _gradient_warned
    if _gradient_warned:
        return
    _gradient_warned = True
    warnings.warn(f"{name} requires grad, but no gradient flows through moe_router: it routes a detached "
                  f"view of the values, and the decision's weights and losses are not part of the autograd "
                  f"graph; use moe_router.torch.route for gradients (warned once per process)", GradientWarning, stacklevel=_caller_stacklevel())


def as_array(x: Any, name: str) -> np.ndarray:
    """View ``x`` as a NumPy array without copying when possible.

    A tensor with ``requires_grad`` is read through ``detach()`` (no copy), with a
    :class:`GradientWarning` the first time.
    """
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "requires_grad", False) is True and callable(getattr(x, "detach", None)):
        # A tensor that takes part in autograd (torch refuses to export it): the router
        # only reads values, and detach() shares the memory; the caller is told once.
        _warn_no_gradient(name)
        x = x.detach()
    if "bfloat16" in str(getattr(x, "dtype", "")) and callable(getattr(x, "float", None)):
        # NumPy has no bfloat16: widen once to float32 (exact), as float16 is.
        x = x.float()
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except Exception as exc:  # e.g. a CUDA tensor
            if hasattr(x, "__dlpack__"):
                try:
                    return np.from_dlpack(x)
                except Exception:
                    pass
            raise InputTypeError(f"{name} cannot be read as a CPU array: {exc}") from exc
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except Exception as exc:
            raise InputTypeError(f"{name} cannot be read through __dlpack__: {exc}") from exc
    raise InputTypeError(f"{name} must be an array (NumPy, torch CPU tensor, or anything with __array__ "
                         f"or __dlpack__), got {type(x).__name__}")


def first_inexact_integer(a: np.ndarray, dtype: Any) -> Optional[int]:
    """Flat (C-order) index of the first entry of the integer array ``a`` that ``dtype`` does not hold exactly.

    None when every entry converts exactly. Only entries beyond ``2**(nmant+1)``
    in magnitude can round; those are converted and compared back in integers.
    """
    dtype = np.dtype(dtype)
    limit = 2 ** (np.finfo(dtype).nmant + 1)
    flat = a.reshape(-1)
    big = flat > limit
    if a.dtype.kind == "i":
        big |= flat < -limit
    (where,) = np.nonzero(big)
    if where.size == 0:
        return None
    values = flat[where]
    rounded = values.astype(dtype).astype(np.float64)
    info = np.iinfo(a.dtype)
    # float(info.max) is the next power of two: values below it convert back without overflow.
    fits = (rounded >= float(info.min)) & (rounded < float(info.max))
    with np.errstate(invalid="ignore"):
        back = np.where(fits, rounded, 0.0).astype(a.dtype)
    inexact = ~(fits & (back == values))
    return int(where[np.argmax(inexact)]) if inexact.any() else None


def _exact_integer_message(name: str, value: Any, where: str, dtype: Any) -> str:
    """The InputError text for an integer ``value`` of ``name`` that ``dtype`` would round."""
    dtype = np.dtype(dtype)
    bits = np.finfo(dtype).nmant + 1
    return (f"{name} holds the integer {int(value)} at {where}, which {dtype.name} cannot represent exactly "
            f"(integers are exact only up to 2**{bits} in magnitude); rounding could change the routing, "
            f"so convert to floating point yourself if that is acceptable")


def float_rows(x: Any, name: str, width: int, width_name: str,
               dtype: Optional[np.dtype] = None, kinds: str = HIDDEN_KINDS) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """``x`` as a C-contiguous float32/float64 ``[T, width]`` array plus its batch shape.

    Accepts ``[T, width]`` and ``[B, S, width]`` of the dtype ``kinds``
    (:data:`LOGITS_KINDS`, :data:`HIDDEN_KINDS`). ``dtype`` forces float32 or
    float64 (a converted copy when it differs); by default float32/float64 stay
    as they are, float16 becomes float32, longdouble and integers float64.

    Raises
    ------
    InputTypeError
        Not a real-valued array (bool, complex, object, strings).
    InputError
        Wrong rank or last dimension; an integer that the float dtype would
        round (the message names the first such token).
    """
    a = as_array(x, name)
    if isinstance(a, np.ma.MaskedArray):
        a = a.data  # the values, in place; the mask is the caller's (see rows_and_mask)
    if a.ndim == 1 and a.size == 0:
        a = a.reshape(0, width)  # an empty list: zero tokens
    ints = None
    if a.dtype not in _FLOAT_OK:
        if a.dtype.kind not in kinds:
            accepted = "float16 and integers are converted" if "i" in kinds else "float16 is converted"
            raise InputTypeError(f"{name} must be a {kinds_text(kinds)} array (float32 or float64 are read in "
                                 f"place; {accepted}), got dtype {a.dtype}")
        if a.dtype.kind in "iu":
            ints = a  # integer-valued logits (e.g. read from JSON): float64, if exact (checked below)
        a = a.astype(np.float64 if a.dtype.kind in "iu" or a.dtype.itemsize > 8 else np.float32)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    if a.ndim not in (2, 3):
        raise InputError(f"{name} has shape {list(a.shape)}, expected [T, {width}] or [B, S, {width}] "
                         f"({width_name} = {width})")
    if a.shape[-1] != width:
        raise InputError(f"{name} has shape {list(a.shape)}, expected last dimension {width} "
                         f"({width_name} = {width})")
    if ints is not None:
        bad = first_inexact_integer(ints, a.dtype)
        if bad is not None:
            raise InputError(_exact_integer_message(name, ints.reshape(-1)[bad], f"token {bad // width} "
                                                   "(the first offending token)", a.dtype))
    batch_shape = tuple(int(d) for d in a.shape[:-1])
    a = np.ascontiguousarray(a).reshape(-1, width)
    return a, batch_shape


def token_mask(mask: Any, batch_shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """``mask`` as a C-contiguous bool ``[T]`` array (or None).

    Accepts shape ``[T]`` or the logits' batch shape (``[B, S]``); integer arrays
    holding only 0 and 1 are accepted as booleans; a masked entry of a NumPy
    masked array is False.
    """
    if mask is None:
        return None
    m = as_array(mask, "token_mask")
    if isinstance(m, np.ma.MaskedArray):
        m = m.filled(0)  # a masked flag routes nothing
    t = int(np.prod(batch_shape))
    if m.dtype != np.bool_:
        if m.dtype.kind not in "iu" or (m.size and not np.isin(m, (0, 1)).all()):
            raise InputTypeError(f"token_mask must be a bool array, or integers 0/1 (True = route the token), "
                                 f"got dtype {m.dtype}"
                                 + (" with values other than 0 and 1" if m.dtype.kind in "iu" else ""))
        m = m.astype(np.bool_)
    if m.shape not in ((t,), batch_shape):
        wanted = f"[{t}]" if batch_shape == (t,) else f"[{t}] or {list(batch_shape)}"
        raise InputError(f"token_mask has shape {list(m.shape)}, expected {wanted} (one flag per token)")
    return np.ascontiguousarray(m).reshape(-1)


def rows_and_mask(x: Any, name: str, width: int, width_name: str, mask: Any, dtype: Optional[np.dtype] = None,
                  kinds: str = HIDDEN_KINDS) -> Tuple[np.ndarray, Tuple[int, ...], Optional[np.ndarray]]:
    """:func:`float_rows` of ``x`` and the token mask of the call.

    A NumPy masked array ``x`` marks its padding itself: a token (a row along
    the last axis) with any masked entry is not routed, as if ``token_mask``
    were False there (its values are never read, so they may be NaN). With an
    explicit ``mask`` too, a token is routed only when both say so. Returns the
    rows, the batch shape and the bool ``[T]`` mask (None when every token is
    routed).

    Raises
    ------
    InputTypeError, InputError
        As :func:`float_rows` and :func:`token_mask`.
    """
    rows, batch_shape = float_rows(x, name, width, width_name, dtype=dtype, kinds=kinds)
    active = token_mask(mask, batch_shape)
    if isinstance(x, np.ma.MaskedArray) and np.ma.is_masked(x):
        unmasked = np.asarray(~np.ma.getmaskarray(x).reshape(-1, width).any(axis=1))
        active = unmasked if active is None else np.logical_and(active, unmasked)
    return rows, batch_shape, active


def expert_bias(bias: Any, num_experts: int) -> Optional[np.ndarray]:
    """``bias`` as a C-contiguous float64 ``[E]`` array (or None)."""
    if bias is None:
        return None
    b = as_array(bias, "expert_bias")
    if b.dtype.kind not in "fiu":
        raise InputTypeError(f"expert_bias must be a real-valued array, got dtype {b.dtype}")
    if b.shape != (num_experts,):
        raise InputError(f"expert_bias has shape {list(b.shape)}, expected [{num_experts}] (one value per expert)")
    _check_exact_integers(b, np.float64, "expert_bias")
    return np.ascontiguousarray(b, dtype=np.float64)


def _check_exact_integers(a: np.ndarray, dtype: Any, name: str) -> None:
    """Refuse a per-expert integer array ``a`` that ``dtype`` would round, naming the entry."""
    if a.dtype.kind in "iu":
        bad = first_inexact_integer(a, dtype)
        if bad is not None:
            raise InputError(_exact_integer_message(name, a.reshape(-1)[bad], f"{name}[{bad}]", dtype))


def step(value: Any) -> int:
    """A training step: an int in ``[0, 2**64 - 1]`` (the RNG key is 64 bits)."""
    return integer(value, "step", 0, U64_MAX, InputError)


def sequence_length(batch_shape: Tuple[int, ...]) -> Optional[int]:
    """S of a ``[B, S]`` batch (for the sequence-level loss), None for ``[T]``."""
    return batch_shape[1] if len(batch_shape) == 2 else None


def weight(value: Any, name: str, shape: Tuple[int, ...], what: str = "", dtype: Any = None,
           kinds: str = WEIGHT_KINDS) -> np.ndarray:
    """A private, read-only, C-contiguous copy of a router weight.

    Private so that later changes to the caller's array cannot make a cached
    conversion (:class:`Casts`) go stale. ``dtype`` None keeps float32/float64
    and makes other floats float32; ``kinds`` are the accepted dtype kinds.

    Raises
    ------
    InputTypeError
        A dtype outside ``kinds``.
    InputError
        Another shape than ``shape`` (``what`` explains it), NaN/inf values, or
        an integer that ``dtype`` would round.
    """
    a = as_array(value, name)
    if a.dtype.kind not in kinds:
        raise InputTypeError(f"{name} must be a {kinds_text(kinds)} array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise InputError(f"{name} has shape {list(a.shape)}, expected {list(shape)}{what}")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    dtype = dtype or (a.dtype if a.dtype in _FLOAT_OK else np.float32)
    _check_exact_integers(a, dtype, name)
    a = np.array(a, dtype=dtype, order="C")
    a.setflags(write=False)
    return a


class Casts:
    """Weights and their conversions to the hidden states' dtype, each made once."""

    def __init__(self, *arrays: Optional[np.ndarray]) -> None:
        self.arrays = arrays
        self._by_dtype: Dict[np.dtype, Tuple[Optional[np.ndarray], ...]] = {}

    def get(self, dtype: Any) -> Tuple[Optional[np.ndarray], ...]:
        """The arrays as C-contiguous ``dtype`` (None stays None; no copy when already so)."""
        dtype = np.dtype(dtype)
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = tuple(None if a is None else np.ascontiguousarray(a, dtype=dtype)
                                          for a in self.arrays)
        return self._by_dtype[dtype]

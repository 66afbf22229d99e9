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

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._core import ConfigError, InputError

_FLOAT_OK = (np.dtype(np.float32), np.dtype(np.float64))


def as_array(x: Any, name: str) -> np.ndarray:
    """View ``x`` as a NumPy array without copying when possible."""
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "requires_grad", False) is True and callable(getattr(x, "detach", None)):
        # A tensor that takes part in autograd (torch refuses to export it): the router
        # only reads values, and detach() shares the memory.
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
            raise TypeError(f"{name} cannot be read as a CPU array: {exc}") from exc
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except Exception as exc:
            raise TypeError(f"{name} cannot be read through __dlpack__: {exc}") from exc
    raise TypeError(f"{name} must be an array (NumPy, torch CPU tensor, or anything with __array__ "
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
               dtype: Optional[np.dtype] = None, integers: bool = False) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """``x`` as a C-contiguous float32/float64 ``[T, width]`` array plus its batch shape.

    Accepts ``[T, width]`` and ``[B, S, width]``. ``dtype`` forces float32 or
    float64 (a converted copy when it differs); by default float32/float64 stay
    as they are and float16 becomes float32.

    Raises
    ------
    TypeError
        Not a real-valued array (bool, complex, object, strings).
    InputError
        Wrong rank or last dimension; an integer that the float dtype would
        round (the message names the first such token).
    """
    a = as_array(x, name)
    if a.ndim == 1 and a.size == 0:
        a = a.reshape(0, width)  # an empty list: zero tokens
    ints = None
    if a.dtype not in _FLOAT_OK:
        if integers and a.dtype.kind in "iu":
            # Integer-valued logits (e.g. read from JSON): float64, if exact (checked below).
            ints = a
            a = a.astype(np.float64)
        elif a.dtype.kind != "f":
            accepted = "float16 and integers are converted" if integers else "float16 is converted"
            raise TypeError(f"{name} must be a floating-point array (float32 or float64 are read in place; "
                            f"{accepted}), got dtype {a.dtype}")
        else:
            a = a.astype(np.float64 if a.dtype.itemsize > 8 else np.float32)
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
    holding only 0 and 1 are accepted as booleans.
    """
    if mask is None:
        return None
    m = as_array(mask, "token_mask")
    t = int(np.prod(batch_shape))
    if m.dtype != np.bool_:
        if m.dtype.kind not in "iu" or (m.size and not np.isin(m, (0, 1)).all()):
            raise TypeError(f"token_mask must be a bool array, or integers 0/1 (True = route the token), "
                            f"got dtype {m.dtype}" + (" with values other than 0 and 1" if m.dtype.kind in "iu" else ""))
        m = m.astype(np.bool_)
    if m.shape not in ((t,), batch_shape):
        wanted = f"[{t}]" if batch_shape == (t,) else f"[{t}] or {list(batch_shape)}"
        raise InputError(f"token_mask has shape {list(m.shape)}, expected {wanted} (one flag per token)")
    return np.ascontiguousarray(m).reshape(-1)


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool; only bools and the integers 0 and 1 are accepted."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def expert_bias(bias: Any, num_experts: int) -> Optional[np.ndarray]:
    """``bias`` as a C-contiguous float64 ``[E]`` array (or None)."""
    if bias is None:
        return None
    b = as_array(bias, "expert_bias")
    if b.dtype.kind not in "fiu":
        raise TypeError(f"expert_bias must be a real-valued array, got dtype {b.dtype}")
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
    """A training step: a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"step must be a non-negative integer, got {value!r}")
    if value < 0:
        raise InputError(f"step must be a non-negative integer, got {value}")
    return int(value)


def sequence_length(batch_shape: Tuple[int, ...]) -> Optional[int]:
    """S of a ``[B, S]`` batch (for the sequence-level loss), None for ``[T]``."""
    return batch_shape[1] if len(batch_shape) == 2 else None


def weight(value: Any, name: str, shape: Tuple[int, ...], what: str = "", dtype: Any = None,
           kinds: str = "f") -> np.ndarray:
    """A private, read-only, C-contiguous copy of a router weight.

    Private so that later changes to the caller's array cannot make a cached
    conversion (:class:`Casts`) go stale. ``dtype`` None keeps float32/float64
    and makes other floats float32; ``kinds`` are the accepted dtype kinds.

    Raises
    ------
    TypeError
        A dtype outside ``kinds``.
    InputError
        Another shape than ``shape`` (``what`` explains it), NaN/inf values, or
        an integer that ``dtype`` would round.
    """
    a = as_array(value, name)
    if a.dtype.kind not in kinds:
        raise TypeError(f"{name} must be a {'floating-point' if kinds == 'f' else 'real-valued'} array, "
                        f"got dtype {a.dtype}")
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


def count(value: Any, name: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An integer setting in ``[minimum, maximum]`` (bools are not integers).

    Raises
    ------
    ConfigError
        Not an integer, or out of range (the message names ``name``).
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if not ok or value < minimum or (maximum is not None and value > maximum):
        allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ConfigError(f"invalid {name}: got {value!r}; must be {allowed}")
    return int(value)

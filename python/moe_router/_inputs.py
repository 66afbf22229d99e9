"""Names of the input rules for the package's Python code; the rules live in the bindings.

Arrays are read by ``_core.read_rows`` and ``_core.read_weight``
(``rust/moe_router_py/src/inputs.rs``): C-contiguous float32/float64 input is
read in place (NumPy arrays and views, torch CPU tensors through
``__array__``, any ``__dlpack__`` producer); other float dtypes, integer arrays
(only if the float dtype holds them exactly) and other layouts are converted
once; everything else is refused with an exception naming the argument.
Scalars follow one rule (``rust/moe_router_py/src/args.rs``): a flag is a
bool, an integer an int (not a bool, not a float), a real an int or a float;
a wrong type raises the TypeError of the argument's family (``error``:
ConfigError or InputError), a value out of range the family's error.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any, Optional, Tuple

from . import _core

#: The largest value of a 64-bit unsigned argument (``step``, seeds).
U64_MAX = 2**64 - 1
#: The largest expert count (expert ids are int32), and so of D and of group counts.
I32_MAX = 2**31 - 1
#: NumPy dtype kinds each array argument accepts (the command line reads files by the
#: same rule): logits and biases may be integers, hidden states and weights are floats.
LOGITS_KINDS = BIAS_KINDS = "fiu"
HIDDEN_KINDS = WEIGHT_KINDS = "f"


def kinds_text(kinds: str) -> str:
    """What an array of ``kinds`` may hold, as messages say it."""
    return "floating-point or integer" if "i" in kinds else "floating-point"


#: The scalar readers (``error``: the family's exception class, ConfigError by default,
#: InputError for ``flag``): ``integer(value, name, minimum=0, maximum=U64_MAX, error)``,
#: ``real(value, name, error)``, ``flag(value, name, error)``, ``choice(value, name,
#: allowed, error)``, ``instance(value, name, cls, error)``, and ``wrong_type(name, value,
#: expected, error)``, which returns the TypeError ("invalid name: got ...; expected").
integer, real, flag, choice, instance = (_core.check_integer, _core.check_real, _core.check_flag,
                                         _core.check_choice, _core.check_instance)
wrong_type, is_int, is_real = _core.wrong_type_error, _core.is_int, _core.is_real


def float_rows(x: Any, name: str, width: int, width_name: str, dtype: Any = None,
               kinds: str = HIDDEN_KINDS) -> Tuple[Any, Tuple[int, ...]]:
    """``x`` as C-contiguous float32/float64 ``[T, width]`` rows and its batch shape (``_core.read_rows``)."""
    return _core.read_rows(x, name, width, width_name, None, dtype, kinds)[:2]


def rows_and_mask(x: Any, name: str, width: int, width_name: str, mask: Any, dtype: Any = None,
                  kinds: str = HIDDEN_KINDS) -> Tuple[Any, Tuple[int, ...], Any]:
    """:func:`float_rows` of ``x``, and the bool ``[T]`` token mask (``_core.read_rows``)."""
    return _core.read_rows(x, name, width, width_name, mask, dtype, kinds)


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


def _warn_no_gradient(name: str) -> None:
    """Warn, once per process, that ``name`` requires grad (called by the bindings' array reader)."""
    global _gradient_warned
    if _gradient_warned:
        return
    _gradient_warned = True
    # The warning points at the first frame outside this package.
    frame: Optional[FrameType] = sys._getframe(0)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{name} requires grad, but no gradient flows through moe_router: it routes a detached "
                  f"view of the values, and the decision's weights and losses are not part of the autograd "
                  f"graph; use moe_router.torch.route for gradients (warned once per process)", GradientWarning,
                  stacklevel=level)

"""JSON-ready values: the one rule behind every ``to_dict`` and every ``--json`` report.

JSON has no NaN or infinity (``json.dumps(..., allow_nan=False)`` refuses them,
and most parsers reject the ``Infinity`` that Python writes by default). A
float that is not finite, such as a loss that overflowed, becomes ``None``
(JSON ``null``); NumPy scalars and arrays become Python numbers and lists.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["json_ready"]


def json_ready(value: Any) -> Any:
    """``value`` with dicts, lists and tuples walked, NaN and +-inf as None, NumPy values as Python ones.

    Tuples become lists (as JSON has only arrays); other values are returned as they are.

    >>> json_ready({"loss": float("inf"), "counts": np.array([1, 2]), "rates": (0.5, float("nan"))})
    {'loss': None, 'counts': [1, 2], 'rates': [0.5, None]}
    """
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value

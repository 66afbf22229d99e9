"""Data shipped inside the package: a real router-logit sample to route by default.

``minilm_l5_e64_4096.npz`` holds the first 4096 tokens (32 sequences of 128) of
the E=64 router logits of layer 5 in ``shared/data/real_router/minilm_l5.npz``:
MoEfication affinities of all-MiniLM-L6-v2's feed-forward layer on real text
(CPython's ``pydoc_data.topics``). The values are copied unchanged (float32).
Their loads are strongly skewed, so the default capacity drops assignments.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import Any, Dict, Tuple

import numpy as np

__all__ = ["DEFAULT_LOGITS_FILE", "default_logits"]

#: File name of the embedded default input, inside this package.
DEFAULT_LOGITS_FILE = "minilm_l5_e64_4096.npz"


def _read_bytes(name: str) -> bytes:
    if hasattr(resources, "files"):  # Python >= 3.9
        return resources.files(__name__).joinpath(name).read_bytes()
    return resources.read_binary(__name__, name)  # pragma: no cover - Python < 3.9


def default_logits() -> Tuple[np.ndarray, Dict[str, Any]]:
    """The embedded default router logits and their description.

    Read through :mod:`importlib.resources`, so it works from a source tree, an
    installed wheel or a zip archive alike.

    Returns
    -------
    logits : numpy.ndarray, float32, shape [4096, 64]
        C-contiguous router logits, one row per token.
    meta : dict
        ``source``, ``key``, ``model``, ``layer``, ``num_experts``, ``tokens``,
        ``sequences``, ``sequence_length``, ``dtype`` and ``made_by`` (how the
        file was made).

    Examples
    --------
    >>> from moe_router.data import default_logits
    >>> logits, meta = default_logits()
    >>> logits.shape, logits.dtype.name, meta["layer"]
    ((4096, 64), 'float32', 5)
    """
    raw = _read_bytes(DEFAULT_LOGITS_FILE)
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        logits = np.ascontiguousarray(z["logits"])
        meta = json.loads(str(z["meta"][()]))
    return logits, meta

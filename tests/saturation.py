"""Ties created by float32 saturation, for the conformance harness.

The peers score float32 logits in float32 (torch on CPU): softmax probabilities
of losing experts underflow to exactly 0, sigmoid scores saturate to exactly 1.0
or 0, and ``torch.topk`` then chooses among equal values in an unspecified
order. This module recomputes the peers' float32 values in NumPy, in torch's
order of operations (softmax: ``exp(z - max)`` summed in order, times the float32
reciprocal of the sum; sigmoid: ``1 / (1 + exp(-z))``; ``exp`` rounded once from
float64), and finds the ties among them by exact equality, never a tolerance:
a variant is tied only where the peer's own float32 values are equal.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

F32 = np.float32
#: Megatron-Core and Hugging Face DeepSeek-V3 add it to the sum of sigmoid scores they divide by.
SIGMOID_EPS = F32(1e-20)


def exp32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, F32).astype(np.float64)).astype(F32)


def softmax32(x: np.ndarray) -> np.ndarray:
    """Row softmax of float32 ``x`` [T, E] in float32, as torch's CPU kernel computes it."""
    x = np.asarray(x, F32)
    e = exp32(x - x.max(axis=1, keepdims=True))
    total = np.zeros(x.shape[0], F32)
    for j in range(x.shape[1]):  # in order, in float32
        total += e[:, j]
    return e * (F32(1) / total)[:, None]


def sigmoid32(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float32, as torch computes it (0 where ``exp(-x)`` overflows)."""
    return F32(1) / (F32(1) + exp32(-np.asarray(x, F32)))


def normalized_sigmoid32(x: np.ndarray) -> np.ndarray:
    """Megatron-Core's aux-loss scores of the sigmoid router: ``s / (sum_e s + 1e-20)``."""
    s = sigmoid32(x)
    return s / (s.sum(axis=1, keepdims=True, dtype=F32) + SIGMOID_EPS)


def boundary_ties(values: np.ndarray, k: int) -> np.ndarray:
    """bool[T]: the k-th and (k+1)-th largest of a row are exactly equal (which k are chosen is a tie)."""
    T, E = values.shape
    if k <= 0 or k >= E:
        return np.zeros(T, bool)
    s = -np.sort(-values, axis=1)
    return s[:, k - 1] == s[:, k]


def order_ties(values: np.ndarray, k: int) -> np.ndarray:
    """bool[T]: two of a row's k largest values are exactly equal (their order in a top-k is a tie)."""
    s = -np.sort(-values, axis=1)[:, :min(k, values.shape[1])]
    return np.any(s[:, 1:] == s[:, :-1], axis=1)


def selection_values(peer: str, params: Dict[str, Any], logits: np.ndarray) -> Optional[np.ndarray]:
    """[T, E] float32: what the peer's top-k ranks experts by (None: argmax of logits, or group-limited)."""
    bias = params.get("expert_bias", params.get("e_score_correction_bias"))
    if peer in ("megatron", "hf-dsv3") and params.get("score_function", "sigmoid" if peer == "hf-dsv3" else
                                                       "softmax") == "sigmoid":
        s = sigmoid32(logits)
        return s if bias is None else s + np.asarray(bias, F32)
    if peer == "megatron":
        return softmax32(logits) if params.get("pre_softmax", False) else np.asarray(logits, F32)
    if peer == "hf-switch" or (peer == "deepspeed" and params["gate"] != "topk"):
        return None  # argmax: the first maximum, our rule too
    return softmax32(logits)


def zero_priority(peer: str, params: Dict[str, Any], logits: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """bool[T, k]: the peer's float32 capacity priority of each chosen (token, expert) is exactly 0.

    The priority is what a ``drop_policy="probs"`` ranks an expert's tokens by: Megatron's
    routing probabilities (after scaling), DeepSpeed top-k's gates. Unrouted tokens rank
    at 0 too, so a routed assignment of priority 0 ties with them.
    """
    k = experts.shape[1]
    chosen = np.take_along_axis(np.asarray(logits, F32), experts, axis=1)
    if peer == "deepspeed":
        return np.take_along_axis(softmax32(logits), experts, axis=1) == 0
    score = params.get("score_function", "softmax")
    if score == "sigmoid":
        s = sigmoid32(chosen)
        p = s / (s.sum(axis=1, keepdims=True, dtype=F32) + SIGMOID_EPS) if k > 1 else s
    elif params.get("pre_softmax", False):
        p = np.take_along_axis(softmax32(logits), experts, axis=1)
    else:
        p = softmax32(chosen)
    scale = params.get("scaling_factor")
    return (p if scale is None else p * F32(scale)) == 0


def kept_bounds(routed: np.ndarray, positive: np.ndarray, capacity: int, T: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per expert, the least and most assignments a ``probs`` drop can keep.

    ``routed`` [E] counts routed assignments, ``positive`` [E] (a lower bound of) those
    of priority above 0. The peer keeps the ``capacity`` highest priorities of the
    expert's column of all T tokens, unrouted ones at 0: the positive ones first, then
    any of the zeros, routed or not (torch's order). With ``capacity >= T`` nothing is
    dropped.
    """
    most = np.minimum(routed, capacity)
    if capacity >= T:
        return most, most
    return np.minimum(positive, capacity), most

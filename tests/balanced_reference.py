"""Sequential references for balanced assignment (``routing="balanced"``), shared by
``test_balanced.py`` and ``benches/bench_balanced.py``.

- :func:`optimum`: the exact optimum from ``scipy.optimize.linear_sum_assignment``
  on the logits with each expert's column repeated T/E times.
- :func:`fairseq_auction`: a NumPy transcription of fairseq's
  ``clib/libbase/balanced_assignment.cpp`` (BASE layers; its C++ extension needs a
  torch build and cannot be installed here).
- :func:`optimum_k`: the optimum with k distinct experts per token, from the
  transportation linear program (its matrix is totally unimodular, so the LP
  optimum is the integer one), solved by ``scipy.optimize.linprog``.
- :func:`greedy_experts`: tokens in order, each to its best expert with room.
"""

from __future__ import annotations

import numpy as np


def optimum(logits: np.ndarray) -> float:
    """The largest total logit over assignments with exactly T/E tokens per expert."""
    from scipy import optimize

    T, E = logits.shape
    wide = np.repeat(np.asarray(logits, np.float64), T // E, axis=1)
    finite = np.where(np.isfinite(wide), wide, -1e18)
    rows, cols = optimize.linear_sum_assignment(finite, maximize=True)
    return float(np.asarray(logits, np.float64)[rows, cols // (T // E)].sum())


def optimum_k(logits: np.ndarray, k: int) -> float:
    """The largest total logit with k distinct experts per token and T*k/E per expert."""
    from scipy import optimize

    T, E = logits.shape
    s = np.asarray(logits, np.float64).reshape(-1)
    ok = np.isfinite(s)
    rows = np.zeros((T + E, T * E))
    for t in range(T):
        rows[t, t * E:(t + 1) * E] = 1
    for e in range(E):
        rows[T + e, e::E] = 1
    rhs = np.concatenate([np.full(T, k), np.full(E, T * k // E)])
    res = optimize.linprog(-np.where(ok, s, 0.0), A_eq=rows, b_eq=rhs,
                           bounds=[(0, 1 if f else 0) for f in ok], method="highs")
    assert res.status == 0, res.message
    return float(-res.fun)


def fairseq_auction(scores: np.ndarray) -> np.ndarray:
    """fairseq's ``balanced_assignment(scores)`` for ``[jobs, workers]`` scores, in
    their dtype: each worker's jobs, worker-major (``top_index[:, :jpw].reshape(-1)``).
    ``torch.topk`` ties: the lower job index first."""
    dt = scores.dtype.type
    s = np.ascontiguousarray(scores.T)
    workers, jobs = s.shape
    jpw = jobs // workers
    eps = max(dt((s.max() - s.min()) / dt(50)), dt(1e-4))
    value, cost, max_value = s.copy(), np.zeros(jobs, s.dtype), s.max()
    counter, bid_indices = 0, None
    while True:
        bids = np.zeros_like(s)
        order = np.argsort(-value, axis=1, kind="stable")[:, :jpw + 1]
        top_values = np.take_along_axis(value, order, axis=1)
        increments = (top_values[:, :jpw] - top_values[:, jpw:jpw + 1]) + eps
        np.put_along_axis(bids, order[:, :jpw], increments, axis=1)
        if 0 < counter < 100:
            bids.reshape(-1)[bid_indices] = eps
        high_bidders = bids.argmax(axis=0)
        high_bids = bids[high_bidders, np.arange(jobs)]
        have = high_bids > 0
        if have.all():
            return order[:, :jpw].reshape(-1)
        cost = cost + high_bids
        value = s - cost
        bid_indices = (high_bidders * jobs + np.arange(jobs))[have]
        value.reshape(-1)[bid_indices] = max_value if counter < 100 else s.reshape(-1)[bid_indices]
        counter += 1


def auction_experts(logits: np.ndarray) -> np.ndarray:
    """Each token's expert under fairseq's auction (non-finite scores replaced by the
    smallest finite one, as ``base_layer.py`` does)."""
    T, E = logits.shape
    s = logits.copy()
    s[~np.isfinite(s)] = s[np.isfinite(s)].min()
    experts = np.empty(T, np.int64)
    experts[fairseq_auction(s)] = np.repeat(np.arange(E), T // E)
    return experts


def greedy_experts(logits: np.ndarray) -> np.ndarray:
    """Tokens in order, each to its best expert that still has room (lower index on ties)."""
    T, E = logits.shape
    room = np.full(E, T // E)
    out = np.empty(T, np.int64)
    for t in range(T):
        row = np.where(room > 0, logits[t], -np.inf)
        out[t] = int(np.argmax(row))
        room[out[t]] -= 1
    return out


def total(logits: np.ndarray, experts: np.ndarray) -> float:
    return float(np.asarray(logits, np.float64)[np.arange(len(experts)), experts].sum())

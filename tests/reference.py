"""A plain, sequential reference router for the parity tests.

It implements docs/semantics.md items 1-13 with Python loops over tokens and
ranks (NumPy only inside one row), in float64 throughout, with no attempt at
speed. It is deliberately written from the text of the semantics, not from the
Rust core, so that the two can be compared.

Training-mode noise (``jitter_eps``, ``noise_std``) depends on the core's
internal RNG and is not modelled: the reference refuses it with
``NotImplementedError``. So does the random training reroute draw
(``0 < expert_dropout < 1`` in training) unless the caller supplies its outcome
as ``reroute_coin``; ``expert_dropout`` of exactly 0 or 1 is modelled (never /
always).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

NEG_INF = float("-inf")


class ReferenceInputError(ValueError):
    """Raised for input the semantics reject (item 1)."""

    def __init__(self, message: str, token: int) -> None:
        super().__init__(message)
        self.token = token


# --------------------------------------------------------------------------
# Per-row pieces (items 2-6)
# --------------------------------------------------------------------------


def row_scores(z: np.ndarray, score_function: str) -> np.ndarray:
    """float64 softmax over all E (exp(-inf) = 0), element-wise sigmoid or sqrt(softplus)."""
    if score_function == "softmax":
        m = float(np.max(z))
        e = np.exp(z - m)
        return e / float(np.sum(e))
    if score_function == "sigmoid":
        out = np.empty_like(z)
        for i, v in enumerate(z.tolist()):
            if v == NEG_INF:
                out[i] = 0.0
            elif v >= 0.0:
                out[i] = 1.0 / (1.0 + math.exp(-v))
            else:
                ev = math.exp(v)
                out[i] = ev / (1.0 + ev)
        return out
    if score_function == "sqrtsoftplus":
        return np.sqrt(np.logaddexp(0.0, z))
    raise ValueError(f"unknown score_function {score_function!r}")


def log_score(v: float, score_function: str) -> float:
    """log of an eligible expert's score, up to a constant of the row: the logit, log(sigmoid),
    or log(sqrt(softplus)) (``v / 2`` where softplus underflows)."""
    if score_function == "softmax":
        return v
    if score_function == "sqrtsoftplus":
        return 0.5 * math.log(math.log1p(math.exp(v))) if v > -700.0 else 0.5 * v
    return -math.log1p(math.exp(-v)) if v > 0.0 else v - math.log1p(math.exp(v))


def normalized_from_logs(logs: Sequence[float]) -> List[float]:
    """``exp(l_j - max) / sum_i exp(l_i - max)``: exact even where every ``exp(l_j)`` underflows."""
    top = max(logs)
    rel = [math.exp(v - top) for v in logs]
    total = math.fsum(rel)
    return [r / total for r in rel]


def row_logsumexp(z: np.ndarray) -> float:
    """logsumexp over the eligible (finite) logits."""
    finite = z[np.isfinite(z)]
    m = float(np.max(finite))
    return m + math.log(float(np.sum(np.exp(finite - m))))


def group_limit(keys: List[float], group_keys: List[float], num_groups: int, group_top_k: int,
                group_score: str) -> List[float]:
    """Set the key of every expert outside the best ``group_top_k`` groups to -inf."""
    e = len(keys)
    size = e // num_groups
    scores = []
    for g in range(num_groups):
        members = group_keys[g * size:(g + 1) * size]
        if group_score == "max":
            scores.append(max(members))
        elif group_score.startswith("top") and group_score.endswith("_sum"):
            n = int(group_score[3:-4])
            finite = sorted((v for v in members if v != NEG_INF), reverse=True)
            scores.append(sum(finite[:n]) if finite else NEG_INF)
        else:
            raise ValueError(group_score)
    ranked = sorted(range(num_groups), key=lambda g: (-scores[g], g))
    best = set(ranked[:group_top_k])
    out = list(keys)
    for g in range(num_groups):
        if g not in best:
            for i in range(g * size, (g + 1) * size):
                out[i] = NEG_INF
    return out


def top_k_choice(keys: Sequence[float], k: int) -> Tuple[List[int], List[bool]]:
    """The k best keys (key descending, index ascending); fillers are not routed."""
    e = len(keys)
    order = sorted(range(e), key=lambda i: (-keys[i], i))
    chosen = [i for i in order if keys[i] != NEG_INF][:k]
    routed = [True] * len(chosen)
    for i in range(e):
        if len(chosen) == k:
            break
        if i not in chosen:
            chosen.append(i)
            routed.append(False)
    return chosen, routed


# --------------------------------------------------------------------------
# Capacity (item 8)
# --------------------------------------------------------------------------


def capacity_of(cf: Optional[float], rounding: str, min_capacity: int, active: int, k: int,
                e: int) -> Optional[int]:
    """Per-expert capacity; None when dropless."""
    if cf is None or cf == "dropless" or cf == math.inf:
        return None
    if rounding == "exact":
        c = math.ceil(Fraction(repr(float(cf))) * active * k / e)
    elif rounding == "megatron":
        c = math.ceil((active * k / e) * float(cf))
    elif rounding == "deepspeed":
        prod = np.float32(active / e) * np.float32(float(cf) * k)
        assert prod.dtype == np.float32
        c = math.ceil(float(prod))
    else:
        raise ValueError(rounding)
    return max(int(min_capacity), int(c))


# --------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------


def _cfg(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def reference_route(logits: Any, config: Any, training: bool = False, token_mask: Any = None,
                    expert_bias: Any = None, reroute_coin: Optional[Callable[[int, int], bool]] = None
                    ) -> Dict[str, Any]:
    """Route ``logits`` ([T, E] or [B, S, E]) as docs/semantics.md says.

    ``config`` is a ``RouterConfig`` or a dict of its fields (missing fields take
    the defaults). Returns a dict with the field names of ``RoutingDecision``.
    ``reroute_coin(token, rank)`` supplies the outcome of the training reroute
    draw when ``0 < expert_dropout < 1`` (the core's RNG is not modelled).
    """
    E = int(_cfg(config, "num_experts", 8))
    k = int(_cfg(config, "top_k", 2))
    score_function = _cfg(config, "score_function", "softmax")
    normalize = bool(_cfg(config, "normalize_weights", False))
    scale = float(_cfg(config, "weight_scale", 1.0))
    cf_train = _cfg(config, "capacity_factor", 1.25)
    cf_eval = _cfg(config, "eval_capacity_factor", None)
    min_capacity = int(_cfg(config, "min_capacity", 0))
    rounding = _cfg(config, "capacity_rounding", "exact")
    policy = _cfg(config, "drop_policy", "position")
    renormalize = bool(_cfg(config, "renormalize_after_drop", False))
    num_groups = _cfg(config, "num_groups", None)
    group_top_k = _cfg(config, "group_top_k", None)
    group_score = _cfg(config, "group_score", "max")
    overflow = _cfg(config, "overflow", "drop")
    reroute_scale = float(_cfg(config, "reroute_weight_scale", 0.5))
    expert_dropout = float(_cfg(config, "expert_dropout", 0.0))
    lb_coeff = float(_cfg(config, "load_balance_loss_coeff", 0.01))
    z_coeff = float(_cfg(config, "router_z_loss_coeff", 0.001))
    seq_coeff = float(_cfg(config, "seq_load_balance_loss_coeff", 0.0))
    if training and (float(_cfg(config, "jitter_eps", 0.0)) > 0 or float(_cfg(config, "noise_std", 0.0)) > 0):
        raise NotImplementedError("training noise uses the core's RNG")

    x = np.asarray(logits)
    if x.ndim not in (2, 3) or x.shape[-1] != E:
        raise ValueError(f"logits shape {x.shape}")
    batch_shape = tuple(x.shape[:-1])
    rows = np.asarray(x, dtype=np.float64).reshape(-1, E)
    T = rows.shape[0]
    if token_mask is None:
        mask = [True] * T
    else:
        mask = [bool(v) for v in np.asarray(token_mask).reshape(-1).tolist()]
        assert len(mask) == T
    bias = None if expert_bias is None else [float(v) for v in np.asarray(expert_bias, dtype=np.float64)]

    # Item 1: validation, first offending active token.
    for t in range(T):
        if not mask[t]:
            continue
        z = rows[t]
        if np.isnan(z).any():
            raise ReferenceInputError(f"logits contain NaN at token {t}", t)
        if (z == np.inf).any():
            raise ReferenceInputError(f"logits contain +inf at token {t}", t)
        if (z == -np.inf).all():
            raise ReferenceInputError(f"logits all -inf at token {t}", t)

    indices = np.zeros((T, k), dtype=np.int64)
    routed = np.zeros((T, k), dtype=bool)
    w32 = np.zeros((T, k), dtype=np.float32)  # pre-drop weights as stored
    w64 = np.zeros((T, k))  # and unrounded
    log_w = np.full((T, k), NEG_INF)  # log of each routed choice's score, up to a row constant
    top1 = [0.0] * T  # float32 score of the rank-0 choice (bpr)
    prob_rows: List[Optional[np.ndarray]] = [None] * T  # score_e / sum score_e
    lse_sq: List[float] = []
    allowed = np.zeros((T, E), dtype=bool)  # experts a token may use at all (reroute candidates)

    # Items 2-7, per token.
    for t in range(T):
        if not mask[t]:
            indices[t] = list(range(k))
            continue
        z = rows[t]
        s = row_scores(z, score_function)
        eligible = [v != NEG_INF for v in z.tolist()]
        if bias is None:
            keys = [float(v) for v in z.tolist()]
        else:
            keys = [float(s[i]) + bias[i] if eligible[i] else NEG_INF for i in range(E)]
        if num_groups is not None:
            base = z if _cfg(config, "group_score_input", "scores") == "logits" else s
            gkeys = [float(base[i]) + (0.0 if bias is None else bias[i]) if eligible[i] else NEG_INF
                     for i in range(E)]
            keys = group_limit(keys, gkeys, int(num_groups), int(group_top_k), group_score)
        allowed[t] = [key != NEG_INF for key in keys]
        chosen, is_routed = top_k_choice(keys, k)
        indices[t] = chosen
        routed[t] = is_routed
        raw = [float(s[chosen[j]]) if is_routed[j] else 0.0 for j in range(k)]
        for j in range(k):
            log_w[t, j] = log_score(float(z[chosen[j]]), score_function) if is_routed[j] else NEG_INF
        if normalize and any(is_routed):
            # Item 6: relative to the largest chosen score (exact where representable).
            ratios = normalized_from_logs([log_w[t, j] for j in range(k) if is_routed[j]])
            raw = [ratios.pop(0) if is_routed[j] else 0.0 for j in range(k)]
        for j in range(k):
            w64[t, j] = raw[j] * scale
            w32[t, j] = np.float32(w64[t, j])
        top1[t] = float(np.float32(s[chosen[0]])) if is_routed[0] else 0.0
        prob_rows[t] = np.array(normalized_from_logs([log_score(v, score_function) for v in z.tolist()]))
        lse_sq.append(row_logsumexp(z) ** 2)

    active_tokens = [t for t in range(T) if mask[t]]
    T_active = len(active_tokens)
    routed_indices = indices.copy()  # the routing before capacity (reroutes change `indices`)

    pre_drop = np.zeros(E, dtype=np.int64)
    for t in active_tokens:
        for j in range(k):
            if routed[t, j]:
                pre_drop[routed_indices[t, j]] += 1

    # Item 8: capacity.
    cf = cf_train if (training or cf_eval is None) else cf_eval
    C = capacity_of(cf, rounding, min_capacity, T_active, k, E)
    dropless = C is None

    # Item 9: drop policies.
    kept = np.zeros((T, k), dtype=bool)
    slots = np.full((T, k), -1, dtype=np.int64)
    load = [0] * E

    def token_order_position() -> List[Tuple[int, int]]:
        return [(t, j) for t in range(T) for j in range(k)]

    if policy == "position" or policy == "probs":
        order = token_order_position()
    elif policy == "rank":
        order = [(t, j) for j in range(k) for t in range(T)]
    elif policy == "bpr":
        toks = sorted(range(T), key=lambda t: (-top1[t], t))
        order = [(t, j) for t in toks for j in range(k)]
    else:
        raise ValueError(policy)

    if policy == "probs" and not dropless:
        buckets: List[List[Tuple[int, int]]] = [[] for _ in range(E)]
        for (t, j) in order:
            if routed[t, j]:
                buckets[indices[t, j]].append((t, j))
        winners = set()
        for e in range(E):
            cands = sorted(buckets[e], key=lambda tj: (-float(w32[tj]), tj[0]))
            winners.update(cands[:C])
        for (t, j) in order:  # token order for the slots
            if (t, j) in winners:
                e = indices[t, j]
                kept[t, j] = True
                slots[t, j] = load[e]
                load[e] += 1
    else:
        for (t, j) in order:
            if not routed[t, j]:
                continue
            e = indices[t, j]
            if dropless or load[e] < C:
                kept[t, j] = True
                slots[t, j] = load[e]
                load[e] += 1

    weights = np.where(kept, w32, np.float32(0.0)).astype(np.float32)
    rerouted = np.zeros((T, k), dtype=bool)

    # Item 13: reroute (placement first, then the dropped assignments in order).
    if overflow == "reroute" and not dropless:
        coin = reroute_coin
        if training and 0.0 < expert_dropout < 1.0:
            if coin is None:
                raise NotImplementedError("the training reroute coin uses the core's RNG")
        elif not training or expert_dropout >= 1.0:
            coin = None  # every overflowing assignment tries
        tries = (not training) or expert_dropout > 0.0
        if tries:
            for (t, j) in order:
                if not routed[t, j] or kept[t, j]:
                    continue
                if coin is not None and not coin(t, j):
                    continue
                taken = set(int(v) for v in indices[t])
                cands = [e for e in range(E) if load[e] < C and allowed[t, e] and e not in taken]
                if not cands:
                    continue
                target = min(cands, key=lambda e: (load[e], e))
                indices[t, j] = target
                slots[t, j] = load[target]
                load[target] += 1
                kept[t, j] = True
                rerouted[t, j] = True
                # From the exact pre-drop weight where float32 holds it only approximately and the
                # factor would scale that error up; saturated, as the rounded w32 can carry the
                # product one step above float32 max.
                base = float(w32[t, j])
                if reroute_scale > 1.0 and base < float(np.finfo(np.float32).tiny):
                    base = float(w64[t, j])
                weights[t, j] = np.float32(min(base * reroute_scale, float(np.finfo(np.float32).max)))

    # Item 10: renormalization after drops.
    if renormalize:
        for t in range(T):
            total = 0.0
            n = 0
            for j in range(k):
                if kept[t, j]:
                    total += float(weights[t, j])
                    n += 1
            if n == 0:
                continue
            subnormal = any(kept[t, j] and float(weights[t, j]) < float(np.finfo(np.float32).tiny) for j in range(k))
            if subnormal and 2.0 * total < scale:
                # From the unrounded weights, when float32 holds a kept one only approximately.
                top = max(log_w[t, j] for j in range(k) if kept[t, j])
                rel = [math.exp(log_w[t, j] - top) * (reroute_scale if rerouted[t, j] else 1.0) if kept[t, j]
                       else 0.0 for j in range(k)]
                total = math.fsum(rel)
                for j in range(k):
                    weights[t, j] = np.float32(rel[j] / total * scale) if total > 0 else 0.0
                continue
            for j in range(k):
                if kept[t, j]:
                    weights[t, j] = np.float32(float(weights[t, j]) / total * scale) if total != 0 else 0.0

    # Item 11: counts.
    tokens_per_expert = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            if kept[t, j]:
                tokens_per_expert[indices[t, j]] += 1
    kept_assignments = int(kept.sum())
    tokens_dropped = sum(1 for t in active_tokens if not kept[t].any())
    if dropless:
        C = int(tokens_per_expert.max()) if E and T else 0

    # Item 12: losses.
    def balance(tokens: List[int]) -> float:
        n = len(tokens)
        if n == 0:
            return 0.0
        counts = np.zeros(E)
        psum = np.zeros(E)
        for t in tokens:
            for j in range(k):
                if routed[t, j]:
                    counts[routed_indices[t, j]] += 1
            psum += prob_rows[t]
        f = counts / (n * k)
        p = psum / n
        return float(E * np.sum(f * p))

    lb = balance(active_tokens)
    prob_mean = np.zeros(E)
    for t in active_tokens:
        prob_mean += prob_rows[t]
    if T_active:
        prob_mean /= T_active
    z_loss = float(sum(lse_sq) / T_active) if T_active else 0.0
    seq_loss: Optional[float] = None
    if len(batch_shape) == 2:
        B, S = batch_shape
        per_seq = []
        for b in range(B):
            toks = [t for t in range(b * S, (b + 1) * S) if mask[t]]
            if toks:
                per_seq.append(balance(toks))
        seq_loss = float(np.mean(per_seq)) if per_seq else 0.0
    aux = lb_coeff * lb + z_coeff * z_loss + (seq_coeff * seq_loss if seq_loss is not None else 0.0)

    return {
        "expert_indices": indices.astype(np.int32),
        "expert_weights": weights,
        "pre_drop_weights": w32,
        "expert_slots": slots.astype(np.int32),
        "kept": kept,
        "routed": routed,
        "rerouted": rerouted,
        "tokens_per_expert": tokens_per_expert,
        "pre_drop_tokens_per_expert": pre_drop,
        "expert_prob_mean": prob_mean,
        "capacity": int(C),
        "dropless": dropless,
        "total_tokens": T,
        "active_tokens": T_active,
        "kept_assignments": kept_assignments,
        "dropped_assignments": T_active * k - kept_assignments,
        "tokens_dropped": tokens_dropped,
        "load_balance_loss": lb,
        "router_z_loss": z_loss,
        "seq_load_balance_loss": seq_loss,
        "auxiliary_loss": aux,
        "batch_shape": batch_shape,
    }

"""The result of routing: ``RoutingDecision`` and the seed's ``ExpertAssignment``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class ExpertAssignment:
    """One kept (token, expert) assignment, in the seed's shape.

    Attributes
    ----------
    expert_id : int
        The expert, in ``[0, E)``.
    probability : float
        The assignment's combine weight (``expert_weights[token_idx, expert_rank]``).
    token_idx : int
        The token, in flattened ``[T]`` order.
    expert_rank : int
        0 for the token's best expert, 1 for the next, ...
    """

    expert_id: int
    probability: float
    token_idx: int
    expert_rank: int

    def is_valid(self) -> bool:
        """True when ``0 <= probability <= 1`` (the seed's check; a ``weight_scale`` > 1 can exceed it)."""
        return 0.0 <= self.probability <= 1.0

    def weighted_contribution(self) -> float:
        """``probability / (expert_rank + 1)``, the seed's rank-discounted weight."""
        return self.probability / (self.expert_rank + 1.0)


class RoutingDecision:
    """How a batch of T tokens is routed to E experts, k choices each.

    Produced by :func:`moe_router.route_logits` and ``ExpertRouter.route_tokens``;
    the arrays are owned by the decision (moved from Rust, not copied).

    Attributes
    ----------
    expert_indices : numpy.ndarray, int32, shape [T, k]
        Chosen experts by rank (best first; ties to the lower expert index).
        Padding tokens and choices beyond the eligible experts hold the
        lowest-index remaining experts, never kept.
    expert_weights : numpy.ndarray, float32, shape [T, k]
        Combine weights; 0 where the assignment is not kept. Not renormalized
        after drops unless ``renormalize_after_drop``.
    expert_slots : numpy.ndarray, int32, shape [T, k]
        Row of the assignment in its expert's buffer, in ``[0, capacity)``; -1 where not kept.
    kept : numpy.ndarray, bool, shape [T, k]
        Whether the assignment survived capacity.
    rerouted : numpy.ndarray, bool, shape [T, k]
        Whether the assignment was moved to another expert (``overflow="reroute"``).
    tokens_per_expert : numpy.ndarray, int64, shape [E]
        Kept assignments per expert (the seed's ``expert_capacities``).
    pre_drop_tokens_per_expert : numpy.ndarray, int64, shape [E]
        Routed assignments per expert before capacity (DeepSpeed ``exp_counts``).
    expert_prob_mean : numpy.ndarray, float64, shape [E]
        ``P_e``: mean over active tokens of expert e's share of the token's score
        distribution (softmax probabilities, or sigmoid scores normalized per token).
    capacity : int
        Per-expert capacity; for dropless routing, the largest kept count.
    dropless : bool
        True when no capacity limit applied.
    total_tokens : int
        T, every row including padding.
    active_tokens : int
        Tokens not masked out by ``token_mask``.
    kept_assignments, dropped_assignments : int
        ``dropped_assignments = active_tokens * k - kept_assignments``.
    tokens_dropped : int
        Active tokens left with no expert at all (the seed's ``T - kept`` is wrong for k > 1).
    load_balance_loss : float
        ``E * sum_e f_e * P_e`` (Switch Transformer eq. 4, GShard, Megatron-Core):
        1.0 at perfect balance for any k. Hugging Face Mixtral's loss is k times this.
    router_z_loss : float
        Mean over active tokens of ``logsumexp(logits)^2`` (ST-MoE eq. 5).
    seq_load_balance_loss : float or None
        Mean over sequences of each sequence's load-balance loss (DeepSeek-V3),
        for ``[B, S, E]`` input; None for ``[T, E]`` input.
    auxiliary_loss : float
        ``load_balance_loss_coeff * load_balance_loss + router_z_loss_coeff *
        router_z_loss`` (+ ``seq_load_balance_loss_coeff * seq_load_balance_loss``).
    peer_load_balance_loss : float or None
        For a configuration made by a preset (``config.peer`` set), the load-balance
        loss as that framework computes it (coefficient 1): k times ours for
        Hugging Face Mixtral/Qwen, first choices only for DeepSpeed top-1/top-2,
        a plain top-k count for Megatron-Core; see
        :func:`moe_router.presets.peer_load_balance_loss`. None otherwise.
    router_probs : numpy.ndarray or None
        float32 ``[T, E]`` scores of the logits as given, when asked for.
    batch_shape : tuple of int
        Leading shape of the input (``(T,)`` or ``(B, S)``).
    """

    expert_indices: np.ndarray
    expert_weights: np.ndarray
    expert_slots: np.ndarray
    kept: np.ndarray
    rerouted: np.ndarray
    tokens_per_expert: np.ndarray
    pre_drop_tokens_per_expert: np.ndarray
    expert_prob_mean: np.ndarray
    capacity: int
    dropless: bool
    total_tokens: int
    active_tokens: int
    kept_assignments: int
    dropped_assignments: int
    tokens_dropped: int
    load_balance_loss: float
    router_z_loss: float
    seq_load_balance_loss: Optional[float]
    auxiliary_loss: float
    peer_load_balance_loss: Optional[float]
    router_probs: Optional[np.ndarray]
    batch_shape: Tuple[int, ...]

    __slots__ = (
        "expert_indices", "expert_weights", "expert_slots", "kept", "rerouted", "tokens_per_expert",
        "pre_drop_tokens_per_expert", "expert_prob_mean", "capacity", "dropless", "total_tokens", "active_tokens",
        "kept_assignments", "dropped_assignments", "tokens_dropped", "load_balance_loss",
        "router_z_loss", "seq_load_balance_loss", "auxiliary_loss", "peer_load_balance_loss", "router_probs",
        "batch_shape", "_assignments",
    )

    def __init__(self, fields: Dict[str, Any], *, auxiliary_loss: float, batch_shape: Tuple[int, ...],
                 router_probs: Optional[np.ndarray] = None) -> None:
        for name in ("expert_indices", "expert_weights", "expert_slots", "kept", "rerouted",
                     "tokens_per_expert", "pre_drop_tokens_per_expert", "expert_prob_mean", "capacity", "dropless",
                     "active_tokens", "kept_assignments", "dropped_assignments", "tokens_dropped",
                     "load_balance_loss", "router_z_loss", "seq_load_balance_loss"):
            setattr(self, name, fields[name] if name != "rerouted" else
                    fields.get(name, None))
        if self.rerouted is None:  # no reroute possible: np.zeros maps pages lazily
            self.rerouted = np.zeros(self.kept.shape, dtype=np.bool_)
        self.total_tokens = int(self.expert_indices.shape[0])
        self.auxiliary_loss = float(auxiliary_loss)
        self.peer_load_balance_loss = None
        self.router_probs = router_probs
        self.batch_shape = tuple(batch_shape)
        self._assignments: Optional[List[List[ExpertAssignment]]] = None

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.tokens_per_expert.shape[0])

    @property
    def top_k(self) -> int:
        """k."""
        return int(self.expert_indices.shape[1])

    @property
    def expert_capacities(self) -> np.ndarray:
        """Alias of :attr:`tokens_per_expert` (the seed's name: kept assignments per expert)."""
        return self.tokens_per_expert

    def routing_efficiency(self) -> float:
        """Kept assignments over ``active_tokens * k``; 1.0 for an empty batch."""
        total = self.active_tokens * self.top_k
        return 1.0 if total == 0 else self.kept_assignments / total

    def load_balance_cv(self) -> float:
        """Coefficient of variation (population std / mean) of ``tokens_per_expert``; 0 if no token is kept."""
        loads = self.tokens_per_expert.astype(np.float64)
        mean = loads.mean() if loads.size else 0.0
        return 0.0 if mean <= 0 else float(loads.std() / mean)

    def expert_utilization(self) -> Dict[str, float]:
        """Buffer use per expert, ``tokens_per_expert / capacity``, summarized.

        Returns
        -------
        dict
            ``min_utilization``, ``max_utilization``, ``mean_utilization`` (0 when
            the capacity is 0), ``tokens_dropped_rate`` (``tokens_dropped /
            active_tokens``, 0 for an empty batch), ``assignment_drop_rate`` and
            ``routing_efficiency``. The seed's ``mean_utilization`` was always 1/E.
        """
        loads = self.tokens_per_expert.astype(np.float64)
        if self.capacity > 0 and loads.size:
            u = loads / float(self.capacity)
            lo, hi, mean = float(u.min()), float(u.max()), float(u.mean())
        else:
            lo = hi = mean = 0.0
        active = self.active_tokens
        return {
            "min_utilization": lo,
            "max_utilization": hi,
            "mean_utilization": mean,
            "tokens_dropped_rate": 0.0 if active == 0 else self.tokens_dropped / active,
            "assignment_drop_rate": 1.0 - self.routing_efficiency(),
            "routing_efficiency": self.routing_efficiency(),
        }

    @property
    def expert_assignments(self) -> List[List[ExpertAssignment]]:
        """Per token, its kept assignments as ``ExpertAssignment`` (the seed's view; built on first use)."""
        if self._assignments is None:
            out: List[List[ExpertAssignment]] = [[] for _ in range(self.total_tokens)]
            tok, rank = np.nonzero(self.kept)
            experts = self.expert_indices[tok, rank].tolist()
            weights = self.expert_weights[tok, rank].tolist()
            for t, j, e, w in zip(tok.tolist(), rank.tolist(), experts, weights):
                out[t].append(ExpertAssignment(expert_id=e, probability=w, token_idx=t, expert_rank=j))
            self._assignments = out
        return self._assignments

    def to_dict(self) -> Dict[str, Any]:
        """Scalars and per-expert counts as JSON-ready Python values (no ``[T, k]`` arrays)."""
        return {
            "total_tokens": self.total_tokens,
            "active_tokens": self.active_tokens,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "capacity": self.capacity,
            "dropless": self.dropless,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "pre_drop_tokens_per_expert": self.pre_drop_tokens_per_expert.tolist(),
            "kept_assignments": self.kept_assignments,
            "dropped_assignments": self.dropped_assignments,
            "tokens_dropped": self.tokens_dropped,
            "routing_efficiency": self.routing_efficiency(),
            "load_balance_cv": self.load_balance_cv(),
            "load_balance_loss": self.load_balance_loss,
            "router_z_loss": self.router_z_loss,
            "seq_load_balance_loss": self.seq_load_balance_loss,
            "auxiliary_loss": self.auxiliary_loss,
            "peer_load_balance_loss": self.peer_load_balance_loss,
        }

    def __repr__(self) -> str:
        return (f"RoutingDecision(T={self.total_tokens}, E={self.num_experts}, k={self.top_k}, "
                f"capacity={self.capacity}, dropped_assignments={self.dropped_assignments}, "
                f"load_balance_loss={self.load_balance_loss:.6g}, router_z_loss={self.router_z_loss:.6g})")

"""``GateNetwork``: the hierarchical gate, with a sparse mode that saves work."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core, _inputs
from ._core import ConfigError


class GateNetwork:
    """Hierarchical gate: ``p(e) = p(group) * p(e | group)`` (a two-level softmax gate).

    E experts form ``G = ceil(sqrt(E))`` contiguous groups of ``P = ceil(E/G)``
    (the last group may be smaller). ``p(group)`` is the softmax of ``x @ W_group``
    (``[D, G]``); ``p(e | group g)`` is the softmax of ``x @ W_g`` (``[D, P]``)
    over group g's real experts, so every token's probabilities sum to 1 (the
    last group's missing experts take no probability mass).

    With ``group_top_k=None`` every group's expert logits are computed (the
    dense gate). With ``group_top_k=m`` only each token's m best groups
    (by group logit, ties to the lower group) are computed and the other experts
    get probability 0: the same values on the computed experts, for
    ``(G + m*P) / (G + G*P)`` of the dense FLOPs. The gate's z-loss is that of
    its group router, ``logsumexp(x @ W_group)^2`` (ST-MoE's z-loss on the first stage). Both run in Rust, in parallel,
    as cache-blocked GEMMs (tokens gathered per group in sparse mode).

    Parameters
    ----------
    input_dim : int
        D, the hidden size.
    num_experts : int
        E (>= 1).
    seed : int
        Seed of the weight initialization: normal with std ``1/sqrt(D)``
        (std 1 would saturate the softmax).
    group_top_k : int or None
        Groups computed per token (1..G), or None for the dense gate.
    dtype : numpy dtype
        float32 (default) or float64 weights; hidden states of the other dtype
        use a converted copy of the weights.

    Raises
    ------
    ConfigError
        Bad ``input_dim`` or ``num_experts`` (ints in ``[1, 2**31 - 1]``),
        ``group_top_k`` (1..G) or ``seed`` (an int in ``[0, 2**64 - 1]``).
    ConfigTypeError
        One of those, or ``dtype``, of the wrong type.
    """

    def __init__(self, input_dim: int, num_experts: int, seed: int = 0,
                 group_top_k: Optional[int] = None, dtype: Any = np.float32) -> None:
        self._dim = _inputs.integer(input_dim, "input_dim", 1, _inputs.I32_MAX)
        self._experts = _inputs.integer(num_experts, "num_experts", 1, _inputs.I32_MAX)
        self._groups, self._per_group = _core.gate_layout(self._experts)
        self.group_top_k = None if group_top_k is None else _inputs.integer(group_top_k, "group_top_k", 1,
                                                                            self._groups)
        dtype = _core.float_dtype(dtype, "dtype", ConfigError)
        rng = np.random.default_rng(_inputs.integer(seed, "seed"))
        std = 1.0 / math.sqrt(self._dim)
        # The weights and their conversions to the hidden states' dtype (keyed by dtype).
        self._arrays: list = [None, None]
        self._casts: Dict[Any, Tuple[np.ndarray, np.ndarray]] = {}
        self.group_weight = (rng.standard_normal((self._dim, self._groups)) * std).astype(dtype)
        self.expert_weight = (rng.standard_normal((self._groups, self._dim, self._per_group)) * std).astype(dtype)

    @property
    def group_weight(self) -> np.ndarray:
        """Group router weight, float ``[D, G]`` (read-only; assign a new array to change it)."""
        return self._arrays[0]

    @group_weight.setter
    def group_weight(self, value: Any) -> None:
        self._set(0, value, "group_weight", (self._dim, self._groups))

    @property
    def expert_weight(self) -> np.ndarray:
        """Within-group expert routers, float ``[G, D, P]`` (read-only; assign a new array to change it)."""
        return self._arrays[1]

    @expert_weight.setter
    def expert_weight(self, value: Any) -> None:
        self._set(1, value, "expert_weight", (self._groups, self._dim, self._per_group))

    def _set(self, which: int, value: Any, name: str, shape: Tuple[int, ...]) -> None:
        """Replace one weight by a private float32/float64 copy of ``value`` (its own dtype)."""
        arrays = list(self._arrays)
        arrays[which] = _core.read_weight(value, name, shape, dtype=getattr(value, "dtype", np.float64))
        self._arrays, self._casts = arrays, {}

    def weights_for(self, dtype: Any) -> Tuple[np.ndarray, np.ndarray]:
        """``(group_weight [D, G], expert_weight [G, D, P])`` as C-contiguous arrays of
        ``dtype`` (float32 or float64), each converted once and cached."""
        return _core.cast_arrays(self._casts, dtype, self._arrays)

    def forward(self, hidden: Any) -> np.ndarray:
        """Expert probabilities of ``hidden``.

        Parameters
        ----------
        hidden : array_like, float, shape [T, D] or [B, S, D]

        Returns
        -------
        numpy.ndarray
            ``[T, E]`` (or ``[B, S, E]``) probabilities in the hidden states' dtype
            (float16 input is computed in float32); rows sum to 1 for the dense
            gate, to the mass of the chosen groups for the sparse one.

        Raises
        ------
        InputError
            Wrong rank or last dimension (must be ``input_dim``).
        InputTypeError
            Not a floating-point array, or a masked array with masked entries
            (this function has no padding to give them).
        """
        return _core.gate_forward(hidden, *self._arrays, self._experts, self.group_top_k, casts=self._casts)[0]

    __call__ = forward

    def num_groups(self) -> int:
        """G, the number of expert groups."""
        return self._groups

    def experts_per_group(self) -> int:
        """P, the experts per group (the last group may hold fewer)."""
        return self._per_group

    def get_hierarchy_stats(self) -> Dict[str, Any]:
        """Layout, parameter counts and FLOPs per token (multiply-adds x 2).

        ``flop_fraction`` is the sparse gate's share of the dense gate's FLOPs
        (1.0 when dense): ``(G + m*P) / (G + G*P)``, counting the last group at its
        padded width P as the GEMMs compute it (``(G + m*P) / (G + E)`` when P divides E).
        """
        d, g, p, e = self._dim, self._groups, self._per_group, self._experts
        dense = 2 * d * (g + g * p)
        sparse = dense if self.group_top_k is None else 2 * d * (g + self.group_top_k * p)
        return {
            "num_groups": g,
            "experts_per_group": p,
            "total_experts": e,
            "group_top_k": self.group_top_k,
            "group_router_params": d * g,
            "expert_router_params": g * d * p,
            "dense_flops_per_token": dense,
            "flops_per_token": sparse,
            "flop_fraction": sparse / dense,
        }

    def __repr__(self) -> str:
        return (f"GateNetwork(input_dim={self._dim}, num_experts={self._experts}, groups={self._groups}x"
                f"{self._per_group}, group_top_k={self.group_top_k})")

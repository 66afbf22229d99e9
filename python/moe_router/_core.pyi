"""Type stubs of the compiled core (checked against the module by mypy.stubtest,
and ``RouterConfig``'s fields against ``RouterConfig.FIELDS`` by tests/test_stubs.py)."""

import decimal
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, final

import numpy as np
import numpy.typing as npt

__all__ = ["CHUNK_TOKENS", "ConfigError", "ConfigTypeError", "ExpertAssignment", "InputError", "InputTypeError", "MAX_THREADS", "PEERS", "RouterConfig", "RouterError", "RoutingDecision", "gate_forward", "gate_layout", "get_num_threads", "peer_load_balance_loss", "route_gate", "route_hidden", "route_logits", "set_num_threads"]

CHUNK_TOKENS: int
MAX_THREADS: int
PEERS: Tuple[str, ...]

class RouterError(ValueError): ...
class ConfigError(RouterError): ...
class InputError(RouterError): ...
class ConfigTypeError(ConfigError, TypeError): ...
class InputTypeError(InputError, TypeError): ...

@final
class RouterConfig:
    FIELDS: ClassVar[Sequence[str]]
    num_experts: int
    top_k: int
    capacity_factor: float | decimal.Decimal | None
    eval_capacity_factor: float | decimal.Decimal | str | None
    min_capacity: int
    expert_capacity: int | None
    capacity_rounding: str
    drop_policy: str
    renormalize_after_drop: bool
    score_function: str
    normalize_weights: bool
    weight_scale: float
    load_balance_loss_coeff: float
    router_z_loss_coeff: float
    seq_load_balance_loss_coeff: float
    expert_dropout: float
    enable_load_balancing: bool
    overflow: str
    reroute_weight_scale: float
    num_groups: int | None
    group_top_k: int | None
    group_score: str
    group_score_input: str
    jitter_eps: float
    noise_std: float
    seed: int
    expert_bias: tuple[float, ...] | None
    peer: str | None
    num_experts_per_token: int
    def __new__(
        cls,
        num_experts: int = ...,
        top_k: int | None = ...,
        *,
        capacity_factor: float | decimal.Decimal | None = ...,
        eval_capacity_factor: float | decimal.Decimal | str | None = ...,
        min_capacity: int = ...,
        expert_capacity: int | None = ...,
        capacity_rounding: str = ...,
        drop_policy: str = ...,
        renormalize_after_drop: bool = ...,
        score_function: str = ...,
        normalize_weights: bool = ...,
        weight_scale: float = ...,
        load_balance_loss_coeff: float = ...,
        router_z_loss_coeff: float = ...,
        seq_load_balance_loss_coeff: float = ...,
        expert_dropout: float = ...,
        enable_load_balancing: bool = ...,
        overflow: str = ...,
        reroute_weight_scale: float = ...,
        num_groups: int | None = ...,
        group_top_k: int | None = ...,
        group_score: str = ...,
        group_score_input: str = ...,
        jitter_eps: float = ...,
        noise_std: float = ...,
        seed: int = ...,
        expert_bias: Sequence[float] | None = ...,
        peer: str | None = ...,
        num_experts_per_token: int | None = ...,
    ) -> RouterConfig: ...
    def capacity(self, num_tokens: int, training: Optional[bool] = None) -> Optional[int]: ...
    def to_dict(self) -> Dict[str, Any]: ...
    def replace(self, **changes: Any) -> RouterConfig: ...
    @classmethod
    def preset(cls, name: str, num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig: ...
    def __setattr__(self, name: str, value: Any, /) -> None: ...
    def __dir__(self) -> List[str]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __getnewargs_ex__(self) -> Tuple[Tuple[()], Dict[str, Any]]: ...
    def __copy__(self) -> RouterConfig: ...
    def __deepcopy__(self, memo: Any, /) -> RouterConfig: ...

@final
class ExpertAssignment:
    expert_id: int
    probability: float
    token_idx: int
    expert_rank: int
    def __new__(cls, expert_id: int, probability: float, token_idx: int, expert_rank: int) -> ExpertAssignment: ...
    def is_valid(self) -> bool: ...
    def weighted_contribution(self) -> float: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class RoutingDecision:
    @property
    def expert_indices(self) -> npt.NDArray[np.int32]: ...
    @property
    def expert_weights(self) -> npt.NDArray[np.float32]: ...
    @property
    def expert_slots(self) -> npt.NDArray[np.int32]: ...
    @property
    def kept(self) -> npt.NDArray[np.bool_]: ...
    @property
    def rerouted(self) -> npt.NDArray[np.bool_]: ...
    @property
    def tokens_per_expert(self) -> npt.NDArray[np.int64]: ...
    @property
    def pre_drop_tokens_per_expert(self) -> npt.NDArray[np.int64]: ...
    @property
    def expert_prob_mean(self) -> npt.NDArray[np.float64]: ...
    @property
    def expert_capacities(self) -> npt.NDArray[np.int64]: ...
    @property
    def router_probs(self) -> Optional[npt.NDArray[np.float32]]: ...
    @property
    def batch_shape(self) -> Tuple[int, ...]: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dropless(self) -> bool: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def active_tokens(self) -> int: ...
    @property
    def kept_assignments(self) -> int: ...
    @property
    def dropped_assignments(self) -> int: ...
    @property
    def tokens_dropped(self) -> int: ...
    @property
    def load_balance_loss(self) -> float: ...
    @property
    def router_z_loss(self) -> float: ...
    @property
    def seq_load_balance_loss(self) -> Optional[float]: ...
    @property
    def auxiliary_loss(self) -> float: ...
    @property
    def peer_load_balance_loss(self) -> Optional[float]: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def expert_assignments(self) -> List[List[ExpertAssignment]]: ...
    def routing_efficiency(self) -> float: ...
    def load_balance_cv(self) -> float: ...
    def expert_utilization(self) -> Dict[str, float]: ...
    def to_dict(self) -> Dict[str, Any]: ...

def route_logits(
    logits: npt.NDArray[Any],
    config: RouterConfig,
    *,
    training: bool = False,
    token_mask: Optional[npt.NDArray[np.bool_]] = None,
    expert_bias: Optional[npt.NDArray[np.float64]] = None,
    step: int = 0,
    sequence_length: Optional[int] = None,
    return_probs: bool = False,
    batch_shape: Optional[Sequence[int]] = None,
) -> RoutingDecision: ...
def route_hidden(
    hidden: npt.NDArray[Any],
    weight: npt.NDArray[Any],
    bias: Optional[npt.NDArray[Any]],
    config: RouterConfig,
    *,
    training: bool = False,
    token_mask: Optional[npt.NDArray[np.bool_]] = None,
    expert_bias: Optional[npt.NDArray[np.float64]] = None,
    step: int = 0,
    sequence_length: Optional[int] = None,
    return_probs: bool = False,
    batch_shape: Optional[Sequence[int]] = None,
) -> RoutingDecision: ...
def route_gate(
    hidden: npt.NDArray[Any],
    group_weight: npt.NDArray[Any],
    expert_weight: npt.NDArray[Any],
    group_top_k: Optional[int],
    config: RouterConfig,
    *,
    training: bool = False,
    token_mask: Optional[npt.NDArray[np.bool_]] = None,
    expert_bias: Optional[npt.NDArray[np.float64]] = None,
    step: int = 0,
    sequence_length: Optional[int] = None,
    return_probs: bool = False,
    batch_shape: Optional[Sequence[int]] = None,
) -> RoutingDecision: ...
def gate_forward(
    hidden: npt.NDArray[Any],
    group_weight: npt.NDArray[Any],
    expert_weight: npt.NDArray[Any],
    num_experts: int,
    group_top_k: Optional[int] = None,
) -> Tuple[npt.NDArray[Any], npt.NDArray[np.float64]]: ...
def peer_load_balance_loss(
    decision: RoutingDecision, peer: str, plain_tokens_per_expert: Optional[Sequence[int]] = None
) -> float: ...
def gate_layout(num_experts: int) -> Tuple[int, int]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

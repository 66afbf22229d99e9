"""Type stubs of the compiled core (checked against the module by mypy.stubtest)."""

from typing import Any, Dict, Optional, Tuple, final

import numpy as np
import numpy.typing as npt

CHUNK_TOKENS: int

class RouterError(ValueError): ...
class ConfigError(RouterError): ...
class InputError(RouterError): ...

@final
class RouteOptions:
    def __new__(
        cls,
        *,
        num_experts: int,
        top_k: int,
        score_function: str,
        normalize_weights: bool,
        weight_scale: float,
        capacity_factor: Optional[str],
        eval_capacity_factor: Optional[str],
        min_capacity: int,
        capacity_rounding: str,
        drop_policy: str,
        renormalize_after_drop: bool,
        num_groups: Optional[int],
        group_top_k: Optional[int],
        group_score: str,
        overflow: str,
        reroute_weight_scale: float,
        expert_dropout: float,
        jitter_eps: float,
        noise_std: float,
        seed: int,
        expert_capacity: Optional[int] = None,
        group_score_input: str = "scores",
    ) -> RouteOptions: ...
    def capacity(self, active_tokens: int, training: bool = False) -> Optional[int]: ...

def route_logits(
    logits: npt.NDArray[Any],
    options: RouteOptions,
    training: bool = False,
    token_mask: Optional[npt.NDArray[np.bool_]] = None,
    expert_bias: Optional[npt.NDArray[np.float64]] = None,
    step: int = 0,
    sequence_length: Optional[int] = None,
) -> Dict[str, Any]: ...
def route_hidden(
    hidden: npt.NDArray[Any],
    weight: npt.NDArray[Any],
    bias: Optional[npt.NDArray[Any]],
    options: RouteOptions,
    training: bool = False,
    token_mask: Optional[npt.NDArray[np.bool_]] = None,
    expert_bias: Optional[npt.NDArray[np.float64]] = None,
    step: int = 0,
    sequence_length: Optional[int] = None,
) -> Dict[str, Any]: ...
def route_gate(
    hidden: npt.NDArray[Any],
    group_weight: npt.NDArray[Any],
    expert_weight: npt.NDArray[Any],
    group_top_k: Optional[int],
    options: RouteOptions,
    training: bool = False,
    token_mask: Optional[npt.NDArray[np.bool_]] = None,
    expert_bias: Optional[npt.NDArray[np.float64]] = None,
    step: int = 0,
    sequence_length: Optional[int] = None,
) -> Dict[str, Any]: ...
def gate_forward(
    hidden: npt.NDArray[Any],
    group_weight: npt.NDArray[Any],
    expert_weight: npt.NDArray[Any],
    num_experts: int,
    group_top_k: Optional[int] = None,
) -> Tuple[npt.NDArray[Any], npt.NDArray[np.float64]]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...

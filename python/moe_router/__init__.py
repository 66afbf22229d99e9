"""moe_router: a fast, exact Mixture-of-Experts token router.

Route router logits (or hidden states) to experts with exact, documented
semantics: top-k with a total tie order, exact-decimal capacity, drop policies,
load-balance and z losses. The hot path runs in a Rust core, in parallel, on
NumPy buffers without copying and with the GIL released.

>>> import numpy as np, moe_router as mr
>>> cfg = mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.25)
>>> dec = mr.route_logits(np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32), cfg)
>>> dec.expert_indices.shape, dec.capacity
((64, 2), 20)
"""

from ._core import (AllToAllPlan, ConfigError, ConfigTypeError, ExpertPlacement, InputError, InputTypeError,
                    ReceivePlan, RouterError, plan_placement)
from ._inputs import GradientWarning
from .balancer import LoadBalancer, LoadBalancingStats
from .config import RouterConfig
from .decision import (DispatchPlan, ExpertAssignment, RecordedRoute, RecordedRoutes, RoutingDecision,
                       moe_align_block_size)
from .gate import GateNetwork
from .global_balance import GlobalBalanceAccumulator
from .presets import PRESETS, peer_load_balance_loss, preset
from .router import ExpertRouter
from .routing import route_logits
from .stats import RoutingStats

__all__ = [
    "AllToAllPlan",
    "ConfigError",
    "ConfigTypeError",
    "DispatchPlan",
    "ExpertAssignment",
    "ExpertPlacement",
    "ExpertRouter",
    "GateNetwork",
    "GlobalBalanceAccumulator",
    "GradientWarning",
    "InputError",
    "InputTypeError",
    "LoadBalancer",
    "LoadBalancingStats",
    "PRESETS",
    "ReceivePlan",
    "RecordedRoute",
    "RecordedRoutes",
    "RouterConfig",
    "RouterError",
    "RoutingDecision",
    "RoutingStats",
    "get_num_threads",
    "moe_align_block_size",
    "peer_load_balance_loss",
    "plan_placement",
    "preset",
    "release_memory",
    "route_logits",
    "set_num_threads",
]

from ._core import get_num_threads, release_memory, set_num_threads

try:
    from importlib.metadata import version as _version

    __version__ = _version("moe_router")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

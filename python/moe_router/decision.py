"""``RoutingDecision``, ``ExpertAssignment``, ``DispatchPlan`` and the replay records ``RecordedRoute``,
``RecordedRoutes``: the core's result types, re-exported, and vLLM's ``moe_align_block_size``."""

from ._core import (DispatchPlan, ExpertAssignment, RecordedRoute, RecordedRoutes, RoutingDecision,
                    moe_align_block_size)

__all__ = ["DispatchPlan", "ExpertAssignment", "RecordedRoute", "RecordedRoutes", "RoutingDecision",
           "moe_align_block_size"]

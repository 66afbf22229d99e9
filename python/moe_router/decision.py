"""``RoutingDecision``, ``ExpertAssignment`` and ``DispatchPlan``: the core's result types, re-exported,
and vLLM's ``moe_align_block_size``."""

from ._core import DispatchPlan, ExpertAssignment, RoutingDecision, moe_align_block_size

__all__ = ["DispatchPlan", "ExpertAssignment", "RoutingDecision", "moe_align_block_size"]

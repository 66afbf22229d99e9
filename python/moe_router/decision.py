"""``RoutingDecision`` and ``ExpertAssignment``: the core's result types, re-exported."""

from ._core import ExpertAssignment, RoutingDecision

__all__ = ["ExpertAssignment", "RoutingDecision"]

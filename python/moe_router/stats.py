"""Routing statistics accumulated over many routing calls: ``RoutingStats``.

The class lives in the Rust core (``moe_router._core.RoutingStats``, documented there).
"""

from ._core import RoutingStats

__all__ = ["RoutingStats"]

"""``RouterConfig``: defined in the Rust core, re-exported here.

Every field, default, spelling and range check lives in
``rust/moe_router_core/src/config.rs``; ``RouterConfig.FIELDS`` lists the
fields, ``PEERS`` the values of ``RouterConfig.peer`` (the frameworks whose
load-balance loss a preset reproduces, see :mod:`moe_router.presets`).
"""

from ._core import PEERS, RouterConfig

__all__ = ["PEERS", "RouterConfig"]

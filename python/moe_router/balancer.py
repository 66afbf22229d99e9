"""Expert load tracking and aux-loss-free balancing: ``LoadBalancer``.

The classes live in the Rust core (``moe_router._core``, documented there): the
balancer watches the per-expert load of successive training calls and keeps
the per-expert selection bias that the router adds to the scores of its next
call (DeepSeek-V3's auxiliary-loss-free load balancing).
"""

from ._core import DEFAULT_RELATIVE_BIAS_RATE, LoadBalancer, LoadBalancingStats, default_bias_update_rate

__all__ = ["DEFAULT_RELATIVE_BIAS_RATE", "LoadBalancer", "LoadBalancingStats", "default_bias_update_rate"]

"""Global-batch balancing: ``GlobalBalanceAccumulator`` with its all-reduce.

The statistics and the update rules live in the Rust core
(``moe_router._core.GlobalBalanceAccumulator``); this subclass adds the one
step that needs Python: summing the state of every rank through a backend of
:mod:`moe_router.distributed`.
"""

from __future__ import annotations

from typing import Any

from . import _core

__all__ = ["GlobalBalanceAccumulator"]


class GlobalBalanceAccumulator(_core.GlobalBalanceAccumulator):
    __doc__ = _core.GlobalBalanceAccumulator.__doc__

    def all_reduce(self, backend: Any) -> None:
        """Replace the statistics by their sum over the ranks of ``backend``.

        Every rank's state is gathered (``backend.allgather_object``) and
        summed in rank order, so every rank ends with the same bits (Megatron-Core
        all-reduces ``local_tokens_per_expert`` over TPxCPxDP the same way,
        once per global batch). Call it on every rank, after the last micro-batch
        and before :meth:`load_balance_loss`, :meth:`bias_update` or
        :meth:`quantile_bias_update`.

        Parameters
        ----------
        backend : moe_router.distributed.MPIBackend or TorchBackend
            Any object with ``allgather_object(obj) -> list`` in rank order.

        Raises
        ------
        InputError
            A rank's accumulator has another E or k, or the totals overflow
            (the statistics are then left as they were).
        """
        parts = backend.allgather_object(self)
        total = type(self)(self.num_experts, self.top_k)
        for part in parts:
            total.merge(part)
        self.reset()
        self.merge(total)

"""Expert parallelism over existing engines: MPI (mpi4py) and ``torch.distributed``.

Each rank routes its own tokens; :class:`ExpertParallelExchange` moves the
kept assignments to the ranks that hold their experts (an all-to-all, planned
in Rust by :meth:`DispatchPlan.all_to_all`), and the experts' outputs back.
The layout follows Megatron-Core's ``MoEAlltoAllTokenDispatcher``: counts
first, then tokens; on arrival rows are regrouped by local expert
("permutation 2"); the return trip is the same exchange with the splits
swapped, which is also the backward of the forward trip.

Backends wrap a communicator and provide three collectives: gather one
Python object from every rank, an equal-split all-to-all of int64 counts,
and a variable-split all-to-all of rows. No transport of our own.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _inputs
from ._core import ConfigError, ExpertPlacement, InputError, gather_rows
from .decision import RoutingDecision

__all__ = ["ExpertParallelExchange", "MPIBackend", "TorchBackend", "expert_parallel_forward"]


class MPIBackend:
    """Collectives over an mpi4py communicator (``Alltoall``/``Alltoallv``, counts in elements).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``. Install with ``pip install "moe_router[mpi]"``
        (mpi4py and the ``mpich`` wheel, whose ``mpiexec`` lands in the
        environment's ``bin/``).
    """

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allgather_object(self, obj: Any) -> List[Any]:
        return self.comm.allgather(obj)

    def alltoall_counts(self, counts: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(counts, dtype=np.int64)
        recv = np.empty_like(send)
        self.comm.Alltoall(send, recv)
        return recv

    def alltoallv(self, rows: np.ndarray, send_counts: np.ndarray, recv_counts: np.ndarray) -> np.ndarray:
        d = rows.shape[1]
        out = np.empty((int(recv_counts.sum()), d), dtype=rows.dtype)
        typ = self._mpi._typedict[rows.dtype.char] if rows.dtype != np.float16 else self._mpi.SHORT
        sc, rc = send_counts * d, recv_counts * d
        sd, rd = np.concatenate([[0], np.cumsum(sc)[:-1]]), np.concatenate([[0], np.cumsum(rc)[:-1]])
        self.comm.Alltoallv([rows, (sc, sd), typ], [out, (rc, rd), typ])
        return out


class TorchBackend:
    """Collectives over a ``torch.distributed`` process group (gloo on CPU: ``all_to_all_single``).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        Default: the world group (``torch.distributed.init_process_group`` must have run).
    """

    def __init__(self, group: Any = None) -> None:
        import torch
        import torch.distributed as dist

        self._torch, self._dist, self.group = torch, dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def allgather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def alltoall_counts(self, counts: np.ndarray) -> np.ndarray:
        send = self._torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
        recv = self._torch.empty_like(send)
        self._dist.all_to_all_single(recv, send, group=self.group)
        return recv.numpy()

    def alltoallv(self, rows: np.ndarray, send_counts: np.ndarray, recv_counts: np.ndarray) -> np.ndarray:
        send = self._torch.from_numpy(np.ascontiguousarray(rows))
        recv = self._torch.empty((int(recv_counts.sum()), rows.shape[1]), dtype=send.dtype)
        self._dist.all_to_all_single(recv, send, output_split_sizes=recv_counts.tolist(),
                                     input_split_sizes=send_counts.tolist(), group=self.group)
        return recv.numpy()


def _agree(backend: Any, problem: Optional[str], facts: Dict[str, Any]) -> None:
    """Every rank checks every other rank's ``facts`` and local ``problem`` before any token moves,
    so a disagreement raises on all ranks instead of hanging one of them."""
    everyone = backend.allgather_object((problem, facts))
    errors = [f"rank {r}: {p}" for r, (p, _) in enumerate(everyone) if p]
    for name in facts:
        values = [f[name] for _, f in everyone]
        if any(v != values[0] for v in values):
            errors.append(f"ranks disagree on {name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    if errors:
        raise ConfigError("expert-parallel exchange refused before any token moved: " + "; ".join(errors))


class ExpertParallelExchange:
    """One rank's side of the token exchange for one routing decision.

    Parameters
    ----------
    decision : RoutingDecision
        This rank's routing of its own tokens (T may differ between ranks, 0 included).
    placement : ExpertPlacement
        Which ranks hold each expert; the same on every rank.
    backend : MPIBackend or TorchBackend
    hidden_dim : int
        D, the width of the rows that will travel; the same on every rank.
    dtype : numpy dtype, default float32
        Of the rows; the same on every rank.

    Attributes
    ----------
    local_experts : numpy.ndarray, int64, shape [L]
        The experts this rank runs (global ids), in local order.
    expert_offsets : numpy.ndarray, int64, shape [L + 1]
        Rows of local expert l in :meth:`dispatch`'s output.
    stats : dict
        Rows and bytes sent and received per rank, filled as the exchange runs.

    Raises
    ------
    ConfigError
        On every rank, before any token moves, when the ranks disagree on E, k,
        D, the dtype or the placement, or when one rank's arguments are invalid.
    """

    def __init__(self, decision: RoutingDecision, placement: ExpertPlacement, backend: Any,
                 hidden_dim: int, dtype: Any = np.float32) -> None:
        self.backend, self.rank = backend, backend.rank
        dtype = np.dtype(dtype)
        problem = None
        if not isinstance(placement, ExpertPlacement):
            problem = f"placement must be an ExpertPlacement, got {type(placement).__name__}"
        elif placement.num_ranks != backend.size:
            problem = f"placement has {placement.num_ranks} ranks, the communicator {backend.size}"
        elif placement.num_experts != decision.num_experts:
            problem = f"placement has {placement.num_experts} experts, the decision {decision.num_experts}"
        facts = dict(num_experts=decision.num_experts, top_k=decision.top_k, hidden_dim=int(hidden_dim),
                     dtype=dtype.str, placement=placement.__getnewargs__() if problem is None else None)
        _agree(backend, problem, facts)
        self.plan = decision.dispatch_plan()
        self.send = self.plan.all_to_all(placement)
        received = backend.alltoall_counts(self.send.expert_counts)
        self.receive = self.send.receive(received, self.rank)
        self.local_experts, self.expert_offsets = self.receive.local_experts, self.receive.expert_offsets
        self.dtype, self.hidden_dim = dtype, int(hidden_dim)
        row = self.hidden_dim * dtype.itemsize
        self.stats: Dict[str, Any] = dict(
            rank=self.rank, rows_sent=self.send.send_counts.tolist(), rows_received=self.receive.recv_counts.tolist(),
            bytes_sent=int(self.send.send_counts.sum()) * row, bytes_received=int(self.receive.recv_counts.sum()) * row,
            seconds={})

    def _rows(self, x: Any, name: str, n: int) -> np.ndarray:
        a = np.asarray(x)
        if a.dtype != self.dtype or a.shape != (n, self.hidden_dim):
            raise InputError(f"{name} has shape {list(a.shape)} and dtype {a.dtype}, expected [{n}, "
                             f"{self.hidden_dim}] {self.dtype}")
        return np.ascontiguousarray(a)

    def _timed(self, step: str, f: Callable[[], np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter()
        out = f()
        self.stats["seconds"][step] = self.stats["seconds"].get(step, 0.0) + time.perf_counter() - t0
        return out

    def _there(self, rows: np.ndarray) -> np.ndarray:
        """Rows in send order -> rows of this rank's experts, expert-major."""
        got = self._timed("exchange", lambda: self.backend.alltoallv(rows, self.send.send_counts,
                                                                      self.receive.recv_counts))
        return gather_rows(got, self.receive.order)

    def _back(self, rows: np.ndarray) -> np.ndarray:
        """Rows of this rank's experts, expert-major -> rows in send order (the reverse trip)."""
        mine = gather_rows(rows, self.receive.inverse)
        return self._timed("exchange", lambda: self.backend.alltoallv(mine, self.receive.recv_counts,
                                                                       self.send.send_counts))

    def dispatch(self, hidden: Any) -> np.ndarray:
        """This rank's tokens ``[T, D]`` -> the rows its experts process ``[M_r, D]`` (expert-major)."""
        h = self._rows(np.asarray(hidden).reshape(-1, self.hidden_dim), "hidden", self.plan.num_tokens)
        return self._there(gather_rows(h, self.send.send_tokens))

    def combine(self, expert_out: Any, weighted: bool = True) -> np.ndarray:
        """The experts' outputs ``[M_r, D]`` -> this rank's tokens ``batch_shape + [D]`` (weighted sum)."""
        weighted = _inputs.flag(weighted, "weighted")  # before the exchange, not after it
        y = self._rows(expert_out, "expert_out", int(self.expert_offsets[-1]))
        return self.plan.combine(gather_rows(self._back(y), self.send.send_position), weighted=weighted)

    def dispatch_backward(self, grad_rows: Any) -> np.ndarray:
        """Backward of :meth:`dispatch`: gradient of the expert rows -> gradient of ``hidden`` ``[T, D]``."""
        g = self._rows(grad_rows, "grad_rows", int(self.expert_offsets[-1]))
        return self.plan.combine(gather_rows(self._back(g), self.send.send_position), weighted=False)

    def combine_backward(self, grad_out: Any, weighted: bool = True) -> np.ndarray:
        """Backward of :meth:`combine` (weights held constant): gradient of the tokens -> of the expert rows."""
        weighted = _inputs.flag(weighted, "weighted")
        g = self.plan.permute(np.ascontiguousarray(grad_out, dtype=self.dtype))
        if weighted:
            g *= self.plan.weights[:, None].astype(self.dtype)
        return self._there(gather_rows(g, self.send.send_rows))


def expert_parallel_forward(hidden_local: Any, decision_local: RoutingDecision,
                            experts: Callable[[int, np.ndarray], np.ndarray], placement: ExpertPlacement,
                            backend: Any, *, return_stats: bool = False) -> Any:
    """The MoE layer's expert part across ranks: send, run the local experts, return, combine.

    Parameters
    ----------
    hidden_local : array, float32/float64/float16, shape [T, D] or batch_shape + [D]
        This rank's tokens (the ones ``decision_local`` routed).
    decision_local : RoutingDecision
    experts : callable ``(expert_id, x [n, D]) -> [n, D]``
        Runs one of this rank's experts (global expert id) on its rows; called
        once per local expert that received rows, in local expert order.
    placement : ExpertPlacement
    backend : MPIBackend or TorchBackend
    return_stats : bool, default False
        Also return the exchange's statistics: rows and bytes per rank, seconds
        per step, and, gathered from every rank, the rows each rank's experts
        processed and their imbalance (max / mean).

    Returns
    -------
    numpy.ndarray, shape batch_shape + [D]
        ``y_t = sum over t's kept choices of w * expert(x_t)``: the single-process
        ``plan.combine`` of the same experts, computed where the experts live.
    (y, stats) when ``return_stats``.

    Raises
    ------
    ConfigError
        On every rank, before any exchange, when the ranks disagree (E, k, D,
        dtype, placement) or a rank's arguments are invalid.
    InputError
        An expert returns the wrong shape or dtype.
    """
    return_stats = _inputs.flag(return_stats, "return_stats")
    h = np.asarray(hidden_local)
    d = int(h.shape[-1]) if h.ndim >= 1 else 0
    ex = ExpertParallelExchange(decision_local, placement, backend, d, h.dtype)
    rows = ex.dispatch(h)
    out = np.empty_like(rows)
    t0 = time.perf_counter()
    for l, e in enumerate(ex.local_experts.tolist()):
        lo, hi = int(ex.expert_offsets[l]), int(ex.expert_offsets[l + 1])
        if hi > lo:
            out[lo:hi] = ex._rows(experts(e, rows[lo:hi]), f"experts({e}, ...)", hi - lo)
    ex.stats["seconds"]["experts"] = time.perf_counter() - t0
    y = ex.combine(out)
    if not return_stats:
        return y
    processed = backend.allgather_object(int(ex.expert_offsets[-1]))
    mean = sum(processed) / max(len(processed), 1)
    ex.stats.update(rows_processed_per_rank=processed,
                    rank_imbalance=(max(processed) / mean) if mean > 0 else 1.0)
    return y, ex.stats

"""``moe-router ep``: an expert-parallel forward across R processes (MPI or gloo), checked.

Every rank routes its share of the tokens (rows ``[r*T/R, (r+1)*T/R)`` of the
logits), gives each token a hidden vector (normal, seeded by the token's global
index), exchanges the kept assignments with ``expert_parallel_forward`` and
compares its output with the single-process forward of the same tokens through
the same experts (``x * (e + 1) + e / 4``: exact, so the check is bit for bit).
Rank 0 prints the per-rank loads, bytes and step times. Started without a
launcher, the command launches itself: ``mpiexec -n R`` (the MPI from the
``mpich`` wheel) or R gloo processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from typing import Any, Dict, List

import numpy as np

from .. import ExpertPlacement
from ..routing import route_logits
from .errors import CliError
from .loading import load_logits
from .parsing import config_from_args, config_summary
from .render import emit, render_ep

#: Set in the processes the command launches, so that they run instead of launching again.
CHILD_ENV = "MOE_ROUTER_EP_CHILD"
#: Variables a launcher sets in its processes (MPICH/Hydra, Open MPI, torchrun): already launched.
LAUNCHER_ENV = (CHILD_ENV, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE")


def _expert(e: int, x: np.ndarray) -> np.ndarray:
    return x * np.float32(e + 1) + np.float32(0.25 * e)


def _placement(num_experts: int, ranks: int, replicas: int) -> ExpertPlacement:
    """Contiguous when E divides by R (else round-robin), plus one extra copy of the first
    ``replicas`` experts on the next rank."""
    mapping = [e * ranks // num_experts for e in range(num_experts)]
    extra = {e: [(mapping[e] + 1) % ranks] for e in range(min(replicas, num_experts)) if ranks > 1}
    return ExpertPlacement(num_experts, ranks, mapping, extra)


def _launch(args: argparse.Namespace, argv: List[str]) -> int:
    env = dict(os.environ, **{CHILD_ENV: "1"})
    if args.backend == "mpi":
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
        if mpiexec is None:
            raise CliError('mpiexec not found: pip install "moe_router[mpi]" (mpi4py and the mpich wheel), '
                           f"or run: mpiexec -n {args.ranks} {sys.executable} -m moe_router {' '.join(argv)}")
        return subprocess.call([mpiexec, "-n", str(args.ranks), sys.executable, "-m", "moe_router", *argv], env=env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "moe_router", *argv], env=dict(
        env, RANK=str(r), WORLD_SIZE=str(args.ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        for r in range(args.ranks)]
    return max(p.wait() for p in procs)


def _check_backend(args: argparse.Namespace) -> None:
    """The backend's package imports (without starting it)."""
    try:
        if args.backend == "mpi":
            import mpi4py  # noqa: F401
        else:
            import torch.distributed  # noqa: F401
    except ImportError as err:
        need = 'pip install "moe_router[mpi]"' if args.backend == "mpi" else "pip install torch"
        raise CliError(f"the {args.backend} backend is not installed ({err}); {need}") from None


def _backend(args: argparse.Namespace) -> Any:
    try:
        if args.backend == "mpi":
            from ..distributed import MPIBackend

            return MPIBackend()
        import torch.distributed as dist

        from ..distributed import TorchBackend

        dist.init_process_group("gloo")
        return TorchBackend()
    except ImportError as err:
        need = 'pip install "moe_router[mpi]"' if args.backend == "mpi" else "pip install torch"
        raise CliError(f"the {args.backend} backend is not installed ({err}); {need}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``moe-router ep`` (launching the ranks first when started alone)."""
    if args.ranks > 1 and not any(name in os.environ for name in LAUNCHER_ENV):
        # Refuse bad input once, here, rather than once per launched process.
        logits, source = load_logits(args)
        route_logits(logits.reshape(-1, logits.shape[-1]), config_from_args(args, int(logits.shape[-1]),
                                                                            source["label"]))
        _check_backend(args)
        return _launch(args, args.argv)
    from ..distributed import expert_parallel_forward

    backend = _backend(args)
    rank, size = backend.rank, backend.size
    if size != args.ranks:
        raise CliError(f"--ranks {args.ranks} but the launcher started {size} processes")
    logits, source = load_logits(args)
    logits = logits.reshape(-1, logits.shape[-1])
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    lo, hi = rank * len(logits) // size, (rank + 1) * len(logits) // size
    rng = np.random.default_rng(lo)
    hidden = rng.standard_normal((hi - lo, args.hidden_dim)).astype(np.float32)
    dec = route_logits(logits[lo:hi], config)
    placement = _placement(config.num_experts, size, args.replicas)
    y, stats = expert_parallel_forward(hidden, dec, _expert, placement, backend, return_stats=True)
    plan = dec.dispatch_plan()
    rows = plan.permute(hidden)
    out = np.empty_like(rows)
    for e in range(config.num_experts):
        a, b = plan.expert_offsets[e], plan.expert_offsets[e + 1]
        out[a:b] = _expert(e, rows[a:b])
    stats.update(tokens=hi - lo, check=bool(np.array_equal(y, plan.combine(out))))
    everyone: List[Dict[str, Any]] = backend.allgather_object(stats)
    ok = all(s["check"] for s in everyone)
    if rank == 0:
        report = {"command": "ep", "source": source, "backend": args.backend, "ranks": size,
                  "config": config_summary(config, False), "hidden_dim": args.hidden_dim,
                  "replicated_experts": min(args.replicas, config.num_experts) if size > 1 else 0,
                  "rank_imbalance": everyone[0]["rank_imbalance"], "check_passed": ok, "per_rank": everyone}
        emit(report, args.json, render_ep)
    return 0 if ok else 1

"""The ``moe-router`` command line (also ``python -m moe_router``).

Commands
--------
``moe-router route [FILE] [options]``
    Route router logits (the embedded real-data sample when FILE is omitted)
    and print a report: capacity, per-expert load, drops, losses and the time
    the routing call took. ``--json`` prints the same content as one JSON object.
``moe-router route --hidden FILE.npz --weight-key W [--bias-key B] [options]``
    The hidden-state path: route ``hidden @ W + b`` with ``ExpertRouter`` (the
    router GEMM fused with the routing, in Rust), all three arrays read from one
    .npz file (hidden states from ``--hidden-key``, default ``hidden``); the same
    report, plus the router (linear, D, compute dtype).
``moe-router balance [FILE] --steps N [--rate R] [--plot OUT.png] [options]``
    Route one batch N times in training mode with the ``LoadBalancer``'s
    expert bias (aux-loss-free balancing) and print, per step, the max/mean
    pre-drop load, dropped assignments and dropped tokens; ``--plot`` draws the
    per-expert load of the first and last step (matplotlib, extra ``plot``).

``moe-router plan [FILE] [--alignment A] [--pad-to-capacity] [options]``
    Route and report the dispatch plan: rows per expert (real and padding), the
    padding overhead and the bytes a permute/combine of D-wide half-precision
    hidden states moves.

``moe-router ep [FILE] --ranks R [--backend mpi|gloo] [--replicas P]``
    An expert-parallel forward over R processes (launched with ``mpiexec -n R``
    or as R gloo processes), checked bit for bit against one process; rank 0
    prints rows and bytes sent and received per rank, step times and the rank imbalance.

``moe-router placement [FILE] --ranks R [--replicas P]``
    Each expert's routed load, and the placement advice (DeepSeek EPLB) with
    the max/mean rank load before (contiguous) and after.

``moe-router train FILE.npz [--steps N] [--plot OUT.png]``
    Train a linear router's weight with the closed-form gradients (NumPy Adam)
    on a balance loss plus a task proxy; per-step loads, drops and losses.

``moe-router route ... --record OUT.npz`` / ``--replay REC.npz``
    Write the routing's selection as a replay file, or route with a recorded one.
``moe-router replay-diff A B``
    Per layer, the tokens whose expert sets differ between two replay recordings
    and their share, the layers that differ, the tokens differing in any layer.

Layout
------
``parsing``
    The argument parser, option types and the ``RouterConfig`` the options describe.
``loading``
    One loader for input files (.npy/.npz, key selection), used for logits and hidden states.
``route``, ``balance``, ``plan``, ``ep``, ``placement``, ``train``, ``replay_diff``
    One module per command: ``run(args)`` builds the report as plain data.
``render``, ``plot``
    The report as rich text or JSON; the balance plot (matplotlib).

Every user-facing failure is raised as ``CliError`` (or one of the package's
``RouterError``/``ValueError``/``TypeError``) and turned into a one-line
message on stderr with exit status 2 by :func:`main`. The library never
imports this package.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Optional, Sequence

from . import balance, ep, placement, plan, replay_diff, route, train
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError
from .parsing import build_parser

__all__ = ["CliError", "build_parser", "main"]

#: Command name -> its handler.
COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {"route": route.run, "balance": balance.run,
                                                            "plan": plan.run, "ep": ep.run,
                                                            "placement": placement.run, "train": train.run,
                                                            "replay-diff": replay_diff.run}


def _fail(message: str) -> int:
    text = " ".join(str(message).split())
    sys.stderr.write(f"moe-router: error: {text}\n")
    return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moe-router`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        args.argv = list(sys.argv[1:] if argv is None else argv)
        handler = COMMANDS.get(args.command)
        if handler is None:
            names = list(COMMANDS)
            sys.stderr.write(f"moe-router: a command is required: {', '.join(names[:-1])} or {names[-1]} "
                             f"(see 'moe-router COMMAND --help')\n")
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(handler(args))
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except (CliError, ValueError, TypeError, OSError) as exc:  # RouterError is a ValueError
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

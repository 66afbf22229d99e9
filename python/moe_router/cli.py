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

Layout: one ``_add_<command>_parser`` and one ``_run_<command>`` per command,
registered in ``build_parser``; input loading (``load_array``), configuration
(``config_from_args``), timing (``time_routing``), the report as plain data
(``build_report``) and its two renderings (``render_text``, JSON) are separate
functions. Every user-facing failure is raised as ``CliError`` (or one of the
package's ``RouterError``/``ValueError``/``TypeError``) and turned into a
one-line message on stderr with exit status 2 by ``main``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, get_num_threads, set_num_threads
from ._core import RouterError
from .config import RouterConfig
from .balancer import DEFAULT_RELATIVE_BIAS_RATE, LoadBalancer
from .data import DEFAULT_LOGITS_FILE, default_logits
from .decision import RoutingDecision
from .router import ExpertRouter
from .routing import route_logits

EXIT_OK = 0
EXIT_USAGE = 2

#: Experts shown at each end of the load chart when there are too many to show all.
CHART_EDGE = 8
#: Width of the load bars, in characters.
BAR_WIDTH = 32
#: Column of the capacity mark in the load bars (when there is a capacity).
CAPACITY_COLUMN = 20
#: Routing calls timed when ``--repeat`` is not given (after one warm-up call).
DEFAULT_REPEAT = 5
#: Routing steps of ``moe-router balance`` when ``--steps`` is not given.
DEFAULT_BALANCE_STEPS = 50
#: Array holding the hidden states in a ``route --hidden`` file when ``--hidden-key`` is not given.
DEFAULT_HIDDEN_KEY = "hidden"
#: Values of ``route --router-dtype``.
ROUTER_DTYPES = ("float32", "float64")


class CliError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ``CliError`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- parsing


def _capacity_factor(text: str) -> Optional[float]:
    """``--capacity-factor`` value: a number, or ``none``/``dropless``/``inf`` for no limit."""
    if text.strip().lower() in ("none", "dropless", "inf", "infinity"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value == float("inf"):
        return None
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(
            f"expected a number > 0, or 'none' for dropless routing (no capacity limit), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_routing_options(p: argparse.ArgumentParser) -> None:
    """Options that build the ``RouterConfig`` (shared by every command that routes)."""
    g = p.add_argument_group("routing")
    g.add_argument("--num-experts", "-E", type=_positive_int, metavar="N",
                   help="E; defaults to the input's last dimension (a mismatch is an error)")
    g.add_argument("--top-k", "-k", type=_positive_int, default=2, metavar="K",
                   help="experts per token (default: 2)")
    g.add_argument("--capacity-factor", "-c", type=_capacity_factor, default=1.25, metavar="CF|none",
                   help="capacity = ceil(CF * T * k / E), exact decimal; 'none' = dropless (default: 1.25)")
    g.add_argument("--score-function", choices=("softmax", "sigmoid"), default="softmax",
                   help="score of each expert (default: softmax)")
    g.add_argument("--normalize-weights", action="store_true",
                   help="divide the k chosen scores by their sum (Mixtral, Qwen norm_topk_prob)")
    g.add_argument("--drop-policy", choices=("position", "rank", "probs", "bpr"), default="position",
                   help="which assignments survive when an expert is full (default: position)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and timing")
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")
    g.add_argument("--repeat", "-n", type=_positive_int, default=DEFAULT_REPEAT, metavar="N",
                   help=f"time N routing calls after one warm-up; report median and min "
                        f"(default: {DEFAULT_REPEAT})")
    g.add_argument("--threads", type=_non_negative_int, metavar="N",
                   help="routing threads (0: one per core; default: MOE_ROUTER_NUM_THREADS or one per core)")


def _add_route_parser(sub: Any) -> None:
    p = sub.add_parser(
        "route", help="route router logits and report loads, drops and losses",
        description="Route router logits and report capacity, per-expert load, drops, losses and "
                    "routing time. Without FILE, routes the embedded sample: 4096 real tokens, "
                    "64 experts (all-MiniLM-L6-v2 layer 5, MoEfication affinities).")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help=".npy or .npz file of float logits [T, E] or [B, S, E] (default: embedded sample)")
    p.add_argument("--key", metavar="NAME",
                   help="array inside an .npz file (optional when it holds a single 2-D/3-D float array)")
    h = p.add_argument_group(
        "hidden states", "route hidden states through a linear router instead of logits: "
                         "logits = hidden @ W + b, computed in Rust and fused with the routing")
    h.add_argument("--hidden", metavar="FILE.npz",
                   help=".npz file holding the hidden states [T, D] or [B, S, D] and the router weight [D, E] "
                        "(replaces FILE)")
    h.add_argument("--weight-key", metavar="NAME", help="router weight [D, E] in the --hidden file (required)")
    h.add_argument("--bias-key", metavar="NAME", help="router bias [E] in the --hidden file (default: no bias)")
    h.add_argument("--hidden-key", metavar="NAME",
                   help=f"hidden states in the --hidden file (default: {DEFAULT_HIDDEN_KEY})")
    h.add_argument("--router-dtype", choices=ROUTER_DTYPES,
                   help="precision of the router GEMM (default: float32 for float32 hidden states, "
                        "float64 for float64 and float16 ones)")
    _add_routing_options(p)
    _add_output_options(p)
    p.set_defaults(handler=_run_route)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):  # also NaN
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _add_balance_parser(sub: Any) -> None:
    p = sub.add_parser(
        "balance", help="route one batch repeatedly with the load balancer's expert bias; show loads fall",
        description="Route the same batch STEPS times in training mode (step = 0, 1, ...) with "
                    "aux-loss-free balancing on: after each step the LoadBalancer moves every expert's "
                    "selection bias by RATE toward balance (b_e += RATE * sign(mean load - load_e), "
                    "DeepSeek-V3), and the next step ranks experts by score + bias. Prints, per step, the "
                    "largest and mean per-expert load before capacity, dropped assignments and dropped "
                    "tokens. Without FILE, routes the embedded sample (4096 real tokens, 64 experts).")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help=".npy or .npz file of float logits [T, E] or [B, S, E] (default: embedded sample)")
    p.add_argument("--key", metavar="NAME",
                   help="array inside an .npz file (optional when it holds a single 2-D/3-D float array)")
    g = p.add_argument_group("balancing")
    g.add_argument("--steps", "-s", type=_positive_int, default=DEFAULT_BALANCE_STEPS, metavar="N",
                   help=f"routing steps (default: {DEFAULT_BALANCE_STEPS})")
    g.add_argument("--rate", "-r", type=_non_negative_float, metavar="R",
                   help=f"bias change per step, in score units (default: {DEFAULT_RELATIVE_BIAS_RATE:g}/E, "
                        f"the LoadBalancer default; DeepSeek-V3 uses 1e-3 on sigmoid scores)")
    _add_routing_options(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object")
    o.add_argument("--plot", metavar="OUT.png",
                   help="draw the per-expert load of the first and the last step as bar charts "
                        "(needs matplotlib: pip install 'moe_router[plot]')")
    o.add_argument("--threads", type=_non_negative_int, metavar="N",
                   help="routing threads (0: one per core; default: MOE_ROUTER_NUM_THREADS or one per core)")
    p.set_defaults(handler=_run_balance)


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-router`` argument parser (one subparser per command)."""
    parser = _Parser(prog="moe-router",
                     description="Mixture-of-Experts token router: exact top-k, capacity, drops and losses.")
    parser.add_argument("--version", action="version", version=f"moe-router {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_route_parser(sub)
    _add_balance_parser(sub)
    return parser


# --------------------------------------------------------------------------- input


def _npz_members(path: Path) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in an .npz, read from the headers only."""
    members: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            members[name[:-4]] = (tuple(shape), dtype)
    return members


def _is_logits_like(shape: Tuple[int, ...], dtype: np.dtype) -> bool:
    return len(shape) in (2, 3) and dtype.kind == "f"


def _describe(shape: Tuple[int, ...], dtype: np.dtype) -> str:
    return f"{list(shape)} {dtype}"


def load_array(file: str, key: Optional[str]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Read logits from an .npy or .npz file; returns the array and a description of its source.

    Raises
    ------
    CliError
        Missing or unreadable file, unknown suffix, missing or ambiguous ``key``,
        or an array that is not a 2-D/3-D floating-point array.
    """
    path = Path(file)
    if not path.exists():
        raise CliError(f"no such file: {file}")
    if path.is_dir():
        raise CliError(f"{file} is a directory, expected an .npy or .npz file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise CliError(f"--key applies to .npz files; {file} is an .npy file")
            array = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            members = _npz_members(path)
            if not members:
                raise CliError(f"{file} holds no arrays")
            if key is None:
                candidates = [k for k, (s, d) in members.items() if _is_logits_like(s, d)]
                if len(candidates) != 1:
                    listing = ", ".join(f"{k} {_describe(*members[k])}" for k in (candidates or members))
                    what = "several 2-D/3-D float arrays" if candidates else "no 2-D/3-D float array"
                    raise CliError(f"{file} holds {what}; choose one with --key NAME: {listing}")
                key = candidates[0]
            elif key not in members:
                raise CliError(f"{file} has no array {key!r}; its keys are: "
                               + ", ".join(f"{k} {_describe(*v)}" for k, v in members.items()))
            with np.load(path, allow_pickle=False) as z:
                array = z[key]
        else:
            raise CliError(f"{file}: unsupported file type {path.suffix or '(none)'!r}; expected .npy or .npz")
    except CliError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CliError(f"cannot read {file}: {exc}") from None
    name = f"{file}[{key}]" if key is not None else file
    if array.dtype.kind != "f":
        raise CliError(f"{name} has dtype {array.dtype}; router logits must be floating point")
    if array.ndim not in (2, 3):
        raise CliError(f"{name} has shape {list(array.shape)}; expected logits [T, E] or [B, S, E]")
    return array, {"kind": "file", "path": str(file), "key": key, "shape": list(array.shape),
                   "dtype": str(array.dtype), "label": name}


def load_default() -> Tuple[np.ndarray, Dict[str, Any]]:
    """The embedded default logits and a description of them."""
    logits, meta = default_logits()
    label = f"embedded {DEFAULT_LOGITS_FILE} ({meta.get('model', '?')}, layer {meta.get('layer', '?')})"
    return logits, {"kind": "embedded", "path": DEFAULT_LOGITS_FILE, "key": None,
                    "shape": list(logits.shape), "dtype": str(logits.dtype), "label": label, "meta": meta}


def load_logits(args: argparse.Namespace) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The logits a routing command works on (FILE, or the embedded default)."""
    if args.file is None:
        if args.key is not None:
            raise CliError("--key needs a FILE")
        return load_default()
    return load_array(args.file, args.key)


def _hidden_options_given(args: argparse.Namespace) -> List[str]:
    names = (("weight_key", "--weight-key"), ("bias_key", "--bias-key"), ("hidden_key", "--hidden-key"),
             ("router_dtype", "--router-dtype"))
    return [flag for attr, flag in names if getattr(args, attr, None) is not None]


def _npz_array(path: Path, members: Dict[str, Tuple[Tuple[int, ...], np.dtype]], key: str,
               option: str, file: str) -> np.ndarray:
    """One named array of an .npz (``option`` names the flag that chose it, for messages)."""
    if key not in members:
        raise CliError(f"{option} {key}: {file} has no array {key!r}; its keys are: "
                       + ", ".join(f"{k} {_describe(*v)}" for k, v in members.items()))
    try:
        with np.load(path, allow_pickle=False) as z:
            array = z[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CliError(f"cannot read {file}[{key}]: {exc}") from None
    if array.dtype.kind != "f":
        raise CliError(f"{option} {key}: {file}[{key}] has dtype {array.dtype}; expected floating point")
    return array


def effective_router_dtype(hidden_dtype: np.dtype, router_dtype: Optional[str]) -> str:
    """The dtype ``ExpertRouter`` computes the GEMM in (its ``router_dtype`` rule)."""
    if router_dtype is not None:
        return router_dtype
    return "float32" if np.dtype(hidden_dtype) == np.float32 else "float64"


def load_hidden(args: argparse.Namespace) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray],
                                                   Dict[str, Any], Dict[str, Any]]:
    """Hidden states, router weight and bias of ``route --hidden``; plus the source and
    router descriptions of the report.

    Raises
    ------
    CliError
        FILE or ``--key`` given as well, no ``--weight-key``, a file that is not a
        readable .npz, a missing key, or arrays whose shapes do not fit together.
    """
    file = args.hidden
    if args.file is not None:
        raise CliError(f"give either FILE ({args.file}) or --hidden {file}, not both")
    if args.key is not None:
        raise CliError("--key selects logits in FILE; with --hidden, choose the arrays with "
                       "--hidden-key, --weight-key and --bias-key")
    if args.weight_key is None:
        raise CliError("--hidden needs --weight-key NAME (the router weight [D, E] in the same file)")
    path = Path(file)
    if not path.exists():
        raise CliError(f"no such file: {file}")
    if path.is_dir() or path.suffix.lower() != ".npz":
        raise CliError(f"--hidden {file}: expected an .npz file holding the hidden states and the router weight")
    try:
        members = _npz_members(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CliError(f"cannot read {file}: {exc}") from None
    hidden_key = DEFAULT_HIDDEN_KEY if args.hidden_key is None else args.hidden_key
    hidden = _npz_array(path, members, hidden_key, "--hidden-key", file)
    if hidden.ndim not in (2, 3):
        raise CliError(f"--hidden-key {hidden_key}: {file}[{hidden_key}] has shape {list(hidden.shape)}; "
                       f"expected hidden states [T, D] or [B, S, D]")
    dim = int(hidden.shape[-1])
    weight = _npz_array(path, members, args.weight_key, "--weight-key", file)
    if weight.ndim != 2 or weight.shape[0] != dim:
        raise CliError(f"--weight-key {args.weight_key}: {file}[{args.weight_key}] has shape "
                       f"{list(weight.shape)}; expected [D, E] with D = {dim} (the hidden size of "
                       f"{hidden_key} {list(hidden.shape)})")
    experts = int(weight.shape[1])
    bias = None
    if args.bias_key is not None:
        bias = _npz_array(path, members, args.bias_key, "--bias-key", file)
        if bias.shape != (experts,):
            raise CliError(f"--bias-key {args.bias_key}: {file}[{args.bias_key}] has shape {list(bias.shape)}; "
                           f"expected [{experts}] (E of {args.weight_key} {list(weight.shape)})")
    label = f"{file}[{hidden_key}] @ {args.weight_key}" + ("" if bias is None else f" + {args.bias_key}")
    source = {"kind": "hidden", "path": str(file), "key": hidden_key, "shape": list(hidden.shape),
              "dtype": str(hidden.dtype), "label": label}
    router = {"kind": "linear", "input_dim": dim, "num_experts": experts,
              "dtype": effective_router_dtype(hidden.dtype, args.router_dtype),
              "router_dtype": args.router_dtype, "weight_key": args.weight_key, "bias_key": args.bias_key,
              "hidden_key": hidden_key}
    return hidden, weight, bias, source, router


# --------------------------------------------------------------------------- routing


def config_from_args(args: argparse.Namespace, input_experts: int, label: str) -> RouterConfig:
    """The ``RouterConfig`` the options describe, checked against the input's E."""
    num_experts = input_experts if args.num_experts is None else args.num_experts
    if num_experts != input_experts:
        raise CliError(f"--num-experts {num_experts} does not match the input: {label} has "
                       f"{input_experts} experts (its last dimension)")
    return RouterConfig(
        num_experts=num_experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        score_function=args.score_function,
        normalize_weights=args.normalize_weights,
        drop_policy=args.drop_policy,
    )


def time_routing(logits: np.ndarray, config: RouterConfig,
                 repeat: int) -> Tuple[RoutingDecision, List[float]]:
    """Route once (warm-up; its decision is returned), then time ``repeat`` more calls.

    Returns the decision and the ``repeat`` wall-clock times in seconds
    (``time.perf_counter`` around ``route_logits``).
    """
    decision = route_logits(logits, config)
    times: List[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        route_logits(logits, config)
        times.append(time.perf_counter() - start)
    return decision, times


def time_hidden_routing(router: ExpertRouter, hidden: np.ndarray,
                        repeat: int) -> Tuple[RoutingDecision, List[float]]:
    """As ``time_routing``, for ``router.route_tokens(hidden)`` (GEMM and routing; evaluation mode)."""
    decision = router.route_tokens(hidden)
    times: List[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        router.route_tokens(hidden)
        times.append(time.perf_counter() - start)
    return decision, times


def _chart_rows(decision: RoutingDecision) -> Tuple[List[int], int]:
    """Experts to chart (busiest first, by pre-drop load) and how many are left out."""
    pre = decision.pre_drop_tokens_per_expert
    kept = decision.tokens_per_expert
    order = sorted(range(pre.shape[0]), key=lambda e: (-int(pre[e]), -int(kept[e]), e))
    if len(order) <= 2 * CHART_EDGE:
        return order, 0
    return order[:CHART_EDGE] + order[-CHART_EDGE:], len(order) - 2 * CHART_EDGE


def build_report(decision: RoutingDecision, config: RouterConfig, source: Dict[str, Any],
                 times: List[float]) -> Dict[str, Any]:
    """Everything the report shows, as JSON-ready data (both renderings read this)."""
    d = decision.to_dict()
    capacity = decision.capacity
    kept = decision.tokens_per_expert
    pre = decision.pre_drop_tokens_per_expert
    chart, hidden = _chart_rows(decision)
    experts: List[Dict[str, Any]] = []
    for e in chart:
        n_kept, n_pre = int(kept[e]), int(pre[e])
        percent = None if decision.dropless or capacity == 0 else 100.0 * n_kept / capacity
        experts.append({"expert": e, "kept": n_kept, "pre_drop": n_pre, "dropped": n_pre - n_kept,
                        "capacity_percent": percent})
    report: Dict[str, Any] = {
        "source": source,
        "tokens": d["total_tokens"],
        "active_tokens": d["active_tokens"],
        "experts": d["num_experts"],
        "top_k": d["top_k"],
        "config": {
            "capacity_factor": config.capacity_factor,
            "score_function": config.score_function,
            "normalize_weights": config.normalize_weights,
            "drop_policy": config.drop_policy,
            "load_balance_loss_coeff": config.load_balance_loss_coeff,
            "router_z_loss_coeff": config.router_z_loss_coeff,
            "training": False,
        },
        "capacity": capacity,
        "dropless": d["dropless"],
        "assignments": d["active_tokens"] * d["top_k"],
        "kept_assignments": d["kept_assignments"],
        "dropped_assignments": d["dropped_assignments"],
        "tokens_dropped": d["tokens_dropped"],
        "routing_efficiency": d["routing_efficiency"],
        "experts_over_capacity": int(np.count_nonzero(pre > kept)),
        "experts_unused": int(np.count_nonzero(pre == 0)),
        "load_balance_cv": d["load_balance_cv"],
        "load_balance_loss": d["load_balance_loss"],
        "router_z_loss": d["router_z_loss"],
        "seq_load_balance_loss": d["seq_load_balance_loss"],
        "auxiliary_loss": d["auxiliary_loss"],
        "load_chart": {"experts": experts, "not_shown": hidden, "order": "pre_drop descending"},
        "tokens_per_expert": d["tokens_per_expert"],
        "pre_drop_tokens_per_expert": d["pre_drop_tokens_per_expert"],
        "timing": {
            "calls": len(times),
            "warmup_calls": 1,
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "threads": get_num_threads(),
        },
    }
    return report


# --------------------------------------------------------------------------- rendering


def _bar(kept: int, pre: int, capacity: Optional[int], scale_max: int, unicode: bool) -> Text:
    """A load bar: kept part, dropped part (cut with an arrow when it runs off), capacity mark.

    With a capacity, the mark sits at a fixed column (``CAPACITY_COLUMN``) so idle
    and overflowing experts are both readable; dropless bars scale to ``scale_max``.
    """
    full, over, mark, more = ("█", "░", "│", "»") if unicode else ("#", "x", "|", ">")
    if capacity:
        unit = CAPACITY_COLUMN / capacity
    else:
        unit = BAR_WIDTH / scale_max if scale_max > 0 else 0.0

    def cells_for(n: int) -> int:
        return 0 if n <= 0 else max(1, int(round(n * unit)))

    n_kept = min(BAR_WIDTH, cells_for(kept))
    n_pre = max(n_kept, cells_for(pre))
    cells = [(full, "green")] * n_kept + [(over, "red")] * (min(n_pre, BAR_WIDTH) - n_kept)
    cells += [(" ", "")] * (BAR_WIDTH - len(cells))
    if n_pre > BAR_WIDTH:
        cells[-1] = (more, "bold red")
    if capacity:
        at = CAPACITY_COLUMN
        cells[at] = (mark, "bold yellow")
    text = Text()
    for ch, style in cells:
        text.append(ch, style=style)
    return text


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms"


def render_text(report: Dict[str, Any], console: Console) -> None:
    """Print the report with rich: summary, load chart, drops, losses, timing."""
    unicode = (console.encoding or "").lower().replace("-", "").startswith("utf")
    cfg = report["config"]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("source", Text(report["source"]["label"]))
    router = report.get("router")
    if router is not None:
        summary.add_row("router", f"{router['kind']}, D={router['input_dim']}, dtype {router['dtype']}")
    shape = " x ".join(str(n) for n in report["source"]["shape"])
    summary.add_row("tokens", f"{report['tokens']}  (input {shape}, {report['source']['dtype']})")
    summary.add_row("experts", str(report["experts"]))
    summary.add_row("top_k", str(report["top_k"]))
    scoring = cfg["score_function"] + (", normalized weights" if cfg["normalize_weights"] else "")
    summary.add_row("scores", scoring)
    if report["dropless"]:
        summary.add_row("capacity", f"dropless (no limit; largest load {report['capacity']})")
    else:
        summary.add_row("capacity", f"{report['capacity']} per expert  (capacity_factor "
                                    f"{cfg['capacity_factor']!r}, drop_policy {cfg['drop_policy']})")
    console.print(Text("moe-router route", style="bold"))
    console.print(summary)
    console.print()

    rows = report["load_chart"]["experts"]
    cap = None if report["dropless"] else report["capacity"]
    scale_max = max([r["pre_drop"] for r in rows] + [cap or 0])
    chart = Table(title="Per-expert load (busiest and idlest, by routed assignments)",
                  title_justify="left", box=None, pad_edge=False, show_edge=False)
    chart.add_column("expert", justify="right")
    chart.add_column("load", no_wrap=True)
    chart.add_column("kept", justify="right")
    chart.add_column("routed", justify="right")
    chart.add_column("% cap", justify="right")
    for i, r in enumerate(rows):
        if report["load_chart"]["not_shown"] and i == CHART_EDGE:
            dots = "…" if unicode else "..."
            chart.add_row("", Text(f"{dots} {report['load_chart']['not_shown']} more experts {dots}", style="dim"),
                          "", "", "")
        pct = "-" if r["capacity_percent"] is None else f"{r['capacity_percent']:.0f}%"
        chart.add_row(str(r["expert"]), _bar(r["kept"], r["pre_drop"], cap, scale_max, unicode),
                      str(r["kept"]), str(r["pre_drop"]), pct)
    console.print(chart)
    legend = ("█ kept  ░ dropped  │ capacity  » more" if unicode else "# kept  x dropped  | capacity  > more")
    console.print(Text(legend, style="dim"))
    console.print(Text(f"experts over capacity: {report['experts_over_capacity']} of {report['experts']}; "
                       f"experts with no routed token: {report['experts_unused']}", style="dim"))
    console.print()

    stats = Table.grid(padding=(0, 2))
    stats.add_column(style="bold")
    stats.add_column(justify="right")
    stats.add_column(style="dim")
    assignments = report["assignments"]
    stats.add_row("dropped assignments", str(report["dropped_assignments"]),
                  f"of {assignments} (tokens x k)")
    stats.add_row("tokens dropped", str(report["tokens_dropped"]),
                  f"of {report['active_tokens']} (tokens with no kept expert)")
    stats.add_row("routing efficiency", f"{report['routing_efficiency']:.4f}", "kept / (tokens x k)")
    stats.add_row("load_balance_cv", f"{report['load_balance_cv']:.4f}", "std / mean of kept loads")
    stats.add_row("load_balance_loss", f"{report['load_balance_loss']:.6g}", "E * sum f_e P_e; 1.0 = balanced")
    stats.add_row("router_z_loss", f"{report['router_z_loss']:.6g}", "mean logsumexp(logits)^2")
    if report["seq_load_balance_loss"] is not None:
        stats.add_row("seq_load_balance_loss", f"{report['seq_load_balance_loss']:.6g}", "mean over sequences")
    stats.add_row("auxiliary_loss", f"{report['auxiliary_loss']:.6g}",
                  f"{cfg['load_balance_loss_coeff']:g} * lb + {cfg['router_z_loss_coeff']:g} * z")
    t = report["timing"]
    stats.add_row("routing time", _fmt_ms(t["median_ms"]),
                  f"median of {t['calls']} call{'s' if t['calls'] != 1 else ''} "
                  f"(min {_fmt_ms(t['min_ms'])}), {t['threads']} thread{'s' if t['threads'] != 1 else ''}")
    console.print(stats)


# --------------------------------------------------------------------------- commands


def _run_route(args: argparse.Namespace) -> int:
    if args.hidden is not None:
        return _run_route_hidden(args)
    given = _hidden_options_given(args)
    if given:
        raise CliError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the hidden-state path; "
                       f"add --hidden FILE.npz")
    logits, source = load_logits(args)
    if args.threads is not None:
        set_num_threads(args.threads)
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    decision, times = time_routing(logits, config, args.repeat)
    report = build_report(decision, config, source, times)
    return _print_route_report(report, args)


def _run_route_hidden(args: argparse.Namespace) -> int:
    hidden, weight, bias, source, router_info = load_hidden(args)
    if args.threads is not None:
        set_num_threads(args.threads)
    config = config_from_args(args, router_info["num_experts"],
                              f"{args.hidden}[{args.weight_key}] {list(weight.shape)}")
    router = ExpertRouter(config, router_info["input_dim"], weight=weight, bias=bias, gate="linear",
                          router_dtype=args.router_dtype)
    decision, times = time_hidden_routing(router, hidden, args.repeat)
    report = build_report(decision, config, source, times)
    report["router"] = router_info
    return _print_route_report(report, args)


def _print_route_report(report: Dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_text(report, Console(file=sys.stdout, highlight=False))
    return EXIT_OK


# --------------------------------------------------------------------------- balance


def _balance_step(step: int, decision: RoutingDecision, bias: np.ndarray) -> Dict[str, Any]:
    """One row of the balance report: pre-drop load extremes, drops, the bias this step used."""
    pre = decision.pre_drop_tokens_per_expert
    num_experts = int(pre.shape[0])
    mean = (decision.active_tokens * decision.top_k) / num_experts if num_experts else 0.0
    max_load = int(pre.max()) if num_experts else 0
    return {
        "step": step,
        "max_load": max_load,
        "min_load": int(pre.min()) if num_experts else 0,
        "mean_load": mean,
        "max_over_mean": None if mean <= 0 else max_load / mean,
        "dropped_assignments": decision.dropped_assignments,
        "tokens_dropped": decision.tokens_dropped,
        "load_balance_loss": decision.load_balance_loss,
        "bias_spread": float(bias.max() - bias.min()) if num_experts else 0.0,
    }


def run_balance(logits: np.ndarray, config: RouterConfig, steps: int,
                balancer: LoadBalancer) -> Tuple[List[Dict[str, Any]], RoutingDecision, RoutingDecision]:
    """Route ``logits`` ``steps`` times in training mode, feeding ``balancer`` after each step.

    Step ``i`` is routed with ``step=i`` and the bias the balancer holds after
    steps ``0 .. i-1``; an all-zero bias is passed as None, as ``ExpertRouter``
    does, so step 0 ranks by the logits. Returns one row per step (see
    ``_balance_step``) and the first and last decisions.
    """
    rows: List[Dict[str, Any]] = []
    first: Optional[RoutingDecision] = None
    decision: Optional[RoutingDecision] = None
    for i in range(steps):
        bias = balancer.expert_bias
        decision = route_logits(logits, config, training=True,
                                expert_bias=bias if bias.any() else None, step=i)
        rows.append(_balance_step(i, decision, bias))
        balancer.update(decision)
        if first is None:
            first = decision
    assert first is not None and decision is not None
    return rows, first, decision


def build_balance_report(rows: List[Dict[str, Any]], first: RoutingDecision, last: RoutingDecision,
                         config: RouterConfig, balancer: LoadBalancer, source: Dict[str, Any],
                         plot: Optional[str]) -> Dict[str, Any]:
    """The balance run as JSON-ready data (the text and JSON renderings both read it)."""
    stats = balancer.get_stats()
    return {
        "command": "balance",
        "source": source,
        "tokens": last.total_tokens,
        "active_tokens": last.active_tokens,
        "experts": last.num_experts,
        "top_k": last.top_k,
        "config": {
            "capacity_factor": config.capacity_factor,
            "score_function": config.score_function,
            "normalize_weights": config.normalize_weights,
            "drop_policy": config.drop_policy,
            "training": True,
        },
        "capacity": last.capacity,
        "dropless": last.dropless,
        "assignments": last.active_tokens * last.top_k,
        "rate": balancer.bias_update_rate,
        "steps": rows,
        "first": rows[0],
        "last": rows[-1],
        "pre_drop_tokens_per_expert": {"first": first.pre_drop_tokens_per_expert.tolist(),
                                       "last": last.pre_drop_tokens_per_expert.tolist()},
        "expert_bias": stats.expert_bias.tolist(),
        "balancer": {"ema_imbalance_ratio": stats.imbalance_ratio, "imbalanced": stats.imbalanced,
                     "load_cv": stats.load_cv(), "well_balanced": stats.is_well_balanced()},
        "plot": plot,
    }


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def render_balance_text(report: Dict[str, Any], console: Console) -> None:
    """Print the balance run with rich: setup, one table row per step, first-to-last summary."""
    cfg = report["config"]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("source", Text(report["source"]["label"]))
    summary.add_row("tokens", str(report["tokens"]))
    summary.add_row("experts", str(report["experts"]))
    summary.add_row("top_k", str(report["top_k"]))
    if report["dropless"]:
        summary.add_row("capacity", "dropless (no limit)")
    else:
        summary.add_row("capacity", f"{report['capacity']} per expert  (capacity_factor "
                                    f"{cfg['capacity_factor']!r}, drop_policy {cfg['drop_policy']})")
    summary.add_row("bias rate", f"{report['rate']:g} per step  (b_e += rate * sign(mean load - load_e))")
    console.print(Text("moe-router balance", style="bold"))
    console.print(summary)
    console.print()
    table = Table(title="Per step (loads are routed assignments, before capacity)", title_justify="left",
                  box=None, pad_edge=False, show_edge=False)
    for name in ("step", "max load", "mean load", "max/mean", "dropped assignments", "tokens dropped"):
        table.add_column(name, justify="right")
    for r in report["steps"]:
        table.add_row(str(r["step"]), str(r["max_load"]), f"{r['mean_load']:.1f}", _fmt_ratio(r["max_over_mean"]),
                      str(r["dropped_assignments"]), str(r["tokens_dropped"]))
    console.print(table)
    console.print()
    first, last = report["first"], report["last"]
    done = Table.grid(padding=(0, 2))
    done.add_column(style="bold")
    done.add_column()
    done.add_row("max/mean load", f"{_fmt_ratio(first['max_over_mean'])} -> {_fmt_ratio(last['max_over_mean'])}  "
                                  f"(step {first['step']} -> step {last['step']})")
    done.add_row("dropped assignments", f"{first['dropped_assignments']} -> {last['dropped_assignments']}  "
                                        f"(of {report['assignments']})")
    done.add_row("tokens dropped", f"{first['tokens_dropped']} -> {last['tokens_dropped']}")
    console.print(done)
    if report["plot"] is not None:
        console.print(Text(f"plot written to {report['plot']}"), soft_wrap=True)


def _plot_figure_class() -> Any:
    """matplotlib's ``Figure`` (imported lazily: matplotlib is the optional extra ``plot``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed; install the optional extra with "
                       "pip install 'moe_router[plot]'") from None
    return Figure


def _check_plot_path(path: str, figure_class: Any) -> None:
    out = Path(path)
    if out.is_dir():
        raise CliError(f"--plot {path} is a directory; give a file name such as load.png")
    if not out.parent.is_dir():
        raise CliError(f"--plot {path}: no such directory {str(out.parent)!r}")
    formats = figure_class().canvas.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix and suffix not in formats:
        raise CliError(f"--plot {path}: unsupported image type {out.suffix!r}; use one of "
                       + ", ".join("." + f for f in sorted(formats)))


def write_balance_plot(path: str, report: Dict[str, Any], figure_class: Any) -> None:
    """Bar charts of each expert's pre-drop load at the first and the last step, saved to ``path``."""
    first_load = report["pre_drop_tokens_per_expert"]["first"]
    last_load = report["pre_drop_tokens_per_expert"]["last"]
    experts = list(range(len(first_load)))
    fig = figure_class(figsize=(max(6.0, min(16.0, 0.12 * len(experts) + 4.0)), 6.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    panels = ((axes[0], first_load, report["first"], "before", "tab:red"),
              (axes[1], last_load, report["last"], "after", "tab:blue"))
    for ax, load, row, when, color in panels:
        ax.bar(experts, load, width=0.85, color=color)
        ax.axhline(row["mean_load"], color="black", linestyle="--", linewidth=1, label="mean load")
        if not report["dropless"]:
            ax.axhline(report["capacity"], color="tab:orange", linewidth=1, label="capacity")
        ax.set_title(f"{when}: step {row['step']}  (max/mean {_fmt_ratio(row['max_over_mean'])}, "
                     f"dropped assignments {row['dropped_assignments']})", fontsize=10)
        ax.set_ylabel("routed assignments")
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("expert")
    fig.suptitle(f"moe-router balance: {report['source']['label']}, E={report['experts']}, k={report['top_k']}, "
                 f"rate {report['rate']:.3g}", fontsize=11)
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot write the plot {path}: {exc}") from None


def _run_balance(args: argparse.Namespace) -> int:
    figure_class = None
    if args.plot is not None:
        figure_class = _plot_figure_class()
        _check_plot_path(args.plot, figure_class)
    logits, source = load_logits(args)
    if args.threads is not None:
        set_num_threads(args.threads)
    config = config_from_args(args, int(logits.shape[-1]), source["label"])
    balancer = LoadBalancer(config.num_experts, bias_update_rate=args.rate)
    rows, first, last = run_balance(logits, config, args.steps, balancer)
    report = build_balance_report(rows, first, last, config, balancer, source, args.plot)
    if figure_class is not None:
        write_balance_plot(args.plot, report, figure_class)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_balance_text(report, Console(file=sys.stdout, highlight=False))
    return EXIT_OK


def _fail(message: str) -> int:
    text = " ".join(str(message).split())
    sys.stderr.write(f"moe-router: error: {text}\n")
    return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moe-router`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.handler(args))
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except CliError as exc:
        return _fail(str(exc))
    except RouterError as exc:
        return _fail(str(exc))
    except (ValueError, TypeError, OSError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

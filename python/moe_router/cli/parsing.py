"""The ``moe-router`` argument parser and the ``RouterConfig`` its options describe."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Dict, NoReturn, Optional

from .. import __version__, set_num_threads
from ..balancer import DEFAULT_RELATIVE_BIAS_RATE
from ..config import RouterConfig
from .errors import CliError

#: Routing calls timed when ``--repeat`` is not given (after one warm-up call).
DEFAULT_REPEAT = 5
#: Routing steps of ``moe-router balance`` when ``--steps`` is not given.
DEFAULT_BALANCE_STEPS = 50
#: Array holding the hidden states in a ``route --hidden`` file when ``--hidden-key`` is not given.
DEFAULT_HIDDEN_KEY = "hidden"
#: Values of ``route --router-dtype``.
ROUTER_DTYPES = ("float32", "float64")
#: Experts shown at each end of the route load chart when ``--top`` is not given.
DEFAULT_CHART_EDGE = 8
#: Rows of the balance table above which it shows every Nth step (``--every`` unset).
MAX_TABLE_ROWS = 20
#: How to install the plot extra, as the package and from a source checkout.
PLOT_INSTALL = "pip install 'moe_router[plot]' (from a source checkout: pip install \".[plot]\")"
#: Words of ``--capacity-factor`` that mean dropless routing.
DROPLESS_WORDS = ("none", "dropless", "inf", "infinity")

INPUT_HELP = (".npy or .npz file of logits [T, E] or [B, S, E], floats or integers (default: embedded "
              "sample)")
SAMPLE_DESCRIPTION = "4096 real tokens, 64 experts"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ``CliError`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- option values


def _capacity_factor(text: str) -> Optional[float]:
    """``--capacity-factor`` value: a number, or ``none``/``dropless``/``inf`` for no limit."""
    if text.strip().lower() in DROPLESS_WORDS:
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


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An option type: an integer >= ``minimum``; ``expected`` describes it in the error message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):  # also NaN
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


# --------------------------------------------------------------------------- option groups


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    """FILE and ``--key``: the logits a command routes."""
    p.add_argument("file", nargs="?", metavar="FILE", help=INPUT_HELP)
    p.add_argument("--key", metavar="NAME",
                   help="array inside an .npz file (optional when it holds a single 2-D/3-D float array, "
                        "or no float array and a single integer one)")


def _add_routing_options(p: argparse.ArgumentParser) -> None:
    """Options that build the ``RouterConfig`` (shared by every command that routes)."""
    g = p.add_argument_group("routing")
    g.add_argument("--router", default="token_choice", metavar="ALGORITHM",
                   help="routing algorithm, RouterConfig.routing (default: token_choice); "
                        "a name the core does not know is reported with the accepted ones")
    g.add_argument("--num-experts", "-E", type=_positive_int, metavar="N",
                   help="E; defaults to the input's last dimension (a mismatch is an error)")
    g.add_argument("--top-k", "-k", type=_positive_int, default=2, metavar="K",
                   help="experts per token (default: 2)")
    g.add_argument("--capacity-factor", "-c", type=_capacity_factor, default=1.25, metavar="CF|none",
                   help="capacity = ceil(CF * T * k / E), exact decimal; 'none' = dropless (default: 1.25)")
    g.add_argument("--score-function", choices=("softmax", "sigmoid", "sqrtsoftplus"), default="softmax",
                   help="score of each expert (default: softmax)")
    g.add_argument("--normalize-weights", action="store_true",
                   help="divide the k chosen scores by their sum (Mixtral, Qwen norm_topk_prob)")
    g.add_argument("--drop-policy", choices=("position", "rank", "probs", "bpr", "bpr_rank"), default="position",
                   help="which assignments survive when an expert is full (default: position)")


def _add_json(g: Any) -> None:
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _add_threads(g: Any) -> None:
    g.add_argument("--threads", type=_non_negative_int, metavar="N",
                   help="routing threads (0: one per core; default: MOE_ROUTER_NUM_THREADS or one per core)")


def _add_route_parser(sub: Any) -> None:
    p = sub.add_parser(
        "route", help="route router logits and report loads, drops and losses",
        description="Route router logits and report capacity, per-expert load, drops, losses and "
                    "routing time. Without FILE, routes the embedded sample: "
                    f"{SAMPLE_DESCRIPTION} (all-MiniLM-L6-v2 layer 5, MoEfication affinities).")
    _add_input_arguments(p)
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
    p.add_argument_group("routing").add_argument(
        "--training", action="store_true",
        help="route in training mode (training capacity and noise; Sinkhorn routing acts only in training)")
    g = p.add_argument_group("output and timing")
    _add_json(g)
    g.add_argument("--repeat", "-n", type=_positive_int, default=DEFAULT_REPEAT, metavar="N",
                   help=f"time N routing calls after one warm-up; report median and min "
                        f"(default: {DEFAULT_REPEAT})")
    chart = g.add_mutually_exclusive_group()
    chart.add_argument("--top", type=_positive_int, default=DEFAULT_CHART_EDGE, metavar="N",
                       help=f"show the N busiest and the N idlest experts in the load chart "
                            f"(default: {DEFAULT_CHART_EDGE})")
    chart.add_argument("--all-experts", action="store_true", help="show every expert in the load chart")
    _add_threads(g)
    r = p.add_argument_group("router replay")
    r.add_argument("--record", metavar="OUT.npz",
                   help="write the routing's selection as a one-layer replay file (RecordedRoute.save), "
                        "for moe-router replay-diff or route --replay")
    r.add_argument("--replay", metavar="REC.npz",
                   help="route with the experts of this one-layer recording (router replay): weights, losses "
                        "and drops from the input's logits")


def _add_balance_parser(sub: Any) -> None:
    p = sub.add_parser(
        "balance", help="route one batch repeatedly with the load balancer's expert bias; show loads fall",
        description="Route the same batch STEPS times in training mode (step = 0, 1, ...) with "
                    "aux-loss-free balancing on: after each step the LoadBalancer moves every expert's "
                    "selection bias by RATE toward balance (b_e += RATE * sign(mean load - load_e), "
                    "DeepSeek-V3), and the next step ranks experts by score + bias. Prints, per step, the "
                    "largest and mean per-expert load before capacity, dropped assignments and dropped "
                    f"tokens. Without FILE, routes the embedded sample ({SAMPLE_DESCRIPTION}).")
    _add_input_arguments(p)
    g = p.add_argument_group("balancing")
    g.add_argument("--steps", "-s", type=_positive_int, default=DEFAULT_BALANCE_STEPS, metavar="N",
                   help=f"routing steps (default: {DEFAULT_BALANCE_STEPS})")
    g.add_argument("--rate", "-r", type=_non_negative_float, metavar="R",
                   help=f"bias change per step, in score units (default: {DEFAULT_RELATIVE_BIAS_RATE:g}/E, "
                        f"the LoadBalancer default; DeepSeek-V3 uses 1e-3 on sigmoid scores)")
    _add_routing_options(p)
    o = p.add_argument_group("output")
    _add_json(o)
    o.add_argument("--every", type=_positive_int, metavar="N",
                   help=f"show every Nth step in the table (and the last one); default: every step up to "
                        f"{MAX_TABLE_ROWS} steps, else a round N that keeps about {MAX_TABLE_ROWS} rows "
                        f"(--json always lists every step)")
    o.add_argument("--plot", metavar="OUT.png",
                   help=f"draw the per-expert load of the first and the last step as bar charts "
                        f"(needs matplotlib: {PLOT_INSTALL})")
    _add_threads(o)


def _add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="route logits and report the dispatch plan: rows per expert, padding, bytes moved",
        description="Route router logits and build the dispatch plan (expert-major rows, as "
                    "RoutingDecision.dispatch_plan): rows per expert, real and padding, the padding overhead, "
                    "and the bytes a permute and a combine of D-wide float16/bfloat16 hidden states move. "
                    f"Without FILE, routes the embedded sample ({SAMPLE_DESCRIPTION}).")
    _add_input_arguments(p)
    g = p.add_argument_group("layout")
    g.add_argument("--alignment", "-a", type=_positive_int, default=1, metavar="A",
                   help="pad each expert's rows to a multiple of A (vLLM block size, grouped-GEMM alignment)")
    g.add_argument("--pad-to-capacity", action="store_true",
                   help="give every expert exactly `capacity` rows (the [E, C, D] buffer; needs a capacity)")
    g.add_argument("--hidden-dim", "-D", type=_positive_int, default=4096, metavar="D",
                   help="hidden size used for the bytes-moved figures (default: 4096)")
    _add_routing_options(p)
    o = p.add_argument_group("output")
    _add_json(o)
    _add_threads(o)


def _add_ep_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ep", help="expert-parallel forward across R processes (MPI or gloo), checked against one process",
        description="Split the tokens over R processes; each routes its share, exchanges the kept assignments "
                    "with the ranks that hold their experts (all-to-all over MPI or torch.distributed gloo), "
                    "runs its experts and combines; the output is checked bit for bit against the "
                    "single-process forward. Launches itself (mpiexec -n R, or R gloo processes) when started "
                    f"alone. Without FILE, routes the embedded sample ({SAMPLE_DESCRIPTION}).")
    _add_input_arguments(p)
    g = p.add_argument_group("expert parallelism")
    g.add_argument("--ranks", "-R", type=_positive_int, default=2, metavar="R", help="processes (default: 2)")
    g.add_argument("--backend", choices=("mpi", "gloo"), default="mpi",
                   help='mpi (pip install "moe_router[mpi]") or gloo (torch.distributed; needs torch)')
    g.add_argument("--replicas", type=_non_negative_int, default=0, metavar="P",
                   help="give the first P experts a second copy on the next rank (default: 0)")
    g.add_argument("--hidden-dim", "-D", type=_positive_int, default=256, metavar="D",
                   help="width of the token vectors exchanged (default: 256)")
    _add_routing_options(p)
    _add_json(p.add_argument_group("output"))


def _add_placement_parser(sub: Any) -> None:
    p = sub.add_parser(
        "placement", help="count each expert's load and print the placement advice (DeepSeek EPLB) for R ranks",
        description="Route router logits, take each expert's routed (pre-drop) load and plan which rank holds "
                    "which experts (mr.plan_placement: replicate the hot experts, then pack an equal number per "
                    "rank, heaviest first), with the max/mean rank load before (contiguous) and after. Without "
                    f"FILE, routes the embedded sample ({SAMPLE_DESCRIPTION}).")
    _add_input_arguments(p)
    g = p.add_argument_group("placement")
    g.add_argument("--ranks", "-R", type=_positive_int, required=True, metavar="R", help="processes")
    g.add_argument("--replicas", type=_positive_int, metavar="P",
                   help="physical expert slots in all (>= E, a multiple of R; default E: no replicas)")
    _add_routing_options(p)
    o = p.add_argument_group("output")
    _add_json(o)
    _add_threads(o)


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a linear router with moe_router's gradients (NumPy Adam) on hidden states",
        description="Train the router weight and bias in FILE.npz on its hidden states: Adam on "
                    "COEFF * load_balance_loss + TASK * -log p(each token's initial top-1 expert), the gradient "
                    "from ExpertRouter.backward (closed form, in Rust). Prints max/mean expert load, dropped "
                    "assignments and both losses per step. E = the weight's columns, top_k 2, capacity 1.25.")
    p.add_argument("file", metavar="FILE.npz", help="hidden states and a router weight, e.g. "
                                                    "../shared/data/real_router/minilm_l5.npz")
    g = p.add_argument_group("arrays")
    g.add_argument("--hidden-key", default=DEFAULT_HIDDEN_KEY, metavar="NAME",
                   help=f"hidden states [T, D] (default: {DEFAULT_HIDDEN_KEY})")
    g.add_argument("--weight-key", default="router_weight_e64", metavar="NAME",
                   help="router weight [D, E] (default: router_weight_e64)")
    g.add_argument("--bias-key", default=None, metavar="NAME", help="router bias [E] (default: none)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", "-s", type=_positive_int, default=60, metavar="N", help="Adam steps (default: 60)")
    t.add_argument("--lr", type=_non_negative_float, default=0.02, metavar="LR", help="learning rate (default: 0.02)")
    t.add_argument("--coeff", type=_non_negative_float, default=1.0, metavar="C",
                   help="load_balance_loss_coeff (default: 1.0)")
    t.add_argument("--task-weight", type=_non_negative_float, default=0.05, metavar="W",
                   help="weight of the task proxy (default: 0.05)")
    o = p.add_argument_group("output")
    _add_json(o)
    o.add_argument("--plot", metavar="OUT.png", help=f"draw the curves (needs matplotlib: {PLOT_INSTALL})")


def _add_replay_diff_parser(sub: Any) -> None:
    p = sub.add_parser(
        "replay-diff", help="compare two router replay recordings: tokens whose expert sets differ, per layer",
        description="Load two replay recordings (.npz, RecordedRoutes.save or route --record) and report, per "
                    "layer, how many tokens' sets of experts differ (rank order ignored; a token routed in one "
                    "recording only counts as differing) and their share of the tokens routed in either, how "
                    "many layers differ at all and, when every layer has the same T, how many tokens differ in "
                    "at least one layer. Layers whose T, k or E differ, and layers present in one file only, "
                    "are reported as mismatches.")
    p.add_argument("a", metavar="A", help="first recording (.npz)")
    p.add_argument("b", metavar="B", help="second recording (.npz)")
    _add_json(p.add_argument_group("output"))


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-router`` argument parser: one subparser per command, its name in ``command``."""
    parser = _Parser(prog="moe-router",
                     description="Mixture-of-Experts token router: exact top-k, capacity, drops and losses.")
    parser.add_argument("--version", action="version", version=f"moe-router {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_route_parser(sub)
    _add_balance_parser(sub)
    _add_plan_parser(sub)
    _add_ep_parser(sub)
    _add_placement_parser(sub)
    _add_train_parser(sub)
    _add_replay_diff_parser(sub)
    return parser


# --------------------------------------------------------------------------- configuration


def config_from_args(args: argparse.Namespace, input_experts: int, label: str) -> RouterConfig:
    """The ``RouterConfig`` the options describe, checked against the input's E.

    Raises
    ------
    CliError
        ``--num-experts`` differs from ``input_experts`` (``label`` names the input).
    ConfigError
        The options do not make a valid configuration.
    """
    num_experts = input_experts if args.num_experts is None else args.num_experts
    if num_experts != input_experts:
        raise CliError(f"--num-experts {num_experts} does not match the input: {label} has "
                       f"{input_experts} experts (its last dimension)")
    return RouterConfig(
        routing=args.router,
        num_experts=num_experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        score_function=args.score_function,
        normalize_weights=args.normalize_weights,
        drop_policy=args.drop_policy,
    )


def config_summary(config: RouterConfig, training: bool, *extra: str) -> Dict[str, Any]:
    """The routing options of ``config`` as the reports show them (plus the fields ``extra``)."""
    summary: Dict[str, Any] = {
        "routing": config.routing,
        "capacity_factor": config.capacity_factor,
        "score_function": config.score_function,
        "normalize_weights": config.normalize_weights,
        "drop_policy": config.drop_policy,
    }
    for name in extra:
        summary[name] = getattr(config, name)
    summary["training"] = training
    return summary


def apply_threads(args: argparse.Namespace) -> None:
    """Set the routing thread count when ``--threads`` was given."""
    if args.threads is not None:
        set_num_threads(args.threads)

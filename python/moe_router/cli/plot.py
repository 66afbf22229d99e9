"""``moe-router balance --plot``: bar charts of the per-expert load (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from .errors import CliError
from .parsing import PLOT_INSTALL
from .render import fmt_ratio


def figure_class() -> Any:
    """matplotlib's ``Figure`` (imported lazily: matplotlib is the optional extra ``plot``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError(f"--plot needs matplotlib, which is not installed; install the optional extra with "
                       f"{PLOT_INSTALL}") from None
    return Figure


def check_plot_path(path: str, figure: Any) -> None:
    """Fail early, before routing, on an output path the plot cannot be written to."""
    out = Path(path)
    if out.is_dir():
        raise CliError(f"--plot {path} is a directory; give a file name such as load.png")
    if not out.parent.is_dir():
        raise CliError(f"--plot {path}: no such directory {str(out.parent)!r}")
    formats = figure().canvas.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix and suffix not in formats:
        raise CliError(f"--plot {path}: unsupported image type {out.suffix!r}; use one of "
                       + ", ".join("." + f for f in sorted(formats)))


def write_balance_plot(path: str, report: Dict[str, Any], figure: Any) -> None:
    """Bar charts of each expert's pre-drop load at the first and the last step, saved to ``path``."""
    first_load = report["pre_drop_tokens_per_expert"]["first"]
    last_load = report["pre_drop_tokens_per_expert"]["last"]
    experts = list(range(len(first_load)))
    fig = figure(figsize=(max(6.0, min(16.0, 0.12 * len(experts) + 4.0)), 6.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    panels = ((axes[0], first_load, report["first"], "before", "tab:red"),
              (axes[1], last_load, report["last"], "after", "tab:blue"))
    for ax, load, row, when, color in panels:
        ax.bar(experts, load, width=0.85, color=color)
        ax.axhline(row["mean_load"], color="black", linestyle="--", linewidth=1, label="mean load")
        if not report["dropless"]:
            ax.axhline(report["capacity"], color="tab:orange", linewidth=1, label="capacity")
        ax.set_title(f"{when}: step {row['step']}  (max/mean {fmt_ratio(row['max_over_mean'])}, "
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

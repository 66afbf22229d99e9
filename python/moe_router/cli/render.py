"""Rendering of the command reports: rich text on a console, or one JSON object.

The commands build their report as plain JSON-ready data; :func:`emit` prints
it as JSON or through the command's text renderer (:func:`render_route`,
:func:`render_balance`).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .._json import json_ready
from .errors import EXIT_OK

#: Width of the load bars, in characters.
BAR_WIDTH = 32
#: Column of the capacity mark in the load bars (when there is a capacity).
CAPACITY_COLUMN = 20

Report = Dict[str, Any]
Cell = Union[str, Text]


def emit(report: Report, as_json: bool, render: Callable[[Report, Console], None]) -> int:
    """Print ``report`` to stdout as indented JSON or with ``render``; returns the exit status 0.

    The JSON is strict: a float that is not finite (an overflowing loss) is ``null``
    (:func:`moe_router._json.json_ready`), never ``Infinity`` or ``NaN``.
    """
    if as_json:
        sys.stdout.write(json.dumps(json_ready(report), indent=2, allow_nan=False) + "\n")
    else:
        render(report, Console(file=sys.stdout, highlight=False))
    return EXIT_OK


def _grid(rows: Iterable[Sequence[Cell]], columns: Sequence[Dict[str, Any]] = ({"style": "bold"}, {})) -> Table:
    """A borderless grid (two columns by default: bold name, value) holding ``rows``."""
    grid = Table.grid(padding=(0, 2))
    for column in columns:
        grid.add_column(**column)
    for row in rows:
        grid.add_row(*row)
    return grid


def _capacity_row(report: Report, dropless: str) -> Sequence[Cell]:
    cfg = report["config"]
    if report["dropless"]:
        return ("capacity", dropless)
    return ("capacity", f"{report['capacity']} per expert  (capacity_factor "
                        f"{cfg['capacity_factor']!r}, drop_policy {cfg['drop_policy']})")


def _print_summary(console: Console, command: str, rows: Iterable[Sequence[Cell]]) -> None:
    console.print(Text(f"moe-router {command}", style="bold"))
    console.print(_grid(rows))
    console.print()


def _plain_table(console: Console, title: str) -> Table:
    """A borderless table, its title printed first as a line of its own (not wrapped to the table's width)."""
    console.print(Text(title, style="italic"), soft_wrap=True)
    return Table(box=None, pad_edge=False, show_edge=False)


# --------------------------------------------------------------------------- route


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
        cells[CAPACITY_COLUMN] = (mark, "bold yellow")
    text = Text()
    for ch, style in cells:
        text.append(ch, style=style)
    return text


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _print_load_chart(report: Report, console: Console, unicode: bool) -> None:
    """The per-expert load chart and its legend. Dropless routing has no capacity and
    drops nothing: its chart has no capacity column and its legend names neither."""
    rows = report["load_chart"]["experts"]
    not_shown, edge = report["load_chart"]["not_shown"], report["load_chart"]["edge"]
    dropless = report["dropless"]
    cap = None if dropless else report["capacity"]
    scale_max = max([r["pre_drop"] for r in rows] + [cap or 0])
    which = "busiest and idlest" if not_shown else "every expert"
    chart = _plain_table(console, f"Per-expert load ({which}, by routed assignments)")
    columns = ["expert", "load", "kept", "routed"] + ([] if dropless else ["% cap"])
    for name in columns:
        chart.add_column(name, **({"no_wrap": True} if name == "load" else {"justify": "right"}))
    for i, r in enumerate(rows):
        if not_shown and i == edge:
            dots = "…" if unicode else "..."
            chart.add_row("", Text(f"{dots} {not_shown} more experts {dots}", style="dim"),
                          *[""] * (len(columns) - 2))
        cells: List[Cell] = [str(r["expert"]), _bar(r["kept"], r["pre_drop"], cap, scale_max, unicode), str(r["kept"]),
                 str(r["pre_drop"])]
        if not dropless:
            cells.append("-" if r["capacity_percent"] is None else f"{r['capacity_percent']:.0f}%")
        chart.add_row(*cells)
    console.print(chart)
    if dropless:
        legend = "█ kept (bars scale to the largest load)" if unicode else "# kept (bars scale to the largest load)"
        notes = f"experts with no routed token: {report['experts_unused']}"
    else:
        legend = "█ kept  ░ dropped  │ capacity  » more" if unicode else "# kept  x dropped  | capacity  > more"
        notes = (f"experts over capacity: {report['experts_over_capacity']} of {report['experts']}; "
                 f"experts with no routed token: {report['experts_unused']}")
    console.print(Text(legend, style="dim"))
    console.print(Text(notes, style="dim"))
    console.print()


def render_route(report: Report, console: Console) -> None:
    """Print the route report with rich: summary, load chart, drops, losses, timing."""
    unicode = (console.encoding or "").lower().replace("-", "").startswith("utf")
    cfg = report["config"]
    source = report["source"]
    summary: List[Sequence[Cell]] = [("source", Text(source["label"]))]
    router = report.get("router")
    if router is not None:
        summary.append(("router", f"{router['kind']}, D={router['input_dim']}, dtype {router['dtype']}"))
    shape = " x ".join(str(n) for n in source["shape"])
    replay = report.get("replay") or {}
    if replay.get("replayed"):
        summary.append(("replay", f"experts from {replay['replayed']} (weights from this input)"))
    summary += [
        ("routing", f"{cfg['routing']} ({'training' if cfg['training'] else 'evaluation'})"),
        ("tokens", f"{report['tokens']}  (input {shape}, {source['dtype']})"),
        ("experts", str(report["experts"])),
        ("top_k", str(report["top_k"])),
        ("scores", cfg["score_function"] + (", normalized weights" if cfg["normalize_weights"] else "")),
        _capacity_row(report, f"dropless (no limit; largest load {report['capacity']})"),
    ]
    _print_summary(console, "route", summary)

    _print_load_chart(report, console, unicode)

    t = report["timing"]
    stats: List[Sequence[Cell]] = [
        # Under expert choice no assignment is dropped: the experts pick tokens, and a
        # token's [T, k] columns that no expert filled are counted instead.
        ("unfilled token columns", str(report["dropped_assignments"]),
         f"of {report['assignments']} (tokens x k; experts choose their tokens)")
        if cfg["routing"] == "expert_choice" else
        ("dropped assignments", str(report["dropped_assignments"]), f"of {report['assignments']} (tokens x k)"),
        ("tokens dropped", str(report["tokens_dropped"]),
         f"of {report['active_tokens']} (tokens with no kept expert)"),
        ("routing efficiency", f"{report['routing_efficiency']:.4f}", "kept / (tokens x k)"),
        ("load_balance_cv", f"{report['load_balance_cv']:.4f}", "std / mean of kept loads"),
        ("load_balance_loss", f"{report['load_balance_loss']:.6g}", "E * sum f_e P_e; 1.0 = balanced"),
        ("router_z_loss", f"{report['router_z_loss']:.6g}", "mean logsumexp(logits)^2"),
    ]
    if report["seq_load_balance_loss"] is not None:
        stats.append(("seq_load_balance_loss", f"{report['seq_load_balance_loss']:.6g}", "mean over sequences"))
    if report.get("sinkhorn_iterations") is not None:
        stats.append(("sinkhorn iterations", str(report["sinkhorn_iterations"]),
                      "converged" if report["sinkhorn_converged"] else "stopped at sinkhorn_max_iterations"))
    stats += [
        ("auxiliary_loss", f"{report['auxiliary_loss']:.6g}",
         f"{cfg['load_balance_loss_coeff']:g} * lb + {cfg['router_z_loss_coeff']:g} * z"),
        ("routing time", _fmt_ms(t["median_ms"]),
         f"median of {_plural(t['calls'], 'call')} (min {_fmt_ms(t['min_ms'])}), {_plural(t['threads'], 'thread')}"),
    ]
    console.print(_grid(stats, ({"style": "bold"}, {"justify": "right"}, {"style": "dim"})))
    if replay.get("recorded"):
        console.print(Text(f"recorded the selection to {replay['recorded']}", style="dim"))


# --------------------------------------------------------------------------- balance


def table_every(steps: int, every: Optional[int], max_rows: int) -> int:
    """The stride of the balance table: ``every`` if given, 1 for at most ``max_rows`` steps,
    else the smallest of 2, 5, 10, 20, 50, 100, ... that keeps about ``max_rows`` rows."""
    if every is not None:
        return every
    stride, scale = 1, 1
    while steps > stride * max_rows:
        for m in (2, 5, 10):
            stride = m * scale
            if steps <= stride * max_rows:
                break
        scale *= 10
    return stride


def progress_console() -> Console:
    """Where progress bars go: standard error (they are shown only on a terminal)."""
    return Console(file=sys.stderr)


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[], None]]:
    """A transient rich progress bar of ``total`` steps on a terminal's standard error;
    yields the function that advances it (which does nothing when not on a terminal)."""
    console = progress_console()
    if not console.is_terminal:
        yield lambda: None
        return
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def fmt_ratio(x: Optional[float]) -> str:
    """A max/mean ratio with two decimals, ``-`` when undefined."""
    return "-" if x is None else f"{x:.2f}"


def render_balance(report: Report, console: Console) -> None:
    """Print the balance run with rich: setup, one table row per step, first-to-last summary."""
    _print_summary(console, "balance", [
        ("source", Text(report["source"]["label"])),
        ("tokens", str(report["tokens"])),
        ("experts", str(report["experts"])),
        ("top_k", str(report["top_k"])),
        _capacity_row(report, "dropless (no limit)"),
        ("bias rate", f"{report['rate']:g} per step  (b_e += rate * sign(mean load - load_e))"),
    ])
    every = report["table_every"]
    which = "" if every == 1 else f"; one row per {every} steps, and the last"
    table = _plain_table(console, f"Per step (loads are routed assignments, before capacity{which})")
    for name in ("step", "max load", "mean load", "max/mean", "dropped assignments", "tokens dropped"):
        table.add_column(name, justify="right")
    steps = report["steps"]
    for i, r in enumerate(steps):
        if i % every == 0 or i == len(steps) - 1:
            table.add_row(str(r["step"]), str(r["max_load"]), f"{r['mean_load']:.1f}",
                          fmt_ratio(r["max_over_mean"]), str(r["dropped_assignments"]), str(r["tokens_dropped"]))
    console.print(table)
    console.print()
    first, last = report["first"], report["last"]
    console.print(_grid([
        ("max/mean load", f"{fmt_ratio(first['max_over_mean'])} -> {fmt_ratio(last['max_over_mean'])}  "
                          f"(step {first['step']} -> step {last['step']})"),
        ("dropped assignments", f"{first['dropped_assignments']} -> {last['dropped_assignments']}  "
                                f"(of {report['assignments']})"),
        ("tokens dropped", f"{first['tokens_dropped']} -> {last['tokens_dropped']}"),
    ]))
    if report["plot"] is not None:
        console.print(Text(f"plot written to {report['plot']}"), soft_wrap=True)


# --------------------------------------------------------------------------- plan


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_plan(report: Report, console: Console) -> None:
    """The ``moe-router plan`` report: layout summary, then rows per expert."""
    src = report["source"]
    layout = f"alignment {report['alignment']}" + (", padded to capacity" if report["pad_to_capacity"] else "")
    _print_summary(console, "plan", [
        ("input", src["label"]),
        ("tokens", f"{report['tokens']} x {report['experts']} experts, top_k {report['top_k']}"),
        _capacity_row(report, "none (dropless)"),
        ("layout", layout),
        ("rows", f"{report['num_rows']} ({report['real_rows']} real, {report['padding_rows']} padding = "
                 f"{report['padding_percent']:.1f} %)"),
        ("bytes moved", f"permute {_bytes(report['permute_bytes'])}, combine {_bytes(report['combine_bytes'])} "
                        f"(D = {report['hidden_dim']}, float16/bfloat16)"),
    ])
    table = _plain_table(console, "rows per expert (expert-major; offsets are cumulative)")
    for name in ("expert", "rows", "real", "padding"):
        table.add_column(name, justify="right")
    for row in report["per_expert"]:
        table.add_row(str(row["expert"]), str(row["rows"]), str(row["real"]), str(row["padding"]))
    console.print(table)


# --------------------------------------------------------------------------- ep


def render_ep(report: Report, console: Console) -> None:
    """The ``moe-router ep`` report: setup, the check, then one row per rank."""
    _print_summary(console, "ep", [
        ("input", report["source"]["label"]),
        ("ranks", f"{report['ranks']} over {report['backend']}, D = {report['hidden_dim']}, "
                  f"{report['replicated_experts']} replicated experts"),
        ("rank imbalance", f"{report['rank_imbalance']:.3f} (max / mean rows processed)"),
        ("check", "passed: equal to the single-process forward, bit for bit" if report["check_passed"]
         else "FAILED: differs from the single-process forward"),
    ])
    table = _plain_table(console, "per rank (rows and bytes of this rank's kept assignments; seconds per step)")
    for name in ("rank", "tokens", "rows sent", "rows received", "processed", "MiB sent", "MiB received",
                 "exchange s", "experts s"):
        table.add_column(name, justify="right")
    for r, s in enumerate(report["per_rank"]):
        table.add_row(str(r), str(s["tokens"]), str(sum(s["rows_sent"])), str(sum(s["rows_received"])),
                      str(s["rows_processed_per_rank"][r]), f"{s['bytes_sent'] / 2**20:.2f}",
                      f"{s['bytes_received'] / 2**20:.2f}", f"{s['seconds'].get('exchange', 0.0):.4f}",
                      f"{s['seconds'].get('experts', 0.0):.4f}")
    console.print(table)


# --------------------------------------------------------------------------- placement


def render_placement(report: Report, console: Console) -> None:
    """The ``moe-router placement`` report: imbalance before and after, then the experts of each rank."""
    before = report["imbalance_before"]
    _print_summary(console, "placement", [
        ("input", report["source"]["label"]),
        ("ranks", f"{report['ranks']}, {report['physical_slots']} physical expert slots"),
        ("max/mean rank load", f"{fmt_ratio(before)} contiguous -> {fmt_ratio(report['imbalance_after'])} planned "
                               f"(DeepSeek EPLB: replicate, then balanced packing)"),
    ])
    table = _plain_table(console, "experts per rank (planned)")
    for name in ("rank", "load", "experts"):
        table.add_column(name, justify="right" if name != "experts" else "left")
    hosts: List[List[int]] = [[] for _ in range(report["ranks"])]
    for e, ranks in enumerate(report["expert_ranks"]):
        for r in ranks:
            hosts[r].append(e)
    for r, experts in enumerate(hosts):
        table.add_row(str(r), f"{report['rank_load_after'][r]:g}", " ".join(map(str, experts)))
    console.print(table)


# --------------------------------------------------------------------------- train


def render_train(report: Report, console: Console) -> None:
    """The ``moe-router train`` report: one row per shown step."""
    _print_summary(console, "train", [
        ("input", report["file"]),
        ("objective", f"{report['coeff']:g} * load_balance_loss + {report['task_weight']:g} * "
                      f"-log p(initial top-1 expert)"),
        ("optimizer", f"Adam, lr {report['lr']:g}, {report['steps']} steps"),
    ])
    table = _plain_table(console, "per step")
    for name in ("step", "max/mean load", "dropped", "load_balance_loss", "task (-log p)"):
        table.add_column(name, justify="right")
    history = report["history"]
    every = table_every(len(history), None, 20)
    for i, h in enumerate(history):
        if i % every == 0 or i == len(history) - 1:
            table.add_row(str(h["step"]), f"{h['max_mean_load']:.2f}", str(h["dropped_assignments"]),
                          f"{h['load_balance_loss']:.4f}", f"{h['task_loss']:.4f}")
    console.print(table)


# --------------------------------------------------------------------------- replay-diff


def render_replay_diff(report: Report, console: Console) -> None:
    """The ``moe-router replay-diff`` report: the totals, then one row per layer."""
    a, b = report["a"], report["b"]
    rows: List[Sequence[Cell]] = [("A", f"{a['path']} ({_plural(a['layers'], 'layer')})"),
                                  ("B", f"{b['path']} ({_plural(b['layers'], 'layer')})"),
                                  ("layers differing", f"{report['layers_differing']} of {report['layers_compared']} "
                                                       f"compared ({100 * report['layers_differing_share']:.1f} %)")]
    if report["any_layer"] is not None:
        anyl = report["any_layer"]
        rows.append(("tokens differing in any layer", f"{anyl['differing_tokens']} of {anyl['routed_tokens']} "
                                                      f"({100 * anyl['differing_share']:.1f} %)"))
    if not report["comparable"]:
        rows.append(("mismatch", Text("the recordings do not match in layers or shape (see the table)",
                                      style="bold red")))
    _print_summary(console, "replay-diff", rows)
    table = _plain_table(console, "per layer (a token differs when its set of experts differs, or it is routed in "
                                  "one recording only)")
    for name in ("layer", "tokens", "routed", "differing", "share"):
        table.add_column(name, justify="right")
    for row in report["layers"]:
        if row["mismatch"] is not None:
            table.add_row(str(row["layer"]), Text(f"mismatch: {row['mismatch']}", style="red"), "", "", "")
        else:
            table.add_row(str(row["layer"]), str(row["tokens"]), str(row["routed_tokens"]),
                          str(row["differing_tokens"]), f"{100 * row['differing_share']:.1f} %")
    console.print(table)

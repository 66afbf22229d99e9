"""Pytest plugin of ``test_conformance.py``: tallies how each peer vector variant ended.

``test_conformance.py`` registers it with ``pytest_plugins``; every variant test
calls :func:`record` once with its outcome, and the terminal summary prints the
counts (reproduced exactly, tied-invariant, skipped by reason, failed) in a
normal ``pytest`` run, whatever ``-q``/``-s`` say.
"""

from __future__ import annotations

import collections
from typing import Counter, Dict

EXACT = "reproduced exactly"
TIED = "tied-invariant"
FAILED = "failed"

#: outcome -> count; skipped outcomes are keyed "skipped: <reason>".
COUNTS: Counter = collections.Counter()
#: variant id -> outcome (the last one recorded, for reruns in one session).
OUTCOMES: Dict[str, str] = {}


def record(variant: str, outcome: str) -> None:
    """Count ``variant``'s outcome (one of EXACT, TIED, FAILED or "skipped: reason")."""
    previous = OUTCOMES.get(variant)
    if previous is not None:
        COUNTS[previous] -= 1
    OUTCOMES[variant] = outcome
    COUNTS[outcome] += 1


def summary_lines() -> list:
    """The tally as text lines (empty when no variant ran)."""
    if not OUTCOMES:
        return []
    skipped = {k: v for k, v in COUNTS.items() if k.startswith("skipped") and v}
    lines = [
        f"peer vectors: {len(OUTCOMES)} variants: {COUNTS[EXACT]} reproduced exactly, "
        f"{COUNTS[TIED]} tied-invariant, {sum(skipped.values())} skipped, {COUNTS[FAILED]} failed",
    ]
    for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {n:4d}  {reason}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: D401 - pytest hook
    lines = summary_lines()
    if lines:
        terminalreporter.section("moe_router peer conformance")
        for line in lines:
            terminalreporter.write_line(line)

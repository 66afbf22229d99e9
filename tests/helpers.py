"""Helpers shared by the test modules, one definition each.

- NumPy arithmetic the tests compare the package against: scores and
  logsumexp, in float64 (the loop-by-loop reference router lives in
  ``reference.py``);
- running the ``moe-router`` command line in-process and checking its JSON
  report or its one-line error.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

from moe_router.cli import main


def softmax(z: np.ndarray) -> np.ndarray:
    """float64 softmax over the last axis (``-inf`` entries get 0)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """float64 element-wise ``1 / (1 + exp(-z))`` (0 where ``exp(-z)`` overflows)."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def scores(z: np.ndarray, score_function: str = "softmax") -> np.ndarray:
    """The router scores of ``z``: ``softmax`` over the last axis or element-wise ``sigmoid``."""
    return sigmoid(z) if score_function == "sigmoid" else softmax(z)


def logsumexp(z: np.ndarray) -> np.ndarray:
    """float64 logsumexp over the last axis (``-inf`` entries contribute 0)."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


# --------------------------------------------------------------------------- command line

#: Report fields that must equal the RoutingDecision's own values (report key -> ``to_dict`` key).
DECISION_FIELDS = {
    "capacity": "capacity",
    "dropless": "dropless",
    "kept_assignments": "kept_assignments",
    "dropped_assignments": "dropped_assignments",
    "tokens_dropped": "tokens_dropped",
    "routing_efficiency": "routing_efficiency",
    "load_balance_cv": "load_balance_cv",
    "load_balance_loss": "load_balance_loss",
    "router_z_loss": "router_z_loss",
    "seq_load_balance_loss": "seq_load_balance_loss",
    "auxiliary_loss": "auxiliary_loss",
    "tokens_per_expert": "tokens_per_expert",
    "pre_drop_tokens_per_expert": "pre_drop_tokens_per_expert",
    "tokens": "total_tokens",
    "active_tokens": "active_tokens",
    "experts": "num_experts",
    "top_k": "top_k",
}


def cli_json(capsys: pytest.CaptureFixture, *argv: str) -> Dict[str, Any]:
    """Run ``moe-router argv`` (which must ask for ``--json``): exit 0, nothing on stderr; the report."""
    assert main(list(argv)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def text_report(capsys: pytest.CaptureFixture, *argv: str) -> Tuple[str, List[str], Callable[[str], str]]:
    """Run ``moe-router argv`` (text output): exit 0, nothing on stderr.

    Returns the output, its lines and ``row(label)``: the first line starting with ``label``.
    """
    assert main(list(argv)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()

    def row(label: str) -> str:
        found = [line for line in lines if line.startswith(label)]
        assert found, f"no line starting with {label!r} in:\n{out}"
        return found[0]

    return out, lines, row


def route_json(capsys: pytest.CaptureFixture, *argv: str) -> Dict[str, Any]:
    """The JSON report of ``moe-router route argv`` timed with one call."""
    return cli_json(capsys, "route", *argv, "--json", "--repeat", "1")


def balance_json(capsys: pytest.CaptureFixture, *argv: str) -> Dict[str, Any]:
    """The JSON report of ``moe-router balance argv``."""
    return cli_json(capsys, "balance", *argv, "--json")


def run_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run ``moe-router argv``: exit 2, nothing on stdout, one ``moe-router: error:`` line (returned)."""
    assert main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("moe-router: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def assert_matches(report: Dict[str, Any], decision: Any) -> None:
    """Every field of ``DECISION_FIELDS`` in ``report`` equals the decision's own value."""
    expected = decision.to_dict()
    for field, key in DECISION_FIELDS.items():
        assert report[field] == expected[key], field


def is_documented_getter(cls: type, name: str) -> bool:
    """True when ``cls.name`` is a documented property with no setter: a Python ``property``
    or a compiled class's getter (a getset descriptor; writing it raises ``AttributeError``)."""
    import types

    prop = vars(cls)[name]
    if isinstance(prop, property):
        return prop.fset is None and bool(prop.__doc__)
    return isinstance(prop, types.GetSetDescriptorType) and bool(prop.__doc__)


def waits_for_lock(obj: Any, read: Callable[[], Any]) -> bool:
    """True when ``read()`` waits while this thread holds ``obj._lock`` and finishes once it is released."""
    import threading

    started, done = threading.Event(), threading.Event()

    def run() -> None:
        started.set()
        read()
        done.set()

    with obj._lock:
        thread = threading.Thread(target=run)
        thread.start()
        started.wait(5.0)
        waited = not done.wait(0.02)
    thread.join(5.0)
    return waited and done.is_set()


def same_at_thread_counts(compute: Callable[[], Any], set_threads: Callable[[int], Any],
                          counts: Tuple[int, ...] = (1, 2, 3)) -> Any:
    """``compute()`` run with each thread count; asserts every array of the results is
    bit-identical across the counts and returns the first result."""
    got = []
    for n in counts:
        set_threads(n)
        got.append(compute())
    for other in got[1:]:
        for a, b in zip(got[0], other):
            np.testing.assert_array_equal(a, b)
    return got[0]

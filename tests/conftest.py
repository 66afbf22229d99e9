"""Shared fixtures of the moe_router test suite.

The shared folder (bug-report cases, real router logits) lives beside the
repository: ``<repo>/../shared``. Tests that need it skip with a clear reason
when it is absent; in CI it is present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

import moe_router as mr

TESTS_DIR = Path(__file__).resolve().parent
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
CASES_PATH = SHARED_DIR / "cases" / "cases.json"
REAL_ROUTER_DIR = SHARED_DIR / "data" / "real_router"
REAL_ROUTER_FILES = ("minilm_l3.npz", "minilm_l5.npz")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "package_bug: the test exposes a known bug in the moe_router package (it fails until the "
        "package is fixed; deselect with -m 'not package_bug')",
    )


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the shared folder is expected beside the repository)")
    return path


def load_cases() -> List[Dict[str, Any]]:
    """The bug-report cases (``json`` accepts the NaN/Infinity they contain); [] when absent."""
    if not CASES_PATH.exists():
        return []
    with CASES_PATH.open() as fh:
        return json.load(fh)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``bug_case`` by the cases of cases.json, one test per case name."""
    if "bug_case" in metafunc.fixturenames:
        cases = load_cases()
        if cases:
            metafunc.parametrize("bug_case", cases, ids=[c["name"] for c in cases])
        else:  # the test skips through its cases_path fixture
            metafunc.parametrize("bug_case", [None], ids=["cases-json-missing"])


@pytest.fixture(scope="session")
def all_cases(cases_path: Path) -> List[Dict[str, Any]]:
    return load_cases()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder; skips the test when it is absent."""
    return _require(SHARED_DIR, "shared folder")


@pytest.fixture(scope="session")
def cases_path() -> Path:
    return _require(CASES_PATH, "cases.json")


@pytest.fixture(scope="session")
def real_router_dir() -> Path:
    return _require(REAL_ROUTER_DIR, "real router data")


_REAL_CACHE: Dict[tuple, np.ndarray] = {}


@pytest.fixture(scope="session")
def real_logits(real_router_dir: Path):
    """``real_logits(file_name, E)``: the [16384, E] float32 logits of one real-router file (cached)."""

    def load(name: str, experts: int) -> np.ndarray:
        key = (name, experts)
        if key not in _REAL_CACHE:
            path = _require(real_router_dir / name, f"real router file {name}")
            with np.load(path) as data:
                _REAL_CACHE[key] = np.asarray(data[f"logits_e{experts}"])
        return _REAL_CACHE[key]

    return load


@pytest.fixture
def restore_threads():
    """For tests that change the thread count: back to rayon's global pool afterwards."""
    try:
        yield mr.set_num_threads
    finally:
        mr.set_num_threads(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240531)

"""Shared fixtures of the moe_router test suite.

The shared folder (bug-report cases, real router logits, peer vectors) lives
beside the repository: ``<repo>/../shared``. Every path into it is defined
here. Tests that need it skip with the reason when it is absent (a user's
clone); with the environment variable ``CI=true`` they fail instead, so CI
cannot pass without running them.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any, Dict, List, NoReturn

import numpy as np
import pytest

import moe_router as mr

TESTS_DIR = Path(__file__).resolve().parent
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
CASES_PATH = SHARED_DIR / "cases" / "cases.json"
REAL_ROUTER_DIR = SHARED_DIR / "data" / "real_router"
REAL_ROUTER_FILES = ("minilm_l3.npz", "minilm_l5.npz")
REAL_L5 = REAL_ROUTER_DIR / "minilm_l5.npz"
VECTORS_DIR = SHARED_DIR / "peers" / "vectors"
#: Peer vectors of this repository where float32 scores saturate (``tests/data/saturation/make_vectors.py``).
SATURATION_DIR = TESTS_DIR / "data" / "saturation"
#: In CI (``CI=true``) missing shared data fails the tests that need it instead of skipping them.
IN_CI = os.environ.get("CI", "").strip().lower() == "true"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "package_bug: the test exposes a known bug in the moe_router package (it fails until the "
        "package is fixed; deselect with -m 'not package_bug')",
    )
    config.addinivalue_line(
        "markers",
        "timing: checks wall-clock latency in a subprocess (a few seconds; deselect with -m 'not timing')",
    )


def shared_missing(what: str, path: Path) -> NoReturn:
    """Skip the running test because ``what`` is missing at ``path``; fail it when ``CI=true``."""
    reason = f"{what} not found at {path} (the shared folder is expected beside the repository)"
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def require_shared(path: Path, what: str) -> Path:
    """``path`` if it exists; otherwise :func:`shared_missing`."""
    if not path.exists():
        shared_missing(what, path)
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
    return require_shared(SHARED_DIR, "shared folder")


@pytest.fixture(scope="session")
def cases_path() -> Path:
    return require_shared(CASES_PATH, "cases.json")


@pytest.fixture(scope="session")
def real_router_dir() -> Path:
    return require_shared(REAL_ROUTER_DIR, "real router data")


@pytest.fixture(scope="session")
def real_router_files(real_router_dir: Path) -> Dict[str, Path]:
    """File name -> path of each real-router file (``REAL_ROUTER_FILES``)."""
    return {name: require_shared(real_router_dir / name, f"real router file {name}") for name in REAL_ROUTER_FILES}


#: Marks a test that reads the real-router files through the constants above.
needs_real_router = pytest.mark.usefixtures("real_router_files")


_REAL_CACHE: Dict[tuple, np.ndarray] = {}


@pytest.fixture(scope="session")
def real_logits(real_router_dir: Path):
    """``real_logits(file_name, E)``: the [16384, E] float32 logits of one real-router file (cached)."""

    def load(name: str, experts: int) -> np.ndarray:
        key = (name, experts)
        if key not in _REAL_CACHE:
            path = require_shared(real_router_dir / name, f"real router file {name}")
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
def no_gc():
    """For tests that check which freed output the package hands out next: a garbage
    collection in the middle could drop some other output of the same size (a cycle
    left by an earlier test, torch's included) and change which buffer comes back."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240531)

"""The type stub lists exactly the configuration fields the core defines.

mypy.stubtest cannot see ``RouterConfig``'s fields (they are read through the
core by name), so this test compares the stub with ``RouterConfig.FIELDS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moe_router as mr
from moe_router import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def _router_config_stub() -> ast.ClassDef:
    tree = ast.parse(STUB.read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RouterConfig")


def test_stub_attributes_are_the_core_fields() -> None:
    cls = _router_config_stub()
    attrs = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    assert [a for a in attrs if a not in ("FIELDS", "num_experts_per_token")] == list(mr.RouterConfig.FIELDS)


def test_stub_constructor_takes_every_field() -> None:
    new = next(n for n in _router_config_stub().body if isinstance(n, ast.FunctionDef) and n.name == "__new__")
    names = [a.arg for a in new.args.args[1:] + new.args.kwonlyargs]
    assert names == list(mr.RouterConfig.FIELDS) + ["num_experts_per_token"]


def test_every_field_round_trips_through_python() -> None:
    cfg = mr.RouterConfig()
    assert sorted(cfg.to_dict()) == sorted(mr.RouterConfig.FIELDS)
    assert mr.RouterConfig(**cfg.to_dict()) == cfg
    assert set(mr.RouterConfig.FIELDS) <= set(dir(cfg))

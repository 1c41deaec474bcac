"""Dependency direction: the core never imports the frontend; one module per driver."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path.relative_to(ROOT).as_posix()] = names
    return found


def test_core_never_imports_the_frontend_or_quart() -> None:
    for module, names in imports("wsrunner").items():
        assert not names & {"frontend", "quart", "quart_trio", "hypercorn"}, module


def test_only_the_adapters_import_the_drivers() -> None:
    core = imports("wsrunner")
    # resp.py is the native trio client of the per-task calls; only queue.py uses it.
    # provision.py is the operator's tool that makes wsrunner's ACL user (no event loop).
    assert {m for m, n in core.items() if "redis" in n or "hiredis" in n} == {
        "wsrunner/queue.py",
        "wsrunner/resp.py",
        "wsrunner/provision.py",
    }
    # libpq.py drives libpq from the trio thread for the per-task statements; only store.py uses it.
    assert {m for m, n in core.items() if "psycopg" in n or "psycopg_pool" in n} == {
        "wsrunner/libpq.py",
        "wsrunner/store.py",
    }
    assert {m for m, n in core.items() if "sqlite3" in n} == {"wsrunner/sqlite.py"}
    for module, names in imports("frontend").items():
        assert not names & {"redis", "psycopg", "sqlite3"}, module


def test_only_the_composition_root_imports_the_adapters() -> None:
    """Everything else depends on the Protocols in wsrunner.ports."""
    for path in (ROOT / "wsrunner").rglob("*.py"):
        if path.name in (
            "daemon.py",
            "queue.py",
            "store.py",
            "sqlite.py",
            "local.py",
            "resp.py",
            "libpq.py",
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in (
                "wsrunner.queue",
                "wsrunner.resp",
                "wsrunner.libpq",
                "wsrunner.store",
                "wsrunner.sqlite",
                "wsrunner.local",
            ):
                raise AssertionError(f"{path.name} imports {node.module}; depend on wsrunner.ports")

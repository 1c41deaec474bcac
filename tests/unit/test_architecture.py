"""The import rules of the layout (README, "Layout"), checked on the source.

wsrunner/backends/{redis,postgres,embedded}/   adapters behind the ports; they know only
                                               the shared types, never the core or each other
wsrunner/engine/      poller, slots, runner, leases: through wsrunner.ports only
wsrunner/execution/   steps, processes, sandbox, git
wsrunner/workspace/   directories, contained paths, search, operations
wsrunner/policy/      the command policy: a leaf
wsrunner/client/      the HTTP client and its commands: usable without the daemon
wsrunner/daemon.py    the composition root: the one module that picks the adapters
frontend/             HTTP; the core never imports it
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The modules every layer may use: values, errors, the wire format, the ports, the claim rules.
SHARED = {
    "wsrunner",
    "wsrunner.errors",
    "wsrunner.models",
    "wsrunner.payload",
    "wsrunner.ports",
    "wsrunner.turns",
}
DRIVERS = {"redis", "hiredis", "psycopg", "psycopg_pool", "sqlite3"}


def modules(package: str) -> dict[str, set[str]]:
    """Module (dotted) -> the modules it imports (dotted, absolute; `from a import b` gives
    `a.b` when that is a module, else `a`)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names}
                submodules = {m for m in submodules if _is_module(m)}
                # `from pkg import module`: the module; `from module import name`: the module.
                names |= submodules or {node.module}
        found[name] = names
    return found


def _is_module(dotted: str) -> bool:
    path = ROOT / Path(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


CORE = modules("wsrunner")


def test_core_never_imports_the_frontend_or_quart() -> None:
    for module, names in CORE.items():
        assert not _top(names) & {"frontend", "quart", "quart_trio", "hypercorn"}, module


def test_each_driver_is_imported_by_its_backend_alone() -> None:
    # provision.py is the operator's tool that makes wsrunner's accounts (no event loop).
    allowed = {
        "redis": ("wsrunner.backends.redis", "wsrunner.backends.provision"),
        "hiredis": ("wsrunner.backends.redis",),
        "psycopg": ("wsrunner.backends.postgres", "wsrunner.backends.provision"),
        "psycopg_pool": ("wsrunner.backends.postgres",),
        "sqlite3": ("wsrunner.backends.embedded",),
    }
    for module, names in CORE.items():
        for driver in _top(names) & DRIVERS:
            assert module.startswith(allowed[driver]), f"{module} imports {driver}"
    for module, names in modules("frontend").items():
        assert not _top(names) & DRIVERS, module


def test_a_backend_knows_the_shared_types_only() -> None:
    """No adapter imports the core, another backend, or another backend's concrete class."""
    for module, names in CORE.items():
        if not module.startswith("wsrunner.backends.") or module == "wsrunner.backends.provision":
            continue
        own = ".".join(module.split(".")[:3])
        for name in names:
            if name.startswith("wsrunner"):
                assert name in SHARED or name.startswith(own), f"{module} imports {name}"


def test_only_the_composition_root_picks_the_adapters() -> None:
    """Everything else depends on the Protocols in wsrunner.ports."""
    for module, names in CORE.items():
        if module.startswith("wsrunner.backends") or module == "wsrunner.daemon":
            continue
        for name in names:
            if name.startswith("wsrunner.backends") and name != "wsrunner.backends.provision":
                raise AssertionError(f"{module} imports {name}; depend on wsrunner.ports")


def test_the_leaves_stay_leaves() -> None:
    """The policy and the HTTP client are used on their own (`policy check`, a client library)."""
    for module, names in CORE.items():
        inner = {n for n in names if n.startswith("wsrunner") and n not in SHARED}
        if module.startswith("wsrunner.policy"):
            assert all(n.startswith("wsrunner.policy") for n in inner), (module, inner)
        if module.startswith("wsrunner.client"):
            assert all(n.startswith("wsrunner.client") for n in inner), (module, inner)


def test_the_engine_and_the_workspace_never_reach_up() -> None:
    """engine/, execution/ and workspace/ never import the facade, the CLI or the root."""
    upper = ("wsrunner.service", "wsrunner.cli", "wsrunner.daemon", "wsrunner.client")
    for module, names in CORE.items():
        if module.startswith(("wsrunner.engine", "wsrunner.execution", "wsrunner.workspace")):
            assert not {n for n in names if n.startswith(upper)}, module


def test_the_frontend_reaches_the_core_through_the_facade() -> None:
    """frontend/ imports from wsrunner only what an HTTP layer over the facade needs, and never
    reaches into the facade's parts (`service.queue`, `.store`, `.ops`, `.workspace`, `.tokens`).

    Allowed, and why:
        wsrunner           `__version__`, for the OpenAPI documents' info
        wsrunner.service   the facade: Service, and Submitted (what submit returns)
        wsrunner.errors    the errors problems.py maps to statuses; handlers raise a few
        wsrunner.models    the values handlers turn into JSON (TaskRecord, ApiToken, states)
        wsrunner.taskshape the task's shape: the models that validate a task, which the
                           documents show for the submit body and the configuration
        wsrunner.metrics   Metrics, which the apps time requests into; /metrics' CONTENT_TYPE
        wsrunner.settings  Settings, in the signature of `serve`, the entry point the daemon calls
    """
    allowed = {"wsrunner", "wsrunner.service", "wsrunner.errors", "wsrunner.models"}
    allowed |= {"wsrunner.taskshape", "wsrunner.metrics", "wsrunner.settings"}
    internals = {"queue", "store", "ops", "workspace", "tokens"}
    for module, names in modules("frontend").items():
        assert {n for n in names if n.startswith("wsrunner")} <= allowed, module
    for path in (ROOT / "frontend").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in internals:
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}")


def test_ports_are_narrow_roles() -> None:
    """Each role in wsrunner.ports declares at most eight methods; `Queue` and `Store` only
    gather roles (they declare nothing of their own)."""
    tree = ast.parse((ROOT / "wsrunner" / "ports.py").read_text())
    roles = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name, node in roles.items():
        methods = [
            n.name for n in node.body if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
        ]
        if name in ("Queue", "Store"):
            assert not methods, f"{name} declares {methods}: put them in a role"
        else:
            assert 1 <= len(methods) <= 8, f"{name} has {len(methods)} methods: {methods}"

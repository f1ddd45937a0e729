"""The layout of sync_service stays true (docs/architecture.md): imports run downward only.

Every import of every module of sync_service (those inside functions too) is
read from the source; a module may import from its own layer or the ones
below it, never from one above, and no chain of imports comes back to where
it started. The rules also stay pure (no I/O, clock, database or wire), and
the shared package fieldsync/ imports no service.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first: a module may import from its own layer and those below.
LAYERS: dict[str, int] = {
    "rules": 0,  # schema, decode, merge, textmerge: pure
    "storage": 1,  # the seam and its SQL implementation, one file per engine
    "writes": 2,  # the write use case
    "relay": 2,  # outbox -> audit service
    "retention": 2,  # history pruning, a task of the service
    "api": 3,  # gRPC <-> domain
    "feed": 3,  # cursors and wake-ups of the RPCs
    "config": 4,  # process: settings, wiring, entry point
    "schema_file": 4,
    "server": 4,
    "__main__": 4,
}

# What a pure rule may not use: I/O, the clock, threads, the database, the wire.
IMPURE = (
    "asyncio",
    "grpc",
    "os",
    "pathlib",
    "psycopg",
    "random",
    "socket",
    "sqlalchemy",
    "sqlite3",
    "threading",
    "time",
    "yaml",
    "fieldsync.db",
    "fieldsync.v1",
    "fieldsync.auth",
)

SERVICES = ("sync_service", "audit_service", "fieldsync_client")


def _modules(package: str) -> dict[str, Path]:
    base = ROOT / package
    out = {}
    for path in sorted(base.rglob("*.py")):
        if ".venv" in path.parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The modules `name` imports (as dotted names) and the line of each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from package import module`
                    yield sub, node.lineno


SYNC = _modules("sync_service")


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {
        name: [(t, line) for t, line in _imports(name, path, SYNC) if t in SYNC and t != name]
        for name, path in SYNC.items()
    }


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return None if len(parts) == 1 else LAYERS.get(parts[1], -1)


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in SYNC if _layer(m) == -1]
    assert not unplaced, f"add these to LAYERS (tests/test_layers.py): {unplaced}"


def test_no_import_runs_upward() -> None:
    upward = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target, line in targets:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{SYNC[module].relative_to(ROOT)}:{line}: {module} -> {target}")
    assert not upward, "imports running upward (see docs/architecture.md):\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    graph = {m: sorted({t for t, _ in targets}) for m, targets in _graph().items()}
    done: set[str] = set()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for target in graph.get(module, ()):
            # The package's own __init__ importing its modules is not a circle.
            if not module.startswith(target + "."):
                visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_rules_are_pure() -> None:
    found = []
    for module, path in SYNC.items():
        if _layer(module) != 0:
            continue
        for target, line in _imports(module, path, SYNC):
            if any(target == bad or target.startswith(bad + ".") for bad in IMPURE):
                found.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not found, "the rules import I/O, clock or storage:\n" + "\n".join(found)


@pytest.mark.parametrize("package", ["fieldsync"])
def test_the_shared_package_imports_no_service(package: str) -> None:
    modules = _modules(package)
    found = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for name, path in modules.items()
        for target, line in _imports(name, path, modules)
        if target.split(".")[0] in SERVICES
    ]
    assert not found, f"{package}/ is shared, it imports no service:\n" + "\n".join(found)


def test_no_module_grows_past_the_limit() -> None:
    """About 500 lines at most (the team's rule); a module past 600 wants splitting."""
    big = {
        str(p.relative_to(ROOT)): n
        for p in SYNC.values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert not big, f"split these modules: {big}"

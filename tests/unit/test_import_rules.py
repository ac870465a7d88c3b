"""The folder a module sits in says which process runs it and what it may import:
core/ and monitor/ know no grpc; only worker/ knows huey; worker/ never reaches into
api/ or monitor/; core/ stands on nothing above it; the client knows no server.
Read from the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "service" / "queueservice_server"
CLIENT = ROOT / "client" / "queueservice"
PACKAGE = "queueservice_server"

# folder -> import prefixes its modules must not use
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "huey", "queueservice.", "prometheus_client",
             f"{PACKAGE}.api", f"{PACKAGE}.worker", f"{PACKAGE}.monitor"),
    "monitor": ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "huey", "queueservice.",
                f"{PACKAGE}.api", f"{PACKAGE}.worker"),
    "api": ("huey", f"{PACKAGE}.worker"),
    "worker": ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "queueservice.",
               f"{PACKAGE}.api", f"{PACKAGE}.monitor"),
    # Top-level modules both processes load (settings, tasks, diag, logs, embedded): neither side's library.
    "": ("grpc", "huey", "queueservice.", f"{PACKAGE}.api", f"{PACKAGE}.worker", f"{PACKAGE}.monitor"),
}  # fmt: skip
# Entry points that start either process, so may import both sides.
ENTRY_POINTS = {"cli.py", "__main__.py"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violates(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def server_modules() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if p.name not in ENTRY_POINTS or p.parent != SERVER)


@pytest.mark.parametrize("path", server_modules(), ids=lambda p: str(p.relative_to(SERVER)))
def test_server_modules_keep_their_folders_rules(path: Path) -> None:
    folder = path.relative_to(SERVER).parts[0] if path.parent != SERVER else ""
    rules = FORBIDDEN[folder]
    broken = sorted(name for name in imports(path) for prefix in rules if violates(name, prefix))
    assert not broken, f"{path.relative_to(ROOT)} ({folder or 'top level'}/) must not import {broken}"


def test_the_client_imports_nothing_of_the_server() -> None:
    for path in CLIENT.rglob("*.py"):
        assert not {name for name in imports(path) if violates(name, PACKAGE)}, path


def test_the_rules_catch_a_breach(tmp_path: Path) -> None:
    """The checker itself: a grpc import inside a function is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import grpc.aio\n    from huey import Huey\n")
    assert {"grpc.aio", "huey", "huey.Huey"} <= imports(module)
    assert violates("grpc.aio", "grpc") and violates("huey.api", "huey") and not violates("grpcio_tools", "grpc")

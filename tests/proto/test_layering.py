"""The layering rules hold mechanically: a sans-IO core, and two apps that never meet."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SANS_IO = ["errors", "frames", "events", "flow", "connection", "auth"]
IO_MODULES = {"trio", "trio_websocket", "socket", "ssl", "select", "selectors", "asyncio", "time"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }
    return names


@pytest.mark.parametrize("module", SANS_IO)
def test_protocol_core_does_no_io(module: str) -> None:
    top_level = {name.split(".")[0] for name in _imports(ROOT / "petit" / f"{module}.py")}
    assert not top_level & IO_MODULES, f"petit/{module}.py imports {top_level & IO_MODULES}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("petit_client", "petit_server"),
        ("petit_server", "petit_client"),
        ("petit", "petit_client"),
        ("petit", "petit_server"),
        # trio-websocket is a test dependency only: a second implementation to interoperate
        # with. The product speaks WebSocket through petit.websocket.
        ("petit", "trio_websocket"),
        ("petit_client", "trio_websocket"),
        ("petit_server", "trio_websocket"),
    ],
)
def test_packages_keep_their_distance(package: str, forbidden: str) -> None:
    for path in (ROOT / package).glob("*.py"):
        offenders = {n for n in _imports(path) if n.split(".")[0] == forbidden}
        assert not offenders, f"{path.relative_to(ROOT)} imports {offenders}"

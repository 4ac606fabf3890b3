"""The layering rules hold mechanically: a sans-IO core, and two apps that never meet."""

from __future__ import annotations

import ast
import subprocess
import sys
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
    for path in (ROOT / package).rglob("*.py"):
        offenders = {n for n in _imports(path) if n.split(".")[0] == forbidden}
        assert not offenders, f"{path.relative_to(ROOT)} imports {offenders}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports() -> dict[str, set[str]]:
    """Each module of the three packages -> the project modules it imports, at any depth
    (a function-level import counts: it is still an arrow between modules)."""
    paths = [
        p
        for package in ("petit", "petit_client", "petit_server")
        for p in (ROOT / package).rglob("*.py")
    ]
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # "from petit_server.edge import hub" names a module; "from x.y import Name" a name
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_cycles() -> None:
    graph = _project_imports()
    state: dict[str, int] = {}  # 1 while on the current path, 2 once done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


# The server's layers, lowest first; a module may import its own layer and those below.
SERVER_LAYERS = [
    ("petit_server.config", "petit_server.usage", "petit_server.policy"),
    ("petit_server.registry",),
    ("petit_server.edge",),
    ("petit_server.ops",),
    (
        "petit_server.cli",
        "petit_server.service",
        "petit_server.workers",
        "petit_server.worker",
        "petit_server.daemon",
        "petit_server.__main__",
    ),
]


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(SERVER_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of SERVER_LAYERS: add it")


def test_server_imports_run_one_way() -> None:
    graph = _project_imports()
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if module.startswith("petit_server.") and module != "petit_server"
        for target in sorted(targets)
        if target.startswith("petit_server.") and _layer(target) > _layer(module)
    ]
    assert not upward, "imports that run up the server's layers: " + "; ".join(upward)


# What a running daemon leaves out, and why: each costs idle RSS in every process.
ONLY_WHEN_NEEDED = {
    "click": "the CLI: the daemon process is petit.daemon's",
    "redis": "the Redis registry and cluster mode",
    "prometheus_client": "the first /metrics scrape",
    "cryptography.x509": "petit-server init, and the HTTPS ingress at its first certificate",
    "cryptography.hazmat.primitives.serialization": "reading and writing key files",
    "importlib.metadata": "nothing: websockets' package imports it, petit needs its C masking",
}


@pytest.mark.parametrize(
    "daemon",
    [
        # The server's daemon module, and its admin API as it starts (on by default).
        "import petit_server.daemon\n"
        "from petit_server.edge.hub import Hub\n"
        "from petit_server.ops.admin import AdminApi, AdminSources\n"
        "from petit_server.usage import UsageStore\n"
        "AdminApi('token', AdminSources(None, Hub(), UsageStore(), dict, None, 0.0))\n",
        "import petit_client.daemon\n",
    ],
    ids=["server", "client"],
)
def test_a_daemon_imports_only_what_it_runs(daemon: str) -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys\n{daemon}print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert "petit.websocket" in loaded
    imported = {
        name: ONLY_WHEN_NEEDED[heavy]
        for name in loaded
        for heavy in ONLY_WHEN_NEEDED
        if name == heavy or name.startswith(heavy + ".")
    }
    assert not imported, f"imported by every daemon: {imported}"

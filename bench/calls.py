"""What one request costs petit in work that does not depend on the machine's speed: Python
function calls (cProfile) and syscalls (strace) per request, in the server and the client.

``run.py`` and ``ab.py`` measure time, and on a shared 2-core machine the same code reads
30-70% apart from one hour to the next (a Python loop's speed moves that much). These
counts do not move: they say whether a change removed work, on any machine, in one run of
a few seconds. Two workloads, each on one connection, so nothing is batched:

- a redis GET through a registration's raw TCP port (redis-benchmark, one connection);
- a 1 KiB HTTP GET through the HTTP ingress (curl, one keep-alive connection, to nginx).

Each daemon runs in the foreground under ``python -m cProfile`` and ends on SIGTERM (it exits
0, and cProfile writes its stats). The calls of a run without requests (start, the checks
that the tunnel is up, stop) are subtracted from those of a run with them; strace counts the
syscalls during the requests only. ``--baseline REF`` counts git revision REF's petit too,
beside the working tree's.

Usage: python bench/calls.py [--requests N] [--baseline REF] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pstats
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from run import (
    DIE_WITH_BENCH,
    ONE_KIB,
    VENV_BIN,
    Bench,
    PetitServer,
    _redis_benchmark,
    _set,
    bench_environment,
    wait_answered,
    wait_listening,
)

STOP_TIMEOUT = 30.0  # seconds a profiled daemon has to exit after SIGTERM


@dataclass
class Petit:
    """One petit's configs, stopped between counted runs (daemons under cProfile)."""

    name: str
    server: PetitServer
    http_client: Path  # config of the client whose backend is nginx
    tcp_client: Path  # config of the client whose backend is redis
    tcp_port: int
    host: str  # the HTTP client's registration (Host header)


def prepare(bench: Bench, name: str, backend: int, redis_port: int, revision: str | None) -> Petit:
    """A petit server with its two clients registered, then stopped, its ports pinned in its
    config so the clients find it again when it runs under cProfile."""
    route = bench.start_petit(name, backend, revision)
    server = route.server
    assert server is not None
    host, _ = bench.start_petit_client(server, server.tunnel_port, redis_port, http=False)
    tcp_port = bench.petit_tcp_port(server, host)
    http_client = bench.client_config(server.tunnel_port, backend)
    tcp_client = bench.client_config(server.tunnel_port, redis_port)
    for config in (tcp_client, http_client):
        bench.run([str(VENV_BIN / "petit-client"), "stop", "-c", str(config)], server.env)
    bench.run([str(VENV_BIN / "petit-server"), "stop", "-c", str(server.config)], server.env)
    _set(server.config, backPort=str(server.tunnel_port), proxyPort=str(server.http_port))
    return Petit(name, server, http_client, tcp_client, tcp_port, route.host)


@contextlib.contextmanager
def profiled(bench: Bench, petit: Petit, run: int) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """petit's server and both clients under cProfile, tunnels up; stopped on exit (SIGTERM;
    killed if one outlives STOP_TIMEOUT), their stats written to
    ``{petit.name}-{profile}-{run}.prof`` in the run directory (profile: PROFILES)."""
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(profile: str, module: str, config: Path) -> None:
        output = bench.root / f"{petit.name}-{profile}-{run}.prof"
        # -P: a revision's code comes from PYTHONPATH, never from the current directory
        argv = [sys.executable, "-P", "-m", "cProfile", "-o", str(output), "-m", module]
        log = f"{petit.name}-{profile}.log"
        processes[profile] = bench.spawn([*argv, str(config)], log, petit.server.env)

    try:
        start("server", "petit_server.daemon", petit.server.config)
        wait_listening(petit.server.tunnel_port, "the profiled server's tunnel port")
        start("client", "petit_client.daemon", petit.tcp_client)
        start("http client", "petit_client.daemon", petit.http_client)
        wait_listening(petit.tcp_port, "the registration's TCP port")
        wait_answered(petit.server.http_port, petit.host)
        yield processes
    finally:
        for profile in ("client", "http client", "server"):
            if profile in processes:
                processes[profile].send_signal(signal.SIGTERM)
                try:
                    processes[profile].wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    processes[profile].kill()
                    raise SystemExit(f"bench: the profiled {profile} ignored SIGTERM") from None


def calls(path: Path) -> int:
    """Every Python and C function call cProfile counted."""
    return sum(stat[1] for stat in pstats.Stats(str(path)).stats.values())  # type: ignore[attr-defined]


@contextlib.contextmanager
def syscalls(pid: int, counted: dict[str, float], role: str) -> Iterator[None]:
    """Count ``pid``'s syscalls (all threads) while the block runs, into ``counted[role]``.
    The block starts once strace is attached, so no early syscall goes uncounted."""
    with subprocess.Popen(
        [*DIE_WITH_BENCH, "strace", "-c", "-f", "-q", "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    ) as strace:
        try:
            _wait_traced(pid, strace)
            yield
        finally:
            strace.send_signal(signal.SIGINT)
            _, report = strace.communicate(timeout=30)
    # the summary's last line: % time, seconds, usecs/call, calls, [errors,] "total"
    total = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total$", report, re.M)
    if total is None:
        raise SystemExit(f"bench: strace counted nothing for pid {pid}: {report.strip()[-300:]}")
    counted[role] = float(total.group(1))


def _wait_traced(pid: int, strace: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Block until ``strace`` has attached to ``pid`` (its TracerPid), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and strace.poll() is None:
        status = Path(f"/proc/{pid}/status").read_text()
        if re.search(r"^TracerPid:\s*[1-9]", status, re.M):
            return
        time.sleep(0.01)  # noqa: TID251 - a benchmark script, polling another process
    raise SystemExit(f"bench: strace did not attach to pid {pid} (is ptrace allowed here?)")


def redis_gets(petit: Petit, requests: int) -> None:
    """``requests`` redis GETs through the registration's TCP port, on one connection."""
    _redis_benchmark(petit.tcp_port, "get", 1, requests)


def http_gets(petit: Petit, requests: int) -> None:
    """``requests`` GETs of a 1 KiB file through the HTTP ingress, on one keep-alive
    connection (curl's URL range)."""
    url = f"http://127.0.0.1:{petit.server.http_port}/{ONE_KIB}?[1-{requests}]"  # one connection
    argv = [*DIE_WITH_BENCH, "curl", "-sf", "-H", f"Host: {petit.host}", url]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=600)


# workload -> (the load, the profiled client it goes through)
WORKLOADS: dict[str, tuple[Callable[[Petit, int], None], str]] = {
    "redis GET, TCP port": (redis_gets, "client"),
    "HTTP 1 KiB GET": (http_gets, "http client"),
}
PROFILES = ("server", "client", "http client")


def count(bench: Bench, petit: Petit, requests: int) -> dict[str, float]:
    """Per workload: calls and syscalls per request in the server and the client."""
    with profiled(bench, petit, 0):
        pass
    idle = {profile: calls(bench.root / f"{petit.name}-{profile}-0.prof") for profile in PROFILES}
    figures: dict[str, float] = {}
    for run, (workload, (load, client)) in enumerate(WORKLOADS.items(), start=1):
        traced: dict[str, float] = {}
        with profiled(bench, petit, run) as processes:
            server, relay = processes["server"].pid, processes[client].pid
            with syscalls(server, traced, "server"), syscalls(relay, traced, client):
                load(petit, requests)
        for role, profile in (("server", "server"), ("client", client)):
            made = calls(bench.root / f"{petit.name}-{profile}-{run}.prof") - idle[profile]
            figures[f"{workload}: Python calls, {role}"] = made / requests
            figures[f"{workload}: syscalls, {role}"] = traced[profile] / requests
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per workload")
    parser.add_argument("--baseline", metavar="REF", help="also count git revision REF's petit")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    with bench_environment() as bench:
        backend, redis_port = bench.start_nginx(), bench.start_redis()
        petits = [prepare(bench, "petit", backend, redis_port, None)]
        if options.baseline:
            petits.append(prepare(bench, options.baseline, backend, redis_port, options.baseline))
        columns = {petit.name: count(bench, petit, options.requests) for petit in petits}
    if options.json:
        options.json.write_text(json.dumps({"requests": options.requests, "figures": columns}))
    names = list(columns)
    width = max(len(row) for row in columns[names[0]]) + 2
    header = f"{'per request':<{width}}" + "".join(f"{name:>12}" for name in names)
    print(header + ("   petit/" + names[1] if len(names) > 1 else ""))
    for row in columns[names[0]]:
        values = [columns[name][row] for name in names]
        line = f"{row:<{width}}" + "".join(f"{value:12.1f}" for value in values)
        if len(values) > 1:
            line += f"{values[0] / values[1]:12.2f}"
        print(line)


if __name__ == "__main__":
    main()

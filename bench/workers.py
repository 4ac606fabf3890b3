"""A server with workers against one process, side by side in one run: what ``workers``
buys on this machine.

One command starts nginx on loopback as the backend, an ``ssh -R`` tunnel to it, a
redis-server for the registry, and two petits in front of the same nginx, each a server and
one registered client: one with ``workers = 1`` and one with ``workers = N`` (default 2),
both with the Redis registry so that only the worker count differs. wrk loads each path at
16 and 64 connections, then four parallel 10 MiB downloads; the table shows req/s, p99,
MB/s and the CPU µs per request of the server (all its processes: supervisor and workers)
and of the client, with the ratios workers/one and against ``ssh -R``.

On a 2-core machine the workers, the client, nginx and wrk share the two cores, so this
shows the cost of the design more than its gain; on a host with cores to spare the server
side scales with the workers until the client (one process) is the limit (see
docs/many-cores.md).

Usage: python bench/workers.py [--workers N] [--smoke] [--duration S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import tomli_w
from cluster import start_redis
from run import (
    VENV_BIN,
    Route,
    bench_environment,
    cpu_seconds,
    download_rounds,
    wrk,
)

ROWS = [
    ("c16_req_s", "req/s, 1 KiB, 16 conns", True),
    ("c64_req_s", "req/s, 1 KiB, 64 conns", True),
    ("c64_p99_ms", "p99 ms, 64 conns", False),
    ("download_4x_mb_s", "MB/s, four 10 MiB downloads", True),
    ("c64_cpu_us_server", "CPU µs/req server, 64 conns", False),
    ("c64_cpu_us_client", "CPU µs/req client, 64 conns", False),
]


def with_workers(redis_url: str, workers: int, prefix: str) -> Callable[[Path], None]:
    """An edit of a server's config: ``workers`` and the Redis registry under ``prefix``."""

    def edit(config: Path) -> None:
        document = tomllib.loads(config.read_text())
        document["server"]["workers"] = workers
        document["server"]["registry"] = {"backend": "redis", "url": redis_url, "prefix": prefix}
        config.write_text(tomli_w.dumps(document))

    return edit


def server_pids(route: Route) -> list[int]:
    """The server's processes: the supervisor and its workers, or the one process."""
    assert route.server is not None
    argv = [str(VENV_BIN / "petit-server"), "status", "--json", "-c", str(route.server.config)]
    reply = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    return [route.server.pid, *(worker["pid"] for worker in reply.get("workers", []))]


def load(route: Route, connections: int, duration: float) -> dict[str, float]:
    """wrk through ``route``, with the CPU µs per request of its server and client."""
    servers = server_pids(route)
    before = sum(map(cpu_seconds, servers)), cpu_seconds(route.client_pid)
    figures = wrk(route, connections, duration)
    after = sum(map(cpu_seconds, servers)), cpu_seconds(route.client_pid)
    figures["cpu_us_server"] = (after[0] - before[0]) * 1e6 / figures["requests"]
    figures["cpu_us_client"] = (after[1] - before[1]) * 1e6 / figures["requests"]
    return figures


def measure(workers: int, duration: float, rounds: int) -> dict[str, object]:
    """Every row on the three paths, each row on all of them in turn, in one run."""
    with bench_environment() as bench:
        backend = bench.start_nginx()
        ssh = Route("ssh -R", bench.start_ssh_tunnel(backend), "localhost")
        redis_url = start_redis(bench)
        one = bench.start_petit("one", backend, configure=with_workers(redis_url, 1, "one:"))
        many = bench.start_petit(
            "workers", backend, configure=with_workers(redis_url, workers, "many:")
        )
        paths = [ssh, one, many]
        results: dict[str, dict[str, float]] = {path.name: {} for path in paths}
        for connections in (16, 64):
            for path in paths:
                figures = wrk(path, connections, duration) if path is ssh else None
                figures = figures or load(path, connections, duration)
                for key, value in figures.items():
                    results[path.name][f"c{connections}_{key}"] = value
        for path in paths:
            results[path.name]["download_4x_mb_s"] = download_rounds(path, 4, rounds)[0]
        return {"paths": results, "workers": workers, "duration_s": duration}


def table(results: dict[str, object]) -> str:
    """The figures, workers/one and each petit against ssh -R (>1: the first is better)."""
    paths = results["paths"]
    assert isinstance(paths, dict)
    workers = f"{results['workers']} workers"
    head = ("measure", "ssh -R", "one process", workers, "workers/one", "one/ssh", "workers/ssh")
    lines = ["{:30} {:>10} {:>12} {:>12} {:>12} {:>9} {:>12}".format(*head)]
    for key, label, higher_is_better in ROWS:
        ssh = paths["ssh -R"].get(key, float("nan"))
        one, many = paths["one"][key], paths["workers"][key]

        def ratio(a: float, b: float, better: bool = higher_is_better) -> float:
            return a / b if better else b / a

        lines.append(
            f"{label:30} {ssh:10.1f} {one:12.1f} {many:12.1f} {ratio(many, one):12.2f}"
            f" {ratio(one, ssh):9.2f} {ratio(many, ssh):12.2f}"
        )
    lines.append("(ratios >1: the first named is better; for p99 and CPU, the inverse)")
    return "\n".join(lines)


def main() -> None:
    """Parse options, measure, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="the workers of the second petit")
    parser.add_argument("--smoke", action="store_true", help="seconds: proves the figures come")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--json", type=Path, default=Path("bench/results/workers.json"))
    options = parser.parse_args()
    if options.smoke:
        results = measure(options.workers, duration=1.0, rounds=1)
    else:
        results = measure(options.workers, duration=options.duration, rounds=5)
    print(table(results))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {options.json}")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench: {exc.cmd[0]} failed: {exc.stderr or exc.stdout}") from None

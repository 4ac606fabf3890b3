"""Two server nodes: req/s through the node that must forward, against the node that holds
the session, side by side in one run.

One command starts nginx on loopback as the backend, a redis-server for the registry and the
node directory, two petit server nodes sharing one certificate (copied) and that registry,
and one client whose only server is node A. wrk then loads the same registration through
node A (its session is there: what a single node does) and through node B (every request
crosses the peer link to A). Only the ratio B/A means anything: absolute figures drift.

Usage: python bench/cluster.py [--smoke] [--duration S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import tomli_w
from run import (
    ONE_KIB,
    VENV_BIN,
    Bench,
    Route,
    _pid_file,
    _set,
    _status,
    bench_environment,
    first_request_ms,
    free_port,
    wait_listening,
    wrk,
)

PETIT_SERVER = str(VENV_BIN / "petit-server")
PETIT_CLIENT = str(VENV_BIN / "petit-client")
ROWS = [
    ("c16_req_s", "req/s, 1 KiB, 16 conns", True),
    ("c16_p50_ms", "p50 ms, 16 conns", False),
    ("c64_req_s", "req/s, 1 KiB, 64 conns", True),
    ("c64_p99_ms", "p99 ms, 64 conns", False),
    ("new_connection_ms", "ms, one request, new conn", False),
]


def start_redis(bench: Bench) -> str:
    """A throwaway redis-server on loopback (in memory only); its URL."""
    port = free_port()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    argv = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    bench.spawn([*argv, "--appendonly", "no", "--dir", str(bench.root)], "redis.log")
    wait_listening(port, "redis-server")
    return f"redis://127.0.0.1:{port}/0"


def init_node(bench: Bench, name: str, redis_url: str, secret: str, tcp_addr: str) -> Path:
    """``petit-server init`` for one node, on loopback ports, with the Redis registry and in
    cluster mode (the node directory in the same Redis; each node's raw TCP ports on its own
    loopback address, so they never clash)."""
    config = bench.root / name / "config.toml"
    bench.run([PETIT_SERVER, "init", "-c", str(config), "--hostname", "localhost"])
    _set(config, bindAddr='"127.0.0.1"', backPort="0", proxyPort="0", listenPort="0")
    _set(config, tcpAddr=f'"{tcp_addr}"', firstPort=str(free_port()), adminPort="0")
    # A loopback measurement: clients register freely.
    _set(config, requireToken="false", registrationsPerMinute="1000000")
    document = tomllib.loads(config.read_text())
    document["server"]["registry"] = {"backend": "redis", "url": redis_url}
    document["server"]["cluster"] = {
        "nodeId": name,
        "internalAddr": "127.0.0.1",
        "internalPort": 0,
        "secret": secret,
    }
    config.write_text(tomli_w.dumps(document))
    return config


def start_node(bench: Bench, config: Path) -> dict[str, int]:
    """Start a node (backgrounded); its bound ports."""
    bench.run([PETIT_SERVER, "start", "-c", str(config)])
    bench.at_close([PETIT_SERVER, "stop", "-c", str(config)])
    return _pid_file(config.parent / "server.pid")[1]


def start_two_nodes(bench: Bench, backend_port: int) -> tuple[Route, Route]:
    """Nodes A and B and a client on A only; the routes through A (local) and B (forwarded)."""
    redis_url = start_redis(bench)
    secret = secrets.token_hex(32)
    node_a = init_node(bench, "node-a", redis_url, secret, "127.0.0.1")
    node_b = init_node(bench, "node-b", redis_url, secret, "127.0.0.2")
    shutil.copytree(
        node_a.parent / "certificates", node_b.parent / "certificates", dirs_exist_ok=True
    )
    ports_a = start_node(bench, node_a)
    ports_b = start_node(bench, node_b)
    client = bench.root / "client" / "config.toml"
    ca = node_a.parent / "certificates" / "ca.crt"
    server = f"localhost:{ports_a['tunnel']}"
    local = f"127.0.0.1:{backend_port}"
    bench.run(
        [
            PETIT_CLIENT,
            "init",
            "-c",
            str(client),
            "--server",
            server,
            "--ca",
            str(ca),
            "--local",
            local,
        ]
    )
    _set(client, listenPort="0", statusPort="0")
    registered = bench.run([PETIT_CLIENT, "register", "-c", str(client)])
    match = re.search(r"Registered with ID (\d+)", registered)
    if match is None:
        raise SystemExit(f"bench: petit-client register said: {registered}")
    bench.run([PETIT_CLIENT, "start", "-c", str(client)])
    bench.at_close([PETIT_CLIENT, "stop", "-c", str(client)])
    host = f"{match.group(1)}.localhost"
    routes = (
        Route("node A (holds the session)", ports_a["http"], host),
        Route("node B (forwards to A)", ports_b["http"], host),
    )
    deadline = time.monotonic() + 20
    while any(_status(route.port, host, ONE_KIB) != 200 for route in routes):
        if time.monotonic() > deadline:
            raise SystemExit("bench: the registration did not answer through both nodes in 20 s")
        time.sleep(0.05)  # noqa: TID251 - a benchmark script, polling other processes
    return routes


def measure(duration: float, repeats: int) -> dict[str, object]:
    """wrk and new-connection latency through both nodes, alternating, in one run."""
    with bench_environment() as bench:
        local, forwarded = start_two_nodes(bench, bench.start_nginx())
        results: dict[str, dict[str, float]] = {"local": {}, "forwarded": {}}
        for connections in (16, 64):
            for name, route in (("local", local), ("forwarded", forwarded)):
                for key, value in wrk(route, connections, duration).items():
                    results[name][f"c{connections}_{key}"] = value
        for name, route in (("local", local), ("forwarded", forwarded)):
            results[name]["new_connection_ms"] = first_request_ms(route, repeats)
        return {"paths": results, "duration_s": duration}


def table(results: dict[str, object]) -> str:
    """The figures and the forwarded/local ratio (>1 is better for forwarding)."""
    paths = results["paths"]
    assert isinstance(paths, dict)
    lines = [
        "{:30} {:>12} {:>12} {:>16}".format("measure", "local", "forwarded", "forwarded/local")
    ]
    for key, label, higher_is_better in ROWS:
        local, forwarded = paths["local"][key], paths["forwarded"][key]
        ratio = forwarded / local if higher_is_better else local / forwarded
        lines.append(f"{label:30} {local:12.2f} {forwarded:12.2f} {ratio:16.3f}")
    lines.append("(latency ratios are local/forwarded: <1 means forwarding costs that much)")
    return "\n".join(lines)


def main() -> None:
    """Parse options, measure, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: proves the figures come")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--json", type=Path, default=Path("bench/results/cluster.json"))
    options = parser.parse_args()
    if options.smoke:
        results = measure(duration=1.0, repeats=3)
    else:
        results = measure(duration=options.duration, repeats=21)
    print(table(results))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {options.json}")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench: {exc.cmd[0]} failed: {exc.stderr or exc.stdout}") from None

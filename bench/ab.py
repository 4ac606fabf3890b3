"""An A/B of the working tree against a git revision, in alternating rounds: for changes
smaller than one run's noise.

One ``bench/run.py --baseline REF`` measures each path once per row, and on a 2-core
machine a single row swings by 10-40% between runs of the same code. Here both petits (the
working tree's and REF's, each a server + an HTTP client + a TCP client in front of the same
nginx and redis-server) take every measure once per round, in alternating order (A then B,
then B then A), and the table shows the median of the rounds, their ratio, and every round's
figure so the spread is visible: wrk at 16 and 64 connections (req/s, p99 ms) and
redis-benchmark GET through the registration's TCP port at 1 and 50 connections, each with
the CPU µs per request of the server and the client.

Usage: python bench/ab.py --baseline REF [--rounds N] [--duration S] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from run import (
    Bench,
    Route,
    _redis_benchmark,
    bench_environment,
    cpu_per_request,
    wait_listening,
    wrk,
)

Figures = dict[str, dict[str, list[float]]]  # petit's name -> measure -> one value per round


def start_pair(
    bench: Bench, backend: int, redis_port: int, name: str, revision: str | None
) -> tuple[Route, Route]:
    """A petit (HTTP route, TCP route) with its TCP client in front of ``redis_port``."""
    http = bench.start_petit(name, backend, revision)
    assert http.server is not None
    host, client_pid = bench.start_petit_client(
        http.server, http.server.tunnel_port, redis_port, http=False
    )
    port = bench.petit_tcp_port(http.server, host)
    wait_listening(port, "the registration's TCP port")
    return http, Route(name, port, "", http.server, client_pid)


def one_round(
    pairs: list[tuple[Route, Route]], duration: float, requests: int, figures: Figures
) -> None:
    """Every measure once on each petit, in the order of ``pairs``."""
    for connections in (16, 64):
        for http, _ in pairs:
            row: dict[str, float] = {}
            with cpu_per_request(http, row, "x"):
                result = wrk(http, connections, duration)
                row["x_requests"] = result["requests"]
            mine = figures[http.name]
            mine.setdefault(f"http_c{connections}_req_s", []).append(result["req_s"])
            mine.setdefault(f"http_c{connections}_p99_ms", []).append(result["p99_ms"])
            for role in ("server", "client"):
                key = f"http_c{connections}_cpu_us_{role}"
                mine.setdefault(key, []).append(row[f"x_cpu_us_{role}"])
    for connections, count in ((1, requests // 10), (50, requests)):
        for _, tcp in pairs:
            row = {"x_requests": count}
            with cpu_per_request(tcp, row, "x"):
                result = _redis_benchmark(tcp.port, "get", connections, count)
            mine = figures[tcp.name]
            mine.setdefault(f"tcp_get_c{connections}_req_s", []).append(result["rps"])
            for role in ("server", "client"):
                key = f"tcp_get_c{connections}_cpu_us_{role}"
                mine.setdefault(key, []).append(row[f"x_cpu_us_{role}"])


HIGHER_IS_BETTER = ("req_s",)


def table(figures: Figures, names: list[str]) -> str:
    """Medians, the ratio (>1: the working tree is better) and every round."""
    mine, theirs = (figures[name] for name in names)
    lines = [f"{'measure':28} {names[0]:>10} {names[1]:>14} {'ratio':>6}  rounds"]
    for key, values in mine.items():
        a, b = statistics.median(values), statistics.median(theirs[key])
        better = any(key.endswith(suffix) for suffix in HIGHER_IS_BETTER)
        ratio = (a / b if better else b / a) if a and b else float("nan")
        rounds = (
            " ".join(f"{x:.0f}" for x in values) + " | " + " ".join(f"{x:.0f}" for x in theirs[key])
        )
        lines.append(f"{key:28} {a:10.1f} {b:14.1f} {ratio:6.2f}  {rounds}")
    lines.append("(ratio >1 means the working tree is better; for p99 and CPU, base/working tree)")
    return "\n".join(lines)


def main() -> None:
    """Parse options, measure in alternating rounds, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REF", required=True, help="git revision to compare")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (each measure A+B once)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: proves every figure comes out"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/ab.json"))
    options = parser.parse_args()
    rounds, duration, requests = options.rounds, options.duration, 20_000
    if options.smoke:
        rounds, duration, requests = 2, 1.0, 2_000
    names = ["petit", f"petit@{options.baseline}"]
    with bench_environment() as bench:
        backend = bench.start_nginx()
        redis_port = bench.start_redis()
        pairs = [
            start_pair(bench, backend, redis_port, names[0], None),
            start_pair(bench, backend, redis_port, names[1], options.baseline),
        ]
        figures: Figures = {name: {} for name in names}
        for index in range(rounds):
            one_round(pairs if index % 2 == 0 else pairs[::-1], duration, requests, figures)
    print(table(figures, names))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps({"rounds": rounds, "figures": figures}, indent=2) + "\n")
    print(f"figures written to {options.json}")


if __name__ == "__main__":
    main()

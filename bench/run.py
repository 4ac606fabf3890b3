"""petit against ``ssh -R`` and a direct connection, side by side in one run.

One command starts nginx on loopback as the backend (1 KiB and 10 MiB files), a private
sshd with an ``ssh -R`` tunnel (its own config, keys and port; never the system sshd), and a
petit server + client; then measures each path to the same nginx: wrk at 16 and 64
keep-alive connections (req/s, p50, p99), one and four parallel 10 MiB downloads (MB/s),
the time of one request on a new connection, the CPU petit's server and client spend per
request, and the RSS of petit's processes idle, under load and after. Only ratios from the
same run mean anything: absolute figures drift.

The raw TCP rows (redis-benchmark through a registration's TCP port) have two more paths,
the floors: petit's relay with none of its features, on trio (``floor.py``) and on OS
threads with blocking sockets (``floor_threads.py``). petit/floor is what the features and
layers cost; floor/ssh is what trio and Python cost, and the threads' floor tells which.

``--baseline REF`` adds a second petit, the code of git revision REF (same venv, its
packages first on PYTHONPATH), measured in the same run beside the working tree's: the
before and after of a change, one table.

Usage: python bench/run.py [--smoke] [--duration S] [--load-rounds N] [--baseline REF]
                           [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# The floors of petit's design, for the TCP rows: script -> path name in the table.
FLOORS = {"floor.py": "floor", "floor_threads.py": "floor, threads"}
REPO = Path(__file__).resolve().parents[1]
ONE_KIB = "1k.bin"
# Put before every command the bench starts that could outlive it: the kernel kills it when
# the bench dies, also by SIGKILL or a test's timeout, where no cleanup runs (a redis-benchmark
# left behind once kept loading the machine). Empty without util-linux's setpriv. A process
# that forks away (petit's daemons, started with `start`; nginx's worker) is not covered: the
# fork clears the signal, and only Bench.close stops them.
DIE_WITH_BENCH = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
TEN_MIB = "10m.bin"


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, what: str, timeout: float = 20.0) -> None:
    """Block until something accepts on 127.0.0.1:port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)  # noqa: TID251 - a benchmark script, polling another process
    raise SystemExit(f"bench: {what} did not listen on 127.0.0.1:{port} within {timeout}s")


@dataclass
class Bench:
    """Everything started for one run; torn down by ``close``."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanups: list[tuple[list[str], dict[str, str] | None]] = field(default_factory=list)
    sshd_port: int = 0
    servers: list[PetitServer] = field(default_factory=list)

    def spawn(
        self, argv: list[str], log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a helper process whose output goes to a log file in the run directory."""
        with (self.root / log).open("ab") as output:
            process = subprocess.Popen(
                [*DIE_WITH_BENCH, *argv],
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        self.processes.append(process)
        return process

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        """Run a command to completion; its stdout."""
        return subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=120, env=env
        ).stdout

    def at_close(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``argv`` when the run ends (before helper processes are signalled)."""
        self.cleanups.append((argv, env))

    def close(self) -> None:
        """Stop everything this run started."""
        for argv, env in reversed(self.cleanups):
            subprocess.run(argv, check=False, capture_output=True, timeout=30, env=env)
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    # ------------------------------------------------------------------ the three paths

    def start_nginx(self) -> int:
        """nginx serving the test files on a loopback port."""
        html = self.root / "html"
        html.mkdir()
        (html / ONE_KIB).write_bytes(os.urandom(1024))
        (html / TEN_MIB).write_bytes(os.urandom(10 * 1024 * 1024))
        port = free_port()
        prefix = self.root / "nginx"
        (prefix / "logs").mkdir(parents=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
user root root;
worker_processes 1;
error_log {prefix}/logs/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; root {html}; }}
}}
"""
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.spawn([nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], "nginx.log")
        wait_listening(port, "nginx")
        return port

    def start_ssh_tunnel(self, backend_port: int) -> int:
        """A private sshd and ``ssh -R`` exposing the backend on a remote-forwarded port."""
        self.sshd_port = self.start_sshd()
        return self.start_ssh_forward(self.sshd_port, backend_port)

    def start_sshd(self) -> int:
        """A private sshd on loopback (its own config and keys; never the system's)."""
        ssh_dir = self.root / "ssh"
        ssh_dir.mkdir(mode=0o700)
        for name in ("host_key", "client_key"):
            self.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / name)])
        (ssh_dir / "authorized_keys").write_text((ssh_dir / "client_key.pub").read_text())
        sshd_port = free_port()
        config = ssh_dir / "sshd_config"
        config.write_text(
            f"""
Port {sshd_port}
ListenAddress 127.0.0.1
HostKey {ssh_dir}/host_key
PidFile {ssh_dir}/sshd.pid
AuthorizedKeysFile {ssh_dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding remote
GatewayPorts no
"""
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        self.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], "sshd.log")
        wait_listening(sshd_port, "sshd")
        return sshd_port

    def start_ssh_forward(self, sshd_port: int, backend_port: int) -> int:
        """``ssh -R`` to the sshd on ``sshd_port``; the remote-forwarded port."""
        ssh_dir = self.root / "ssh"
        forwarded_port = free_port()
        self.spawn(
            [
                "ssh",
                "-N",
                "-p",
                str(sshd_port),
                "-i",
                str(ssh_dir / "client_key"),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                f"UserKnownHostsFile={ssh_dir}/known_hosts",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "ServerAliveInterval=15",
                "-R",
                f"127.0.0.1:{forwarded_port}:127.0.0.1:{backend_port}",
                f"{os.environ.get('USER', 'root')}@127.0.0.1",
            ],
            "ssh.log",
        )
        wait_listening(forwarded_port, "the ssh -R forward")
        return forwarded_port

    def start_petit(
        self,
        name: str,
        backend_port: int,
        revision: str | None = None,
        configure: Callable[[Path], None] | None = None,
    ) -> Route:
        """A petit server + registered client in front of ``backend_port``: the working
        tree's code, or with ``revision`` that git revision's; ``configure`` edits the
        server's config before it starts."""
        env = None
        source = REPO
        if revision is not None:
            source = self.root / f"source-{revision}"
            source.mkdir()
            archive = subprocess.run(
                [
                    "git",
                    "-C",
                    str(REPO),
                    "archive",
                    revision,
                    "petit",
                    "petit_server",
                    "petit_client",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True, timeout=60)
            env = {**os.environ, "PYTHONPATH": str(source)}
        byte_compile(source)
        server_config = self.root / f"server-{len(self.servers)}" / "config.toml"
        petit_server = str(VENV_BIN / "petit-server")
        self.run([petit_server, "init", "-c", str(server_config), "--hostname", "localhost"], env)
        _set(
            server_config,
            bindAddr='"127.0.0.1"',
            tcpAddr='"127.0.0.1"',
            requireToken="false",  # a loopback measurement: clients register freely
            registrationsPerMinute="1000000",
            firstPort=str(free_port_block()),
            backPort="0",
            proxyPort="0",
            listenPort="0",
            adminPort="0",
        )
        if configure is not None:
            configure(server_config)
        self.run([petit_server, "start", "-c", str(server_config)], env)
        self.at_close([petit_server, "stop", "-c", str(server_config)], env)
        server_pid, ports = _pid_file(server_config.parent / "server.pid")
        server = PetitServer(server_config, ports["tunnel"], ports["http"], server_pid, env)
        self.servers.append(server)
        host, client_pid = self.start_petit_client(server, server.tunnel_port, backend_port)
        return Route(name, server.http_port, host, server, client_pid)

    def start_petit_client(
        self, server: PetitServer, dial_port: int, backend_port: int, *, http: bool = True
    ) -> tuple[str, int]:
        """A registered, started petit client of ``server`` dialling ``dial_port`` (its
        tunnel port, or a relay to it); (Host, pid). With ``http``, returns once a request
        through it is answered (its backend is nginx)."""
        client_config = self.client_config(dial_port, backend_port)
        petit_client = str(VENV_BIN / "petit-client")
        self.run(
            [
                petit_client,
                "init",
                "-c",
                str(client_config),
                "--server",
                f"localhost:{dial_port}",
                "--ca",
                str(server.config.parent / "certificates" / "ca.crt"),
                "--local",
                f"127.0.0.1:{backend_port}",
            ],
            server.env,
        )
        _set(client_config, listenPort="0", statusPort="0")
        registered = self.run([petit_client, "register", "-c", str(client_config)], server.env)
        match = re.search(r"Registered with ID (\d+)", registered)
        if match is None:
            raise SystemExit(f"bench: petit-client register said: {registered}")
        self.run([petit_client, "start", "-c", str(client_config)], server.env)
        self.at_close([petit_client, "stop", "-c", str(client_config)], server.env)
        client_pid, _ = _pid_file(client_config.parent / "client.pid")
        host = f"{match.group(1)}.localhost"
        if http:
            wait_answered(server.http_port, host)
        return host, client_pid

    def client_config(self, dial_port: int, backend_port: int) -> Path:
        """The config of the client dialling ``dial_port`` in front of ``backend_port``."""
        return self.root / f"client-{dial_port}-{backend_port}" / "config.toml"

    def start_redis(self) -> int:
        """A private redis-server on loopback, nothing persisted: the raw TCP ports' backend."""
        port = free_port()
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [
            redis,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.spawn([*argv, "--dir", str(self.root)], "redis.log")
        wait_listening(port, "redis-server")
        return port

    def petit_tcp_port(self, server: PetitServer, host: str) -> int:
        """The raw TCP port ``server`` opened for the registration behind ``host``."""
        registration_id = host.split(".")[0]
        argv = [str(VENV_BIN / "petit-server"), "status", registration_id, "--json"]
        reply = json.loads(self.run([*argv, "-c", str(server.config)], server.env))
        return int(reply["connections"][0]["port"])

    def start_floor(self, server: PetitServer, target_port: int, script: str) -> Route:
        """A floor of petit's design (``script``: floor.py, floor_threads.py) in front of
        ``target_port``, with the certificates of petit's ``server``."""
        certificates = server.config.parent / "certificates"
        floor = [sys.executable, str(Path(__file__).with_name(script))]
        public_port, tunnel_port = free_port(), free_port()
        floor_server = self.spawn(
            [
                *floor,
                "server",
                str(public_port),
                str(tunnel_port),
                str(certificates / "server.crt"),
                str(certificates / "server.key"),
            ],
            "floor.log",
        )
        wait_listening(tunnel_port, "the floor's tunnel port")
        floor_client = self.spawn(
            [*floor, "client", str(tunnel_port), str(certificates / "ca.crt"), str(target_port)],
            "floor.log",
        )
        wait_listening(public_port, "the floor's public port")
        return Route(
            FLOORS[script],
            public_port,
            "",
            client_pid=floor_client.pid,
            server_pid=floor_server.pid,
        )

    def start_delay(self, target_port: int, one_way_ms: float) -> int:
        """A relay to ``target_port`` holding each chunk ``one_way_ms`` each way (delay.py)."""
        port = free_port()
        relay = Path(__file__).with_name("delay.py")
        self.spawn(
            [sys.executable, str(relay), str(port), str(target_port), f"{one_way_ms:g}"],
            "delay.log",
        )
        wait_listening(port, "the delay relay")
        return port


def free_port_block(count: int = 16) -> int:
    """The first of ``count`` consecutive loopback ports free now, below the ephemeral range.
    Drawn at random: two benches started together (the test suite's smoke runs) probing
    from the same first port would both find it free and give their servers one block."""
    rng = random.Random()
    for _ in range(100):
        first = rng.randrange(20_000, 32_000, count)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise SystemExit("bench: no block of free ports for the registrations' TCP ports")


def _set(config: Path, **values: str) -> None:
    text = config.read_text()
    for key, value in values.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    config.write_text(text)


def _pid_file(path: Path) -> tuple[int, dict[str, int]]:
    """The daemon's pid and bound ports, from its pid file."""
    document = json.loads(path.read_text())
    return int(document["pid"]), {k: int(v) for k, v in document.get("ports", {}).items()}


def curl_argv(port: int, host: str, path: str, write_out: str = "") -> list[str]:
    """curl for one GET of ``path`` on a loopback port: body discarded, ``write_out`` shown."""
    url = f"http://127.0.0.1:{port}/{path}"
    return [
        *DIE_WITH_BENCH,
        *["curl", "-s", "-o", "/dev/null", "-w", write_out, "-H", f"Host: {host}", url],
    ]


def wait_answered(port: int, host: str, timeout: float = 20.0) -> None:
    """Block until a GET through the petit HTTP ingress on ``port`` for ``host`` gets a 200:
    the tunnel is up (bounded)."""
    deadline = time.monotonic() + timeout
    while _status(port, host, ONE_KIB) != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the petit tunnel did not come up within {timeout:g} s")
        time.sleep(0.05)  # noqa: TID251 - a benchmark script, polling another process


def _status(port: int, host: str, path: str) -> int:
    result = subprocess.run(
        curl_argv(port, host, path, "%{http_code}"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return int(result.stdout or 0)


def byte_compile(source: Path) -> None:
    """Write the .pyc files of petit's packages under ``source``, as pip does when it installs
    the wheel (the image, a user's venv). An editable install under PYTHONDONTWRITEBYTECODE
    has none: each daemon then compiled every module at start, 0.7 MB more RSS when the bench
    reads it, none of it petit's when installed."""
    packages = [str(source / package) for package in ("petit", "petit_server", "petit_client")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True, timeout=120)


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class PetitServer:
    """A running petit server (``env`` selects the code it runs: None is the working tree)."""

    config: Path
    tunnel_port: int
    http_port: int
    pid: int
    env: dict[str, str] | None


@dataclass(frozen=True)
class Route:
    """One way to reach a backend: a port and the Host header to send; through petit, the
    server and the client whose CPU time the request costs."""

    name: str
    port: int
    host: str
    server: PetitServer | None = None
    client_pid: int = 0
    server_pid: int = 0  # the server's, when it is not a petit server (the floor's)

    @property
    def pids(self) -> dict[str, int]:
        """The tunnel's processes on this route, by role."""
        server_pid = self.server.pid if self.server is not None else self.server_pid
        if not server_pid:
            return {}
        return {"server": server_pid, "client": self.client_pid}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_per_request(target: Route, figures: dict[str, float], row: str) -> Iterator[None]:
    """Around a load that fills ``figures``: add petit's CPU µs per request for each role
    (``{row}_cpu_us_server`` ...) from the load's request count, ``figures[row + "_requests"]``."""
    before = {role: cpu_seconds(pid) for role, pid in target.pids.items()}
    yield
    for role, pid in target.pids.items():
        spent = cpu_seconds(pid) - before[role]
        figures[f"{row}_cpu_us_{role}"] = spent * 1e6 / figures[f"{row}_requests"]


def wrk(target: Route, connections: int, duration: float) -> dict[str, float]:
    """req/s, p50 and p99 (ms) for the 1 KiB file at ``connections`` keep-alive connections."""
    output = subprocess.run(
        [
            *DIE_WITH_BENCH,
            "wrk",
            "--latency",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{duration:g}s",
            "-H",
            f"Host: {target.host}",
            f"http://127.0.0.1:{target.port}/{ONE_KIB}",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    requests = float(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "req_s": rate,
        "requests": requests,
        "p50_ms": _latency(output, "50%"),
        "p99_ms": _latency(output, "99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def _latency(output: str, percentile: str) -> float:
    match = re.search(rf"^\s+{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def downloads(target: Route, parallel: int) -> float:
    """MB/s for ``parallel`` simultaneous 10 MiB downloads, each on its own connection.

    Timed by curl itself (start of the transfer to its end, the slowest of the parallel
    ones), not by the wall clock around it: spawning curl costs several ms, which is a
    third of a 10 MiB transfer on a fast path and would flatter the slower one.
    """
    argv = curl_argv(target.port, target.host, TEN_MIB, "%{time_total}")
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(parallel)]
    seconds = []
    for process in running:
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            raise SystemExit(f"bench: a 10 MiB download through {target.name} failed")
        seconds.append(float(output))
    return parallel * 10 * 1024 * 1024 / max(seconds) / 1e6


def download_rounds(target: Route, parallel: int, rounds: int) -> tuple[float, float]:
    """(median, best) MB/s over ``rounds`` timed runs after one untimed warm-up run.

    One 10 MiB transfer lasts tens of ms, so single samples scatter widely: on two cores
    petit's server and client each keep a core busy, and the transfer runs at half speed
    while the scheduler has them share one; ssh -R now and then waits 40 ms for its first
    byte. The median is the typical download, the best what the path can do.
    """
    downloads(target, parallel)
    samples = [downloads(target, parallel) for _ in range(rounds)]
    return statistics.median(samples), max(samples)


def first_request_ms(target: Route, repeats: int) -> float:
    """Median time of one request on a new connection (curl's total time)."""
    times = []
    for _ in range(repeats):
        result = subprocess.run(
            curl_argv(target.port, target.host, ONE_KIB, "%{time_total}"),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        times.append(float(result.stdout) * 1000)
    return statistics.median(times)


@contextlib.contextmanager
def bench_environment() -> Iterator[Bench]:
    """A temporary run directory with everything torn down afterwards."""
    with tempfile.TemporaryDirectory(prefix="petit-bench-") as root:
        bench = Bench(Path(root))
        try:
            yield bench
        finally:
            bench.close()


@dataclass(frozen=True)
class Plan:
    """How long and how often to measure."""

    duration: float  # seconds per wrk run
    repeats: int  # new-connection requests (median)
    download_rounds: int  # timed downloads per figure (median and best)
    load_rounds: int  # extra petit load rounds for the leak check, RSS after each
    redis_requests: int  # redis-benchmark requests at 50 connections (a tenth at one)
    slow_settle: float = 3.0  # seconds slow readers run before the download beside them


def measure(plan: Plan, baseline: str | None) -> dict[str, object]:
    """Run every measurement on every path; return the figures."""
    with bench_environment() as bench:
        backend = bench.start_nginx()
        ssh_port = bench.start_ssh_tunnel(backend)
        petits = [bench.start_petit("petit", backend)]
        if baseline is not None:
            petits.append(bench.start_petit(f"petit@{baseline}", backend, baseline))
        paths = [Route("direct", backend, "localhost"), Route("ssh -R", ssh_port, "localhost")]
        paths += petits
        memory: dict[str, object] = {
            f"{role}_idle_mb": rss_mb(pid) for role, pid in petits[0].pids.items()
        }
        results: dict[str, dict[str, float]] = {p.name: {} for p in paths}
        results.update({name: {} for name in FLOORS.values()})  # the TCP rows only
        # Each measure runs on every path one after the other, so a neighbour's load on a
        # shared machine hits all of them alike instead of whichever path ran last.
        for connections in (16, 64):
            for target in paths:
                figures = results[target.name]
                with cpu_per_request(target, figures, f"c{connections}"):
                    for key, value in wrk(target, connections, plan.duration).items():
                        figures[f"c{connections}_{key}"] = value
        memory.update({f"{r}_load_mb": rss_mb(pid) for r, pid in petits[0].pids.items()})
        for parallel in (1, 4):
            for target in paths:
                median, best = download_rounds(target, parallel, plan.download_rounds)
                results[target.name][f"download_{parallel}x_mb_s"] = median
                results[target.name][f"download_{parallel}x_best_mb_s"] = best
        for target in paths:
            results[target.name]["new_connection_ms"] = first_request_ms(target, plan.repeats)
        memory.update({f"{r}_after_mb": rss_mb(pid) for r, pid in petits[0].pids.items()})
        routes = redis_paths(bench, petits)
        for index, test in enumerate(TCP_TESTS):
            # Each test runs on every path in turn, in the opposite order to the test before:
            # no path always follows the same neighbour (in one order, the working tree's
            # petit measured 0.81x its baseline at 50 connections where ab.py found 0.99).
            for target in routes if index % 2 == 0 else routes[::-1]:
                results[target.name].update(redis_figures(target, test, plan))
        results["direct"]["wan_download_mb_s"] = float("nan")  # no tunnel leg to delay
        for target in long_link_paths(bench, backend, petits, WAN_ONE_WAY_MS):
            median, _ = download_rounds(target, 1, plan.download_rounds)
            results[target.name]["wan_download_mb_s"] = median
            with slow_readers(target, SLOW_READERS, plan.slow_settle):
                median, _ = download_rounds(target, 1, plan.download_rounds)
            results[target.name]["wan_beside_slow_mb_s"] = median
        # Last: its rounds load the working tree's petit only, and a row measured after them
        # would compare a petit just out of 5 load rounds with a baseline that had none.
        memory.update(leak_check(petits[0], plan))
        return {"paths": results, "memory": memory, "duration_s": plan.duration}


WAN_ONE_WAY_MS = 25.0  # the long-link row: 50 ms round trip on the tunnel leg
SLOW_READERS = 4  # callers reading a download at SLOW_PIECE / SLOW_PACE beside the long-link row
SLOW_PIECE = 4096  # bytes per read
SLOW_PACE = 0.04  # seconds between reads: 100 KB/s
SLOW_TIMEOUT = 10.0  # seconds a slow reader's connect or read may take before it gives up


@contextlib.contextmanager
def slow_readers(target: Route, count: int, settle: float) -> Iterator[None]:
    """``count`` callers downloading through ``target``, each reading at 100 KB/s: a client
    on a slow link, or an application that reads slowly. Their kernels keep small receive
    buffers, so what the path sends them waits in its own send queues. The block runs after
    ``settle`` seconds, once their buffers have filled; the readers stop when it ends."""
    done = threading.Event()
    request = f"GET /{TEN_MIB} HTTP/1.1\r\nHost: {target.host}\r\n\r\n".encode()

    def read_slowly(caller: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the path failed, or the block ended mid-read
            caller.sendall(request)
            while not done.wait(SLOW_PACE) and caller.recv(SLOW_PIECE):
                pass

    callers: list[socket.socket] = []
    threads: list[threading.Thread] = []
    try:
        for _ in range(count):
            caller = socket.create_connection(("127.0.0.1", target.port), timeout=SLOW_TIMEOUT)
            callers.append(caller)
            threads.append(threading.Thread(target=read_slowly, args=(caller,), daemon=True))
            threads[-1].start()
        time.sleep(settle)  # noqa: TID251 - the load's shape: its buffers fill first
        yield
    finally:
        done.set()
        for caller in callers:
            with contextlib.suppress(OSError):
                caller.shutdown(socket.SHUT_RDWR)  # ends a recv that waits
        for thread in threads:
            thread.join(timeout=SLOW_TIMEOUT)
        for caller in callers:
            caller.close()


def redis_paths(bench: Bench, petits: list[Route]) -> list[Route]:
    """redis-server reached directly, through ssh -R, through the floors of petit's design
    (FLOORS), and through each petit's raw TCP port (one more client per server, whose
    private service is the redis-server)."""
    redis_port = bench.start_redis()
    ssh_port = bench.start_ssh_forward(bench.sshd_port, redis_port)
    routes = [Route("direct", redis_port, ""), Route("ssh -R", ssh_port, "")]
    assert petits[0].server is not None
    routes += [bench.start_floor(petits[0].server, redis_port, script) for script in FLOORS]
    for petit in petits:
        assert petit.server is not None
        server = petit.server
        host, client_pid = bench.start_petit_client(
            server, server.tunnel_port, redis_port, http=False
        )
        tcp_port = bench.petit_tcp_port(server, host)
        wait_listening(tcp_port, "the registration's TCP port")
        routes.append(Route(petit.name, tcp_port, "", server, client_pid))
    return routes


# redis-benchmark's tests on the TCP rows: (test, connections, divisor of plan.redis_requests)
TCP_TESTS = [("get", 1, 10), ("get", 50, 1), ("set", 50, 1), ("ping_inline", 1, 10)]


def redis_figures(target: Route, test: tuple[str, int, int], plan: Plan) -> dict[str, float]:
    """One redis-benchmark test of TCP_TESTS through ``target``: req/s; for the inline PING,
    the round trip (p50, p99 ms); through petit or a floor, the CPU per request."""
    name, clients, divisor = test
    requests = plan.redis_requests // divisor
    row = f"tcp_{name}_c{clients}"
    figures: dict[str, float] = {f"{row}_requests": requests}
    with cpu_per_request(target, figures, row):
        result = _redis_benchmark(target.port, name, clients, requests)
    figures[f"{row}_req_s"] = result["rps"]
    if name == "ping_inline":
        figures["tcp_ping_p50_ms"] = result["p50_latency_ms"]
        figures["tcp_ping_p99_ms"] = result["p99_latency_ms"]
    return figures


def _redis_benchmark(port: int, test: str, clients: int, requests: int) -> dict[str, float]:
    argv = [*DIE_WITH_BENCH, "redis-benchmark", "-p", str(port), "-t", test, "-c", str(clients)]
    argv += ["-n", str(requests), "--csv", "--precision", "3"]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    header, values = (line.replace('"', "").split(",") for line in output.strip().splitlines()[:2])
    return {name: float(value) for name, value in zip(header[1:], values[1:], strict=True)}


def long_link_paths(
    bench: Bench, backend: int, petits: list[Route], one_way_ms: float
) -> list[Route]:
    """A second ssh -R and one more client per petit server, each dialling through a delay
    relay."""
    ssh_relay = bench.start_delay(bench.sshd_port, one_way_ms)
    routes = [Route("ssh -R", bench.start_ssh_forward(ssh_relay, backend), "localhost")]
    for petit in petits:
        assert petit.server is not None
        relay = bench.start_delay(petit.server.tunnel_port, one_way_ms)
        host, _ = bench.start_petit_client(petit.server, relay, backend)
        routes.append(Route(petit.name, petit.port, host))
    return routes


def leak_check(petit: Route, plan: Plan) -> dict[str, list[float]]:
    """RSS of petit's processes after each of ``plan.load_rounds`` further identical loads.

    A leak grows a little every round; the allocator's high-water mark is reached in the
    first rounds and then stays flat.
    """
    after: dict[str, list[float]] = {f"{role}_rounds_mb": [] for role in petit.pids}
    for _ in range(plan.load_rounds):
        wrk(petit, 64, plan.duration)
        downloads(petit, 4)
        for role, pid in petit.pids.items():
            after[f"{role}_rounds_mb"].append(rss_mb(pid))
    return after


ROWS = [
    ("c16_req_s", "req/s, 1 KiB, 16 conns", True),
    ("c16_p50_ms", "p50 ms, 16 conns", False),
    ("c16_p99_ms", "p99 ms, 16 conns", False),
    ("c64_req_s", "req/s, 1 KiB, 64 conns", True),
    ("c64_p50_ms", "p50 ms, 64 conns", False),
    ("c64_p99_ms", "p99 ms, 64 conns", False),
    ("download_1x_mb_s", "MB/s, one 10 MiB download", True),
    ("download_1x_best_mb_s", "  best of the rounds", True),
    ("download_4x_mb_s", "MB/s, four 10 MiB downloads", True),
    ("download_4x_best_mb_s", "  best of the rounds", True),
    ("new_connection_ms", "ms, one request, new conn", False),
    ("wan_download_mb_s", "MB/s, one 10 MiB, 50 ms RTT", True),
    ("wan_beside_slow_mb_s", "MB/s, same, beside 4 slow readers", True),
    ("tcp_get_c1_req_s", "TCP port: redis GET/s, 1 conn", True),
    ("tcp_get_c50_req_s", "TCP port: redis GET/s, 50 conns", True),
    ("tcp_set_c50_req_s", "TCP port: redis SET/s, 50 conns", True),
    ("tcp_ping_p50_ms", "TCP port: PING p50 ms, 1 conn", False),
    ("tcp_ping_p99_ms", "TCP port: PING p99 ms, 1 conn", False),
    ("c64_cpu_us_server", "CPU µs/req server, 64 conns", False),
    ("c64_cpu_us_client", "CPU µs/req client, 64 conns", False),
    ("tcp_get_c1_cpu_us_server", "CPU µs/GET server, TCP 1 conn", False),
    ("tcp_get_c1_cpu_us_client", "CPU µs/GET client, TCP 1 conn", False),
]


def _ratio(petit: float, base: float, higher_is_better: bool) -> float:
    if not petit or not base or math.isnan(petit) or math.isnan(base):
        return float("nan")
    return petit / base if higher_is_better else base / petit


def table(results: dict[str, object]) -> str:
    """The figures with petit/ssh and petit/direct ratios (>1 is better for petit), and with
    a baseline revision, petit/petit@REV."""
    paths = results["paths"]
    assert isinstance(paths, dict)
    names = list(paths)
    ratios = [("petit/ssh", "ssh -R"), ("petit/direct", "direct")]
    ratios += [(f"/{name}", name) for name in names[3:]]
    header = ["measure", *names, *(label for label, _ in ratios)]
    widths = [31, *(max(10, len(name)) for name in header[1:])]
    lines = [
        " ".join(
            f"{h:{w}}" if i == 0 else f"{h:>{w}}"
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for key, label, higher_is_better in ROWS:
        values = [paths[name].get(key, float("nan")) for name in names]
        petit = paths["petit"].get(key, float("nan"))
        cells = [
            *values,
            *(
                _ratio(petit, paths[base].get(key, float("nan")), higher_is_better)
                for _, base in ratios
            ),
        ]
        lines.append(
            f"{label:{widths[0]}} "
            + " ".join(
                f"{value:{width}.2f}" for value, width in zip(cells, widths[1:], strict=True)
            )
        )
    lines.append("(ratios: >1 means petit is better; for latency and CPU, base/petit)")
    memory = results["memory"]
    assert isinstance(memory, dict)
    phases = {k: v for k, v in memory.items() if isinstance(v, float)}
    lines.append(
        "petit RSS MB: " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in sorted(phases.items()))
    )
    for key, values in sorted(memory.items()):
        if isinstance(values, list):
            shown = " ".join(f"{v:.1f}" for v in values)
            lines.append(f"petit {key[: -len('_rounds_mb')]} RSS MB after each load round: {shown}")
    return "\n".join(lines)


def main() -> None:
    """Parse options, measure, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, not minutes: only proves every figure is produced",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument(
        "--load-rounds",
        type=int,
        default=5,
        help="leak check: petit load rounds (wrk + 4 downloads), RSS after each",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure petit at this git revision (before and after, one run)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/latest.json"))
    options = parser.parse_args()
    if options.smoke:
        plan = Plan(
            duration=1.0,
            repeats=3,
            download_rounds=1,
            load_rounds=2,
            redis_requests=2000,
            slow_settle=0.5,
        )
    else:
        plan = Plan(
            options.duration,
            repeats=21,
            download_rounds=7,
            load_rounds=options.load_rounds,
            redis_requests=20_000,
        )
    results = measure(plan, options.baseline)
    print(table(results))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {options.json}")


if __name__ == "__main__":
    main()

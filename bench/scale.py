"""Scale run: many registered clients connected at once to one petit server.

The clients are simulated in this one process (real registrations, real TLS WebSocket
sessions, the real handshake), each answering HTTP requests itself. Reports the server's
RSS idle and with every client connected, the memory per tunnel, the time to register and
to connect them all, and how many requests through the ingress failed.

Usage: python bench/scale.py [--clients N] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit import messages
from petit.auth import (
    Hello,
    decode_window,
    encode_hello,
    generate_key,
    hello_transcript,
    parse_json_object,
    sign,
)
from petit.connection import DEFAULT_WINDOW, Role, TunnelConnection
from petit.pki import client_ssl_context
from petit.session import TunnelSession, TunnelStream
from petit.transport import (
    REGISTER_PATH,
    TUNNEL_PATH,
    ServerAddress,
    open_websocket,
)

VENV_BIN = Path(sys.executable).parent
CONCURRENCY = 64  # registrations, connections or requests in flight at once
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def register(address: ServerAddress, ca: Path) -> tuple[str, Ed25519PrivateKey]:
    """One real registration; returns (ID, private key)."""
    key = generate_key()
    async with open_websocket(address, client_ssl_context(ca), REGISTER_PATH) as (ws, fingerprint):
        nonce = base64.b64decode(
            str(messages.decode(await ws.get_message(), what="nonce")["nonce"])
        )
        await ws.send_message(messages.encode(messages.register_request(key, nonce, fingerprint)))
        reply = messages.decode(await ws.get_message(), what="reply")
    if reply.get("type") != "registered":
        raise RuntimeError(f"registration refused: {reply}")
    return str(reply["id"]), key


async def answer_http(stream: TunnelStream, target: str) -> None:
    """The simulated private service: answer every request head on the stream with 'ok'."""
    stream.accept()
    buffered = b""
    while chunk := await stream.receive_some():
        buffered += chunk
        while b"\r\n\r\n" in buffered:
            _, buffered = buffered.split(b"\r\n\r\n", 1)
            await stream.send_all(RESPONSE)


async def run_client(
    address: ServerAddress,
    ca: Path,
    registration_id: str,
    key: Ed25519PrivateKey,
    connecting: trio.Semaphore,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One simulated client: connect, prove the key, report started, serve until cancelled.

    ``connecting`` bounds how many clients are in their TLS + handshake phase at once.
    """
    async with connecting:
        websocket_cm = open_websocket(address, client_ssl_context(ca), TUNNEL_PATH)
        websocket, fingerprint = await websocket_cm.__aenter__()
    try:
        session = TunnelSession(
            TunnelConnection(Role.CLIENT),
            websocket,
            ping_interval=30,
            stream_handler=answer_http,
        )

        def make_hello(nonce: bytes) -> bytes:
            signature = sign(key, hello_transcript(nonce, fingerprint, [registration_id]))
            hello = Hello(claims={registration_id: signature}, window=DEFAULT_WINDOW)
            return encode_hello(hello)

        welcome = parse_json_object(await session.handshake_as_client(make_hello), what="welcome")
        session.connection.settle_windows(decode_window(welcome, what="welcome"))
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            task_status.started()
    finally:
        await websocket_cm.__aexit__(None, None, None)


async def request(port: int, registration_id: str) -> bool:
    """One GET through the server's HTTP ingress; True on a 200 with our body."""
    try:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                host = f"{registration_id}.localhost"
                await stream.send_all(
                    f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False
    return received.startswith(b"HTTP/1.1 200") and received.endswith(b"ok")


async def scale(clients: int, workdir: Path) -> dict[str, float]:
    """Start a server, register and connect ``clients`` clients, measure."""
    config = workdir / "server" / "config.toml"
    petit_server = str(VENV_BIN / "petit-server")
    subprocess.run(
        [petit_server, "init", "-c", str(config), "--hostname", "localhost"],
        check=True,
        capture_output=True,
    )
    text = config.read_text()
    for key, value in {
        "bindAddr": '"127.0.0.1"',
        "backPort": "0",
        "proxyPort": "0",
        "listenPort": "0",
        "adminPort": "0",
        "pingInterval": "30",
        "requireToken": "false",  # a loopback measurement: clients register freely
        "registrationsPerMinute": "1000000",
    }.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    config.write_text(text)
    subprocess.run([petit_server, "start", "-c", str(config)], check=True, capture_output=True)
    try:
        pid_file = json.loads((config.parent / "server.pid").read_text())
        server_pid, ports = int(pid_file["pid"]), pid_file["ports"]
        address = ServerAddress("localhost", int(ports["tunnel"]))
        ca = config.parent / "certificates" / "ca.crt"
        idle = rss_mb(server_pid)

        limiter = trio.CapacityLimiter(CONCURRENCY)
        registrations: list[tuple[str, Ed25519PrivateKey]] = []

        async def register_one() -> None:
            async with limiter:
                registrations.append(await register(address, ca))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(register_one)
        register_seconds = time.perf_counter() - started

        failures = 0
        async with trio.open_nursery() as sessions:
            connecting = trio.Semaphore(CONCURRENCY)
            started = time.perf_counter()
            async with trio.open_nursery() as connects:

                async def connect(rid: str, key: Ed25519PrivateKey) -> None:
                    nonlocal failures
                    try:
                        await sessions.start(run_client, address, ca, rid, key, connecting)
                    except Exception:  # noqa: BLE001 - counted and reported, not fatal to the run
                        failures += 1

                for rid, private_key in registrations:
                    connects.start_soon(connect, rid, private_key)
            connect_seconds = time.perf_counter() - started
            connected_rss = rss_mb(server_pid)

            ok = 0

            async def request_one(rid: str) -> None:
                nonlocal ok
                async with limiter:
                    answered = await request(int(ports["http"]), rid)
                ok += answered  # not `ok += await …`: that reads ok before the await

            started = time.perf_counter()
            async with trio.open_nursery() as requests:
                for rid, _ in registrations:
                    requests.start_soon(request_one, rid)
            request_seconds = time.perf_counter() - started
            loaded_rss = rss_mb(server_pid)
            sessions.cancel_scope.cancel()
        return {
            "clients": float(clients),
            "server_idle_mb": idle,
            "server_connected_mb": connected_rss,
            "server_after_requests_mb": loaded_rss,
            "per_tunnel_kb": (connected_rss - idle) * 1024 / max(clients, 1),
            "register_all_s": register_seconds,
            "connect_all_s": connect_seconds,
            "request_each_once_s": request_seconds,
            "connect_errors": float(failures),
            "request_errors": float(clients - ok),
        }
    finally:
        subprocess.run(
            [petit_server, "stop", "-c", str(config)], check=False, capture_output=True, timeout=60
        )


def main() -> None:
    """Parse options, run, print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=Path("bench/results/scale.json"))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="petit-scale-") as workdir:
        results = trio.run(scale, options.clients, Path(workdir))
    for name, value in results.items():
        print(f"{name:28} {value:10.2f}")
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

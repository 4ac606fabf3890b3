"""IPv4 and IPv6 callers from another host, as far as one machine allows: a network namespace
this test creates, joined to ours by a veth pair carrying an IPv4 and an IPv6 subnet of its
own. The server listens on ``bindAddr = "*"``; curl runs inside the namespace against both
of the server's addresses, and the registration's allow-list proves which caller address the
server saw. Nothing leaves the pair: the namespace has no other route."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.harness import (
    ClientFactory,
    PythonBackend,
    ServerFactory,
    http_request,
    run_cli,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="creating a network namespace needs root and iproute2",
    ),
]


@dataclass(frozen=True)
class Namespace:
    """A namespace reached over a veth pair: our side's addresses and its own."""

    name: str
    host_v4: str
    guest_v4: str
    host_v6: str
    guest_v6: str

    def run(self, *argv: str) -> list[str]:
        """``argv`` as a command inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    tag = secrets.token_hex(3)
    subnet = int(tag[:2], 16)  # 10.213.<subnet>.0/24 and fd00:213:<subnet>::/64, ours alone
    ns = Namespace(
        name=f"petit-{tag}",
        host_v4=f"10.213.{subnet}.1",
        guest_v4=f"10.213.{subnet}.2",
        host_v6=f"fd00:213:{subnet:x}::1",
        guest_v6=f"fd00:213:{subnet:x}::2",
    )
    host_end, guest_end = f"pth{tag}", f"ptg{tag}"
    try:
        _ip("netns", "add", ns.name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", guest_end)
        _ip("link", "set", guest_end, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_v4}/24", "dev", host_end)
        _ip("-6", "addr", "add", f"{ns.host_v6}/64", "dev", host_end, "nodad")
        _ip("link", "set", host_end, "up")
        inside = ["-n", ns.name]
        _ip(*inside, "addr", "add", f"{ns.guest_v4}/24", "dev", guest_end)
        _ip(*inside, "-6", "addr", "add", f"{ns.guest_v6}/64", "dev", guest_end, "nodad")
        _ip(*inside, "link", "set", guest_end, "up")
        _ip(*inside, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=10)


async def test_ipv4_and_ipv6_callers_reach_a_server_listening_on_every_address(
    namespace: Namespace,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    server = await server_factory(bindAddr="*")
    client = await client_factory(server, python_backend.port)
    allowed = f"allow={namespace.guest_v4}/32,{namespace.guest_v6}/128"
    reply = await server.control(f"POLICY {client.registration_id} {allowed}")
    assert reply["success"] is True, reply
    port = server.http_port
    for address in (namespace.host_v4, f"[{namespace.host_v6}]"):
        result = await run_cli(
            namespace.run(
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "10",
                "-H",
                f"Host: {client.host}",
                f"http://{address}:{port}/",
            )
        )
        assert result.stdout.encode() == PythonBackend.GET_BODY, (address, result)
    # From loopback, outside the allow-list: the server judged the namespace's addresses.
    assert (await http_request(port, client.host)).status == 403

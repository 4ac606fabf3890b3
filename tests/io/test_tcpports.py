"""The TCP port manager binds a served registration's port even when the registry is late,
and refuses a shared one that another process listens on."""

from __future__ import annotations

import sys
from subprocess import PIPE

import trio
import trio.testing

from petit.listen import open_listeners, strangers_listening
from petit_server.edge.tcpports import TcpPorts
from petit_server.registry.base import Registration
from tests.integration.harness import free_port, wait_until

TIMEOUT = 10  # seconds bounding the test


class StillUpstreams:
    """Serves one registration and never announces a change."""

    def __init__(self, registration_id: str) -> None:
        self.changed = trio.Event()
        self._ids = {registration_id}

    def served_ids(self) -> set[str]:
        return set(self._ids)

    async def open_stream(self, registration_id: str) -> trio.abc.HalfCloseableStream:
        raise AssertionError("no connection is made to the port in this test")


async def test_a_port_is_bound_once_a_late_registry_knows_its_registration() -> None:
    """A cluster node may learn that another node holds 1001 before its registry mirror has
    loaded 1001; the port must listen once it has, with no other change to wake it."""
    port = free_port()
    known: dict[str, Registration] = {}
    ports = TcpPorts(StillUpstreams("1001"), known.get, host="127.0.0.1", open_timeout=1.0)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(ports.run, nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert not ports.status_of("1001")["tcpListening"]
            known["1001"] = Registration("1001", b"k" * 32, port, 0.0)  # the mirror catches up
            await wait_until(
                lambda: ports.status_of("1001")["tcpListening"] is True,
                TIMEOUT,
                what="the port to listen",
            )
            (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
            nursery.cancel_scope.cancel()


STRANGER = """
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen(1)
print("listening", flush=True)
sys.stdin.read()
"""


async def test_a_shared_port_another_process_listens_on_is_refused() -> None:
    """Workers share a registration's port with SO_REUSEPORT, which any process of our user
    could join too and take part of its connections: one that listens on it first makes the
    port fail with a reason, as a port in use does for a single server."""
    port = free_port()
    known = {"1001": Registration("1001", b"k" * 32, port, 0.0)}
    ports = TcpPorts(
        StillUpstreams("1001"), known.get, host="127.0.0.1", open_timeout=1.0, shared=True
    )
    assert strangers_listening(port) == 0
    stranger = await trio.lowlevel.open_process(
        [sys.executable, "-c", STRANGER, str(port)], stdin=PIPE, stdout=PIPE
    )
    try:
        with trio.fail_after(TIMEOUT):
            assert stranger.stdout is not None
            assert (await stranger.stdout.receive_some()).startswith(b"listening")
            assert strangers_listening(port) == 1
            async with trio.open_nursery() as nursery:
                await nursery.start(ports.run, nursery)
                await wait_until(
                    lambda: bool(ports.status_of("1001")["tcpError"]),
                    TIMEOUT,
                    what="the port to be refused",
                )
                nursery.cancel_scope.cancel()
    finally:
        stranger.kill()
        await stranger.wait()
    assert ports.status_of("1001") == {
        "tcpListening": False,
        "tcpError": f"cannot listen on TCP 127.0.0.1:{port}: already in use",
    }


async def test_our_own_listeners_on_a_shared_port_are_no_strangers() -> None:
    listeners = await open_listeners(0, "127.0.0.1", shared=True)
    try:
        port = listeners[0].socket.getsockname()[1]
        more = await open_listeners(port, "127.0.0.1", shared=True)
        assert strangers_listening(port) == 0
        for listener in more:
            await listener.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()

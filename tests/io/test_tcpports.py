"""The TCP port manager binds a served registration's port even when the registry is late."""

from __future__ import annotations

import trio
import trio.testing

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

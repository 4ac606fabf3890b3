"""Accept loops that outlive running out of descriptors, and throttled log lines."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket

import pytest
import trio
import trio.testing

from petit.listen import (
    ACCEPT_RETRY,
    bind_sockets,
    local_address,
    open_listeners,
    serve_listeners,
    show_address,
)
from petit.logs import REPORT_INTERVAL, Throttled

TIMEOUT = 60  # virtual seconds (autojump clock)


class ExhaustedListener(trio.abc.Listener[trio.SocketStream]):
    """accept() fails with EMFILE ``failures`` times, then hands out one real connection."""

    def __init__(self, failures: int, connection: trio.SocketStream) -> None:
        self.failures = failures
        self.connection: trio.SocketStream | None = connection

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if self.connection is None:
            await trio.sleep_forever()
        connection, self.connection = self.connection, None
        assert connection is not None
        return connection

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_an_accept_loop_out_of_descriptors_retries_and_logs_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    failures = int(2.5 * REPORT_INTERVAL / ACCEPT_RETRY)  # 25 s of EMFILE
    near, far = trio.socket.socketpair()
    listener = ExhaustedListener(failures, trio.SocketStream(near))
    served = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"served")
        served.set()

    caplog.set_level(logging.WARNING, logger="petit.listen")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_listeners(handler, [listener], what="HTTP ingress"))
            await served.wait()
            nursery.cancel_scope.cancel()
    assert await trio.SocketStream(far).receive_some() == b"served"
    lines = [r for r in caplog.records if r.name == "petit.listen"]
    assert len(lines) == 3, [r.getMessage() for r in lines]  # at 0 s, 10 s and 20 s
    assert all(r.exc_info is None for r in lines), "a traceback per retry floods the log"
    assert "HTTP ingress cannot accept connections: Too many open files" in lines[0].getMessage()
    held_back = re.search(r"\(and (\d+) more like it in the last 10 s\)", lines[1].getMessage())
    assert held_back is not None, lines[1].getMessage()
    assert 99 <= int(held_back[1]) <= 100  # one retry every 0.1 s for 10 s


async def test_an_accept_error_that_is_not_exhaustion_ends_the_listener() -> None:
    class Broken(trio.abc.Listener[trio.SocketStream]):
        async def accept(self) -> trio.SocketStream:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, "Bad file descriptor")

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    async def handler(stream: trio.SocketStream) -> None:
        raise AssertionError("nothing was accepted")

    with trio.fail_after(TIMEOUT), pytest.raises(ExceptionGroup) as ended:
        await serve_listeners(handler, [Broken()], what="HTTP ingress")
    assert ended.group_contains(OSError)


def test_throttled_holds_repeats_back_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("petit.test.throttled")
    throttled = Throttled(logger, interval=10, max_keys=2)
    caplog.set_level(logging.INFO, logger=logger.name)
    assert throttled.log(logging.INFO, "peer A", 0.0, "bad request from %s", "A")
    assert not throttled.log(logging.INFO, "peer A", 1.0, "bad request from %s", "A")
    assert not throttled.log(logging.INFO, "peer A", 9.0, "bad request from %s", "A")
    assert throttled.log(logging.INFO, "peer B", 9.5, "bad request from %s", "B")  # its own key
    assert throttled.log(logging.INFO, "peer A", 10.0, "bad request from %s", "A")
    assert [r.getMessage() for r in caplog.records] == [
        "bad request from A",
        "bad request from B",
        "bad request from A (and 2 more like it in the last 10 s)",
    ]
    # Bounded: a third key forgets the oldest, which then logs at once again.
    assert throttled.log(logging.INFO, "peer C", 11.0, "bad request from %s", "C")
    assert throttled.log(logging.INFO, "peer B", 12.0, "bad request from %s", "B")


@pytest.mark.parametrize("spec", ["*", "127.0.0.1, ::1"])
async def test_every_address_of_a_spec_listens_on_one_port(spec: str) -> None:
    """trio's open_tcp_listeners gave each family its own random port for port 0."""
    listeners = await open_listeners(0, spec)
    try:
        ports = {listener.socket.getsockname()[1] for listener in listeners}
        families = {listener.socket.family for listener in listeners}
        assert len(ports) == 1, ports
        assert families == {socket.AF_INET, socket.AF_INET6}
        (port,) = ports
        with trio.fail_after(TIMEOUT):
            for address in ("127.0.0.1", "::1"):
                async with await trio.open_tcp_stream(address, port):
                    pass
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_a_held_shared_port_takes_no_connection_and_keeps_others_out() -> None:
    """What the workers' supervisor relies on: a bound, never listening, SO_REUSEPORT socket
    reserves its port (port 0 resolved once) for sockets that share it, and is never chosen
    for a connection; a socket that does not share it cannot bind the port."""
    held = await bind_sockets(0, "127.0.0.1", shared=True)
    port = held[0].getsockname()[1]
    first = await open_listeners(port, "127.0.0.1", shared=True)
    second = await open_listeners(port, "127.0.0.1", shared=True)
    try:
        with pytest.raises(OSError, match="Address already in use"):
            await open_listeners(port, "127.0.0.1")
        accepted = {id(first[0]): 0, id(second[0]): 0}
        all_accepted = trio.Event()
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def count(listener: trio.SocketListener) -> None:
                    while True:
                        stream = await listener.accept()
                        accepted[id(listener)] += 1
                        await stream.aclose()
                        if sum(accepted.values()) == 32:
                            all_accepted.set()

                nursery.start_soon(count, first[0])
                nursery.start_soon(count, second[0])
                for _ in range(32):  # each connects: none lands on the held socket
                    async with await trio.open_tcp_stream("127.0.0.1", port):
                        pass
                await all_accepted.wait()
                nursery.cancel_scope.cancel()
        assert all(accepted.values()), accepted  # both listeners took a share
    finally:
        for listener in [*first, *second]:
            await listener.aclose()
        for sock in held:
            sock.close()


async def test_an_address_that_cannot_be_bound_is_an_oserror_and_leaks_nothing() -> None:
    descriptors = len(os.listdir("/proc/self/fd"))
    # 192.0.2.1 (TEST-NET-1) is never this machine's; 127.0.0.1 was bound first.
    with pytest.raises(OSError, match="Cannot assign requested address"):
        await open_listeners(0, "127.0.0.1, 192.0.2.1")
    assert len(os.listdir("/proc/self/fd")) == descriptors


@pytest.mark.parametrize(
    ("spec", "local", "shown"),
    [
        ("0.0.0.0", "127.0.0.1", "0.0.0.0:80"),
        ("*", "127.0.0.1", "*:80"),
        ("::", "::1", "[::]:80"),
        ("::1, 127.0.0.1", "::1", "[::1]:80 and 127.0.0.1:80"),
        ("tunnel.example.com", "tunnel.example.com", "tunnel.example.com:80"),
    ],
)
def test_addresses_are_reached_locally_and_shown_as_people_write_them(
    spec: str, local: str, shown: str
) -> None:
    assert local_address(spec) == local
    assert show_address(spec, 80) == shown

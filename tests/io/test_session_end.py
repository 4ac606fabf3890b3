"""How a session ends, seen from its peer: the last GOAWAY arrives even when the writer was
in the middle of a send over TLS, and an open still pending when the client's session ends
fails as "session closed" (the public caller's 503), not as "refused" (502).
"""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing
import trustme

from petit.connection import Role, TunnelConnection
from petit.session import (
    SessionClosedError,
    StreamCarrier,
    TunnelSession,
    TunnelStream,
)

from .helpers import REGISTRATION_ID, Served, handshake, session_pair

TIMEOUT = 10  # seconds bounding each test


class GatedCarrier(StreamCarrier):
    """A carrier whose reads wait while ``open`` is cleared: the peer's sends pile up."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.open = trio.Event()
        self.open.set()

    async def receive(self) -> bytes:
        await self.open.wait()
        return await super().receive()


def tls_pair() -> tuple[trio.SSLStream[trio.abc.Stream], trio.SSLStream[trio.abc.Stream]]:
    """(client, server) TLS over a lockstep pair: a send returns only once the peer read it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("tunnel.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_raw, server_raw = trio.testing.lockstep_stream_pair()
    return (
        trio.SSLStream(client_raw, client_context, server_hostname="tunnel.test"),
        trio.SSLStream(server_raw, server_context, server_side=True),
    )


async def test_goaway_reaches_the_peer_when_the_writer_is_mid_send() -> None:
    """Cancelling a TLS send half-way would break the stream and lose the GOAWAY behind it."""
    client_tls, server_tls = tls_pair()
    client_carrier = GatedCarrier(client_tls)

    async def take_stream(stream: TunnelStream, target: str) -> None:
        stream.accept()
        await trio.sleep_forever()

    client = Served(
        TunnelSession(
            TunnelConnection(Role.CLIENT),
            client_carrier,
            ping_interval=3600,
            stream_handler=take_stream,
        )
    )
    server = Served(
        TunnelSession(TunnelConnection(Role.SERVER), StreamCarrier(server_tls), ping_interval=3600)
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as handshakes:
                handshakes.start_soon(client_tls.do_handshake)
                handshakes.start_soon(server_tls.do_handshake)
            await handshake(client.session, server.session)
            await nursery.start(server.run)
            await nursery.start(client.run)
            stream = await server.session.open_stream(REGISTRATION_ID)

            client_carrier.open = trio.Event()  # the client stops reading
            nursery.start_soon(stream.send_all, bytes(512 * 1024))
            await trio.testing.wait_all_tasks_blocked()  # the server's writer is stuck mid-send
            server.session.close("server going down")
            await trio.testing.wait_all_tasks_blocked()
            client_carrier.open.set()

            await client.finished.wait()
            await server.finished.wait()
            going_away = client.session.going_away
            assert going_away is not None, f"no GOAWAY; client: {client.session.close_reason}"
            assert going_away.reason == "server going down"
            assert (client.error, server.error) == (None, None)


@pytest.mark.parametrize("ending", ["client closes", "client is cancelled"])
async def test_an_open_pending_when_the_client_session_ends_fails_as_session_closed(
    ending: str,
) -> None:
    """The client gives up on an open it was still dialling: not a refusal by its service."""
    dialling = trio.Event()

    async def dial_forever(stream: TunnelStream, target: str) -> None:
        dialling.set()
        async with trio.open_nursery() as attempts:  # as trio.open_tcp_stream dials
            attempts.start_soon(trio.sleep_forever)  # the local service never answers
            await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, handler=dial_forever)
            outcome: list[BaseException] = []

            async def open_pending() -> None:
                try:
                    await pair.server.session.open_stream(REGISTRATION_ID)
                except Exception as exc:  # noqa: BLE001 - the assertion is on its type
                    outcome.append(exc)

            nursery.start_soon(open_pending)
            await dialling.wait()
            if ending == "client closes":
                pair.client.session.close("the client's registrations changed")
            else:
                pair.client.cancel_scope.cancel()
            await pair.server.finished.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(outcome) == 1
            assert isinstance(outcome[0], SessionClosedError), repr(outcome[0])

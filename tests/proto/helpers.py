"""A client and a server ``TunnelConnection`` wired back to back, so tests read like a dialogue."""

from __future__ import annotations

import ipaddress
import json

from petit.connection import DEFAULT_WINDOW, Role, TunnelConnection
from petit.events import (
    ChallengeReceived,
    HelloReceived,
    StreamAccepted,
    StreamOpened,
    TunnelEvent,
    Welcomed,
)
from petit.frames import MAX_PAYLOAD, Frame, decode_all, encode_frame

NONCE = bytes(range(32))
HELLO = b'{"client": "c1"}'
WELCOME = b'{"session": "s1"}'


class ConnectionPair:
    """A client and a server; ``deliver(to=...)`` moves the other side's queued bytes across.

    Each side offers its ``*_window`` in the handshake and settles the windows with what the
    other announced, as the services do; ``None`` makes that side an old peer, which announces
    nothing and never settles (both its windows stay DEFAULT_WINDOW).
    """

    def __init__(
        self,
        *,
        client_window: int | None = DEFAULT_WINDOW,
        server_window: int | None = DEFAULT_WINDOW,
        max_payload: int = MAX_PAYLOAD,
        handshake: bool = True,
    ) -> None:
        self.client_window, self.server_window = client_window, server_window
        self.client = TunnelConnection(
            Role.CLIENT, offered_window=client_window or DEFAULT_WINDOW, max_payload=max_payload
        )
        self.server = TunnelConnection(
            Role.SERVER, offered_window=server_window or DEFAULT_WINDOW, max_payload=max_payload
        )
        if handshake:
            self.handshake()

    def connection(self, role: Role) -> TunnelConnection:
        return self.client if role is Role.CLIENT else self.server

    def deliver(self, to: Role) -> list[TunnelEvent]:
        """Feed the bytes the other side queued to ``to``; [] if it queued none (not an EOF)."""
        sender = self.connection(Role.SERVER if to is Role.CLIENT else Role.CLIENT)
        data = sender.data_to_send()
        return self.connection(to).receive_data(data) if data else []

    def handshake(self) -> None:
        self.server.send_challenge(NONCE)
        assert self.deliver(to=Role.CLIENT) == [ChallengeReceived(NONCE)]
        hello = _announcing(HELLO, self.client_window)
        self.client.send_hello(hello)
        assert self.deliver(to=Role.SERVER) == [HelloReceived(hello)]
        if self.server_window is not None:
            self.server.settle_windows(self.client_window)
        welcome = _announcing(WELCOME, self.server_window)
        self.server.send_welcome(welcome)
        assert self.deliver(to=Role.CLIENT) == [Welcomed(welcome)]
        if self.client_window is not None:
            self.client.settle_windows(self.server_window)

    def open_stream(self, target: str = "reg-1") -> int:
        """Open a stream from the server and accept it on the client; return its id."""
        stream_id = self.server.open_stream(target)
        assert self.deliver(to=Role.CLIENT) == [StreamOpened(stream_id, target)]
        self.client.accept_stream(stream_id)
        assert self.deliver(to=Role.SERVER) == [StreamAccepted(stream_id)]
        return stream_id


def _announcing(document: bytes, window: int | None) -> bytes:
    """A handshake document with the ``window`` field, or without it from an old peer."""
    if window is None:
        return document
    return json.dumps({**json.loads(document), "window": window}).encode()


def inject(connection: TunnelConnection, *frames: Frame) -> list[TunnelEvent]:
    """Feed hand-made frames to ``connection``, as a misbehaving peer would."""
    return connection.receive_data(b"".join(map(encode_frame, frames)))


def sent_frames(connection: TunnelConnection) -> list[Frame]:
    """Drain and decode what ``connection`` queued."""
    return decode_all(connection.data_to_send())


def proxy_v2(source: str, source_port: int = 51000) -> bytes:
    """A v2 PROXY header for a TCP connection from ``source`` to port 443 (as a balancer
    sends it; built here byte by byte, independently of petit.proxyprotocol)."""
    address = ipaddress.ip_address(source)
    destination = ipaddress.ip_address("192.0.2.1" if address.version == 4 else "2001:db8::1")
    ports = source_port.to_bytes(2, "big") + (443).to_bytes(2, "big")
    body = address.packed + destination.packed + ports
    family = b"\x11" if address.version == 4 else b"\x21"  # TCP over IPv4 / IPv6
    return b"\r\n\r\n\x00\r\nQUIT\n\x21" + family + len(body).to_bytes(2, "big") + body

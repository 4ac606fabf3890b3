"""Hostile tunnel peers against a real server, frame by frame over a real TLS WebSocket.

The attacker writes raw frames (``encode_frame``), so it can say what a well-behaved client
never would: frames before its hello, a header declaring an oversized payload, a window
overflow, DATA on a stream it was never given. Each must end the attacker's session only: a
legitimate client keeps its original session and keeps being served. Last, a hand-broken
registry file: ``start`` refuses it in one line and leaves it as it was.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit.auth import Hello, encode_hello, generate_key, hello_transcript, sign
from petit.connection import DEFAULT_WINDOW
from petit.errors import ErrorCode
from petit.frames import Frame, FrameDecoder, FrameType, encode_frame, encode_header
from petit.pki import client_ssl_context
from petit.transport import REGISTER_PATH, TUNNEL_PATH, ServerAddress, open_websocket
from petit.websocket import WebSocket, WebSocketClosedError
from tests.integration.harness import (
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    ServerFactory,
    http_request,
    register_request,
    rss_kib,
    signed_request,
    tail,
    wait_until,
)

pytestmark = pytest.mark.integration

EXCHANGE_TIMEOUT = 10.0  # seconds for one attack, start to close
U32 = struct.Struct("!I")


@dataclass
class RawTunnel:
    """An attacker's tunnel WebSocket: raw frames out, decoded frames in."""

    websocket: WebSocket
    fingerprint: bytes
    nonce: bytes
    decoder: FrameDecoder

    async def send(self, *frames: Frame | bytes) -> None:
        await self.websocket.send_message(
            b"".join(f if isinstance(f, bytes) else encode_frame(f) for f in frames)
        )

    async def next_frame(self) -> Frame | None:
        """The next frame from the server, or None once it closed the WebSocket."""
        while (frame := self.decoder.next_frame()) is None:
            try:
                self.decoder.feed(await self.websocket.get_message(limit=1 << 24))
            except WebSocketClosedError:
                return None
        return frame

    async def goaway(self) -> tuple[ErrorCode, str]:
        """Read until the server's GOAWAY; it must then close the WebSocket."""
        while (frame := await self.next_frame()) is not None:
            if frame.type is FrameType.GOAWAY:
                (code,) = U32.unpack_from(frame.payload)
                assert await self.next_frame() is None, "the server kept the tunnel open"
                return ErrorCode(code), frame.payload[U32.size :].decode()
        raise AssertionError("the server closed the tunnel without a GOAWAY")

    async def hello(self, claims: dict[str, bytes], window: int | None = DEFAULT_WINDOW) -> None:
        """A hello as petit-client sends it (``window=None``: as an older one did)."""
        hello = Hello(claims=claims, window=window)
        await self.send(Frame(FrameType.HELLO, 0, encode_hello(hello)))


@asynccontextmanager
async def raw_tunnel(server: PetitServer) -> AsyncIterator[RawTunnel]:
    """A TLS WebSocket to the tunnel endpoint, after the server's CHALLENGE."""
    address = ServerAddress("127.0.0.1", server.tunnel_port)
    with trio.fail_after(EXCHANGE_TIMEOUT):
        async with open_websocket(address, client_ssl_context(server.ca), TUNNEL_PATH) as (
            websocket,
            fingerprint,
        ):
            tunnel = RawTunnel(websocket, fingerprint, b"", FrameDecoder())
            challenge = await tunnel.next_frame()
            assert challenge is not None
            assert challenge.type is FrameType.CHALLENGE, challenge
            tunnel.nonce = challenge.payload
            yield tunnel


@dataclass
class Attacker:
    """A registration of the attacker's own, so it can open a real session."""

    server: PetitServer
    registration_id: str
    key: Ed25519PrivateKey

    @asynccontextmanager
    async def session(self) -> AsyncIterator[RawTunnel]:
        """A raw tunnel past its WELCOME: the server routes the attacker's ID to it."""
        async with raw_tunnel(self.server) as tunnel:
            transcript = hello_transcript(tunnel.nonce, tunnel.fingerprint, [self.registration_id])
            await tunnel.hello({self.registration_id: sign(self.key, transcript)})
            welcome = await tunnel.next_frame()
            assert welcome is not None
            assert welcome.type is FrameType.WELCOME, welcome
            yield tunnel


@dataclass
class Victim:
    """The legitimate client and the session it must keep."""

    server: PetitServer
    client: PetitClient
    since: object

    async def assert_unharmed(self) -> None:
        status = await self.client.control_status()
        assert (status["status"], status["connectedSince"]) == ("connected", self.since), status
        assert await self.server.sessions_of(self.client.registration_id) == 1
        for _ in range(3):
            response = await http_request(self.server.http_port, self.client.host)
            assert (response.status, response.body) == (200, PythonBackend.GET_BODY)


@pytest.fixture
async def victim(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> Victim:
    client = await client_factory(server, python_backend.port)
    return Victim(server, client, (await client.control_status())["connectedSince"])


@pytest.fixture
async def attacker(server: PetitServer) -> Attacker:
    key = generate_key()
    reply = await signed_request(server, REGISTER_PATH, register_request(key))
    assert reply.get("type") == "registered", reply
    return Attacker(server, str(reply["id"]), key)


def window_update(stream_id: int, delta: int) -> Frame:
    return Frame(FrameType.WINDOW_UPDATE, stream_id, U32.pack(delta))


PRE_HELLO_FRAMES: Sequence[Frame] = (
    Frame(FrameType.OPEN, 1, b"1001"),
    Frame(FrameType.DATA, 1, b"GET / HTTP/1.1\r\n\r\n"),
    window_update(1, 1024),
    Frame(FrameType.PING, 0, bytes(8)),
)


@pytest.mark.parametrize("frame", PRE_HELLO_FRAMES, ids=lambda f: f.type.name)
async def test_frames_before_the_hello_are_answered_with_goaway_auth(
    frame: Frame, server: PetitServer, victim: Victim
) -> None:
    async with raw_tunnel(server) as tunnel:
        await tunnel.send(frame)
        code, _ = await tunnel.goaway()
    assert code is ErrorCode.AUTH
    await victim.assert_unharmed()


async def test_a_failed_hello_says_nothing_about_which_ids_exist(
    server: PetitServer, victim: Victim
) -> None:
    forger = generate_key()
    answers = []
    for rid in (victim.client.registration_id, "987654321"):
        async with raw_tunnel(server) as tunnel:
            transcript = hello_transcript(tunnel.nonce, tunnel.fingerprint, [rid])
            await tunnel.hello({rid: sign(forger, transcript)})
            answers.append(await tunnel.goaway())
    assert answers[0] == answers[1], "an existing and an unknown ID were refused differently"
    assert answers[0][0] is ErrorCode.AUTH
    await victim.assert_unharmed()


async def test_a_peer_repeating_a_refused_hello_costs_one_log_line_per_interval(
    server: PetitServer, victim: Victim
) -> None:
    """20 forged hellos in a row: each is refused, but the log gets one line for them (and
    the next line, an interval later, would count the rest): no flood rotates history away."""
    forger = generate_key()
    rid = victim.client.registration_id
    for _ in range(20):
        async with raw_tunnel(server) as tunnel:
            transcript = hello_transcript(tunnel.nonce, tunnel.fingerprint, [rid])
            await tunnel.hello({rid: sign(forger, transcript)})
            code, _ = await tunnel.goaway()
            assert code is ErrorCode.AUTH
    refusals = server.log.read_text().count("tunnel from 127.0.0.1 refused")
    assert 1 <= refusals <= 2, tail(server.log)  # 2 only if the loop crossed an interval
    await victim.assert_unharmed()


async def test_a_client_announcing_no_window_is_refused_after_its_proof(
    server: PetitServer, victim: Victim, attacker: Attacker
) -> None:
    """A hello without a receive window (an older client, or one that wants the 1 MiB per
    stream that lifts the server's memory bound) is refused, saying why, once its proof holds."""
    async with raw_tunnel(server) as tunnel:
        rid = attacker.registration_id
        transcript = hello_transcript(tunnel.nonce, tunnel.fingerprint, [rid])
        await tunnel.hello({rid: sign(attacker.key, transcript)}, window=None)
        code, reason = await tunnel.goaway()
    assert code is ErrorCode.PROTOCOL
    assert reason == (
        "the hello announces no receive window: this petit-client predates the server's "
        "window negotiation; upgrade it"
    )
    assert await server.sessions_of(rid) == 0
    await victim.assert_unharmed()


PING = encode_frame(Frame(FrameType.PING, 0, bytes(8)))
PING_MESSAGE = PING * (256 * 1024 // len(PING))  # what issue 14's attacker sent, 256 KiB each
PING_FLOOD = 400  # messages at most: 100 MiB of PINGs (1.4 GB of server RSS in 87 s, once)
RSS_GROWTH_LIMIT = 50 * 1024  # KiB


async def test_a_ping_flood_that_never_reads_is_no_longer_read(
    server: PetitServer, victim: Victim, attacker: Attacker
) -> None:
    """The attacker's own session floods PINGs and never reads the PONGs: once its replies
    back up, the server stops reading it (the flood stalls in the attacker's own socket) and
    the keepalive, hearing nothing more, ends the session. Server memory stays flat and
    everyone else is served at once throughout."""
    before = rss_kib(server.pid)
    sent = 0
    async with attacker.session() as tunnel:
        with contextlib.suppress(trio.BrokenResourceError):  # the session ended
            for _ in range(PING_FLOOD):
                with trio.move_on_after(1) as stalled:
                    await tunnel.send(PING_MESSAGE)
                if stalled.cancelled_caught:
                    break
                sent += 1
        growth = rss_kib(server.pid) - before
        with trio.fail_after(1):
            response = await http_request(server.http_port, victim.client.host)
        assert (response.status, response.body) == (200, PythonBackend.GET_BODY)
    print(f"PING flood: {sent} x 256 KiB before the server stopped reading; RSS +{growth} KiB")
    assert sent < PING_FLOOD, "the server read the whole flood"
    assert growth <= RSS_GROWTH_LIMIT, f"server RSS grew {growth} KiB"
    await wait_until(
        lambda: _sessions_are(server, attacker.registration_id, 0), 5, what="the flooder's end"
    )
    await victim.assert_unharmed()


async def accepted_stream(attacker: RawTunnel, host: str) -> int:
    """Accept the stream a public caller's request opens; its id once the request arrived,
    so the attack lands on a stream in use."""
    stream_id = 0
    while (frame := await attacker.next_frame()) is not None:
        if frame.type is FrameType.OPEN:
            stream_id = frame.stream_id
            await attacker.send(Frame(FrameType.ACCEPT, stream_id))
        elif frame.type is FrameType.DATA and frame.stream_id == stream_id:
            return stream_id
    raise AssertionError(f"no request for {host} arrived")


async def test_a_hostile_frame_ends_only_the_senders_session(
    server: PetitServer, victim: Victim, attacker: Attacker
) -> None:
    """Each breach gets the attacker GOAWAY with its reason; nobody else notices."""
    breaches: dict[str, tuple[bytes, ErrorCode]] = {
        "declared length over 64 KiB": (
            encode_header(FrameType.DATA, 1, 64 * 1024 + 1),
            ErrorCode.FRAME_SIZE,
        ),
        "DATA on a stream never opened": (
            encode_frame(Frame(FrameType.DATA, 7, b"hello")),
            ErrorCode.STREAM_CLOSED,
        ),
    }
    for name, (raw, expected) in breaches.items():
        async with attacker.session() as tunnel:
            await wait_until(
                lambda: _sessions_are(server, attacker.registration_id, 1), 5, what="attach"
            )
            await tunnel.send(raw)
            code, reason = await tunnel.goaway()
        assert code is expected, (name, reason)
        await wait_until(
            lambda: _sessions_are(server, attacker.registration_id, 0), 5, what="detach"
        )
        await victim.assert_unharmed()


async def test_a_window_update_overflow_ends_only_the_senders_session(
    server: PetitServer, victim: Victim, attacker: Attacker
) -> None:
    host = f"{attacker.registration_id}.localhost"
    statuses: list[int] = []
    async with trio.open_nursery() as nursery, attacker.session() as tunnel:

        async def public_caller() -> None:
            statuses.append((await http_request(server.http_port, host)).status)

        nursery.start_soon(public_caller)
        stream_id = await accepted_stream(tunnel, host)
        await tunnel.send(window_update(stream_id, 2**32 - 1))
        code, _ = await tunnel.goaway()
    assert code is ErrorCode.FLOW_CONTROL
    assert statuses == [502], statuses
    await victim.assert_unharmed()


async def _sessions_are(server: PetitServer, registration_id: str, count: int) -> bool:
    return await server.sessions_of(registration_id) == count


# ----------------------------------------------------------------------------- hostile state

CORRUPT_REGISTRIES = {
    "truncated JSON": (b'{"version": 1,\n "registrations": {', "line 2, column 20"),
    "not UTF-8": (b'{"version": 1, "\xff": 2}', "byte 16: not UTF-8"),
    "wrong types": (
        b'{"version": 1, "registrations": [], "next_id": "1001"}',
        "'registrations' and 'next_id' are required",
    ),
    "malformed registration": (
        b'{"version": 1, "next_id": 1002, "registrations": {"1001": {"public_key": 5}}}',
        "registration 1001 is malformed",
    ),
}


async def test_a_corrupt_registry_stops_start_with_one_line_and_stays_untouched(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(start=False)
    for name, (content, where) in CORRUPT_REGISTRIES.items():
        server.registry.write_bytes(content)
        result = await server.cli("start", check=False)
        assert result.returncode == 3, (name, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (name, result)
        assert lines[0].startswith(f"error: registry {server.registry}"), (name, lines[0])
        assert where in lines[0], (name, lines[0])
        assert server.registry.read_bytes() == content, f"{name}: the registry was rewritten"
        assert server.running() is None
        assert not (server.directory / "server.lock").exists()


@pytest.mark.parametrize("stage", ["nothing", "TLS only"])
async def test_a_connection_that_never_completes_its_handshake_is_closed_in_time(
    server_factory: ServerFactory, stage: str
) -> None:
    """handshakeTimeout runs from TCP accept: a peer that sends nothing, or stops after TLS
    (no WebSocket upgrade), is closed within it rather than held for a minute."""
    timeout = 2.0
    server = await server_factory(handshakeTimeout=timeout)
    with trio.fail_after(timeout * 5):
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", server.tunnel_port)
        async with stream:
            # Closed before or after TLS, with or without a close_notify: closed all the same.
            with contextlib.suppress(trio.BrokenResourceError):
                if stage == "TLS only":
                    context = client_ssl_context(server.directory / "certificates" / "ca.crt")
                    stream = trio.SSLStream(stream, context, server_hostname="localhost")
                    await stream.do_handshake()
                assert await stream.receive_some() == b""

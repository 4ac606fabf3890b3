"""Attacks on the tunnel handshake against a real server with a legitimately connected client.

The attacker is built in-process from petit's own pieces (TLS WebSocket, session driver, sans-IO
connection, Ed25519 helpers), so it speaks the protocol perfectly and only its proofs are bad.
After every attack the legitimate client must still hold its original session and serve.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit.auth import Hello, encode_hello, generate_key, hello_transcript, parse_json_object, sign
from petit.connection import DEFAULT_WINDOW, Role, TunnelConnection
from petit.errors import RemoteProtocolError
from petit.pki import client_ssl_context
from petit.session import StreamHandler, TunnelSession, TunnelStream
from petit.transport import TUNNEL_PATH, ServerAddress, open_websocket
from tests.integration.harness import (
    PING_INTERVAL,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    http_request,
    wait_until,
)

pytestmark = pytest.mark.integration

MakeHello = Callable[[bytes, bytes], bytes]  # (nonce, server certificate fingerprint) -> HELLO
ATTACKER_BODY = b"attacker"


def signed_hello(
    claims: Sequence[str], keys: Sequence[Ed25519PrivateKey], *, fingerprint: bytes | None = None
) -> MakeHello:
    """A hello built like petit_client.service builds it (optionally over another cert)."""

    def make(nonce: bytes, server_fingerprint: bytes) -> bytes:
        transcript = hello_transcript(nonce, fingerprint or server_fingerprint, list(claims))
        signatures = {rid: sign(key, transcript) for rid, key in zip(claims, keys, strict=True)}
        hello = Hello(claims=signatures, vitae={"hostname": "attacker"}, window=DEFAULT_WINDOW)
        return encode_hello(hello)

    return make


@asynccontextmanager
async def tunnel(
    server: PetitServer, make_hello: MakeHello, stream_handler: StreamHandler | None = None
) -> AsyncIterator[tuple[TunnelSession, dict[str, object]]]:
    """Dial the real server, handshake with ``make_hello``; yield the session and WELCOME."""
    address = ServerAddress("127.0.0.1", server.tunnel_port)
    async with open_websocket(address, client_ssl_context(server.ca), TUNNEL_PATH) as (
        websocket,
        fingerprint,
    ):
        session = TunnelSession(
            TunnelConnection(Role.CLIENT),
            websocket,
            ping_interval=PING_INTERVAL,
            stream_handler=stream_handler,
        )
        with trio.fail_after(10):
            welcome = await session.handshake_as_client(lambda n: make_hello(n, fingerprint))
        yield session, parse_json_object(welcome, what="welcome")


def _leaves(group: BaseExceptionGroup[RemoteProtocolError]) -> list[RemoteProtocolError]:
    found: list[RemoteProtocolError] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def refusal(server: PetitServer, make_hello: MakeHello) -> str:
    """The server's reason for refusing the hello; fails the test if it was accepted."""
    reasons: list[str] = []
    try:
        async with tunnel(server, make_hello) as (_, welcome):
            reasons.append(f"ACCEPTED: {welcome}")
    except* RemoteProtocolError as group:
        reasons.extend(str(exc) for exc in _leaves(group))
    assert reasons, "the handshake neither failed nor succeeded"
    assert not reasons[0].startswith("ACCEPTED"), reasons[0]
    return reasons[0]


@pytest.fixture
async def victim(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> PetitClient:
    """The legitimate client, connected, serving the python backend."""
    return await client_factory(server, python_backend.port)


async def assert_unharmed(server: PetitServer, victim: PetitClient, since: object) -> None:
    """The legitimate client kept its original session and its requests reach its backend."""
    status = await victim.status()
    assert status["status"] == "connected", status
    assert status["connectedSince"] == since, "the legitimate client lost its session"
    assert await server.sessions_of(victim.registration_id) == 1
    for _ in range(5):
        response = await http_request(server.http_port, victim.host)
        assert (response.status, response.body) == (200, PythonBackend.GET_BODY)


@pytest.mark.parametrize(
    "forgery",
    ["wrong key", "other server certificate", "garbage signature"],
)
async def test_forged_hello_for_a_legit_id_is_refused(
    forgery: str, server: PetitServer, victim: PetitClient
) -> None:
    since = (await victim.control_status())["connectedSince"]
    rid = victim.registration_id
    if forgery == "wrong key":
        make = signed_hello([rid], [generate_key()])
    elif forgery == "other server certificate":  # a relay through a MITM's own certificate
        make = signed_hello([rid], [victim.key()], fingerprint=hashlib.sha256(b"mitm").digest())
    else:

        def make(nonce: bytes, fingerprint: bytes) -> bytes:
            return encode_hello(Hello(claims={rid: bytes(64)}))

    reason = await refusal(server, make)
    assert "(AUTH)" in reason, reason
    await assert_unharmed(server, victim, since)


async def test_replayed_hello_is_refused(server: PetitServer, victim: PetitClient) -> None:
    since = (await victim.control_status())["connectedSince"]
    rid = victim.registration_id
    genuine = signed_hello([rid], [victim.key()])
    captured: list[bytes] = []

    def capture(nonce: bytes, fingerprint: bytes) -> bytes:
        captured.append(genuine(nonce, fingerprint))
        return captured[-1]

    # The captured bytes are a valid proof for the nonce they answered...
    async with tunnel(server, capture) as (_, welcome):
        assert welcome["accepted"] == [rid]
        await wait_until(lambda: _sessions_are(server, rid, 2), 5, what="a second session")
    await wait_until(
        lambda: _sessions_are(server, rid, 1), 5, what="the genuine second session to end"
    )

    # ...and worth nothing on a new connection, whose nonce differs.
    reason = await refusal(server, lambda nonce, fingerprint: captured[0])
    assert "(AUTH)" in reason, reason
    await assert_unharmed(server, victim, since)


async def _sessions_are(server: PetitServer, rid: str, count: int) -> bool:
    return await server.sessions_of(rid) == count


async def test_second_registration_cannot_claim_the_victims_id(
    server: PetitServer,
    victim: PetitClient,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    since = (await victim.control_status())["connectedSince"]
    other = await client_factory(server, python_backend.port, start=False)
    own, target = other.registration_id, victim.registration_id
    key = other.key()
    opened_for: list[str] = []

    async def answer(stream: TunnelStream, registration_id: str) -> None:
        opened_for.append(registration_id)
        stream.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some()
            if not chunk:
                return
            request += chunk
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(ATTACKER_BODY), ATTACKER_BODY)
        )
        await stream.send_eof()

    async with tunnel(server, signed_hello([own, target], [key, key]), answer) as (
        session,
        welcome,
    ):
        assert welcome["accepted"] == [own]
        assert welcome["rejected"] == [target]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await wait_until(
                lambda: _sessions_are(server, own, 1), 5, what="the attacker's session"
            )
            # The attacker's session is live and serves the ID it proved...
            mine = await http_request(server.http_port, other.host)
            assert (mine.status, mine.body) == (200, ATTACKER_BODY)
            # ...while every request for the victim still reaches the victim's backend.
            for _ in range(10):
                theirs = await http_request(server.http_port, victim.host)
                assert (theirs.status, theirs.body) == (200, PythonBackend.GET_BODY)
            assert await server.sessions_of(target) == 1
            nursery.cancel_scope.cancel()
    assert opened_for == [own]
    await assert_unharmed(server, victim, since)

"""What strangers can send to petit, as fuzz targets: each takes any bytes and raises only on
a bug (an unexpected exception type, a broken invariant, a hang caught by a timeout).

The hypothesis tests (``tests/proto/test_fuzz.py``, ``test_fuzz_inputs.py``) and the atheris
runner (``tests/fuzz/run.py``) drive the same functions; ``SEEDS`` gives each target a few
well-formed inputs to start from.
"""

from __future__ import annotations

import base64
import json
import secrets
import tempfile
from collections.abc import Callable, Iterable
from functools import cache, partial
from pathlib import Path

import trio
import trio.testing

from petit.auth import decode_hello
from petit.connection import ConnectionState, Role
from petit.control import send_control, serve_control
from petit.errors import PetitError, RemoteProtocolError
from petit.frames import Frame, FrameType, encode_frame
from petit.logs import LogSettings
from petit.messages import decode as decode_message
from petit_server.config import ServerConfig
from petit_server.edge.gateway import Gateway, SourceRate
from petit_server.edge.hub import Attachment, Hub
from petit_server.edge.ingress import IngressConnection, Routing
from petit_server.registry.base import registration_id_for_host
from petit_server.registry.file_backend import FileRegistry
from tests.io.helpers import session_pair
from tests.io.test_ingress import HttpBackend
from tests.proto.helpers import ConnectionPair, sent_frames

# ----------------------------------------------------------------------------- frames


def feed_connection(receiver: Role, handshake: bool, chunks: Iterable[bytes]) -> None:
    """Feed wire bytes to one side of a connection pair (past its handshake, a stream open,
    or just challenged): only RemoteProtocolError may come out, after which the connection
    is closed, has queued a GOAWAY and ignores everything else."""
    pair = ConnectionPair(handshake=handshake)
    if handshake:
        pair.server.open_stream("reg-1")
    else:
        pair.server.send_challenge(bytes(32))
    connection = pair.connection(receiver)
    connection.data_to_send()
    for chunk in chunks:
        if not chunk:
            continue
        try:
            connection.receive_data(chunk)
        except RemoteProtocolError:
            assert connection.state is ConnectionState.CLOSED
            assert sent_frames(connection)[-1].type is FrameType.GOAWAY
            assert connection.receive_data(chunk) == []
            return


def connection_target(data: bytes) -> None:
    """The first byte picks the receiver, the handshake and the piece size (1-64 bytes)."""
    if not data:
        return
    flags, wire = data[0], data[1:]
    piece = 1 + (flags >> 2)
    feed_connection(
        Role.CLIENT if flags & 1 else Role.SERVER,
        bool(flags & 2),
        (wire[start : start + piece] for start in range(0, len(wire), piece)),
    )


# ----------------------------------------------------------------------------- handshake


@cache
def fuzz_gateway() -> Gateway:
    """A gateway over a throw-away registry holding one registration (1001)."""
    directory = Path(tempfile.mkdtemp(prefix="petit-fuzz-"))
    return make_gateway(directory)


def make_gateway(directory: Path) -> Gateway:
    """A gateway over a registry in ``directory`` holding one registration (1001)."""
    config = ServerConfig(
        path=directory / "config.toml",
        registry_file=directory / "registry.json",
        certificate=directory / "server.crt",
        key=directory / "server.key",
        log=LogSettings(file=directory / "server.log", audit_file=directory / "audit.log"),
        require_token=False,  # the proofs alone decide here: that is what is fuzzed
    )
    registry = FileRegistry(config.registry_file, first_port=config.first_port)
    trio.run(registry.register, bytes(32), {})
    return Gateway(config, registry, Hub(), secrets.token_bytes(32), SourceRate(1_000_000))


def refuse_unproven(
    gateway: Gateway, register: dict[str, object], unregister: dict[str, object]
) -> None:
    """Requests signed by nobody are refused with PetitError and change nothing."""
    registry_file = gateway.config.registry_file
    before = registry_file.read_bytes()
    nonce = secrets.token_bytes(32)
    for answer, request in ((gateway._register, register), (gateway._unregister, unregister)):
        try:
            trio.run(answer, request, nonce, "192.0.2.1")
        except PetitError:
            continue
        raise AssertionError(f"an unproven request was answered: {request!r}")
    assert registry_file.read_bytes() == before
    assert gateway.registry.public_key_of("1001") == bytes(32)


def handshake_target(data: bytes) -> None:
    """The same bytes as a hello, and as a register and an unregister request."""
    try:
        hello = decode_hello(data)
    except PetitError:
        pass
    else:
        assert hello.claims
        assert all(rid.isdigit() for rid in hello.claims)
    try:
        request = decode_message(data, what="register")
    except PetitError:
        return
    assert isinstance(request, dict)
    refuse_unproven(fuzz_gateway(), request, request)


# ----------------------------------------------------------------------------- control port


async def reply_to(port: int, data: bytes) -> bytes:
    """Send ``data`` then EOF to a control port; everything it answers before closing."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # it already answered and closed: read what it said
        reply = bytearray()
        while chunk := await stream.receive_some(65536):
            reply += chunk
        return bytes(reply)


async def echo_verb(verb: str, args: list[str], actor: str) -> dict[str, object]:
    return {"success": True, "verb": verb, "args": args}


def control_exchange(inputs: list[bytes]) -> None:
    """A real control port answers each input with a JSON object, then still answers PING."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve_control, echo_verb, host="127.0.0.1", port=0, allow=["127.0.0.1"])
            )
            with trio.fail_after(10):
                for data in inputs:
                    reply = await reply_to(port, data)
                    assert isinstance(json.loads(reply), dict), reply
                pong = await send_control("127.0.0.1", port, "PING")
                assert pong == {"success": True, "verb": "PING", "args": []}
            nursery.cancel_scope.cancel()

    trio.run(main)


def control_target(data: bytes) -> None:
    control_exchange([data])


# ----------------------------------------------------------------------------- public HTTP


def ingress_answer(data: bytes, piece: int) -> bytes:
    """What the HTTP ingress answers ``data`` sent in ``piece``-byte writes, then EOF.

    Hosts naming 1001 reach a private service through a real session pair; others 404. The
    answer must be empty or HTTP; time is virtual, so a hang shows as TooSlowError at once.
    """

    async def main() -> bytes:
        caller, public = trio.testing.memory_stream_pair()
        answer = bytearray()
        with trio.fail_after(600):  # virtual seconds: the clock jumps whenever all tasks wait
            async with trio.open_nursery() as nursery:
                pair = await session_pair(nursery, handler=HttpBackend("A"))
                hub = Hub()
                hub.attach(Attachment(pair.server.session, ["1001"], remote="test", vitae={}))
                routing = Routing(
                    route=lambda host: "1001" if registration_id_for_host(host) == "1001" else None,
                    open_upstream=hub.open_stream,
                    open_timeout=1,
                    header_timeout=1,
                    idle_timeout=1,
                )
                try:
                    async with trio.open_nursery() as connection:
                        connection.start_soon(serve_public, public, routing)
                        await send_in_pieces(caller, data, piece)
                        while chunk := await caller.receive_some(65536):
                            answer += chunk
                finally:
                    nursery.cancel_scope.cancel()
        return bytes(answer)

    answer = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not answer or answer.startswith(b"HTTP/1.1 "), answer[:80]
    return answer


async def serve_public(public: trio.abc.Stream, routing: Routing) -> None:
    """One public connection, closed afterwards as the service closes it."""
    try:
        await IngressConnection(public, routing, "192.0.2.1").run()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the caller went away: the only failure the ingress may let out
    finally:
        await trio.aclose_forcefully(public)


async def send_in_pieces(caller: trio.abc.HalfCloseableStream, data: bytes, piece: int) -> None:
    try:
        for start in range(0, len(data), piece):
            await caller.send_all(data[start : start + piece])
        await caller.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the ingress answered and closed early


def ingress_target(data: bytes) -> None:
    """The first byte picks the write size (1-256 bytes)."""
    if data:
        ingress_answer(data[1:], 1 + data[0])


# ----------------------------------------------------------------------------- registry

TARGETS: dict[str, Callable[[bytes], None]] = {
    "connection": connection_target,
    "handshake": handshake_target,
    "control": control_target,
    "ingress": ingress_target,
}

_B64_KEY = base64.b64encode(bytes(32)).decode()
SEEDS: dict[str, list[bytes]] = {
    "connection": [
        bytes([flags]) + b"".join(map(encode_frame, frames))
        for flags in (0x02, 0x03, 0x42, 0x00)
        for frames in (
            [Frame(FrameType.DATA, 1, b"hello"), Frame(FrameType.END, 1)],
            [Frame(FrameType.WINDOW_UPDATE, 1, b"\x00\x01\x00\x00")],
            [Frame(FrameType.PING, 0, bytes(8)), Frame(FrameType.GOAWAY, 0, bytes(4) + b"bye")],
            [Frame(FrameType.HELLO, 0, b'{"claims": {}}')],
        )
    ],
    "handshake": [
        b'{"claims": [{"id": "1001", "signature": "AA=="}], "vitae": {"os": "linux"}}',
        json.dumps({"type": "register", "public_key": _B64_KEY, "signature": _B64_KEY}).encode(),
        b'{"type": "unregister", "id": "1001", "signature": "AAAA"}',
    ],
    "control": [b"STATUS\x03", b"PING", b"LOG debug\x03", b"\xff\xfe\x03", b"STOP 1 2 3\x03"],
    "ingress": [
        b"\x40GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n",
        b"\x08POST /x HTTP/1.1\r\nHost: 1001.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"\xffGET / HTTP/1.1\r\nHost: nobody.example\r\nContent-Length: 3\r\n\r\nabc",
    ],
}

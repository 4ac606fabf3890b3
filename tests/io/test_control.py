"""The control port over real loopback sockets, including the original ``nc`` usage."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

from petit import control
from petit.control import ETX, MAX_COMMAND, ControlError, send_control, serve_control
from petit.errors import ConfigError


class RecordingHandler:
    """Answers every verb with what it received; ``BOOM`` simulates a handler bug."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.actors: list[str] = []

    async def __call__(self, verb: str, args: list[str], actor: str) -> dict[str, object]:
        self.calls.append((verb, args))
        self.actors.append(actor)
        if verb == "BOOM":
            raise RuntimeError("handler bug")
        return {"success": True, "verb": verb, "args": args}


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


async def start_server(nursery: trio.Nursery, handler: RecordingHandler, allow: list[str]) -> int:
    port: int = await nursery.start(
        partial(serve_control, handler, host="127.0.0.1", port=0, allow=allow)
    )
    return port


@pytest.fixture
async def port(nursery: trio.Nursery, handler: RecordingHandler) -> int:
    return await start_server(nursery, handler, ["127.0.0.1"])


async def exchange(port: int, payload: bytes, *, half_close: bool = True) -> object:
    """Send raw bytes like a foreign client would, then read the reply until the server closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(payload)
        if half_close:
            await stream.send_eof()
        received = bytearray()
        while chunk := await stream.receive_some():
            received += chunk
    return json.loads(received)


async def test_stop_then_half_close(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"STOP\x03")

    assert reply == {"success": True, "verb": "STOP", "args": []}
    assert handler.calls == [("STOP", [])]


async def test_command_without_half_close(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"ping\x03", half_close=False)

    assert reply == {"success": True, "verb": "PING", "args": []}


async def test_command_with_arguments(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"STATUS  1001 \t web\r\n\x03")

    assert reply == {"success": True, "verb": "STATUS", "args": ["1001", "web"]}


async def test_eof_without_etx_ends_the_command(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"LOG debug")

    assert reply == {"success": True, "verb": "LOG", "args": ["debug"]}


async def test_command_of_max_length_is_accepted(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"X" * MAX_COMMAND + ETX)

    assert reply == {"success": True, "verb": "X" * MAX_COMMAND, "args": []}


async def test_too_long_command_is_refused(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"X" * (MAX_COMMAND + 100) + ETX)

    assert reply == {"success": False, "error": "command too long"}
    assert handler.calls == []


@pytest.mark.parametrize(
    ("payload", "error"),
    [(b"", "empty command"), (b" \x03", "empty command"), (b"\xff\x03", "command is not UTF-8")],
)
async def test_unusable_command_is_refused(
    port: int, handler: RecordingHandler, payload: bytes, error: str
) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, payload)

    assert reply == {"success": False, "error": error}
    assert handler.calls == []


async def test_silent_client_gets_a_timeout_reply(
    port: int, handler: RecordingHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "COMMAND_TIMEOUT", 0.05)
    with trio.fail_after(10):
        reply = await exchange(port, b"STOP", half_close=False)

    assert reply == {"success": False, "error": "no command within 0.05 s"}
    assert handler.calls == []


async def test_peer_outside_allow_list_is_refused(
    nursery: trio.Nursery, handler: RecordingHandler
) -> None:
    port = await start_server(nursery, handler, ["10.0.0.0/8", "::1"])
    with trio.fail_after(10):
        reply = await exchange(port, b"STOP\x03")

    assert reply == {"success": False, "error": "not allowed from 127.0.0.1"}
    assert handler.calls == []


async def test_handler_exception_is_contained(
    port: int, handler: RecordingHandler, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        reply = await exchange(port, b"BOOM\x03")
        assert reply == {"success": False, "error": "internal error"}

        assert await send_control("127.0.0.1", port, "PING") == {
            "success": True,
            "verb": "PING",
            "args": [],
        }
    [record] = [r for r in caplog.records if r.name == "petit.control"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None


async def test_send_control_round_trip(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        reply = await send_control("127.0.0.1", port, "STATUS 1001")

    assert reply == {"success": True, "verb": "STATUS", "args": ["1001"]}


async def test_send_control_to_closed_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with trio.fail_after(10), pytest.raises(ControlError) as excinfo:
        await send_control("127.0.0.1", closed_port, "STOP")

    assert str(excinfo.value) == f"nothing is listening on the control port 127.0.0.1:{closed_port}"


async def test_send_control_rejects_a_non_json_reply(nursery: trio.Nursery) -> None:
    async def greeter(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some():  # read the command up to the client's EOF
                pass
            await stream.send_all(b"hello")

    listeners = await nursery.start(partial(trio.serve_tcp, greeter, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]

    with (
        trio.fail_after(10),
        pytest.raises(ControlError, match="did not answer with JSON: b'hello'"),
    ):
        await send_control("127.0.0.1", port, "STOP")


def test_ipv4_mapped_peers_are_normalised() -> None:
    assert str(control._normalise_address("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(control._normalise_address("::1")) == "::1"


async def test_invalid_allow_entry_is_a_config_error(handler: RecordingHandler) -> None:
    with pytest.raises(ConfigError, match="'localhost' is not an IP address or CIDR network"):
        await serve_control(handler, host="127.0.0.1", port=0, allow=["localhost"])


def netcat_half_closes() -> bool:
    """Is ``nc`` the OpenBSD netcat, whose ``-N`` shuts the socket down after stdin's EOF?"""
    netcat = shutil.which("nc")
    if netcat is None:
        return False
    usage = subprocess.run([netcat, "-h"], capture_output=True, text=True, check=False)
    return "-N" in usage.stdout + usage.stderr


@pytest.mark.skipif(not netcat_half_closes(), reason="needs the OpenBSD nc (for -N)")
async def test_netcat_stop(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        result = await trio.run_process(
            ["nc", "-N", "127.0.0.1", str(port)], stdin=b"STOP\x03", capture_stdout=True
        )

    assert json.loads(result.stdout) == {"success": True, "verb": "STOP", "args": []}


# Who may command.


async def test_the_handler_learns_the_commanding_uid(port: int, handler: RecordingHandler) -> None:
    with trio.fail_after(10):
        await exchange(port, b"PING\x03")
    expected = f"control:uid={os.geteuid()}" if Path("/proc/net/tcp").exists() else "control:"
    assert handler.actors[0].startswith(expected)


SETPRIV = shutil.which("setpriv")
NC = shutil.which("nc")


@pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None or NC is None or not Path("/proc/net/tcp").exists(),
    reason="needs root, setpriv and nc on Linux to act as another local user",
)
async def test_another_local_user_gets_one_refusal_line(
    port: int, handler: RecordingHandler
) -> None:
    """As ``nobody``: STOP (or anything) is refused and never reaches the handler."""
    assert SETPRIV is not None
    assert NC is not None
    argv = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", NC, "-N"]
    with trio.fail_after(10):
        result = await trio.run_process(
            [*argv, "127.0.0.1", str(port)], stdin=b"STOP\x03", capture_stdout=True
        )
    reply = json.loads(result.stdout)
    assert reply == {
        "success": False,
        "error": "only uid 0 (this daemon's user) and root may use the control port",
    }
    assert result.stdout.count(b"\n") <= 1
    assert handler.calls == []


def test_the_peer_of_a_loopback_connection_is_found_in_the_socket_table() -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp: not Linux")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as peer:
            accepted, _ = listener.accept()
            with accepted:
                assert control.loopback_peer_uid(peer.getsockname(), accepted.getsockname()) == (
                    os.geteuid()
                )
                stranger = ("127.0.0.1", 1)  # nobody's socket
                assert control.loopback_peer_uid(stranger, accepted.getsockname()) == -1

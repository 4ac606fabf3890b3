"""The control port: one ASCII command in, one JSON document out, then close.

The wire format is the original product's, so existing scripts keep working:
``echo -ne "STOP\\x03" | nc 127.0.0.1 3016``. A command ends at ETX (0x03), or at EOF for
clients that close without one. Every peer read has a deadline and a size limit, and a
failing handler costs only its own connection, never the server.

Who may command: a peer in the allow list; and a peer on loopback only if its socket belongs
to the daemon's own user or root. On Linux the kernel's socket table (/proc/net/tcp, tcp6)
names the uid that owns the peer's end of a loopback connection, so any other local user
(``nobody``) gets one refusal line. The handler learns who commanded (``actor``), for the
audit trail.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, TypeAlias

import trio

from petit.errors import ConfigError, PetitError
from petit.listen import kernel_tcp_sockets, open_listeners, serve_listeners

ETX: Final = b"\x03"
MAX_COMMAND: Final = 4096  # bytes before ETX
MAX_REPLY: Final = 1024 * 1024
COMMAND_TIMEOUT: Final = 10.0  # seconds a peer gets to send its command
REPLY_TIMEOUT: Final = 10.0  # seconds a peer gets to take the reply
LINGER_TIMEOUT: Final = 1.0  # seconds we read leftovers, so closing does not reset the reply
MAX_LINGER_BYTES: Final = 64 * 1024

Handler: TypeAlias = Callable[[str, list[str], str], Awaitable[dict[str, object]]]
"""(verb upper-cased, arguments, actor) -> the JSON reply. The actor says who commanded
(``control:uid=0``, or ``control:ADDRESS`` for a peer not on loopback). Unknown verbs are the
handler's to reject."""

_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = logging.getLogger("petit.control")


class ControlError(PetitError):
    """The control port could not be reached or gave an unreadable answer."""


async def serve_control(
    handler: Handler,
    *,
    host: str,
    port: int,
    allow: Sequence[str],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control port forever; ``task_status.started`` gets the bound port.

    ``allow`` lists the IPs or CIDR networks that may connect; others get an error reply.
    """
    networks = parse_networks(allow, "control allow")
    listeners = await open_listeners(port, host)
    bound_port: int = listeners[0].socket.getsockname()[1]
    task_status.started(bound_port)
    await serve_listeners(
        partial(_serve_connection, handler, networks), listeners, what="control port"
    )


async def send_control(host: str, port: int, command: str) -> dict[str, object]:
    """Send one command and return the JSON reply. The caller puts a timeout around it."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        if _is_refused(exc):
            raise ControlError(f"nothing is listening on the control port {host}:{port}") from None
        raise ControlError(f"cannot connect to the control port {host}:{port}: {exc}") from None
    async with stream:
        try:
            await stream.send_all(command.encode("utf-8") + ETX)
            await stream.send_eof()
            reply = await _receive_until_eof(stream, MAX_REPLY)
        except trio.BrokenResourceError as exc:
            raise ControlError(
                f"the control port {host}:{port} dropped the connection: {exc.__cause__ or exc}"
            ) from None
    if reply is None:
        raise ControlError(f"the control port {host}:{port} sent more than {MAX_REPLY} bytes")
    try:
        document = json.loads(reply)
    except ValueError:  # also covers a reply that is not UTF-8
        raise ControlError(
            f"the control port {host}:{port} did not answer with JSON: {reply[:80]!r}"
        ) from None
    if not isinstance(document, dict):
        raise ControlError(f"the control port {host}:{port} answered with a non-object JSON")
    return document


def parse_networks(entries: Sequence[str], what: str) -> list[_Network]:
    """IP addresses or CIDR networks (an allow list, trusted proxies); ConfigError naming
    ``what`` and the entry that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{what} entry {entry!r} is not an IP address or CIDR network"
            ) from None
    return networks


def in_networks(host: str, networks: Sequence[_Network]) -> bool:
    """Whether IP ``host`` (IPv4-mapped IPv6 unwrapped) is in any of ``networks``; False for
    anything that is no IP address."""
    try:
        address = _normalise_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _normalise_address(host: str) -> _Address:
    """The peer's IP, with IPv4-mapped IPv6 (``::ffff:a.b.c.d``) unwrapped to IPv4."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def _serve_connection(
    handler: Handler, networks: list[_Network], stream: trio.SocketStream
) -> None:
    """One connection, start to close; every failure stays inside it."""
    async with stream:
        try:
            reply = await _reply_to_peer(handler, networks, stream)
            with trio.move_on_after(REPLY_TIMEOUT) as send_scope:
                await stream.send_all(reply)
            if not send_scope.cancelled_caught:
                await _linger(stream)
        except (trio.BrokenResourceError, OSError) as exc:
            logger.debug("control connection lost: %s", exc)


async def _reply_to_peer(
    handler: Handler, networks: list[_Network], stream: trio.SocketStream
) -> bytes:
    peer_name = stream.socket.getpeername()
    peer = _normalise_address(peer_name[0])
    if not in_networks(peer_name[0], networks):
        logger.warning("control connection from %s refused: not in the allow list", peer)
        return _encode_error(f"not allowed from {peer}")
    actor = f"control:{peer}"
    if peer.is_loopback:
        ours = stream.socket.getsockname()
        uid = await trio.to_thread.run_sync(
            loopback_peer_uid, (peer_name[0], peer_name[1]), (ours[0], ours[1])
        )
        if uid is not None and uid not in (0, os.geteuid()):
            logger.warning("control connection from uid %d refused: not this daemon's user", uid)
            return _encode_error(
                f"only uid {os.geteuid()} (this daemon's user) and root may use the control port"
            )
        actor = f"control:uid={uid}" if uid is not None else actor
    command = await _receive_command(stream)
    if isinstance(command, _Rejected):
        return _encode_error(command.reason)
    try:
        text = command.decode("utf-8")
    except UnicodeDecodeError:
        return _encode_error("command is not UTF-8")
    words = text.split()
    if not words:
        return _encode_error("empty command")
    verb, args = words[0].upper(), words[1:]
    try:
        return json.dumps(await handler(verb, args, actor)).encode("utf-8")
    except Exception:
        logger.exception("control command %s from %s failed", verb, peer)
        return _encode_error("internal error")


@dataclass(frozen=True)
class _Rejected:
    """Why a command could not be read."""

    reason: str


async def _receive_command(stream: trio.SocketStream) -> bytes | _Rejected:
    """Read up to ETX, or EOF after some bytes, within the deadline and the size limit."""
    buffer = bytearray()
    with trio.move_on_after(COMMAND_TIMEOUT):
        while True:
            end = buffer.find(ETX)
            if end != -1:
                return bytes(buffer[:end])
            if len(buffer) > MAX_COMMAND:
                return _Rejected("command too long")
            chunk = await stream.receive_some(MAX_COMMAND + 1 - len(buffer))
            if not chunk:
                return bytes(buffer) if buffer else _Rejected("empty command")
            buffer += chunk
    return _Rejected(f"no command within {COMMAND_TIMEOUT:g} s")


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read what the peer still sends until it closes too (bounded).

    Closing with unread input makes the kernel send a reset, which can destroy the reply
    before the peer reads it (e.g. after a refused or too-long command).
    """
    await stream.send_eof()
    with trio.move_on_after(LINGER_TIMEOUT):
        drained = 0
        while drained < MAX_LINGER_BYTES:
            chunk = await stream.receive_some()
            if not chunk:
                return
            drained += len(chunk)


async def _receive_until_eof(stream: trio.SocketStream, limit: int) -> bytes | None:
    """Everything the peer sends until it closes; None if it sends more than ``limit``."""
    buffer = bytearray()
    while chunk := await stream.receive_some():
        buffer += chunk
        if len(buffer) > limit:
            return None
    return bytes(buffer)


def loopback_peer_uid(peer: tuple[str, int], ours: tuple[str, int]) -> int | None:
    """The uid owning the peer's end of a loopback TCP connection to ``ours``.

    Found in the kernel's socket tables (Linux): the entry whose local address is the peer's
    and whose remote address is ours. None where there are no such tables (not Linux); -1,
    which no user has, when they exist but hold no such entry (the peer already closed).
    """
    wanted_local = _proc_forms(*peer)
    wanted_remote = _proc_forms(*ours)
    sockets = kernel_tcp_sockets()
    if sockets is None:
        return None
    for fields in sockets:
        if fields[1] in wanted_local and fields[2] in wanted_remote:
            return int(fields[7])
    return -1


def _proc_forms(host: str, port: int) -> set[str]:
    """How /proc/net/tcp{,6} write an address: 32-bit words in host order, hex, ``:PORT``."""
    address = _normalise_address(host)
    v4 = address if isinstance(address, ipaddress.IPv4Address) else None
    v6 = address if v4 is None else ipaddress.IPv6Address(f"::ffff:{v4}")
    words = [v6.packed[i : i + 4] for i in range(0, 16, 4)]
    forms = {"".join(f"{int.from_bytes(w, sys.byteorder):08X}" for w in words) + f":{port:04X}"}
    if v4 is not None:
        forms.add(f"{int.from_bytes(v4.packed, sys.byteorder):08X}:{port:04X}")
    return forms


def _encode_error(message: str) -> bytes:
    return json.dumps({"success": False, "error": message}).encode("utf-8")


def _is_refused(exc: OSError) -> bool:
    """Did every connection attempt (trio tries each resolved address) get refused?"""
    attempts = exc.__cause__ if isinstance(exc.__cause__, ExceptionGroup) else None
    errors = attempts.exceptions if attempts is not None else (exc,)
    return all(isinstance(error, ConnectionRefusedError) for error in errors)

"""Accept loops for every TCP listener, and log lines that a flood cannot multiply.

# Theory of operation

- ``serve_listeners`` is trio's, with one difference that matters under attack: when
  ``accept`` fails because the process or the system ran out of something (descriptors,
  memory, buffers), the loop waits ``ACCEPT_RETRY`` and tries again, as trio's does, but
  it writes one WARNING line per ``REPORT_INTERVAL`` per listener with the count of
  failures, not a traceback per retry (trio's wrote ten a second: 822 in 40 s of an idle
  connection flood, rotating the log's history away). Every other accept error ends the
  listener, as in trio.
- Each accepted connection runs its handler in ``handler_nursery`` (the listener's own
  nursery by default) and is closed when the handler returns, as trio does.
- ``open_listeners`` binds what a config's address says: one address or name, several
  separated by commas (``"0.0.0.0, ::"``), or ``"*"`` for every address of both families.
  All of them share one port, also when the port is 0 (the first bind picks it); trio's own
  ``open_tcp_listeners`` gave each family its own random port. An IPv6 socket is IPv6 only,
  so ``"::"`` and ``"0.0.0.0"`` can be bound side by side.
- ``shared=True`` sets ``SO_REUSEPORT``: the server's workers (``petit_server.workers``)
  each bind the same public ports, and the kernel spreads new connections over their
  listening sockets by a hash of the 4-tuple. Only processes of the same user can join,
  but any of them can, and would silently take part of the connections: so a shared port
  is refused when a process other than this one and its siblings (the other children of
  its parent: the other workers) listens on it (``strangers_listening``, from Linux's
  socket tables; a port the supervisor holds is checked by a plain bind instead).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from petit.logs import Throttled

log = logging.getLogger("petit.listen")

# What accept() raises when resources ran out rather than the listener broke (trio's list).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1  # seconds between accept attempts while out of resources


Handler = Callable[[trio.SocketStream], Awaitable[object]]


async def serve_listeners(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    *,
    what: str,
    handler_nursery: trio.Nursery | None = None,
) -> None:
    """Accept on every listener forever; ``what`` names them in log lines."""
    reports = Throttled(log)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(
                _accept_loop, listener, handler, handler_nursery or nursery, what, reports
            )


EVERY_ADDRESS = "*"


def split_addresses(spec: str) -> list[str]:
    """The addresses a config value names: ``"a, b"`` is two, ``"*"`` stays ``"*"``."""
    return [address.strip() for address in spec.split(",") if address.strip()]


def local_address(spec: str) -> str:
    """Where this machine reaches a port bound as ``spec``: its first address, with a
    wildcard (``*``, ``0.0.0.0``, ``::``) meaning loopback."""
    first = (split_addresses(spec) or [EVERY_ADDRESS])[0]
    wildcards = {EVERY_ADDRESS: "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104
    return wildcards.get(first, first)


def show_address(spec: str, port: int) -> str:
    """Where a port listens, as people write it: ``[::1]:3014`` for IPv6, ``*:3014`` for
    every address, ``0.0.0.0:3014 and [::]:3014`` for two."""
    return " and ".join(
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host in split_addresses(spec)
    )


async def open_listeners(
    port: int, spec: str, *, shared: bool = False
) -> list[trio.SocketListener]:
    """Listen on every address ``spec`` names, all on one port (see the module's notes);
    ``shared``: with the other workers' sockets on that port.

    Raises:
        OSError: an address cannot be resolved or bound (in use, not ours).
    """
    sockets = await bind_sockets(port, spec, shared=shared)
    for sock in sockets:
        sock.listen(0xFFFF)  # as trio does: the kernel caps it at somaxconn
    return [trio.SocketListener(sock) for sock in sockets]


PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")  # the kernel's TCP socket tables
TCP_LISTEN = "0A"  # the state column of those tables for a listening socket


def kernel_tcp_sockets() -> list[list[str]] | None:
    """Every TCP socket in the kernel's tables (Linux), a row of their columns each:
    local and remote address, state, uid, inode...; None where there are no such tables."""
    tables = [path for path in PROC_NET_TCP if os.path.exists(path)]
    if not tables:
        return None
    rows: list[list[str]] = []
    for path in tables:
        with open(path) as table:
            next(table, None)  # the column names
            rows.extend(line.split() for line in table)
    return rows


def strangers_listening(port: int) -> int:
    """How many sockets listen on TCP ``port`` (any address) outside this process and its
    siblings; 0 where Linux's /proc is not there to tell."""
    listening = {
        fields[9]  # the socket's inode
        for fields in kernel_tcp_sockets() or []
        if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port
    }
    if not listening:
        return 0
    family = _siblings()
    ours = {inode for pid in family for inode in _socket_inodes(pid)}
    return len(listening - ours)


def _siblings() -> set[int]:
    """This process and every other child of its parent."""
    parent, family = os.getppid(), {os.getpid()}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(entry.path, "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:  # after "pid (comm)"
                    family.add(int(entry.name))
    return family


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds (those we may read: our user's)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


async def bind_sockets(port: int, spec: str, *, shared: bool) -> list[trio.socket.SocketType]:
    """Bound, not yet listening sockets for every address ``spec`` names, on one port.

    A bound socket that never listens receives no connection: the workers' supervisor holds
    such ``shared`` sockets to keep each public port (and the one port 0 picked) theirs.

    Raises:
        OSError: an address cannot be resolved or bound (in use, not ours).
    """
    hosts = [None if host == EVERY_ADDRESS else host for host in split_addresses(spec)]
    sockets: list[trio.socket.SocketType] = []
    try:
        for host in hosts:
            infos = await trio.socket.getaddrinfo(
                host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
            )
            for family, kind, protocol, _, address in infos:
                sock = trio.socket.socket(family, kind, protocol)
                sockets.append(sock)
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                if shared:
                    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind((address[0], port, *address[2:]))
                port = port or sock.getsockname()[1]  # the rest share the port chosen first
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_tcp(
    handler: Handler,
    port: int,
    *,
    host: str,
    what: str,
    handler_nursery: trio.Nursery | None = None,
    shared: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host``:``port`` (see ``open_listeners``), report the bound port, and serve
    forever."""
    listeners = await open_listeners(port, host, shared=shared)
    task_status.started(listeners[0].socket.getsockname()[1])
    await serve_listeners(handler, listeners, what=what, handler_nursery=handler_nursery)


async def _accept_loop(
    listener: trio.abc.Listener[trio.SocketStream],
    handler: Handler,
    handler_nursery: trio.Nursery,
    what: str,
    reports: Throttled,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                reports.log(
                    logging.WARNING,
                    listener,
                    trio.current_time(),
                    "the %s cannot accept connections: %s; retrying every %g s "
                    "(raise the open-file limit, or lower maxConnections)",
                    what,
                    exc.strerror or exc,
                    ACCEPT_RETRY,
                )
                await trio.sleep(ACCEPT_RETRY)
            else:
                handler_nursery.start_soon(_run_handler, handler, stream)


async def _run_handler(handler: Handler, stream: trio.SocketStream) -> None:
    async with stream:
        await handler(stream)

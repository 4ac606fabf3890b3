"""Several worker processes serving one server's ports: docs/many-cores.md, part 2.

# Theory of operation

- ``workers = N`` (N > 1) in ``[server]``: the daemon process is a supervisor, and N worker
  processes (``python -P -m petit_server.worker``) do the serving. A petit-server process
  runs one trio loop on one core; the workers use N.
- Ports. The supervisor binds each public port (tunnel endpoint, HTTP and HTTPS ingress)
  with ``SO_REUSEPORT`` and never listens on it: the port stays ours while workers come and
  go, and a port 0 is chosen once for all. Each worker binds the same ports the same way and
  listens; the kernel spreads new connections over the listening sockets by a hash of their
  addresses. A registration's raw TCP port is bound that way by every worker that serves it.
- Sessions. Each worker is a full server (``ServerService``) and a node of a cluster of its
  own on loopback: the node directory lives in the Redis registry under a prefix naming this
  host and tunnel port, and the link secret is made at each start and handed to the workers
  in their environment, so no other host's nodes can join. The WELCOME says ``worker`` and
  ``workers``, and a client keeps a session to every worker (``petit_client.service``): then
  every worker serves every registration from its own session. A request that lands on a
  worker without one (a client still dialling, or one older than workers) is forwarded over
  the link to a worker that has one, as between cluster nodes.
- State. Registrations, aliases, tokens and usage live in Redis, shared by all (which is why
  N > 1 needs the Redis registry). The supervisor applies the control port's registry
  commands itself, naming the caller in the audit trail; the workers follow Redis's change
  stream, as nodes do.
- Control. The supervisor answers the control port: STOP, PING, LOG (every worker's level
  too), STATUS (every worker's answer, merged: a registration is connected if any worker
  has its session) and the registry commands. Worker 0 serves the admin API. Each worker has
  a control port of its own on loopback, for the supervisor only.
- Logs. One rotating file cannot have several writers, so each worker writes its own log
  and audit files beside the configured ones (``server-w1.log``, ``audit-w1.log``); the
  supervisor's file says when workers start, stop and fail.
- Failures. A worker that fails before it is ready at start fails the start, with its error
  line. One that exits later is started again after a delay that doubles from 0.5 s to 30 s
  (reset once it stays up); meanwhile the kernel gives its share of new connections to the
  others, and its clients' sessions redial. A worker ends with its supervisor even when the
  supervisor is killed (``PR_SET_PDEATHSIG``).
- Stop (STOP, SIGINT, SIGTERM): SIGTERM to every worker, each drains as a single server
  does (GOAWAY, ``shutdownGrace``); what is left after ``shutdownGrace`` + ``STOP_MARGIN``
  seconds is killed. The supervisor then exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import trio

from petit import __version__
from petit.control import ControlError, Handler, send_control, serve_control
from petit.errors import PetitError
from petit.listen import bind_sockets, show_address
from petit.lockfile import ProcessLock
from petit.logs import set_level
from petit_server.config import ClusterConfig, ServerConfig, WorkerPlace
from petit_server.edge.https import certificate_source
from petit_server.registry.backend import open_registry
from petit_server.registry.base import Registry
from petit_server.service import answer_control

log = logging.getLogger("petit.workers")

# The cluster link secret, made at each start (this is the variable's name, not a secret).
SECRET_ENV = "PETIT_WORKER_SECRET"  # noqa: S105
PORTS_ENV = "PETIT_WORKER_PORTS"  # JSON: the public ports the supervisor holds
STOP_MARGIN = 5.0  # seconds past shutdownGrace a worker has to exit before it is killed
ASK_TIMEOUT = 5.0  # seconds a worker has to answer the supervisor on its control port
FIRST_RESTART_DELAY = 0.5  # seconds; doubles per failure up to MAX_RESTART_DELAY
MAX_RESTART_DELAY = 30.0
STABLE_WORKER = 60.0  # seconds up after which a worker's restart delay starts again
PIPE_GRACE = 1.0  # seconds to read a worker's last output after it exited
MAX_LINE = 8192  # bytes of one line a worker writes on stdout or stderr


def worker_config(
    config: ServerConfig, place: WorkerPlace, ports: dict[str, int], secret: str
) -> ServerConfig:
    """The config a worker serves with: the supervisor's ports, a private control port, its
    own log files, and a cluster node of this host's workers only."""
    node = f"{socket.gethostname()}-{ports['tunnel']}"
    cluster = ClusterConfig(
        redis_url=config.registry_url,
        node_id=f"{node}-w{place.index}",
        internal_addr="127.0.0.1",
        internal_port=0,
        advertise_addr="127.0.0.1",
        secret=secret,
        key_prefix=f"{config.registry_prefix}workers:{node}:",
    )
    log_settings = replace(
        config.log,
        file=numbered(config.log.file, place.index),
        audit_file=numbered(config.log.audit_file, place.index),
    )
    return replace(
        config,
        back_port=ports["tunnel"],
        proxy_port=ports["http"],
        secure_proxy_port=ports.get("https", config.secure_proxy_port),
        listen_addr="127.0.0.1",
        listen_port=0,
        listen_allow=("127.0.0.1",),
        cluster=cluster,
        worker=place,
        log=log_settings,
    )


def numbered(path: Path, index: int) -> Path:
    """A worker's own file beside ``path``: logs/server.log -> logs/server-w1.log."""
    return path.with_name(f"{path.stem}-w{index}{path.suffix}")


@dataclass(slots=True, eq=False)
class _Worker:
    """One worker slot, and the process that fills it now."""

    index: int
    process: trio.Process | None = None
    ports: dict[str, int] = field(default_factory=dict)  # what it reported when ready
    state: str = "starting"  # starting, running, restarting, stopped
    restarts: int = 0
    started: float | None = None  # time.time() when it became ready
    last_error: str = ""
    errors: list[str] = field(default_factory=list)  # its last stderr lines, for a failure

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "pid": None if self.process is None else self.process.pid,
            "state": self.state,
            "since": self.started,
            "restarts": self.restarts,
            "lastError": self.last_error,
        }


class Supervisor:
    """The daemon of a server with ``workers`` > 1: its ports, its workers and its control port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # A bad or unreachable registry is a one-line error here, before start backgrounds.
        self.registry: Registry = open_registry(config)
        self.registry.close()
        self._workers = [_Worker(index) for index in range(config.workers)]
        self._secret = secrets.token_hex(32)
        self._stop = trio.Event()
        self._stopping = False

    async def serve(self, stop: trio.Event, lock: ProcessLock) -> None:
        """Hold the ports, run the workers until ``stop`` (or STOP), then stop them."""
        config = self.config
        self._stop = stop
        self.registry = open_registry(config, load=False)
        held: list[trio.socket.SocketType] = []
        try:
            ports = await self._hold_ports(held)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.registry.run)
                control = await _start_control(nursery, config, self.handle_control)
                async with trio.open_nursery() as starting:  # all at once, each until ready
                    for worker in self._workers:
                        starting.start_soon(nursery.start, self._keep_running, worker, ports)
                admin = self._workers[0].ports.get("admin")  # worker 0 serves the admin API
                published = {"control": control, **ports, **({"admin": admin} if admin else {})}
                lock.write_pid(control, ready=True, ports=published)
                log.info(
                    "server %s ready: %d workers, tunnel endpoint %s, HTTP ingress %s, control %s",
                    __version__,
                    len(self._workers),
                    show_address(config.bind_addr, ports["tunnel"]),
                    show_address(config.bind_addr, ports["http"]),
                    show_address(config.listen_addr, control),
                )
                await self._stop.wait()
                await self._stop_workers()
                nursery.cancel_scope.cancel()
        finally:
            for sock in held:
                sock.close()
            self.registry.close()
        log.info("stopped")

    async def _hold_ports(self, held: list[trio.socket.SocketType]) -> dict[str, int]:
        """Bind (never listen on) each public port; the ports, by name, for the workers."""
        config = self.config
        wanted = {"tunnel": ("tunnel endpoint", "backPort", config.back_port)}
        if certificate_source(config) is not None:
            wanted["https"] = ("HTTPS ingress", "secureProxyPort", config.secure_proxy_port)
        wanted["http"] = ("HTTP ingress", "proxyPort", config.proxy_port)
        ports: dict[str, int] = {}
        for name, (what, key, port) in wanted.items():
            try:
                sockets = await bind_sockets(port, config.bind_addr, shared=True)
            except OSError as exc:
                raise PetitError(
                    f"cannot listen for the {what} on {config.bind_addr}:{port}: "
                    f"{exc.strerror or exc}; stop what uses the port or change {key}"
                ) from None
            held.extend(sockets)
            ports[name] = sockets[0].getsockname()[1]
        return ports

    async def _keep_running(
        self,
        worker: _Worker,
        ports: dict[str, int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one worker slot: started once ready (a failure before that fails the start),
        then restarted whenever it exits until the supervisor stops."""
        delay = FIRST_RESTART_DELAY
        await self._run_worker(worker, ports, task_status)
        while not self._stopping:
            worker.state, worker.restarts = "restarting", worker.restarts + 1
            up = 0.0 if worker.started is None else time.time() - worker.started
            delay = FIRST_RESTART_DELAY if up > STABLE_WORKER else delay
            log.error(
                "worker %d %s; starting it again in %g s",
                worker.index,
                worker.last_error,
                delay,
            )
            await trio.sleep(delay)
            delay = min(MAX_RESTART_DELAY, delay * 2)
            try:
                await self._run_worker(worker, ports, None)
            except PetitError as exc:  # it failed before it was ready: try again later
                worker.last_error = str(exc)

    async def _run_worker(
        self,
        worker: _Worker,
        ports: dict[str, int],
        task_status: trio.TaskStatus[None] | None,
    ) -> None:
        """Start the worker's process and return when it exits; ``task_status`` is told
        once it is ready. PetitError if it exits before it is ready."""
        worker.state, worker.started, worker.ports, worker.errors = "starting", None, {}, []
        argv = [
            sys.executable,
            "-P",
            "-m",
            "petit_server.worker",
            str(self.config.path),
            str(worker.index),
            str(len(self._workers)),
        ]
        environment = {**os.environ, SECRET_ENV: self._secret, PORTS_ENV: json.dumps(ports)}
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        worker.process = process
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None
                assert process.stderr is not None
                nursery.start_soon(self._read_errors, worker, process.stderr)
                output = _lines(process.stdout)
                ready = await _ready_line(output)
                if ready is not None:
                    nursery.start_soon(self._read_output, worker, output)
                    worker.ports, worker.started, worker.state = ready, time.time(), "running"
                    log.info("worker %d (pid %d) ready", worker.index, process.pid)
                    if task_status is not None:
                        task_status.started()
                code = await process.wait()
                # Its last lines may still be in the pipes: read them to EOF, boundedly.
                nursery.cancel_scope.deadline = trio.current_time() + PIPE_GRACE
        finally:  # it exited, or we are cancelled (a failed start, a second signal)
            with trio.CancelScope(shield=True):
                await _end(process, STOP_MARGIN)
        worker.last_error = _exit_reason(code, worker.errors)
        if worker.started is None and not self._stopping:
            raise PetitError(f"worker {worker.index} did not start: {worker.last_error}")
        if not self._stopping:
            worker.state = "restarting"

    async def _read_errors(self, worker: _Worker, stderr: trio.abc.ReceiveStream) -> None:
        """A worker's stderr into our log, line by line; its last lines kept for a failure."""
        async for line in _lines(stderr):
            log.warning("worker %d: %s", worker.index, line)
            worker.errors = [*worker.errors[-9:], line]

    async def _read_output(self, worker: _Worker, output: AsyncIterator[str]) -> None:
        """What a worker writes on stdout after its ready line (nothing, normally), logged
        rather than left to fill the pipe and block it."""
        async for line in output:
            log.info("worker %d: %s", worker.index, line)

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker (each drains), then wait for them, killing any left."""
        self._stopping = True
        running = [w.process for w in self._workers if w.process and w.process.returncode is None]
        log.info("stopping %d worker(s)", len(running))
        for process in running:
            process.terminate()
        with trio.move_on_after(self.config.shutdown_grace + STOP_MARGIN):
            for process in running:
                await process.wait()
        for worker in self._workers:
            worker.state = "stopped"

    async def handle_control(self, verb: str, args: list[str], actor: str) -> dict[str, object]:
        """The control port's commands, as a single server answers them (``answer_control``);
        STATUS and LOG ask every worker. Registry commands are applied here, once."""

        async def status(registration_id: str | None) -> dict[str, object]:
            command = "STATUS" if registration_id is None else f"STATUS {registration_id}"
            return merge_status(await self._ask_workers(command))

        async def set_log_level(level: str) -> dict[str, object]:
            await self._ask_workers(f"LOG {level}")
            return set_level(level)

        return await answer_control(
            verb, args, actor, self._stop, self.registry, status, set_log_level
        )

    async def _ask_workers(self, command: str) -> list[tuple[_Worker, dict[str, object]]]:
        """Every worker's reply to a control command, side by side; a worker that does not
        answer replies with its state."""
        replies: list[tuple[_Worker, dict[str, object]]] = []

        async def ask(worker: _Worker) -> None:
            reply: dict[str, object] = {"success": False, "error": f"worker is {worker.state}"}
            port = worker.ports.get("control")
            if worker.state == "running" and port is not None:
                try:
                    with trio.fail_after(ASK_TIMEOUT):
                        reply = await send_control("127.0.0.1", port, command)
                except (ControlError, trio.TooSlowError) as exc:
                    reply = {"success": False, "error": str(exc) or "no answer in time"}
            replies.append((worker, reply))

        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(ask, worker)
        replies.sort(key=lambda pair: pair[0].index)
        return replies


def merge_status(replies: list[tuple[_Worker, dict[str, object]]]) -> dict[str, object]:
    """The workers' STATUS replies as one server's: a registration is connected if a worker
    holds its session (``workers`` says how many do), with every worker's remotes and
    sessions; counts are added up. ``workers`` at the top lists the worker processes."""
    workers = [
        {
            **worker.to_json(),
            "answered": reply.get("success") is True,
            "publicConnections": reply.get("publicConnections"),
        }
        for worker, reply in replies
    ]
    answered = [reply for _, reply in replies if reply.get("success") is True]
    if not answered:  # e.g. an unknown ID: every worker says so
        first = replies[0][1] if replies else {"error": "no worker"}
        return {"success": False, "error": first.get("error"), "workers": workers}
    seen: dict[str, _Seen] = {}
    for reply in answered:
        for entry in _objects(reply.get("connections")):
            seen.setdefault(str(entry.get("registeredId")), _Seen(entry)).add(entry)
    return {
        **answered[0],
        "tasks": sum(_count(reply.get("tasks")) for reply in answered),
        "publicConnections": sum(_count(reply.get("publicConnections")) for reply in answered),
        "connections": [registration.to_json() for registration in seen.values()],
        "workers": workers,
    }


@dataclass(slots=True)
class _Seen:
    """One registration as the workers see it, added up."""

    first: dict[str, object]  # its vitae, port, aliases... (the same in every worker)
    workers: int = 0  # how many hold a session for it
    remotes: set[str] = field(default_factory=set)
    since: list[float] = field(default_factory=list)
    sessions: list[dict[str, object]] = field(default_factory=list)

    def add(self, entry: dict[str, object]) -> None:
        self.workers += entry.get("connected") is True
        self.remotes.update(str(remote) for remote in _list(entry.get("remotes")))
        if isinstance(since := entry.get("since"), int | float):
            self.since.append(since)
        self.sessions.extend(_objects(entry.get("sessions")))

    def to_json(self) -> dict[str, object]:
        merged = {
            **self.first,
            "connected": self.workers > 0,
            "workers": self.workers,
            "remotes": sorted(self.remotes),
            "since": min(self.since, default=None),
        }
        if "sessions" in self.first:
            merged["sessions"] = self.sessions
        return merged


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _objects(value: object) -> list[dict[str, object]]:
    return [item for item in _list(value) if isinstance(item, dict)]


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


async def _start_control(nursery: trio.Nursery, config: ServerConfig, handler: Handler) -> int:
    """The supervisor's control port, where a single server has its own."""
    try:
        port: int = await nursery.start(
            partial(
                serve_control,
                handler,
                host=config.listen_addr,
                port=config.listen_port,
                allow=config.listen_allow,
            )
        )
    except OSError as exc:
        raise PetitError(
            f"cannot listen for the control port on {config.listen_addr}:{config.listen_port}: "
            f"{exc.strerror or exc}; stop what uses the port or change listenPort"
        ) from None
    return port


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    """A worker's output, line by line until EOF; a line past ``MAX_LINE`` is cut there."""
    pending = b""
    while chunk := await stream.receive_some(MAX_LINE):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE:
            lines, pending = [*lines, pending[:MAX_LINE]], b""
        for line in lines:
            yield line.decode("utf-8", "replace").rstrip()
    if pending:
        yield pending.decode("utf-8", "replace").rstrip()


async def _ready_line(output: AsyncIterator[str]) -> dict[str, int] | None:
    """The ports a worker reports on stdout once ready (``petit_server.worker``), or None
    if its stdout ends first (it exited). The lines after it are left in ``output``."""
    async for line in output:
        with contextlib.suppress(ValueError):
            document = json.loads(line)
            if isinstance(document, dict) and isinstance(ports := document.get("ready"), dict):
                return {str(name): port for name, port in ports.items() if isinstance(port, int)}
    return None


async def _end(process: trio.Process, grace: float) -> None:
    """Make sure a worker is gone: SIGTERM, then SIGKILL after ``grace``."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def _exit_reason(code: int, errors: list[str]) -> str:
    """Why a worker ended, in a few words: its error line, else its exit status."""
    said = next((line for line in reversed(errors) if line.startswith("error: ")), None)
    if said is not None:
        return said.removeprefix("error: ")
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"

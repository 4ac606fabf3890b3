"""Several worker processes serving one server's ports: docs/many-cores.md, part 2.

# Theory of operation

- ``workers = N`` (N > 1) in ``[server]``: the daemon process is a supervisor, and N worker
  processes (``python -P -m petit_server.worker``) do the serving. A petit-server process
  runs one trio loop on one core; the workers use N.
- Ports. The supervisor binds each public port (tunnel endpoint, HTTP and HTTPS ingress)
  with ``SO_REUSEPORT`` and never listens on it: the port stays ours while workers come and
  go, and a port 0 is chosen once for all. It first binds each without ``SO_REUSEPORT``, so
  a port some other process holds (another server's workers too) fails the start. Each
  worker binds the same ports the same way and listens; the kernel spreads new connections
  over the listening sockets by a hash of their addresses. A registration's raw TCP port
  is bound that way by every worker that serves it, once it found no other process than
  the workers listening there (``petit.listen.strangers_listening``).
- Sessions. Each worker is a full server (``ServerService``) and a node of a cluster of its
  own on loopback: the node directory lives in the Redis registry under a prefix naming this
  host and tunnel port, and the link secret is made at each start and handed to the workers
  in their environment, so no other host's nodes can join. The WELCOME says ``worker`` and
  ``workers``, and a client keeps a session to every worker (``petit_client.service``): then
  every worker serves every registration from its own session. The client's hello names the
  workers it holds already; one of those answers with a welcome accepting nothing and keeps
  no session, so no request is routed to a session about to close. A request that lands on a
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
- Failures. A worker that fails before it is ready at start (or is not ready within
  ``WORKER_START_TIMEOUT``) fails the start, with its error line. One that exits later is
  started again after a delay that doubles from 0.5 s to 30 s (reset once it stays up);
  meanwhile the kernel gives its share of new connections to the others, and its clients'
  sessions redial.
- Stop. A worker's stdin is a pipe from the supervisor, and a worker stops at its end, as
  a single server does on SIGTERM (GOAWAY, ``shutdownGrace``). So STOP, SIGINT or SIGTERM
  to the supervisor closes every worker's stdin, and what is left after ``shutdownGrace`` +
  ``STOP_MARGIN`` seconds is killed; then the supervisor exits 0. A supervisor that dies,
  however it dies, closes the pipes too. Workers run in sessions of their own: a terminal's
  Ctrl-C reaches the supervisor only, and systemd's SIGTERM to the whole service (its
  default) is the one signal each worker gets, so each still drains.
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
from petit.control import ControlError, send_control, serve_control
from petit.errors import PetitError
from petit.listen import bind_sockets, show_address
from petit.lockfile import ProcessLock
from petit.logs import set_level
from petit_server.config import ClusterConfig, ServerConfig, WorkerPlace
from petit_server.edge.https import certificate_source
from petit_server.registry.backend import open_registry
from petit_server.service import answer_control, cannot_listen, check_registry, start_listener

log = logging.getLogger("petit.workers")

# The cluster link secret, made at each start (this is the variable's name, not a secret).
SECRET_ENV = "PETIT_WORKER_SECRET"  # noqa: S105
PORTS_ENV = "PETIT_WORKER_PORTS"  # JSON: the public ports the supervisor holds
LOG_LEVEL_ENV = "PETIT_WORKER_LOG_LEVEL"  # set by LOG since start: a restarted worker keeps it
STOP_MARGIN = 5.0  # seconds past shutdownGrace a stopping worker has before it is killed
ASK_TIMEOUT = 5.0  # seconds a worker has to answer the supervisor on its control port
FIRST_RESTART_DELAY = 0.5  # seconds; doubles per failure up to MAX_RESTART_DELAY
MAX_RESTART_DELAY = 30.0
STABLE_WORKER = 60.0  # seconds up after which a worker's restart delay starts again
WORKER_START_TIMEOUT = 30.0  # seconds a worker has to report ready
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
        self.registry = check_registry(config)
        self._workers = [_Worker(index) for index in range(config.workers)]
        self._secret = secrets.token_hex(32)
        self._log_level: str | None = None  # set by LOG: restarted workers take it too
        self._stop = trio.Event()
        self._starting = trio.CancelScope()  # the start, until every worker is ready

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
                control = partial(serve_control, self.handle_control, allow=config.listen_allow)
                ports["control"] = await start_listener(
                    nursery,
                    "control port",
                    "listenPort",
                    config.listen_addr,
                    config.listen_port,
                    control,
                )
                nursery.start_soon(self._start_workers, nursery, ports, lock)
                await self._stop.wait()  # also while they start
                self._starting.cancel()  # those not ready yet are ended at once
                await self._stop_workers()
                nursery.cancel_scope.cancel()
        finally:
            for sock in held:
                sock.close()
            self.registry.close()
        log.info("stopped")

    async def _hold_ports(self, held: list[trio.socket.SocketType]) -> dict[str, int]:
        """Bind (never listen on) each public port; the ports, by name, for the workers.

        Any process of our user may join a port shared with ``SO_REUSEPORT``, and would
        silently take part of its connections: a port first bound without it is checked to
        be free of every other socket (another server's workers too)."""
        config = self.config
        wanted = {"tunnel": ("tunnel endpoint", "backPort", config.back_port)}
        if certificate_source(config) is not None:
            wanted["https"] = ("HTTPS ingress", "secureProxyPort", config.secure_proxy_port)
        wanted["http"] = ("HTTP ingress", "proxyPort", config.proxy_port)
        ports: dict[str, int] = {}
        for name, (what, key, port) in wanted.items():
            try:
                probes = await bind_sockets(port, config.bind_addr, shared=False)
                port = probes[0].getsockname()[1]  # port 0 picked one
                for probe in probes:
                    probe.close()
                sockets = await bind_sockets(port, config.bind_addr, shared=True)
            except OSError as exc:
                raise cannot_listen(what, key, config.bind_addr, port, exc) from None
            held.extend(sockets)
            ports[name] = port
        return ports

    async def _start_workers(
        self, nursery: trio.Nursery, ports: dict[str, int], lock: ProcessLock
    ) -> None:
        """Start every worker at once; once all are ready, publish the pid file. A worker
        that cannot start fails the start."""
        with self._starting:
            async with trio.open_nursery() as starting:
                for worker in self._workers:
                    starting.start_soon(nursery.start, self._keep_running, worker, ports)
        if self._starting.cancelled_caught:
            return  # stopped before every worker was ready
        admin = self._workers[0].ports.get("admin")  # worker 0 serves the admin API
        lock.write_pid(
            ports["control"], ready=True, ports=ports | ({"admin": admin} if admin else {})
        )
        config = self.config
        log.info(
            "server %s ready: %d workers, tunnel endpoint %s, HTTP ingress %s, control %s",
            __version__,
            len(self._workers),
            show_address(config.bind_addr, ports["tunnel"]),
            show_address(config.bind_addr, ports["http"]),
            show_address(config.listen_addr, ports["control"]),
        )

    async def _keep_running(
        self,
        worker: _Worker,
        ports: dict[str, int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one worker slot: started once ready (a failure before that fails the start),
        then started again whenever it exits, until the supervisor stops."""
        await self._run_worker(worker, ports, task_status)
        if worker.started is None and not self._stop.is_set():
            raise PetitError(f"worker {worker.index} did not start: {worker.last_error}")
        delay = FIRST_RESTART_DELAY
        while not self._stop.is_set():
            worker.state, worker.restarts = "restarting", worker.restarts + 1
            up = 0.0 if worker.started is None else time.time() - worker.started
            delay = FIRST_RESTART_DELAY if up > STABLE_WORKER else delay
            log.error(
                "worker %d ended (%s); starting it again in %g s",
                worker.index,
                worker.last_error,
                delay,
            )
            with trio.move_on_after(delay):
                await self._stop.wait()
            if self._stop.is_set():
                return
            delay = min(MAX_RESTART_DELAY, delay * 2)
            await self._run_worker(worker, ports, None)

    async def _run_worker(
        self,
        worker: _Worker,
        ports: dict[str, int],
        task_status: trio.TaskStatus[None] | None,
    ) -> None:
        """Start the worker's process and return when it has ended; ``task_status`` is told
        once it is ready. Why it ended goes to ``worker.last_error``."""
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
        environment = {
            **os.environ,
            SECRET_ENV: self._secret,
            PORTS_ENV: json.dumps(ports),
            **({LOG_LEVEL_ENV: self._log_level} if self._log_level else {}),
        }
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,  # its end is the worker's signal to stop
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
                start_new_session=True,  # a terminal's Ctrl-C is for us, not for it
            )
        except OSError as exc:
            worker.last_error = f"could not be started: {exc.strerror or exc}"
            return
        worker.process = process
        ready: dict[str, int] | None = None
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None
                assert process.stderr is not None
                nursery.start_soon(self._read_errors, worker, process.stderr)
                output = _lines(process.stdout)
                with trio.move_on_after(WORKER_START_TIMEOUT) as starting:
                    ready = await _ready_line(output)
                if ready is not None:
                    nursery.start_soon(self._read_output, worker, output)
                    worker.ports, worker.started, worker.state = ready, time.time(), "running"
                    log.info("worker %d (pid %d) ready", worker.index, process.pid)
                    if task_status is not None:
                        task_status.started()
                elif starting.cancelled_caught:  # it hangs (an exited one ended its stdout)
                    worker.errors.append(f"error: not ready within {WORKER_START_TIMEOUT:g} s")
                    await _end(process, STOP_MARGIN)
                code = await process.wait()
                # Its last lines may still be in the pipes: read them to EOF, boundedly.
                nursery.cancel_scope.deadline = trio.current_time() + PIPE_GRACE
        finally:  # it exited, or we are cancelled (a failed start, a second signal)
            with trio.CancelScope(shield=True):
                await _end(process, STOP_MARGIN)
        worker.last_error = _exit_reason(code, worker.errors)

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
        """Ask every worker to stop (each drains as a single server does), wait for them,
        and kill those left after ``shutdownGrace`` + ``STOP_MARGIN``."""
        running = [w.process for w in self._workers if w.process and w.process.returncode is None]
        log.info("stopping %d worker(s)", len(running))
        for process in running:
            await _ask_to_stop(process)
        with trio.move_on_after(self.config.shutdown_grace + STOP_MARGIN):
            for process in running:
                await process.wait()
        for process in running:
            if process.returncode is None:
                log.warning("worker pid %d did not stop in time: killed", process.pid)
                process.kill()
        for worker in self._workers:
            worker.state = "stopped"

    async def handle_control(self, verb: str, args: list[str], actor: str) -> dict[str, object]:
        """The control port's commands, as a single server answers them (``answer_control``);
        STATUS and LOG ask every worker. Registry commands are applied here, once."""

        async def status(registration_id: str | None) -> dict[str, object]:
            command = "STATUS" if registration_id is None else f"STATUS {registration_id}"
            return merge_status(await self._ask_workers(command))

        async def set_log_level(level: str) -> dict[str, object]:
            reply = set_level(level)
            if not reply.get("success"):
                return reply
            self._log_level = level
            missed = [
                f"worker {worker.index}: {answer.get('error')}"
                for worker, answer in await self._ask_workers(f"LOG {level}")
                if not answer.get("success")
            ]
            if missed:  # a worker starting or restarting takes it when it starts
                return {**reply, "success": False, "error": "not set in " + "; ".join(missed)}
            return reply

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
    holds its session (``connectedWorkers`` says how many do), with every worker's remotes
    and sessions, and its TCP port listening if it listens anywhere; counts are added up.
    ``workers`` lists the worker processes."""
    workers = [
        {
            **worker.to_json(),
            "answered": reply.get("success") is True,
            "publicConnections": reply.get("publicConnections"),
        }
        for worker, reply in replies
    ]
    answered = [reply for _, reply in replies if reply.get("success") is True]
    if not answered:  # an unknown ID, which every worker that answered says
        said = [reply for worker, reply in replies if worker.state == "running"]
        error = next(iter(said or [reply for _, reply in replies]), {}).get("error")
        return {"success": False, "error": error or "no worker is running", "workers": workers}
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
    tcp_listening: bool = False
    tcp_errors: list[str] = field(default_factory=list)

    def add(self, entry: dict[str, object]) -> None:
        self.workers += entry.get("connected") is True
        self.remotes.update(str(remote) for remote in _list(entry.get("remotes")))
        if isinstance(since := entry.get("since"), int | float):
            self.since.append(since)
        self.sessions.extend(_objects(entry.get("sessions")))
        self.tcp_listening |= entry.get("tcpListening") is True
        if isinstance(error := entry.get("tcpError"), str) and error:
            self.tcp_errors.append(error)

    def to_json(self) -> dict[str, object]:
        merged = {
            **self.first,
            "connected": self.workers > 0,
            "connectedWorkers": self.workers,
            "remotes": sorted(self.remotes),
            "since": min(self.since, default=None),
        }
        if "tcpListening" in self.first:  # listening anywhere is listening: no error then
            merged["tcpListening"] = self.tcp_listening
            merged["tcpError"] = "" if self.tcp_listening else next(iter(self.tcp_errors), "")
        if "sessions" in self.first:
            merged["sessions"] = self.sessions
        return merged


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _objects(value: object) -> list[dict[str, object]]:
    return [item for item in _list(value) if isinstance(item, dict)]


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


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


async def _ask_to_stop(process: trio.Process) -> None:
    """Close the worker's stdin: at its end it drains and exits (``petit_server.worker``)."""
    if process.stdin is not None:
        await process.stdin.aclose()


async def _end(process: trio.Process, grace: float) -> None:
    """Make sure a worker is gone: ask it to stop, then SIGKILL after ``grace``."""
    if process.returncode is None:
        await _ask_to_stop(process)
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
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {-code}"

"""The daemon process of both apps: one service in the foreground until a signal or STOP.

# Theory of operation

- ``petit-server start`` and ``petit-client start`` run ``python -P -m
  petit_server.daemon CONFIG`` (or petit_client's). In the background they check the config
  first, spawn it detached and wait for its ready pid file. With ``--foreground`` they exec
  it at once in their own process, so systemd and containers keep the pid they started;
  the daemon checks its config itself. A running daemon is therefore always
  ``daemon_main``, which imports neither click nor the CLI's other commands (1.5 MB of the
  server's RSS, 1.3 MB of the client's). It names itself petit-server or petit-client, as
  ps, top and journald show it.
- The daemon logs to its rotating file, and to stderr too unless ``--detached``. It takes
  the lock (a stale one is taken over with one log line), runs the service until
  SIGINT/SIGTERM or STOP (a graceful stop, exit 0; a second signal cancels at once), and
  releases the lock.
- A failure ends it with one ``error:`` line on stderr, which a background ``start`` shows
  as its own, and with the CLIs' exit code (``ExitCode``); once logging is set up, the log
  gets the same line with that code. Anything else is a bug, and its traceback the report.
- ``-P``: the working directory never goes on the daemon's import path, so a folder named
  petit/ where the command runs cannot shadow the installed package.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from petit.errors import AuthError, ConfigError, PetitError
from petit.lockfile import AlreadyRunningError, ProcessLock
from petit.logs import EXIT_CODE_FIELD, LogSettings, configure_daemon_logging

Serve = Callable[[trio.Event, ProcessLock], Awaitable[None]]


class ExitCode(enum.IntEnum):
    """Process exit status of petit-client and petit-server (part of the interface)."""

    OK = 0  # success, including a graceful stop on SIGINT/SIGTERM/STOP
    FAILURE = 1  # anything else that went wrong (click's own errors use 1 too)
    USAGE = 2  # bad command line (click's UsageError)
    CONFIG = 3  # config or state file missing, unreadable or invalid
    AUTH = 4  # an identity was refused
    UNAVAILABLE = 5  # server unreachable, port in use, or the daemon is not running
    RUNNING = 6  # the daemon is already running


FAILURES = (PetitError, OSError)  # what ends a command with one line, not a traceback


def failure(exc: PetitError | OSError) -> tuple[str, ExitCode]:
    """The one line and the exit code that ``exc`` ends a command or a daemon with."""
    if isinstance(exc, ConfigError):
        return str(exc), ExitCode.CONFIG
    if isinstance(exc, AuthError):
        return str(exc), ExitCode.AUTH
    if isinstance(exc, AlreadyRunningError):
        return str(exc), ExitCode.RUNNING
    if isinstance(exc, PetitError):  # the control port, the server, the network
        return str(exc), ExitCode.UNAVAILABLE
    return f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "), ExitCode.FAILURE


@dataclass(frozen=True)
class Daemon:
    """What a daemon process runs: its service, with where it keeps its pid and lock files
    (beside its config) and how it logs."""

    name: str  # "server" or "client": the pid and lock files' names
    config_path: Path  # resolved
    log: LogSettings
    serve: Serve


def daemon_argv(module: str, config_path: Path, *, verbose: bool, detached: bool) -> list[str]:
    """The command line of the daemon process for ``module`` (petit_server, petit_client)."""
    argv = [sys.executable, "-P", "-m", f"{module}.daemon", str(config_path)]
    return argv + ["--verbose"] * verbose + ["--detached"] * detached


def daemon_main(module: str, open_daemon: Callable[[Path], Daemon]) -> NoReturn:
    """The daemon process of ``module``, with the arguments of ``daemon_argv``;
    ``open_daemon`` loads the config and builds the service."""
    match sys.argv[1:]:
        case [config, *flags] if set(flags) <= {"--verbose", "--detached"}:
            pass
        case _:
            _say_error(f"usage: python -m {module}.daemon CONFIG [--verbose] [--detached]")
            sys.exit(ExitCode.USAGE)
    name_process(f"petit-{module.removeprefix('petit_')}")
    try:
        daemon = open_daemon(Path(config))
    except FAILURES as exc:
        sys.exit(end_with_error(exc))
    sys.exit(run_daemon(daemon, verbose="--verbose" in flags, detached="--detached" in flags))


def run_daemon(daemon: Daemon, *, verbose: bool, detached: bool) -> ExitCode:
    """Log, lock, serve until stopped, unlock; the exit code (a failure said on stderr)."""
    try:
        configure_daemon_logging(daemon.log, verbose=verbose, to_stderr=not detached)
    except FAILURES as exc:
        return end_with_error(exc)  # there is no log yet
    logger = logging.getLogger("petit")
    if (raised := raise_open_file_limit()) is not None:
        logger.info("open-file limit raised from %d to %d", *raised)
    try:
        lock = ProcessLock(daemon.config_path.parent, daemon.name)
        if lock.acquire():
            logger.warning("took over a stale lock left by a %s that is gone", daemon.name)
        try:
            run_service(lambda stop: daemon.serve(stop, lock))
        finally:
            lock.release()
    except FAILURES as exc:
        return end_with_error(exc, logger)
    return ExitCode.OK


def end_with_error(exc: PetitError | OSError, logger: logging.Logger | None = None) -> ExitCode:
    """Say why the daemon ends, on stderr and, once logging is set up, in the log with the
    exit code (stderr's copy of the log skips it: the error: line says it); that code."""
    message, code = failure(exc)
    if logger is not None:
        logger.error("%s", message, extra={EXIT_CODE_FIELD: int(code)})
    _say_error(message)
    return code


def name_process(name: str) -> None:
    """What ps, top, pgrep -x and journald show: the app, not "python" (Linux; elsewhere
    the name stays)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name)


def _say_error(message: str) -> None:
    """The one line a failure ends with, as the CLIs print theirs; a background ``start``
    shows it as its own."""
    print(f"error: {message}", file=sys.stderr, flush=True)  # noqa: T201


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise the soft limit on open files to the hard one; (old, new), or None if unchanged.

    Every public connection, tunnel and stream holds descriptors: systemd's soft default of
    1,024 let 1,100 idle connections starve everyone else, while the hard limit is far higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def run_service(service: Callable[[trio.Event], Awaitable[None]]) -> None:
    """Run ``service(stop_event)`` until it returns; SIGINT/SIGTERM set the stop event.

    A second signal cancels at once. The service owns its graceful shutdown.
    """

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        if stop.is_set():
                            nursery.cancel_scope.cancel()
                            return
                        logging.getLogger("petit").info(
                            "%s received, shutting down", signal.Signals(signum).name
                        )
                        stop.set()

            nursery.start_soon(watch_signals)
            await service(stop)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except ExceptionGroup as group:
        raise _sole_failure(group) from None


def _sole_failure(group: ExceptionGroup[Exception]) -> Exception:
    """The one error nested nurseries wrapped (a bad certificate, a port in use), so that it
    is reported in one line; the group itself if there were several."""
    inner: Exception = group
    while isinstance(inner, ExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner

"""Click plumbing shared by ``petit-client`` and ``petit-server``.

Library errors stay click-free and are translated here, in one place, into one line on
stderr and a documented exit code (petit.daemon says which). ``start`` runs the daemon
process of petit.daemon: detached, waiting until it reports ready, or with ``--foreground``
in place of the command, by exec.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import trio

from petit.control import ControlError, send_control
from petit.daemon import FAILURES, Daemon, ExitCode, daemon_argv, failure
from petit.lockfile import PidInfo, ProcessLock, read_pid
from petit.logs import LOG_FILE_MODE

START_TIMEOUT = 30.0  # seconds for a background daemon to report ready
LOCK_RELEASE_WAIT = 1.0  # seconds from the pid file's removal to the lock file's
STOP_TIMEOUT = 15.0  # seconds for a daemon to exit after STOP, before SIGTERM


class CliError(click.ClickException):
    """A failure reported as one line on stderr with a specific exit code."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: object = None) -> None:
        """Print ``error: <message>`` on stderr (no usage banner, no traceback)."""
        click.echo(f"error: {self.format_message()}", err=True)


# click >= 8.2 answers a bare group (``petit-server token``) with this usage error: its help
_HELP_INSTEAD = getattr(click.exceptions, "NoArgsIsHelpError", ())


class CommandGroup(click.Group):
    """The root group of both CLIs: a usage error (an unknown option, a missing argument) is
    one ``error:`` line with exit 2, like every other failure, not click's usage block."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: object,
    ) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> object:
        with _one_line_usage_errors():  # every subcommand parses its arguments in here
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """A click usage error as a CliError: its message on one line, the help hint after it."""
    try:
        yield
    except _HELP_INSTEAD:
        raise
    except click.UsageError as exc:
        message = " ".join(exc.format_message().split())  # "Choose from:" lists span lines
        if exc.ctx is not None:
            message = f"{message.rstrip('.')}; see {exc.ctx.command_path} --help"
        raise CliError(message, ExitCode.USAGE) from None


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """Turn petit errors reaching the CLI into one-line messages and exit codes."""
    try:
        yield
    except FAILURES as exc:
        raise CliError(*failure(exc)) from None


SPIN_INTERVAL = 0.1  # seconds between two frames of a progress spinner


@contextlib.contextmanager
def progress(label: str) -> Iterator[None]:
    """A spinner line on stderr (``- Waiting for the tunnel ... 3s``) while the body runs.

    Only on a terminal: piped or logged output stays free of carriage returns. A thread
    draws it, so it keeps turning while the body blocks (in ``trio.run``, in a key
    generation); the line is erased when the body ends.
    """
    stream = sys.stderr
    if not stream.isatty():
        yield
        return
    done = threading.Event()
    began = time.monotonic()

    def spin() -> None:
        for frame in itertools.cycle("-\\|/"):
            stream.write(f"\r{frame} {label} ... {time.monotonic() - began:.0f}s")
            stream.flush()
            if done.wait(SPIN_INTERVAL):
                return

    spinner = threading.Thread(target=spin, name="progress", daemon=True)
    spinner.start()
    try:
        yield
    finally:
        done.set()
        spinner.join()
        stream.write("\r\x1b[K")  # back to the line's start and erase it
        stream.flush()


def start_in_background(argv: list[str], directory: Path, name: str, log_file: Path) -> PidInfo:
    """Spawn ``argv`` (a detached daemon, petit.daemon) and wait until it is ready.

    Ready means its pid file says so. The daemon logs to its own rotating file; ``log_file``
    catches what it prints on stdout and stderr (the ``error:`` line of a failed start, a
    crash). If the daemon exits first, the last line there becomes the error.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
    os.fchmod(fd, LOG_FILE_MODE)  # a crash's traceback is a log like any other: owner only
    with open(fd, "ab") as log:
        before = log.tell()  # what earlier runs left there is not this run's reason
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )

    async def wait_ready() -> PidInfo:
        with trio.move_on_after(START_TIMEOUT):
            while process.poll() is None:
                info = read_pid(directory, name)
                if info is not None and info.pid == process.pid and info.extra.get("ready"):
                    return info
                await trio.sleep(0.05)
        if process.poll() is None:
            process.terminate()
            raise CliError(f"{name} did not become ready; see {log_file}", ExitCode.FAILURE)
        reason = _last_line(log_file, before)
        code = process.returncode  # the daemon's own (a port in use: 5); killed: negative
        raise CliError(
            reason or f"{name} exited; see {log_file}",
            ExitCode(code) if 0 < code <= max(ExitCode) else ExitCode.FAILURE,
        )

    return trio.run(wait_ready)


def _last_line(log_file: Path, offset: int) -> str:
    with log_file.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").strip().splitlines()
    if not lines:
        return ""
    last = lines[-1]
    return last.split(": ", 1)[1] if last.startswith("error: ") else last


def running_daemon(directory: Path, name: str) -> PidInfo:
    """The live daemon's pid info, or a CliError saying it is not running."""
    info = read_pid(directory, name)
    if info is None:
        raise CliError(f"{name.capitalize()} is not running.", ExitCode.UNAVAILABLE)
    return info


def control_command(host: str, port: int, command: str) -> dict[str, object]:
    """Send one control command to a local daemon and return its JSON reply."""

    async def ask() -> dict[str, object]:
        with trio.fail_after(STOP_TIMEOUT):
            return await send_control(host, port, command)

    try:
        return trio.run(ask)
    except trio.TooSlowError:
        raise CliError(f"no answer to {command} on {host}:{port}", ExitCode.UNAVAILABLE) from None


def stop_daemon(directory: Path, name: str, host: str) -> str:
    """Stop a daemon with STOP on its control port, falling back to SIGTERM; say how."""
    info = running_daemon(directory, name)
    with exit_codes():
        try:
            control_command(host, info.listen, "STOP")
        except (ControlError, CliError):
            os.kill(info.pid, signal.SIGTERM)
            _wait_gone(directory, name)
            return f"{name.capitalize()} is stopped with SIGTERM."
    if not _wait_gone(directory, name):
        os.kill(info.pid, signal.SIGTERM)
        if not _wait_gone(directory, name):
            raise CliError(f"Unable to stop {name} on pid {info.pid}.", ExitCode.FAILURE)
        return f"{name.capitalize()} is stopped with SIGTERM."
    return f"{name.capitalize()} stopped."


def _wait_gone(directory: Path, name: str) -> bool:
    """Whether the daemon's pid file went away within STOP_TIMEOUT; then, briefly, its lock
    file too, which the daemon removes just after (so "stopped" means both are gone)."""

    async def wait() -> bool:
        with trio.move_on_after(STOP_TIMEOUT):
            while read_pid(directory, name) is not None:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
            with trio.move_on_after(LOCK_RELEASE_WAIT):
                while ProcessLock(directory, name).lock_path.exists():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            return True
        return False

    return trio.run(wait)


def start_daemon(
    module: str,
    config_path: Path,
    *,
    open_daemon: Callable[[Path], Daemon],
    started: str,
    verbose: bool,
    foreground: bool,
) -> PidInfo:
    """The ``start`` command of both apps: the daemon process (petit.daemon) of ``module``.

    With ``foreground``, exec it in this process at once (the same pid, for systemd and
    containers; it checks its config itself). Otherwise check the config with
    ``open_daemon``, spawn the daemon detached, print ``started`` (the original's wording,
    with ``{pid}``) and return its pid file once it is ready.
    """
    if foreground:
        argv = daemon_argv(module, config_path, verbose=verbose, detached=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)  # noqa: S606 - our own interpreter, an argument list
    with exit_codes():
        daemon = open_daemon(config_path)
    argv = daemon_argv(module, daemon.config_path, verbose=verbose, detached=True)
    running = read_pid(daemon.config_path.parent, daemon.name)
    if running is not None:
        raise CliError(
            f"{daemon.name.capitalize()} is already running on pid {running.pid}.",
            ExitCode.RUNNING,
        )
    log_file = daemon.log.file.parent / f"{daemon.name}.stderr"
    with exit_codes():  # the log directory may not be creatable: one line, not a traceback
        info = start_in_background(argv, daemon.config_path.parent, daemon.name, log_file)
    click.echo(started.format(pid=info.pid))
    return info


def config_option(default: Path, what: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``-c/--config PATH`` for every command."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=default,
        show_default=True,
        help=f"{what} config file.",
    )


def verbose_option(function: Callable[..., None]) -> Callable[..., None]:
    """``-v/--verbose``: debug logging."""
    return click.option("-v", "--verbose", is_flag=True, help="Print debug output.")(function)


def service_commands(
    role: str, default_config: Path, load_config: Callable[[Path], object]
) -> click.Group:
    """``service install`` / ``service uninstall``: a systemd unit for this daemon.

    ``install`` first loads the config as ``start`` would, so a unit is never installed for a
    config that is missing or invalid (exit 3, like ``start``).
    """
    from petit import systemd  # only these commands need it

    @contextlib.contextmanager
    def refusals() -> Iterator[None]:
        """What systemd's helpers refuse (no such unit, no useradd) is a failure (exit 1)."""
        try:
            yield
        except systemd.ServiceInstallError as exc:
            raise CliError(str(exc), ExitCode.FAILURE) from None

    @click.group(name="service")
    def group() -> None:
        """Install or remove a systemd unit, so the daemon starts at boot."""

    @group.command()
    @config_option(default_config, role.capitalize())
    @verbose_option
    @click.option(
        "--user",
        default=systemd.DEFAULT_USER,
        show_default=True,
        help="Dedicated user the service runs as (created if missing).",
    )
    @click.option(
        "--unit-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=systemd.DEFAULT_UNIT_DIR,
        show_default=True,
        help="Where the unit file goes.",
    )
    @click.option(
        "--no-create-user",
        is_flag=True,
        help="Do not create the user or hand it the config directory.",
    )
    def install(
        config_path: Path, verbose: bool, user: str, unit_dir: Path, no_create_user: bool
    ) -> None:
        executable = Path(sys.executable).parent / f"petit-{role}"
        with exit_codes(), refusals():
            load_config(config_path)
            path = systemd.install(
                role=role,
                executable=executable if executable.exists() else Path(sys.argv[0]).resolve(),
                config=config_path.expanduser().resolve(),
                user=user,
                unit_dir=unit_dir,
                create_user=not no_create_user,
            )
        click.echo(f"Installed {path} (runs as {user}).")
        click.echo(f"Start it now and at every boot: systemctl enable --now petit-{role}")

    @group.command()
    @config_option(default_config, role.capitalize())
    @verbose_option
    @click.option(
        "--unit-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=systemd.DEFAULT_UNIT_DIR,
        show_default=True,
        help="Where the unit file is.",
    )
    def uninstall(config_path: Path, verbose: bool, unit_dir: Path) -> None:
        with exit_codes(), refusals():
            path = systemd.uninstall(role=role, unit_dir=unit_dir)
        click.echo(f"Removed {path}. Stop a running service with: systemctl stop petit-{role}")

    return group

"""One server (or client) per state directory, without leftovers that block the next start.

``NAME.lock`` is held with ``flock`` for the life of the process. The kernel drops the lock
when the process dies however it dies, so a lock or pid file that nobody holds is stale and
is taken over; a reused PID cannot fool this, as nothing relies on ``kill(pid, 0)``.
``NAME.pid`` tells other commands (``stop``, ``status``) the pid and the control port.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeGuard

from petit import statefile
from petit.errors import ConfigError, PetitError


class AlreadyRunningError(PetitError):
    """A live process holds the lock."""

    def __init__(self, pid: int | None) -> None:
        if pid is None:
            super().__init__("already running (its pid file is not written yet)")
        else:
            super().__init__(f"already running on pid {pid}")
        self.pid = pid


@dataclass(frozen=True)
class PidInfo:
    """What a running process published in its pid file."""

    pid: int
    listen: int  # control port
    extra: dict[str, object]  # every other key, e.g. bound ports


class ProcessLock:
    """The lock + pid file pair of one process role (``"server"`` or ``"client"``)."""

    def __init__(self, directory: Path, name: str) -> None:
        self._directory = directory
        self._name = name
        self._fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self._directory / f"{self._name}.lock"

    @property
    def pid_path(self) -> Path:
        return self._directory / f"{self._name}.pid"

    def acquire(self) -> bool:
        """Take the lock; True means a dead process's files were taken over (worth a log line).

        Raises AlreadyRunningError if a live process holds the lock.
        """
        assert self._fd is None, "lock already acquired"
        while True:
            fd, created = self._open_lock_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_pid_file(self.pid_path)
                raise AlreadyRunningError(holder.pid if holder else None) from None
            if _is_current_lock_file(fd, self.lock_path):
                break
            # The previous holder unlinked the file between our open and our flock: the lock
            # we hold is on a dead inode that a newcomer would not see. Start over.
            os.close(fd)
        self._fd = fd
        took_over = not created or self.pid_path.exists()
        self.pid_path.unlink(missing_ok=True)  # a dead process's pid must not be reported
        return took_over

    def write_pid(self, listen: int, **extra: object) -> None:
        """Publish our pid and control port; call again to replace ``extra`` (e.g. bound ports)."""
        assert self._fd is not None, "write_pid() before acquire()"
        document = {**extra, "pid": os.getpid(), "listen": listen}
        statefile.write_json_atomic(self.pid_path, document, mode=0o644)

    def release(self) -> None:
        """Remove the pid file, then the lock file, then drop the lock. Safe to call twice."""
        if self._fd is None:
            return
        self.pid_path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _open_lock_file(self) -> tuple[int, bool]:
        """Open (creating if needed) the lock file; also say whether we created it."""
        while True:
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                return os.open(self.lock_path, flags, 0o644), True
            except FileExistsError:
                pass
            except OSError as exc:
                raise ConfigError(f"cannot create {self.lock_path}: {exc.strerror}") from None
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: create it then
                return os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC), False


def read_pid(directory: Path, name: str) -> PidInfo | None:
    """The running process's pid file, or None if nothing runs (missing, stale or corrupt)."""
    lock = ProcessLock(directory, name)
    if not lock.pid_path.exists() or not _is_lock_held(lock.lock_path):
        return None
    return _read_pid_file(lock.pid_path)


def _is_lock_held(lock_path: Path) -> bool:
    """Probe with a fresh descriptor: flock is per open file, so our own holder counts too."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe lock if we got it
    return False


def _is_current_lock_file(fd: int, lock_path: Path) -> bool:
    """True if ``fd`` is still the file at ``lock_path`` (not unlinked or replaced)."""
    try:
        on_disk = os.stat(lock_path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_pid_file(pid_path: Path) -> PidInfo | None:
    """Parse a pid file; missing or malformed reads as None (stale), never as a crash."""
    try:
        document = statefile.read_json(pid_path, what="pid file")
    except ConfigError:
        return None
    if not isinstance(document, dict):
        return None
    pid = document.pop("pid", None)
    listen = document.pop("listen", None)
    if not _is_int(pid) or not _is_int(listen):
        return None
    return PidInfo(pid=pid, listen=listen, extra=document)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)

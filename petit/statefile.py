"""Crash-safe state files: a reader sees the old content or the new one, never half a file.

Secrets (keys, tokens) go through here too, so the temporary file is created with its final
mode: it is never world-readable, not even for the instant before a chmod.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
from pathlib import Path

from petit.errors import ConfigError


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash at any point leaves a whole file behind."""
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as temp_file:
            os.fchmod(temp_file.fileno(), mode)  # the umask may have narrowed it
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()
        raise
    _fsync_directory(path.parent)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files a killed writer of ``path`` left behind.

    Call it only while holding the lock that guards writes to ``path`` (no writer is running
    then): each is a partial copy that never became ``path``.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def write_json_atomic(path: Path, obj: object, *, mode: int = 0o600) -> None:
    """Write ``obj`` as stable, diff-friendly JSON (sorted keys, indented, final newline)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode("utf-8"), mode=mode)


def read_json(path: Path, *, what: str) -> object:
    """Load a JSON state file; any problem becomes one ConfigError line saying what to do."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is corrupt (byte {exc.start}: not UTF-8): "
            "restore it from a backup or move it aside"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is corrupt (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
            "restore it from a backup or move it aside"
        ) from None


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable, not just the file content."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Logging for both daemons: JSON lines in size-rotated files, an audit trail, runtime levels.

One JSON object per line (``time`` in ISO 8601 UTC, ``level``, ``logger``, ``message``, then
whatever the call passed as ``extra=``), so a log can be searched with jq and shipped as is.
The daemon log goes to ``logFile``; records of ``petit.audit`` (who changed a registration,
an alias or a token) go only to ``auditFile``, always at INFO whatever the runtime level.
In the foreground the daemon also writes to stderr, for a terminal or the journal, as text
or as JSON (``logFormat``); a daemon ``start`` detached writes only to its file.
A message a peer can make us repeat (a refused connection, a forged hello) goes through
``Throttled``: one line per key per ``REPORT_INTERVAL``, the next one counting those held
back, with bounded memory (``max_keys``, oldest forgotten first), so no flood rotates the
log's history away.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import io
import json
import logging
import logging.handlers
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from petit.config import LOG_LEVELS, Table

LOG_FORMATS = ("text", "json")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
AUDIT_FILE = "./logs/audit.log"  # the server's
CLIENT_AUDIT_FILE = "./logs/client-audit.log"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
AUDIT_LOGGER = "petit.audit"
# The extra field of the record that says why a daemon ended; its CLI prints that as its
# ``error:`` line, so the stderr handler leaves it to the log file.
EXIT_CODE_FIELD = "exitCode"
DAEMON_LOGGER = "petit"  # the level ``LOG <level>`` changes

audit_log = logging.getLogger(AUDIT_LOGGER)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the extras, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in document:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


REPORT_INTERVAL = 10.0  # seconds: at most one line per key of a Throttled this often


class Throttled:
    """Log a repeated message at most once per ``interval`` per key, with a count."""

    def __init__(
        self, logger: logging.Logger, interval: float = REPORT_INTERVAL, max_keys: int = 1024
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._max_keys = max_keys
        self._seen: dict[object, tuple[float, int]] = {}  # key -> (last logged, held back)

    def log(
        self,
        level: int,
        key: object,
        now: float,
        message: str,
        *args: object,
        exc_info: bool = False,
    ) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than an interval ago;
        whether it was logged."""
        last, held = self._seen.pop(key, (-math.inf, 0))
        if now - last < self._interval:
            self._remember(key, (last, held + 1))
            return False
        if held:
            message += f" (and {held} more like it in the last {now - last:.0f} s)"
        self._logger.log(level, message, *args, exc_info=exc_info or None)
        self._remember(key, (now, 0))
        return True

    def bug(self, now: float, message: str, *args: object) -> bool:
        """Log the exception being handled, with its traceback, once per interval for each
        place such an exception is raised: a peer that can trigger a bug at will must not be
        able to rotate the log away with tracebacks."""
        exc = sys.exception()
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        site = (type(exc), tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb else type(exc)
        return self.log(logging.ERROR, site, now, message, *args, exc_info=True)

    def _remember(self, key: object, state: tuple[float, int]) -> None:
        if len(self._seen) >= self._max_keys:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = state


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """The log keys of a daemon's config table (``[server]`` or ``[client]``)."""

    level: str = "info"
    file: Path
    audit_file: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    format: str = "text"  # of stderr in the foreground; files are always JSON


def read_log_settings(table: Table, role: str) -> LogSettings:
    """The log keys of ``[server]`` or ``[client]``; ``role`` names the default log files.
    The client's audit file is its own: a server and a client sharing one directory (one
    config.toml) must not rotate the same file."""
    return LogSettings(
        level=table.choice("logLevel", "info", LOG_LEVELS),
        file=table.path("logFile", f"./logs/{role}.log"),
        audit_file=table.path("auditFile", AUDIT_FILE if role == "server" else CLIENT_AUDIT_FILE),
        max_bytes=table.integer("logMaxBytes", DEFAULT_MAX_BYTES, low=1024, high=2**40),
        backups=table.integer("logBackups", DEFAULT_BACKUPS, low=0, high=1000),
        format=table.choice("logFormat", "text", LOG_FORMATS),
    )


def log_keys(settings: LogSettings) -> dict[str, object]:
    """The settings under their config key names, as ``config`` commands print them."""
    return {
        "logLevel": settings.level,
        "logFile": str(settings.file),
        "auditFile": str(settings.audit_file),
        "logMaxBytes": settings.max_bytes,
        "logBackups": settings.backups,
        "logFormat": settings.format,
    }


LOG_FILE_MODE = 0o600  # daemon and audit logs: their owner only


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Log files readable by their owner only (0600): logs name callers, IDs and errors.

    Each file is created with that mode (no world-readable instant before a chmod), an
    existing one is narrowed to it, and rotation renames files, so backups keep it.
    """

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, LOG_FILE_MODE)
        os.fchmod(fd, LOG_FILE_MODE)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def rotating_json_handler(path: Path, settings: LogSettings) -> logging.Handler:
    """A JSON-lines file rotated at ``max_bytes`` keeping ``backups`` old files (.1 newest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = PrivateRotatingFileHandler(
        path, maxBytes=settings.max_bytes, backupCount=settings.backups, encoding="utf-8"
    )
    handler.setFormatter(JsonFormatter())
    return handler


def configure_daemon_logging(settings: LogSettings, *, verbose: bool, to_stderr: bool) -> None:
    """Set up a daemon's handlers: its log file, its audit file and, if asked, stderr."""
    level = "DEBUG" if verbose else settings.level.upper()
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    root.addHandler(rotating_json_handler(settings.file, settings))
    if to_stderr:
        root.addHandler(stderr_handler(settings.format))
    logging.getLogger(DAEMON_LOGGER).setLevel(level)
    configure_audit(settings)


def stderr_handler(log_format: str) -> logging.Handler:
    """Human text, or the same JSON lines as the file (for a collector reading stderr); all
    but the record of why the daemon ended, which its CLI prints as one ``error:`` line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(lambda record: not hasattr(record, EXIT_CODE_FIELD))
    return handler


def configure_audit(settings: LogSettings) -> None:
    """Send ``petit.audit`` records to the audit file only, at INFO whatever the daemon's
    level, so ``log warning`` never silences the audit trail."""
    for handler in audit_log.handlers[:]:
        audit_log.removeHandler(handler)
        handler.close()
    audit_log.addHandler(rotating_json_handler(settings.audit_file, settings))
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False


@contextlib.contextmanager
def audit_to_file(settings: LogSettings) -> Iterator[None]:
    """For a CLI command that changes state itself (the daemon is not running): audit
    records go to the audit file while the body runs."""
    configure_audit(settings)
    try:
        yield
    finally:
        for handler in audit_log.handlers[:]:
            audit_log.removeHandler(handler)
            handler.close()


def audit(event: str, message: str, /, **fields: object) -> None:
    """One audit record: ``event`` (e.g. ``alias.added``) and its facts, never a secret."""
    audit_log.info(message, extra={"event": event, **fields})


def cli_actor(how: Literal["offline", "cli"] = "offline") -> str:
    """Who ran a command that changed state itself: ``offline:<user>`` when it stood in for
    a stopped daemon (the server's registry edits), ``cli:<user>`` when that is the command's
    only way, daemon or not (petit-client register, unregister, evict)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        user = f"uid {os.getuid()}"
    return f"{how}:{user}"


def set_level(level: str) -> dict[str, object]:
    """``LOG <level>`` on a control port: change the running daemon's level (not persisted)."""
    if level not in LOG_LEVELS:
        return {"success": False, "error": f"log level must be one of {', '.join(LOG_LEVELS)}"}
    logger = logging.getLogger(DAEMON_LOGGER)
    logger.setLevel(level.upper())
    # handle(), not warning(): the change is recorded even when the new level hides warnings.
    record = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 0, "log level set to %s", (level,), None
    )
    logger.handle(record)
    return {"success": True, "level": level}

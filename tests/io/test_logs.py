"""petit.logs in-process: the JSON line format, rotation, the audit trail's own level."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from petit.logs import (
    AUDIT_LOGGER,
    DAEMON_LOGGER,
    JsonFormatter,
    LogSettings,
    audit,
    configure_daemon_logging,
    rotating_json_handler,
    set_level,
)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[LogSettings]:
    """Daemon log settings in tmp_path; the process's logging is put back afterwards."""
    root, daemon, audit_logger = (logging.getLogger(n) for n in ("", DAEMON_LOGGER, AUDIT_LOGGER))
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (root, daemon, audit_logger)]
    yield LogSettings(
        file=tmp_path / "logs" / "server.log", audit_file=tmp_path / "logs" / "audit.log"
    )
    for logger, handlers, level, propagate in saved:
        for handler in logger.handlers[:]:
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_record_is_one_json_line_with_its_extras_and_traceback() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("petit.test").makeRecord(
            "petit.test",
            logging.ERROR,
            __file__,
            1,
            "tunnel from %s ended",
            ("10.0.0.1",),
            exc_info=sys.exc_info(),
            extra={"event": "x.y", "id": "1001", "path": Path("/a")},
        )
    text = JsonFormatter().format(record)
    assert "\n" not in text
    document = json.loads(text)
    assert document["message"] == "tunnel from 10.0.0.1 ended"
    assert (document["level"], document["logger"]) == ("ERROR", "petit.test")
    assert (document["event"], document["id"], document["path"]) == ("x.y", "1001", "/a")
    assert document["time"].endswith("+00:00")
    assert "ValueError: boom" in document["exception"]
    assert not {"args", "msg", "levelno"} & set(document)  # no LogRecord internals


def test_rotation_keeps_the_configured_number_of_files_under_the_size(tmp_path: Path) -> None:
    settings = LogSettings(file=tmp_path / "a.log", audit_file=tmp_path / "b.log", max_bytes=2048)
    logger = logging.getLogger("petit.test.rotation")
    logger.propagate = False
    handler = rotating_json_handler(settings.file, dataclasses.replace(settings, backups=3))
    logger.addHandler(handler)
    try:
        for number in range(400):
            logger.warning("line %d", number)
    finally:
        logger.removeHandler(handler)
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.log", "a.log.1", "a.log.2", "a.log.3"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 2048
        assert path.stat().st_mode & 0o777 == 0o600, path  # logs name callers and IDs
    assert lines(tmp_path / "a.log")[-1]["message"] == "line 399"


def test_the_audit_trail_ignores_the_runtime_level(settings: LogSettings) -> None:
    configure_daemon_logging(settings, verbose=False, to_stderr=False)
    assert set_level("error") == {"success": True, "level": "error"}
    logging.getLogger("petit.server").warning("hidden at error level")
    audit("alias.added", "alias a.example added to 1001", actor="control", alias="a.example")
    assert set_level("loud")["success"] is False
    for handler in logging.getLogger().handlers + logging.getLogger(AUDIT_LOGGER).handlers:
        handler.flush()
    assert [r["message"] for r in lines(settings.file)] == ["log level set to error"]
    (record,) = lines(settings.audit_file)
    assert (record["event"], record["actor"], record["alias"]) == (
        "alias.added",
        "control",
        "a.example",
    )


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_foreground_also_logs_to_stderr_in_the_chosen_format(
    settings: LogSettings, log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_daemon_logging(
        dataclasses.replace(settings, format=log_format), verbose=False, to_stderr=True
    )
    logging.getLogger("petit.server").info("ready on %d", 8090)
    line = capsys.readouterr().err.strip()
    if log_format == "json":
        assert json.loads(line)["message"] == "ready on 8090"
    else:
        assert line.endswith(" INFO petit.server: ready on 8090"), line
    assert lines(settings.file)[0]["message"] == "ready on 8090"  # the file is JSON either way


def test_an_existing_world_readable_log_is_narrowed_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "old.log"
    path.write_text("from before\n")
    path.chmod(0o644)
    settings = LogSettings(file=path, audit_file=tmp_path / "b.log")
    rotating_json_handler(path, settings).close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == "from before\n"

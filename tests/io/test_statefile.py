"""Atomic writes never leave half a file, a temp file or a too-open mode behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from petit import statefile
from petit.errors import ConfigError


def test_write_atomic_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    statefile.write_atomic(target, b"old")
    statefile.write_atomic(target, b"new")

    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_write_atomic_sets_the_requested_mode(tmp_path: Path) -> None:
    secret = tmp_path / "key.pem"
    public = tmp_path / "server.pid"
    statefile.write_atomic(secret, b"secret")
    statefile.write_atomic(public, b"{}", mode=0o644)

    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "registry.json"
    statefile.write_json_atomic(target, {"version": 1})

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        statefile.write_atomic(target, b"half")

    assert statefile.read_json(target, what="registry") == {"version": 1}
    assert os.listdir(tmp_path) == ["registry.json"]


def test_unserialisable_object_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    statefile.write_json_atomic(target, {"version": 1})

    with pytest.raises(TypeError):
        statefile.write_json_atomic(target, {"version": object()})

    assert statefile.read_json(target, what="registry") == {"version": 1}
    assert os.listdir(tmp_path) == ["registry.json"]


def test_json_is_sorted_indented_and_newline_terminated(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    statefile.write_json_atomic(target, {"b": 1, "a": [1]})

    assert target.read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'


def test_corrupt_json_names_the_file_line_and_column(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    target.write_text('{\n  "a": 1\n  "b": 2\n}\n')

    with pytest.raises(ConfigError) as excinfo:
        statefile.read_json(target, what="registry")

    assert str(excinfo.value) == (
        f"registry {target} is corrupt (line 3, column 3: Expecting ',' delimiter): "
        "restore it from a backup or move it aside"
    )


def test_non_utf8_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    target.write_bytes(b'{"a": "\xff"}')

    with pytest.raises(ConfigError, match=r"is corrupt \(byte 7: not UTF-8\)"):
        statefile.read_json(target, what="registry")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^registry .*missing\.json does not exist$"):
        statefile.read_json(tmp_path / "missing.json", what="registry")


def test_stale_temporaries_of_one_file_are_removed_and_no_others(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    statefile.write_json_atomic(path, {"kept": True})
    stale = tmp_path / ".registry.json.0123456789abcdef.tmp"
    stale.write_text('{"half a regis')
    other = tmp_path / ".other.json.0123456789abcdef.tmp"
    other.write_text("not ours")
    statefile.remove_stale_temporaries(path)
    assert not stale.exists()
    assert other.exists()
    assert json.loads(path.read_text()) == {"kept": True}

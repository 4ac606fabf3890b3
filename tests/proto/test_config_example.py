"""config.toml.example documents every key both daemons read, each with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from petit.config import Table
from petit_client.config import load_client_config
from petit_server.config import load_server_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config.toml.example"


def _keys_read(load: object, path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every key the loader asks its tables for, by dotted name."""
    seen: set[str] = set()
    original = Table._take

    def recording(self: Table, key: str, default: object) -> object:
        seen.add(f"{self._dotted}.{key}")
        return original(self, key, default)

    monkeypatch.setattr(Table, "_take", recording)
    load(path)  # type: ignore[operator]
    monkeypatch.undo()
    return seen


def _documented(text: str) -> set[str]:
    """Dotted keys set or shown commented out in the example."""
    documented, table = set(), ""
    for line in text.splitlines():
        if heading := re.match(r"^\[([\w.]+)\]$", line):
            table = heading.group(1)
            documented.add(table)
        elif key := re.match(r"^#? ?(\w+) = ", line):
            documented.add(f"{table}.{key.group(1)}")
    return documented


@pytest.mark.parametrize("load", [load_server_config, load_client_config])
def test_every_key_is_documented(load: object, monkeypatch: pytest.MonkeyPatch) -> None:
    read = _keys_read(load, EXAMPLE, monkeypatch)
    missing = read - _documented(EXAMPLE.read_text())
    assert not missing, f"config.toml.example lacks {sorted(missing)}"


@pytest.mark.parametrize(
    ("load", "section"), [(load_server_config, "server"), (load_client_config, "client")]
)
def test_example_values_are_the_defaults(load: object, section: str, tmp_path: Path) -> None:
    minimal = tmp_path / "config.toml"
    minimal.write_text(f"[{section}]\n")
    example_copy = tmp_path / "example.toml"
    example_copy.write_text(EXAMPLE.read_text())
    from_example = dataclasses.asdict(load(example_copy))  # type: ignore[operator]
    from_defaults = dataclasses.asdict(load(minimal))  # type: ignore[operator]
    from_example.pop("path"), from_defaults.pop("path")
    from_example.pop("vitae"), from_defaults.pop("vitae")
    assert from_example == from_defaults

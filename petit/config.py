"""Strict TOML config reading shared by client and server.

Unknown keys are errors and every message names the dotted key, so a typo never silently
falls back to a default. Paths are resolved against the config file's directory, as the
original petit did for values starting with ``./`` or ``../``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from petit.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")


def load_toml(path: Path, *, init_hint: str) -> dict[str, object]:
    """Read a TOML file, turning every failure into one ConfigError line that says what to do."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f'no config at "{path}": run "{init_hint}" first') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f'cannot read config "{path}": {exc}') from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f'config "{path}" is not valid TOML: {exc}') from None


class Table:
    """One TOML table read strictly: typed getters, then ``finish()`` rejects leftovers."""

    def __init__(self, data: Mapping[str, object], dotted: str, base_dir: Path) -> None:
        self._data = data
        self._dotted = dotted
        self._base_dir = base_dir
        self._seen: set[str] = set()

    def _take(self, key: str, default: object) -> object:
        self._seen.add(key)
        return self._data.get(key, default)

    def _fail(self, key: str, expected: str, value: object) -> ConfigError:
        return ConfigError(f"{self._dotted}.{key}: expected {expected}, got {value!r}")

    def string(self, key: str, default: str) -> str:
        """A non-empty string."""
        value = self._take(key, default)
        if not isinstance(value, str) or not value:
            raise self._fail(key, "a non-empty string", value)
        return value

    def addresses(self, key: str, default: str) -> str:
        """Where to listen: an address or name, ``"*"`` (every address, IPv4 and IPv6), or a
        list of them, kept as one comma-separated string (``petit.listen.open_listeners``)."""
        value = self._take(key, default)
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return ", ".join(value)
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, 'an address, "*", or a list of addresses', value)
        return value

    def optional_string(self, key: str) -> str | None:
        """A string, or None when the key is absent."""
        value = self._take(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            raise self._fail(key, "a non-empty string", value)
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        """An integer within [low, high]."""
        value = self._take(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self._fail(key, f"a whole number from {low} to {high}", value)
        return value

    def port(self, key: str, default: int) -> int:
        """A TCP port; 0 lets the system choose (the bound port goes to the pid file)."""
        return self.integer(key, default, low=0, high=65535)

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        """A number of seconds (or similar) within [low, high]."""
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"a number from {low} to {high}", value)
        if not low <= value <= high:
            raise self._fail(key, f"a number from {low} to {high}", value)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        """true or false."""
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``."""
        value = self._take(key, default)
        if value not in choices:
            raise self._fail(key, "one of " + ", ".join(choices), value)
        assert isinstance(value, str)
        return value

    def path(self, key: str, default: str) -> Path:
        """A path, relative to the config file's directory unless absolute."""
        return self._base_dir / Path(self.string(key, default)).expanduser()

    def optional_path(self, key: str) -> Path | None:
        """A path, or None when the key is absent."""
        value = self.optional_string(key)
        return None if value is None else self._base_dir / Path(value).expanduser()

    def string_list(self, key: str, default: list[str]) -> list[str]:
        """A list of strings."""
        value = self._take(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings", value)
        return list(value)

    def scalars(self, key: str) -> dict[str, str]:
        """A sub-table of free-form scalar facts (vitae), as strings."""
        value = self._take(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(v, str | int | float | bool) for v in value.values()
        ):
            raise self._fail(key, "a table of strings", value)
        return {k: str(v) for k, v in value.items()}

    def mapping(self, key: str) -> dict[str, object]:
        """A sub-table taken whole (absent means empty), for a reader that checks each of
        its keys itself; errors it raises should name ``dotted(key)``."""
        value = self._take(key, {})
        if not isinstance(value, dict):
            raise self._fail(key, "a table", value)
        return dict(value)

    def dotted(self, key: str) -> str:
        """The full name of one of this table's keys, for error messages."""
        return f"{self._dotted}.{key}"

    def table(self, key: str) -> Table:
        """A sub-table (absent means empty)."""
        value = self._take(key, {})
        if not isinstance(value, dict):
            raise self._fail(key, "a table", value)
        return Table(value, f"{self._dotted}.{key}", self._base_dir)

    def finish(self) -> None:
        """Reject keys nobody asked for: they are typos or options from another version."""
        if unknown := sorted(set(self._data) - self._seen):
            names = ", ".join(f"{self._dotted}.{key}" for key in unknown)
            raise ConfigError(f"unknown key(s) {names}")


SECTIONS = ("server", "client")  # the top-level tables a petit config may hold


def root_table(document: Mapping[str, object], section: str, path: Path) -> Table:
    """The ``[section]`` table of a config document.

    Client and server may share one file (as in the original), so each reads only its own;
    any other top-level name is a mistake (``[clinet]`` would leave every setting at its
    default), so it is an error naming it.
    """
    unknown = [name for name in document if name not in SECTIONS]
    if unknown:
        raise ConfigError(
            f'config "{path}": unknown table [{unknown[0]}]; petit reads only '
            + " and ".join(f"[{name}]" for name in SECTIONS)
        )
    value = document.get(section)
    if not isinstance(value, dict):
        raise ConfigError(f'config "{path}" has no [{section}] table')
    return Table(value, section, path.parent)

"""Aliases in the FileRegistry: the hostname rules, routing by Host, persistence and the
control commands ADDALIAS / DELALIAS as both the live server and offline edits run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import petit_server.registry.file_backend
from petit.errors import ConfigError
from petit_server.registry.base import RegistryError, apply_command
from petit_server.registry.file_backend import FileRegistry

FIRST_PORT = 20000


@pytest.fixture
async def registry(tmp_path: Path) -> FileRegistry:
    """1001 and 1002 registered."""
    registry = FileRegistry(tmp_path / "registry.json", first_port=FIRST_PORT)
    await registry.register(bytes([1]) * 32, {})
    await registry.register(bytes([2]) * 32, {})
    return registry


def reloaded(registry: FileRegistry) -> FileRegistry:
    return FileRegistry(registry.path, first_port=FIRST_PORT)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("myalias.example.com", "1002"),
        ("MyAlias.Example.COM", "1002"),
        ("myalias.example.com:8090", "1002"),
        ("myalias.example.com.", "1002"),  # fully qualified, as the ID rule already allowed
        ("myalias.example.com.:8090", "1002"),
        ("1001.localhost.", "1001"),
        (" myalias.example.com ", "1002"),
        ("other.example.com", None),
        ("example.com", None),
        ("x.myalias.example.com", None),  # exact names only, no wildcard
        ("1001.localhost", "1001"),
        ("1001-app.example.com:443", "1001"),
        ("1003.localhost", None),  # the ID rule, but nobody holds 1003
        ("[::1]:8090", None),
        ("", None),
    ],
)
async def test_route_tries_aliases_then_the_id_rule(
    registry: FileRegistry, host: str, expected: str | None
) -> None:
    await registry.add_alias("myalias.example.com", "1002")
    assert registry.route(host) == expected


@pytest.mark.parametrize(
    "alias",
    [
        "",
        "bad_name.example.com",
        "space here.com",
        "-lead.example.com",
        "trail-.example.com",
        "double..dot.com",
        "trailing.dot.",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4) + ".com",  # 258 characters
        "émoji.example.com",
        "1001.example.com",  # would shadow the ID route
        "1001-x.example.com",
        "0123.example.com",
        "4242",
    ],
)
async def test_malformed_or_id_shaped_aliases_are_refused(
    registry: FileRegistry, alias: str
) -> None:
    before = registry.path.read_bytes()
    with pytest.raises(RegistryError):
        await registry.add_alias(alias, "1001")
    assert registry.path.read_bytes() == before
    assert registry.get("1001").aliases == []  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "alias", ["a.b", "1a.example.com", "app-1001.example.com", "x" * 63, "Upper.Example.com"]
)
async def test_hostname_aliases_are_accepted_lowercased(registry: FileRegistry, alias: str) -> None:
    await registry.add_alias(alias, "1001")
    assert registry.get("1001").aliases == [alias.lower()]  # type: ignore[union-attr]
    assert registry.route(alias) == "1001"


async def test_an_alias_is_bound_once(registry: FileRegistry) -> None:
    await registry.add_alias("shop.example.com", "1001")
    for rid in ("1001", "1002"):
        with pytest.raises(RegistryError, match=r"^Alias shop\.example\.com already exists\.$"):
            await registry.add_alias("SHOP.example.com", rid)
    assert registry.route("shop.example.com") == "1001"


async def test_an_alias_needs_a_registered_id(registry: FileRegistry) -> None:
    for rid in ("1003", "abc", ""):
        with pytest.raises(RegistryError, match=rf"^No such registeredId {rid}\.$"):
            await registry.add_alias("shop.example.com", rid)
    assert registry.route("shop.example.com") is None


async def test_aliases_persist_and_go_with_their_registration(registry: FileRegistry) -> None:
    await registry.add_alias("a.example.com", "1001")
    await registry.add_alias("b.example.com", "1001")
    await registry.add_alias("c.example.com", "1002")
    again = reloaded(registry)
    assert again.get("1001").aliases == ["a.example.com", "b.example.com"]  # type: ignore[union-attr]
    assert again.route("c.example.com") == "1002"

    await again.unregister("1001")
    assert again.route("a.example.com") is None
    assert reloaded(again).route("b.example.com") is None
    # A freed alias can be bound again.
    await again.add_alias("a.example.com", "1002")
    assert reloaded(again).route("a.example.com") == "1002"


async def test_remove_alias(registry: FileRegistry) -> None:
    await registry.add_alias("a.example.com", "1001")
    with pytest.raises(RegistryError, match=r"^a\.example\.com is not an alias of 1002\.$"):
        await registry.remove_alias("a.example.com", "1002")
    with pytest.raises(RegistryError, match=r"^nope\.example\.com is not an alias\.$"):
        await registry.remove_alias("nope.example.com")
    assert registry.route("a.example.com") == "1001"
    await registry.remove_alias("A.example.com", "1001")
    assert registry.route("a.example.com") is None
    assert reloaded(registry).get("1001").aliases == []  # type: ignore[union-attr]


async def test_failed_save_leaves_no_alias_behind(
    registry: FileRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(petit_server.registry.file_backend, "write_atomic", failing_write)
    with pytest.raises(OSError, match="No space left"):
        await registry.add_alias("a.example.com", "1001")
    assert registry.route("a.example.com") is None
    assert registry.get("1001").aliases == []  # type: ignore[union-attr]


async def test_an_alias_bound_twice_in_the_file_is_a_config_error(registry: FileRegistry) -> None:
    document = json.loads(registry.path.read_text())
    for entry in document["registrations"].values():
        entry["aliases"] = ["same.example.com"]
    registry.path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="more than one registration"):
        reloaded(registry)


# (command, error) in order; error None means {"success": true}.
ALIAS_SESSION = [
    ("ADDALIAS 1001 a.example.com", None),
    ("ADDALIAS 1002 a.example.com", "Alias a.example.com already exists."),
    ("ADDALIAS 1009 b.example.com", "No such registeredId 1009."),
    ("ADDALIAS a.example.com", "usage: ADDALIAS <id> <alias>"),
    ("DELALIAS 1002 a.example.com", "a.example.com is not an alias of 1002."),
    ("DELALIAS 1001 a.example.com", None),
    ("DELALIAS a.example.com", "a.example.com is not an alias."),
    ("ADDALIAS 1002 a.example.com", None),
    ("DELALIAS a.example.com", None),
    ("DELALIAS", "usage: DELALIAS [<id>] <alias>"),
]


async def test_alias_control_commands(registry: FileRegistry) -> None:
    for command, error in ALIAS_SESSION:
        verb, *args = command.split()
        expected = {"success": True} if error is None else {"success": False, "error": error}
        assert await apply_command(registry, verb, args, actor="test") == expected, command
    assert registry.route("a.example.com") is None
    # STATUS is not a registry command
    assert await apply_command(registry, "STATUS", [], actor="test") is None

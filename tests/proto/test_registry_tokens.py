"""Enrollment tokens in the FileRegistry: only hashes are stored, a token registers once, a
revoked or unknown one never, and consuming it is part of the registration's single save."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import petit_server.registry.file_backend
from petit.errors import AuthError, ConfigError
from petit_server.edge.gateway import SourceRate
from petit_server.registry.base import (
    ENROLLMENT_REFUSED,
    MergePlan,
    Registration,
    RegistryError,
    apply_command,
)
from petit_server.registry.file_backend import FileRegistry

FIRST_PORT = 20000


def key(n: int) -> bytes:
    return bytes([n]) * 32


@pytest.fixture
def registry(tmp_path: Path) -> FileRegistry:
    return FileRegistry(tmp_path / "registry.json", first_port=FIRST_PORT)


def reloaded(registry: FileRegistry) -> FileRegistry:
    return FileRegistry(registry.path, first_port=FIRST_PORT)


async def test_the_file_holds_the_hash_never_the_secret(registry: FileRegistry) -> None:
    token, secret = await registry.create_token("laptop of ana")
    assert secret.startswith("pt_")
    assert len(secret) == 3 + 32  # token_urlsafe(24): 32 characters
    text = registry.path.read_text()
    assert secret not in text
    assert secret[3:] not in text
    entry = json.loads(text)["tokens"][token.token_id]
    assert entry["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert entry["note"] == "laptop of ana"
    (listed,) = reloaded(registry).tokens()
    assert (listed.token_id, listed.note, listed.state) == (
        token.token_id,
        "laptop of ana",
        "unused",
    )


async def test_tokens_get_increasing_ids_and_distinct_secrets(registry: FileRegistry) -> None:
    made = [await registry.create_token(f"n{i}") for i in range(5)]
    assert [t.token_id for t, _ in made] == ["1", "2", "3", "4", "5"]
    assert len({secret for _, secret in made}) == 5
    await registry.revoke_token("5")
    assert (await reloaded(registry).create_token(""))[
        0
    ].token_id == "6"  # revoked IDs are not reused


async def test_a_token_registers_exactly_once(registry: FileRegistry) -> None:
    _, secret = await registry.create_token("")
    first = await registry.register(key(1), {}, token=secret)
    state = reloaded(registry).tokens()[0]
    assert (state.state, state.used_by) == ("used", first.registration_id)
    assert state.used_at == first.created
    with pytest.raises(AuthError) as refused:
        await registry.register(key(2), {}, token=secret)
    assert str(refused.value) == ENROLLMENT_REFUSED
    assert [r.registration_id for r in reloaded(registry).all()] == ["1001"]


@pytest.mark.parametrize("presented", ["", "pt_", "pt_nonsense", "the-right-one-but-revoked"])
async def test_unknown_or_revoked_tokens_register_nothing(
    registry: FileRegistry, presented: str
) -> None:
    token, secret = await registry.create_token("")
    if presented == "the-right-one-but-revoked":
        await registry.revoke_token(token.token_id)
        presented = secret
    with pytest.raises(AuthError, match="valid enrollment token is required"):
        await registry.register(key(1), {}, token=presented)
    assert reloaded(registry).all() == []
    assert (await reloaded(registry).register(key(1), {})).registration_id == "1001"  # ID not burnt


async def test_without_a_token_argument_none_is_needed(registry: FileRegistry) -> None:
    await registry.create_token("")
    assert (await registry.register(key(1), {})).registration_id == "1001"
    assert registry.tokens()[0].state == "unused"


async def test_revoke(registry: FileRegistry) -> None:
    await registry.create_token("")
    _, secret = await registry.create_token("")
    await registry.register(key(1), {}, token=secret)
    with pytest.raises(RegistryError, match=r"^No such token 9\.$"):
        await registry.revoke_token("9")
    with pytest.raises(RegistryError, match=r"^Token 2 is already used\.$"):
        await registry.revoke_token("2")
    await registry.revoke_token("1")
    with pytest.raises(RegistryError, match=r"^Token 1 is already revoked\.$"):
        await registry.revoke_token("1")
    assert [t.state for t in reloaded(registry).tokens()] == ["revoked", "used"]


async def test_consuming_is_undone_when_the_registration_cannot_be_saved(
    registry: FileRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await registry.create_token("")

    def failing_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(petit_server.registry.file_backend, "write_atomic", failing_write)
    with pytest.raises(OSError, match="No space left"):
        await registry.register(key(1), {}, token=secret)
    monkeypatch.undo()
    assert registry.tokens()[0].state == "unused"
    assert registry.all() == []
    assert (await registry.register(key(1), {}, token=secret)).registration_id == "1001"


@pytest.mark.parametrize("note", ["x" * 201, "bell\x07", "line\nbreak"])
async def test_notes_are_short_printable_text(registry: FileRegistry, note: str) -> None:
    with pytest.raises(RegistryError, match="printable"):
        await registry.create_token(note)
    assert registry.tokens() == []


@pytest.mark.parametrize(
    "change",
    [{"sha256": "zz"}, {"sha256": "ab"}, {"created": "yesterday"}, {"used_at": "now"}],
)
async def test_a_corrupt_token_entry_is_a_config_error(
    registry: FileRegistry, change: dict[str, object]
) -> None:
    token, _ = await registry.create_token("")
    document = json.loads(registry.path.read_text())
    document["tokens"][token.token_id].update(change)
    registry.path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=f"token {token.token_id} is malformed"):
        reloaded(registry)


async def test_token_control_commands(registry: FileRegistry) -> None:
    created = await apply_command(registry, "TOKEN", ["create", "ci", "runner", "7"], actor="test")
    assert created is not None
    assert created["success"] is True
    assert str(created["token"]).startswith("pt_")
    assert created["id"] == "1"
    listing = await apply_command(registry, "TOKEN", ["LIST"], actor="test")
    assert listing is not None
    assert listing["tokens"] == [
        {
            "id": "1",
            "note": "ci runner 7",
            "created": registry.tokens()[0].created,
            "state": "unused",
            "usedBy": None,
            "usedAt": None,
            "forId": None,
        }
    ]
    assert await apply_command(registry, "TOKEN", ["REVOKE", "1"], actor="test") == {
        "success": True
    }
    assert await apply_command(registry, "TOKEN", ["REVOKE", "1"], actor="test") == {
        "success": False,
        "error": "Token 1 is already revoked.",
    }
    for wrong in ([], ["LIST", "x"], ["REVOKE"], ["DESTROY", "1"]):
        reply = await apply_command(registry, "TOKEN", wrong, actor="test")
        assert reply is not None
        assert reply["success"] is False
        assert str(reply["error"]).startswith("usage: TOKEN CREATE")


async def test_a_claim_gives_a_key_once_and_never_replaces_one(registry: FileRegistry) -> None:
    keyless = Registration("4001", b"", 11090, 1.0, {"hostname": "old"}, ["old.example.com"])
    assert await registry.merge(MergePlan(registrations=[keyless], next_id=4002)) == []
    assert registry.public_key_of("4001") is None  # nothing proves it before the claim
    _, first = await registry.create_token("", for_id="4001")
    _, second = await registry.create_token("", for_id="4001")
    assert first.startswith("pc_")
    claimed = await registry.register(key(1), {"hostname": "new"}, token=first)
    assert (claimed.registration_id, claimed.port, claimed.aliases) == (
        "4001",
        11090,
        ["old.example.com"],
    )
    with pytest.raises(AuthError, match="claim token is unknown, used or revoked"):
        await registry.register(key(2), {}, token=second)  # a second holder takes nothing
    assert reloaded(registry).public_key_of("4001") == key(1)
    with pytest.raises(RegistryError, match="already has a key"):
        await registry.create_token("", for_id="4001")
    with pytest.raises(RegistryError, match="No such registeredId 4999"):
        await registry.create_token("", for_id="4999")


def test_registrations_per_source_are_a_token_bucket_with_bounded_memory() -> None:
    rate = SourceRate(per_minute=2, max_sources=3)
    assert rate.seconds_to_wait("192.0.2.1", 0.0) == 0
    assert rate.seconds_to_wait("192.0.2.1", 0.0) == 0
    assert rate.seconds_to_wait("192.0.2.1", 0.0) == pytest.approx(30.0)  # 2/min: one per 30 s
    assert rate.seconds_to_wait("192.0.2.2", 0.0) == 0  # another address has its own bucket
    assert rate.seconds_to_wait("192.0.2.1", 30.0) == 0  # refilled by one
    assert rate.seconds_to_wait("192.0.2.1", 30.0) > 0  # and empty again
    for n in range(3, 6):  # three more sources: only three buckets are kept, the oldest go
        rate.seconds_to_wait(f"192.0.2.{n}", 31.0)
    assert rate.seconds_to_wait("192.0.2.1", 31.0) == 0  # forgotten, so full again

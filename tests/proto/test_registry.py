"""FileRegistry: ID and port assignment, persistence, corrupt files, failed saves."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import petit_server.registry.base
import petit_server.registry.file_backend
from petit.errors import ConfigError
from petit.statefile import write_atomic
from petit_server.registry.base import LAST_PORT, RegistryError
from petit_server.registry.file_backend import FileRegistry

FIRST_PORT = 20000


def key(n: int) -> bytes:
    return bytes([n]) * 32


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.json"


async def test_register_assigns_sequential_ids_and_ports(path: Path) -> None:
    registry = FileRegistry(path, first_port=FIRST_PORT)
    first = await registry.register(key(1), {"hostname": "a"})
    second = await registry.register(key(2), {})
    assert (first.registration_id, first.port) == ("1001", FIRST_PORT)
    assert (second.registration_id, second.port) == ("1002", FIRST_PORT + 1)
    assert registry.get("1001") == first
    assert registry.public_key_of("1002") == key(2)
    assert registry.public_key_of("1003") is None


async def test_registry_is_persisted_and_reloaded_identically(path: Path) -> None:
    registry = FileRegistry(path, first_port=FIRST_PORT)
    for n in range(1, 4):
        await registry.register(key(n), {"hostname": f"host-{n}", "os": "linux"})
    reloaded = FileRegistry(path, first_port=FIRST_PORT)
    assert reloaded.all() == registry.all()
    assert [r.registration_id for r in reloaded.all()] == ["1001", "1002", "1003"]
    assert (await reloaded.register(key(4), {})).registration_id == "1004"


async def test_ids_are_never_reused_and_freed_ports_are(path: Path) -> None:
    registry = FileRegistry(path, first_port=FIRST_PORT)
    await registry.register(key(1), {})
    await registry.register(key(2), {})
    await registry.unregister("1002")
    await registry.unregister("1001")
    reloaded = FileRegistry(path, first_port=FIRST_PORT)
    assert reloaded.all() == []
    again = await reloaded.register(key(3), {})
    assert (again.registration_id, again.port) == ("1003", FIRST_PORT)


def test_a_missing_file_is_an_empty_registry(path: Path) -> None:
    registry = FileRegistry(path, first_port=FIRST_PORT)
    assert registry.all() == []
    assert not path.exists()  # nothing is written until something changes


def valid_document() -> dict[str, object]:
    return {
        "version": 1,
        "next_id": 1002,
        "registrations": {"1001": {"public_key": key(1).hex(), "port": FIRST_PORT, "created": 1.5}},
    }


def _with_entry(**changes: object) -> str:
    document = valid_document()
    entry = document["registrations"]["1001"]  # type: ignore[index]
    entry.update(changes)
    return json.dumps(document)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        b"\xff\xfe{}",
        "[]",
        json.dumps({**valid_document(), "version": 2}),
        json.dumps({**valid_document(), "registrations": []}),
        json.dumps({**valid_document(), "next_id": "1002"}),
        _with_entry(public_key="zz"),
        _with_entry(public_key=key(1).hex()[:-2]),
        _with_entry(port="eleven"),
        _with_entry(port=99999),
        _with_entry(port=0),
        _with_entry(vitae=["x"]),
        json.dumps({**valid_document(), "registrations": {"0001": {}}}),
    ],
)
def test_corrupt_file_is_a_config_error_naming_the_file(path: Path, content: str | bytes) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as error:
        FileRegistry(path, first_port=FIRST_PORT)
    assert str(path) in str(error.value)


async def test_valid_file_loads(path: Path) -> None:
    path.write_text(json.dumps(valid_document()))
    registry = FileRegistry(path, first_port=FIRST_PORT)
    (only,) = registry.all()
    assert (only.registration_id, only.public_key, only.port) == ("1001", key(1), FIRST_PORT)
    assert (await registry.register(key(2), {})).registration_id == "1002"


def failing_write(path: Path, obj: object, *, mode: int = 0o600) -> None:
    raise OSError(28, "No space left on device")


async def test_failed_register_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = FileRegistry(path, first_port=FIRST_PORT)
    await registry.register(key(1), {})
    before_file = path.read_bytes()
    before = registry.all()

    monkeypatch.setattr(petit_server.registry.file_backend, "write_atomic", failing_write)
    with pytest.raises(OSError, match="No space left"):
        await registry.register(key(2), {})
    assert registry.all() == before
    assert registry.public_key_of("1002") is None
    assert path.read_bytes() == before_file
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    monkeypatch.undo()
    # The ID of the failed attempt was never handed out, so it is the next one.
    assert (await registry.register(key(2), {})).registration_id == "1002"
    assert FileRegistry(path, first_port=FIRST_PORT).all() == registry.all()


async def test_failed_unregister_changes_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = FileRegistry(path, first_port=FIRST_PORT)
    registered = await registry.register(key(1), {})
    before_file = path.read_bytes()

    monkeypatch.setattr(petit_server.registry.file_backend, "write_atomic", failing_write)
    with pytest.raises(OSError, match="No space left"):
        await registry.unregister("1001")
    assert registry.get("1001") == registered
    assert path.read_bytes() == before_file


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis:6379/0", "redis://:****@redis:6379/0"),
        ("rediss://petit:s3cret@[::1]:6380/2", "rediss://petit:****@[::1]:6380/2"),
        ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0?password=****"),
        (
            "redis://u:a@redis/0?socket_timeout=2&Password=b",
            "redis://u:****@redis/0?socket_timeout=2&Password=****",
        ),
        (
            "unix:///run/redis.sock?db=1&password=s3cret",
            "unix:///run/redis.sock?db=1&password=****",
        ),
    ],
)
def test_redis_urls_are_shown_without_their_passwords(url: str, shown: str) -> None:
    assert petit_server.registry.base.redacted_url(url) == shown


def test_two_registrations_with_one_port_are_refused_naming_both(path: Path) -> None:
    document = valid_document()
    document["registrations"]["1002"] = {"public_key": key(2).hex(), "port": FIRST_PORT}  # type: ignore[index]
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=f"1001 and 1002 both have port {FIRST_PORT}"):
        FileRegistry(path, first_port=FIRST_PORT)


async def test_ports_never_leave_their_range(path: Path) -> None:
    registry = FileRegistry(path, first_port=LAST_PORT - 1)
    assert [(await registry.register(key(n), {})).port for n in (1, 2)] == [
        LAST_PORT - 1,
        LAST_PORT,
    ]
    with pytest.raises(RegistryError, match="no TCP port is free from firstPort"):
        await registry.register(key(3), {})
    assert len(registry.all()) == 2
    await registry.unregister(registry.all()[0].registration_id)
    assert (await registry.register(key(4), {})).port == LAST_PORT - 1  # a freed port is reused


async def test_the_file_is_the_same_json_as_a_full_encode_after_every_kind_of_change(
    path: Path,
) -> None:
    """Entries are rendered one by one and joined; the file must still be exactly
    json.dumps(document, indent=2, sort_keys=True), so old and new servers read the same."""
    registry = FileRegistry(path, first_port=FIRST_PORT)

    def full_encode() -> bytes:
        document = {
            "version": 1,
            "next_id": registry._next_id,
            "registrations": {r.registration_id: r.to_json() for r in registry.all()},
            "tokens": {t.token_id: t.to_json() for t in registry.tokens()},
        }
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    assert not path.exists()
    registry.save()
    assert path.read_bytes() == full_encode()  # empty objects
    for n in range(1, 12):  # IDs 1001..1011: string order differs from number order past 9
        await registry.register(key(n), {"host": f"h{n}", "note": 'é "quoted"\n'})
        assert path.read_bytes() == full_encode()
    await registry.add_alias("shop.example.com", "1003")
    await registry.create_token("for the next one")
    await registry.unregister("1002")
    await registry.remove_alias("shop.example.com")
    assert path.read_bytes() == full_encode()
    assert FileRegistry(path, first_port=FIRST_PORT).all() == registry.all()


async def test_a_change_renders_only_what_it_touched_and_writes_in_a_worker_thread(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps a 100,000-registration registry from stalling requests on every change:
    no full re-render, and the file written off the event loop's thread."""
    registry = FileRegistry(path, first_port=FIRST_PORT)
    for n in range(1, 51):
        await registry.register(key(n), {})
    rendered: list[str] = []
    original = petit_server.registry.base.Registration.to_json

    def counting_to_json(self: petit_server.registry.base.Registration) -> dict[str, object]:
        rendered.append(self.registration_id)
        return original(self)

    writers: list[str] = []

    def recording_write(target: Path, data: bytes, *, mode: int = 0o600) -> None:
        writers.append(threading.current_thread().name)
        write_atomic(target, data, mode=mode)

    monkeypatch.setattr(petit_server.registry.base.Registration, "to_json", counting_to_json)
    monkeypatch.setattr(petit_server.registry.file_backend, "write_atomic", recording_write)
    await registry.register(key(51), {})
    await registry.add_alias("a.example.com", "1007")
    assert rendered == ["1051", "1007"]
    assert len(writers) == 2
    assert threading.main_thread().name not in writers

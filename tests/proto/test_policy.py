"""Per-registration policies: their keys and checks, and their life in the FileRegistry
(persisted, audited, changed by the POLICY command as the live server and offline edits run
it). The Redis backend's side is in tests/integration/test_redis_registry.py."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from petit.errors import ConfigError
from petit_server.policy import (
    KEYS,
    Policy,
    PolicyError,
    default_policy,
    parse_assignments,
    policy_from_json,
)
from petit_server.registry.base import apply_command
from petit_server.registry.file_backend import FileRegistry

FIRST_PORT = 20000


@pytest.fixture
async def registry(tmp_path: Path) -> FileRegistry:
    """1001 registered."""
    registry = FileRegistry(tmp_path / "registry.json", first_port=FIRST_PORT)
    await registry.register(bytes([1]) * 32, {})
    return registry


@pytest.mark.parametrize(
    ("changes", "address", "admitted"),
    [
        ({}, "203.0.113.9", True),  # no lists: everyone
        ({"allow": "10.0.0.0/8"}, "10.1.2.3", True),
        ({"allow": "10.0.0.0/8"}, "11.1.2.3", False),
        ({"allow": "10.0.0.0/8"}, "::ffff:10.1.2.3", True),  # IPv4 on a dual-stack socket
        ({"allow": "2001:db8::/32"}, "2001:db8::1", True),
        ({"allow": "2001:db8::/32"}, "10.1.2.3", False),
        ({"deny": "192.0.2.0/24"}, "192.0.2.1", False),
        ({"deny": "192.0.2.0/24"}, "198.51.100.1", True),
        ({"allow": "192.0.2.0/24", "deny": "192.0.2.128/25"}, "192.0.2.200", False),  # deny wins
        ({"allow": "192.0.2.0/24", "deny": "192.0.2.128/25"}, "192.0.2.100", True),
        ({"allow": "10.0.0.0/8"}, "not an address", False),
    ],
)
def test_visitor_lists(changes: dict[str, object], address: str, admitted: bool) -> None:
    assert Policy().changed(changes).admits(address) is admitted


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"responsetimeout": "5"}, "unknown policy key 'responsetimeout'"),
        ({"responseTimeout": "0"}, "responseTimeout is seconds"),
        ({"responseTimeout": "nan"}, "responseTimeout is a finite number"),
        ({"openTimeout": "soon"}, "openTimeout is a number"),
        ({"maxRequestBody": "1.5"}, "maxRequestBody is a whole number"),
        ({"maxStreams": "0"}, "maxStreams is a whole number of at least 1"),
        ({"rateLimit": "-1"}, "rateLimit is requests per second"),
        ({"rateBurst": True}, "rateBurst is a number"),
        ({"allow": "10.0.0.0/33"}, "allow: '10.0.0.0/33' is no address range"),
        ({"deny": 7}, "deny is a list of address ranges"),
        (
            {"allow": ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(257))},
            "allow holds at most 256",
        ),
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_rule(
    changes: dict[str, object], error: str
) -> None:
    with pytest.raises(PolicyError, match="^" + re.escape(error)):
        Policy().changed(changes)


def test_an_empty_value_resets_a_key() -> None:
    policy = Policy().changed({"allow": "10.0.0.0/8", "responseTimeout": "90", "rateLimit": "5"})
    assert policy.burst == 5
    reset = policy.changed({"allow": "", "responseTimeout": None})
    assert reset.to_json() == {"rateLimit": 5.0}
    assert not Policy()
    assert policy


def test_assignments_from_a_command_line() -> None:
    assert parse_assignments(["allow=10.0.0.0/8,::1/128", "idleTimeout="]) == {
        "allow": "10.0.0.0/8,::1/128",
        "idleTimeout": "",
    }
    with pytest.raises(PolicyError, match="is not KEY=VALUE"):
        parse_assignments(["allow"])


networks = st.lists(
    st.ip_addresses().map(lambda address: str(ipaddress.ip_network(address))), max_size=3
)


@given(
    seconds=st.none() | st.floats(0.001, 86_400),
    body=st.none() | st.integers(0, 2**40),
    allow=networks,
    rate=st.none() | st.floats(0.01, 1000),
    streams=st.none() | st.integers(1, 10_000),
)
def test_the_stored_form_reads_back_as_the_same_policy(
    seconds: float | None,
    body: int | None,
    allow: list[str],
    rate: float | None,
    streams: int | None,
) -> None:
    policy = Policy().changed(
        {
            "responseTimeout": seconds,
            "maxRequestBody": body,
            "allow": allow,
            "rateLimit": rate,
            "maxStreams": streams,
        }
    )
    stored = json.loads(json.dumps(policy.to_json()))
    assert policy_from_json(stored) == policy
    assert set(stored) <= set(KEYS)


async def test_a_policy_is_saved_audited_and_read_back(
    registry: FileRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="petit.audit")
    policy = await registry.set_policy(
        "1001", {"allow": "10.0.0.0/8", "responseTimeout": "120"}, actor="control"
    )
    again = FileRegistry(registry.path, first_port=FIRST_PORT)
    assert again.get("1001").policy == policy  # type: ignore[union-attr]
    stored = json.loads(registry.path.read_text())["registrations"]["1001"]["policy"]
    assert stored == {"responseTimeout": 120.0, "allow": ["10.0.0.0/8"]}
    (record,) = [r for r in caplog.records if r.getMessage().startswith("policy of 1001")]
    assert record.getMessage() == (
        'policy of 1001 is now {"responseTimeout": 120.0, "allow": ["10.0.0.0/8"]}'
    )
    await registry.set_policy("1001", {"allow": "", "responseTimeout": ""})
    untouched = json.loads(registry.path.read_text())["registrations"]["1001"]
    assert "policy" not in untouched  # back to the defaults: the entry as before policies


async def test_a_refused_change_leaves_the_policy_and_the_file_alone(
    registry: FileRegistry,
) -> None:
    await registry.set_policy("1001", {"maxStreams": "5"})
    before = registry.path.read_bytes()
    with pytest.raises(PolicyError):
        await registry.set_policy("1001", {"maxStreams": "5", "rateLimit": "fast"})
    assert registry.path.read_bytes() == before
    assert registry.get("1001").policy.max_streams == 5  # type: ignore[union-attr]


async def test_a_corrupt_stored_policy_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = FileRegistry(path, first_port=FIRST_PORT)
    await registry.register(bytes([1]) * 32, {})
    document = json.loads(path.read_text())
    document["registrations"]["1001"]["policy"] = {"allow": ["not a range"]}
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"registration 1001 is malformed .*not a range"):
        FileRegistry(path, first_port=FIRST_PORT)


@pytest.mark.parametrize(
    ("args", "reply"),
    [
        (["1001"], {"success": True, "id": "1001", "policy": {}}),
        (
            ["1001", "rateLimit=2", "rateBurst=4"],
            {"success": True, "id": "1001", "policy": {"rateLimit": 2.0, "rateBurst": 4}},
        ),
        (["1009"], {"success": False, "error": "No such registeredId 1009."}),
        (["1009", "maxStreams=3"], {"success": False, "error": "No such registeredId 1009."}),
        (
            ["1001", "maxStreams"],
            {
                "success": False,
                "error": "'maxStreams' is not KEY=VALUE (an empty VALUE resets the key)",
            },
        ),
        (
            [],
            {
                "success": False,
                "error": "usage: POLICY <id> [key=value...] (an empty value resets the key)",
            },
        ),
    ],
)
async def test_the_policy_command(
    registry: FileRegistry, args: list[str], reply: dict[str, object]
) -> None:
    assert await apply_command(registry, "POLICY", args, actor="control") == reply


def test_server_defaults_apply_where_a_registration_sets_nothing() -> None:
    defaults = default_policy({"allow": ["10.0.0.0/8"], "rateLimit": 5, "bandwidth": 10**6})
    own = Policy().changed({"allow": "192.0.2.0/24", "maxStreams": "3"})
    effective = own.over(defaults)
    assert effective.to_json() == {
        "allow": ["192.0.2.0/24"],  # the registration's list replaces the default, whole
        "rateLimit": 5.0,
        "maxStreams": 3,
        "bandwidth": 1_000_000,
    }
    assert Policy().over(defaults) == defaults


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"responseTimeout": 5}, "responseTimeout's default is [server] responseTimeout"),
        ({"maxStreams": 5}, "maxStreams's default is [server] maxStreamsPerRegistration"),
        ({"rateLimit": "x"}, "rateLimit is a number, not 'x'"),
    ],
)
def test_server_defaults_refuse_keys_with_a_server_key_of_their_own(
    table: dict[str, object], error: str
) -> None:
    with pytest.raises(PolicyError, match="^" + re.escape(error)):
        default_policy(table)

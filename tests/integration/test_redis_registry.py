"""RedisRegistry against a real redis-server: nodes sharing it, atomicity, outages, bad data,
and the same audit records as the file."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from petit.errors import AuthError, ConfigError
from petit.logs import AUDIT_LOGGER, JsonFormatter
from petit_server.registry.base import (
    MergePlan,
    Registration,
    Registry,
    RegistryError,
    RegistryUnavailableError,
)
from petit_server.registry.file_backend import FileRegistry
from petit_server.registry.redis_backend import SOCKET_TIMEOUT, RedisRegistry
from petit_server.usage import RegistrationUsage, UsageStore
from tests.integration.harness import RedisServer, free_port, wait_until

pytestmark = pytest.mark.integration

FIRST_PORT = 21000
SEEN = 3.0  # seconds for one node's change to reach another (it takes ~0.2 s)


def key(n: int) -> bytes:
    return n.to_bytes(2, "big") * 16


@asynccontextmanager
async def node(
    url: str, *, prefix: str = "petit:", removed: list[str] | None = None
) -> AsyncIterator[RedisRegistry]:
    """A registry as one server node runs it: loaded, then following the others' changes."""
    registry = RedisRegistry(
        url,
        prefix=prefix,
        first_port=FIRST_PORT,
        on_removed=None if removed is None else removed.append,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run)
            yield registry
            nursery.cancel_scope.cancel()
    finally:
        registry.close()


async def test_two_nodes_see_each_others_registrations_aliases_and_tokens(
    redis_server: RedisServer,
) -> None:
    removed: list[str] = []
    async with node(redis_server.url) as a, node(redis_server.url, removed=removed) as b:
        registration = await a.register(key(1), {"hostname": "laptop"})
        assert (registration.registration_id, registration.port) == ("1001", FIRST_PORT)
        await wait_until(lambda: b.get("1001") == registration, SEEN, what="B to see 1001")
        assert b.public_key_of("1001") == key(1)
        assert b.route("1001.example.com") == "1001"

        await b.add_alias("shop.example.com", "1001")
        assert b.route("SHOP.example.com:8090") == "1001"  # at once on the node that changed it
        await wait_until(lambda: a.route("shop.example.com") == "1001", SEEN, what="A: alias")
        with pytest.raises(RegistryError, match=r"^Alias shop\.example\.com already exists\.$"):
            await a.add_alias("shop.example.com", "1001")

        changes = {"deny": "192.0.2.0/24,2001:db8::/32", "maxStreams": "5"}
        policy = await b.set_policy("1001", changes)
        assert b.get("1001").policy == policy  # type: ignore[union-attr]
        await wait_until(
            lambda: getattr(a.get("1001"), "policy", None) == policy, SEEN, what="A: policy"
        )
        assert not policy.admits("192.0.2.7")
        assert policy.admits("198.51.100.7")

        token, secret = await a.create_token("ci")
        await wait_until(lambda: [t.token_id for t in b.tokens()] == ["1"], SEEN, what="token")
        used = await b.register(key(2), {}, token=secret)
        assert used.registration_id == "1002"
        await wait_until(lambda: a.tokens()[0].used_by == "1002", SEEN, what="A: token used")
        with pytest.raises(RegistryError, match="already used"):
            await b.revoke_token(token.token_id)

        await a.unregister("1001")
        await wait_until(lambda: b.get("1001") is None, SEEN, what="B to forget 1001")
        assert b.route("shop.example.com") is None
        assert removed == ["1001"]  # B's hub is told, so its sessions for 1001 end
        again = await b.register(key(3), {})
        assert (again.registration_id, again.port) == ("1003", FIRST_PORT)  # port freed, ID not


async def test_a_hello_catches_up_on_a_registration_made_on_another_node_at_once(
    redis_server: RedisServer,
) -> None:
    """A client reconnects to every node right after registering on one: the others must
    know its ID at its hello, not at their next poll."""
    b = RedisRegistry(redis_server.url, first_port=FIRST_PORT)  # loaded once, not polling
    try:
        await trio.to_thread.run_sync(b.load)
        async with node(redis_server.url) as a:
            rid = (await a.register(key(7), {})).registration_id
        assert b.public_key_of(rid) is None
        await b.catch_up([rid, "9999"])
        assert b.public_key_of(rid) == key(7)
        assert b.get("9999") is None
    finally:
        b.close()


async def test_concurrent_registrations_on_two_nodes_never_collide(
    redis_server: RedisServer,
) -> None:
    made: list[Registration] = []
    async with node(redis_server.url) as a, node(redis_server.url) as b:

        async def register(registry: RedisRegistry, n: int) -> None:
            made.append(await registry.register(key(n), {}))

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(register, a if n % 2 else b, n)
        ids = {r.registration_id for r in made}
        ports = {r.port for r in made}
        assert len(ids) == len(ports) == 40
        assert ports == set(range(FIRST_PORT, FIRST_PORT + 40))
        await wait_until(lambda: len(a.all()) == len(b.all()) == 40, SEEN, what="all 40 seen")
        everything = {x.registration_id: x.public_key for x in made}
        for registry in (a, b):
            assert {x.registration_id: x.public_key for x in registry.all()} == everything


async def test_a_token_registers_once_across_nodes(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        _, secret = await a.create_token("")
        outcomes: list[str] = []

        async def attempt(registry: RedisRegistry, n: int) -> None:
            try:
                outcomes.append((await registry.register(key(n), {}, token=secret)).registration_id)
            except AuthError as exc:
                outcomes.append(str(exc))

        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(attempt, a if n % 2 else b, n)
        registered = [o for o in outcomes if o.isdigit()]
        assert len(registered) == 1, outcomes
        assert all("valid enrollment token is required" in o for o in outcomes if not o.isdigit())


async def test_prefixes_keep_installations_apart(redis_server: RedisServer) -> None:
    async with (
        node(redis_server.url, prefix="one:") as one,
        node(redis_server.url, prefix="two:") as two,
    ):
        await one.register(key(1), {})
        first = await two.register(key(2), {})
        assert first.registration_id == "1001"
        await trio.sleep(0.5)  # several refresh rounds: nothing may cross over
        assert [r.public_key for r in two.all()] == [key(2)]


async def test_claim_token_gives_a_key_to_a_keyless_registration_once(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        keyless = Registration("4001", b"", 11090, 1.0, {"hostname": "old"}, ["old.example.com"])
        assert await a.merge(MergePlan(registrations=[keyless], next_id=4002)) == []
        assert a.public_key_of("4001") is None  # nobody can prove it before the claim
        with pytest.raises(RegistryError, match="already has a key"):
            await a.create_token("", for_id=str((await a.register(key(1), {})).registration_id))
        _, claim = await a.create_token("for ana", for_id="4001")
        _, second = await a.create_token("also for 4001", for_id="4001")
        assert claim.startswith("pc_")
        await wait_until(lambda: len(b.tokens()) == 2, SEEN, what="B: claim tokens")
        claimed = await b.register(key(7), {"hostname": "new"}, token=claim)
        assert (claimed.registration_id, claimed.port, claimed.public_key) == (
            "4001",
            11090,
            key(7),
        )
        assert claimed.aliases == ["old.example.com"]
        assert claimed.vitae == {"hostname": "new"}
        for spent in (claim, second):  # a key, once given, is never replaced
            with pytest.raises(AuthError, match="claim token is unknown, used or revoked"):
                await a.register(key(8), {}, token=spent)
        await wait_until(lambda: a.public_key_of("4001") == key(7), SEEN, what="A: claimed key")


async def test_redis_down_keeps_routing_refuses_changes_and_recovers(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        await a.register(key(1), {})
        await a.add_alias("shop.example.com", "1001")
        await wait_until(lambda: b.route("shop.example.com") == "1001", SEEN, what="B: alias")

        await redis_server.stop()
        for registry in (a, b):
            assert registry.route("shop.example.com") == "1001"
            assert registry.public_key_of("1001") == key(1)
        with pytest.raises(RegistryUnavailableError, match=r"registry is unavailable \(Redis at"):
            await a.register(key(2), {})
        with pytest.raises(RegistryUnavailableError):
            await b.add_alias("www.example.com", "1001")

        await redis_server.start()  # same port, same data
        registered: list[Registration] = []

        async def registers() -> bool:
            try:
                registered.append(await b.register(key(2), {}))
            except RegistryUnavailableError:
                return False
            return True

        await wait_until(registers, 10, what="B to register again", poll=0.2)
        assert registered[0].registration_id == "1002"
        await wait_until(lambda: a.get("1002") is not None, SEEN, what="A to see 1002")


async def test_unreachable_redis_at_start_is_one_clear_line() -> None:
    port = free_port()
    registry = RedisRegistry(f"redis://:sekrit@127.0.0.1:{port}/0", first_port=FIRST_PORT)
    with pytest.raises(RegistryUnavailableError) as caught:
        registry.load()
    registry.close()
    message = str(caught.value)
    assert message.startswith(
        f"cannot reach the Redis registry at redis://:****@127.0.0.1:{port}/0: "
    )
    assert message.endswith("; start redis-server or fix [server.registry] url")
    assert "sekrit" not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("corrupt", "named"),
    [
        ({"petit:registration:1001": "{not json"}, "petit:registration:1001"),
        ({"petit:registration:1001": '{"public_key": "zz", "port": 1}'}, "petit:registration:1001"),
        ({"petit:next_id": "many"}, "petit:next_id"),
        ({"petit:token:1": '{"sha256": 5}'}, "petit:token:1"),
    ],
)
async def test_corrupt_data_is_an_error_naming_the_key(
    redis_server: RedisServer, corrupt: dict[str, str], named: str
) -> None:
    with redis_server.client() as client:
        client.sadd("petit:ids", "1001")
        client.sadd("petit:tokens", "1")
        client.mset(corrupt)
    registry = RedisRegistry(redis_server.url, first_port=FIRST_PORT)
    with pytest.raises(ConfigError, match=f"key {named} is corrupt"):
        registry.load()
    registry.close()


async def test_a_key_of_the_wrong_type_is_an_error_naming_it(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        client.set("petit:ids", "1001")
    registry = RedisRegistry(redis_server.url, first_port=FIRST_PORT)
    with pytest.raises(ConfigError, match=r"key petit:ids is corrupt .*WRONGTYPE"):
        registry.load()
    registry.close()


async def test_a_hung_redis_never_blocks_the_event_loop(redis_server: RedisServer) -> None:
    """A change waits in its worker thread, then fails with our one-line error in bounded time."""
    async with node(redis_server.url) as registry:
        await registry.register(key(1), {})
        before = registry.snapshot()
        assert redis_server.child is not None
        redis_server.child.send_signal(signal.SIGSTOP)  # accepts, never answers
        try:
            outcome: list[BaseException] = []
            finished = trio.Event()

            async def register() -> None:
                try:
                    await registry.register(key(2), {})
                except RegistryUnavailableError as exc:
                    outcome.append(exc)
                finished.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(register)
                for _ in range(20):  # the loop keeps running, and routing keeps answering
                    await trio.sleep(0.01)
                    assert registry.route("1001.example.com") == "1001"
                assert not finished.is_set()  # the registration waits in its worker thread
                # One Redis round trip's timeout, with room for a loaded machine; never a hang.
                with trio.fail_after(SOCKET_TIMEOUT * 5):
                    await finished.wait()
            assert len(outcome) == 1, "the change must fail, not succeed or hang"
            message = str(outcome[0])
            assert "\n" not in message
            assert message.startswith(f"the registry is unavailable (Redis at {redis_server.url}")
            assert message.endswith("; try again later")
            assert registry.snapshot() == before
            assert registry.route("1001.example.com") == "1001"
        finally:
            redis_server.child.send_signal(signal.SIGCONT)
        # Redis, resumed, runs the script it held: past its deadline, the script changes nothing.
        await registry.register(key(3), {})  # answered after the held script, in order
        with redis_server.client() as client:
            assert client.smembers("petit:ids") == {"1001", "1002"}
            assert client.get("petit:next_id") == "1002"
        assert [r.public_key for r in registry.all()] == [key(1), key(3)]


class AuditRecords(logging.Handler):
    """What the registry wrote to ``petit.audit``, without the time."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        document = json.loads(JsonFormatter().format(record))
        del document["time"]
        self.seen.append(document)


async def audited_changes(registry: Registry) -> list[dict[str, object]]:
    """The same changes on any backend, and the audit records they wrote."""
    records = AuditRecords()
    audit_logger = logging.getLogger(AUDIT_LOGGER)
    level = audit_logger.level
    audit_logger.addHandler(records)
    audit_logger.setLevel(logging.INFO)
    try:
        _, secret = await registry.create_token("ci", actor="control")
        await registry.register(key(1), {}, token=secret, actor="tunnel:192.0.2.1")
        await registry.add_alias("shop.example.com", "1001", actor="admin:127.0.0.1")
        await registry.add_alias("blog.example.com", "1001", actor="control")
        await registry.remove_alias("shop.example.com", actor="offline:ops")
        await registry.set_policy(
            "1001", {"allow": "10.0.0.0/8", "responseTimeout": "120"}, actor="admin:127.0.0.1"
        )
        await registry.set_policy("1001", {"allow": ""}, actor="control")
        unused, _ = await registry.create_token("spare", actor="control")
        await registry.revoke_token(unused.token_id, actor="control")
        await registry.unregister("1001", actor="tunnel:192.0.2.1")
    finally:
        audit_logger.removeHandler(records)
        audit_logger.setLevel(level)
    return records.seen


async def test_both_backends_write_the_same_audit_records(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    on_file = await audited_changes(FileRegistry(tmp_path / "r.json", first_port=FIRST_PORT))
    async with node(redis_server.url) as registry:
        on_redis = await audited_changes(registry)
    assert [(r["event"], r["actor"]) for r in on_file] == [
        ("token.created", "control"),
        ("registration.created", "tunnel:192.0.2.1"),
        ("token.used", "tunnel:192.0.2.1"),
        ("alias.added", "admin:127.0.0.1"),
        ("alias.added", "control"),
        ("alias.removed", "offline:ops"),
        ("policy.changed", "admin:127.0.0.1"),
        ("policy.changed", "control"),
        ("token.created", "control"),
        ("token.revoked", "control"),
        ("registration.deleted", "tunnel:192.0.2.1"),
    ]
    assert on_file[-1]["aliases"] == ["blog.example.com"]
    assert [r["policy"] for r in on_file if r["event"] == "policy.changed"] == [
        {"responseTimeout": 120.0, "allow": ["10.0.0.0/8"]},
        {"responseTimeout": 120.0},
    ]
    assert on_redis == on_file


def served(store: UsageStore, rid: str, count: int, *, status: int = 200) -> None:
    """``count`` requests of 10 bytes in, 20 out, half a second each."""
    for _ in range(count):
        store.record_request(
            rid,
            status=status,
            unavailable=False,
            complete=True,
            bytes_in=10,
            bytes_out=20,
            seconds=0.5,
        )


async def test_usage_flushes_add_every_nodes_deltas_once_and_survive_an_outage(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        rid = (await a.register(key(1), {})).registration_id
        usage_a, usage_b = UsageStore(), UsageStore()
        served(usage_a, rid, 2)
        served(usage_b, rid, 3, status=502)
        usage_b.record_tcp_connection(rid).a_to_b += 7

        async def totals() -> RegistrationUsage:
            return (await b.usage_totals([rid]))[rid]

        def expected() -> RegistrationUsage:
            both = RegistrationUsage()
            both.merge(usage_a.of(rid))
            both.merge(usage_b.of(rid))
            return both

        for _ in range(2):  # the second flush has nothing new to add
            await a.flush_usage(usage_a)
            await b.flush_usage(usage_b)
            assert await totals() == expected()
        assert (await totals()).statuses == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 0, "5xx": 3}

        served(usage_a, rid, 4)
        await redis_server.stop()
        await a.flush_usage(usage_a)  # fails: A keeps its delta
        served(usage_a, rid, 1)
        await redis_server.start()

        async def flushed() -> bool:
            await a.flush_usage(usage_a)
            return not usage_a.unflushed()

        await wait_until(flushed, 10, what="A to flush once Redis is back", poll=0.2)
        assert await totals() == expected()
        assert (await totals()).requests == 10

        # Unregistering deletes the totals; a late flush for the ID adds nothing back.
        await a.unregister(rid)
        served(usage_b, rid, 1)
        await b.flush_usage(usage_b)
        with redis_server.client() as client:
            assert client.exists(f"petit:usage:{rid}") == 0

"""``petit-server import-registry`` (the original petit's JSON file and Redis keys) and
``migrate-registry`` (file ⇄ Redis), through the real CLI.

The original formats are built from the inventory's description: the JSON file
``{"maxRegisteredId", "maxRegisteredPort", "comments", "version", "registeredIds": {id:
{port, key, vitae, aliases}}}`` and the Redis keys ``g2c/allids``, ``g2c/ids/<id>/{port,key,
vitae}``, ``g2c/aliases/<alias>``, ``g2c/max/id``, ``g2c/ports/<port>``, ``g2c/openPorts``.
Their keys are RSA public keys in SPKI PEM, as node-forge wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from petit.auth import generate_key, key_fingerprint, public_key_raw
from petit.transport import REGISTER_PATH
from petit_server.registry.file_backend import FileRegistry
from tests.integration.harness import (
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    RedisServer,
    ServerFactory,
    edit_config,
    http_request,
    log_records,
    register_request,
    signed_request,
    wait_until,
)

pytestmark = pytest.mark.integration


def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def original_file(path: Path) -> Path:
    """An original petit registry file: two numeric IDs, one the new petit cannot take."""
    document = {
        "maxRegisteredId": 1003,
        "maxRegisteredPort": 11083,
        "comments": ["petit registry"],
        "version": 1,
        "registeredIds": {
            "1001": {
                "port": 11081,
                "key": rsa_pem(),
                "vitae": {"hostname": "ana", "brand": "ce", "ip": "10.0.0.5"},
                "aliases": ["Shop.Example.com"],
            },
            "1003": {"port": 11083, "key": rsa_pem(), "vitae": {}, "aliases": []},
            "custom": {"port": 11090, "key": rsa_pem(), "vitae": {}, "aliases": []},
        },
    }
    path.write_text(json.dumps(document))
    return path


def audited(server: PetitServer, since: int = 0) -> list[tuple[str, str, str]]:
    """(event, actor kind, ID or token) of the server's audit records from ``since`` on."""
    return [
        (r["event"], r["actor"].partition(":")[0], r.get("id") or r.get("token") or "")
        for r in log_records(server.audit_log)[since:]
    ]


def seed_original_redis(redis_server: RedisServer) -> None:
    """The original petit's keys, as registry_redis.js left them (bugs included)."""
    with redis_server.client() as client:
        client.sadd("g2c/allids", "4001", "4002")
        client.set("g2c/max/id", "4002")
        for rid, port in (("4001", 11081), ("4002", 11082)):
            client.set(f"g2c/ids/{rid}/port", str(port))
            client.set(f"g2c/ids/{rid}/key", rsa_pem())
            client.set(f"g2c/ids/{rid}/vitae", json.dumps({"hostname": f"h{rid}", "since": "x"}))
            client.set(f"g2c/ports/{port}", rid)
        client.set("g2c/aliases/shop.example.com", "4001")
        client.sadd("g2c/ids/{regId}/aliases", "shop.example.com")  # the literal-key bug
        client.zadd("g2c/openPorts", {"11083": 0, "11084": 0})


async def test_original_file_imports_keyless_and_the_customer_claims_the_same_id(
    server_factory: ServerFactory, python_backend: PythonBackend, reaper: Reaper, tmp_path: Path
) -> None:
    server = await server_factory(start=False)
    source = original_file(tmp_path / "original-registry")
    before = server.registry.read_bytes()

    dry = await server.cli("import-registry", "--from-file", str(source), "--dry-run")
    assert dry.stdout.startswith("Would import 2 registration(s) (2 awaiting a key)"), dry
    assert "skipped: ID custom: not a number" in dry.stderr, dry
    assert server.registry.read_bytes() == before  # a dry run changes nothing
    assert audited(server) == []  # and audits nothing

    claims = tmp_path / "claims.txt"
    done = await server.cli(
        "import-registry", "--from-file", str(source), "--claim-tokens", str(claims)
    )
    assert done.stdout.startswith("Imported 2 registration(s) (2 awaiting a key)"), done
    assert "petit-client register --token" in done.stdout, done
    assert claims.stat().st_mode & 0o777 == 0o600
    tokens = dict(line.split() for line in claims.read_text().splitlines())
    assert sorted(tokens) == ["1001", "1003"]
    assert all(token.startswith("pc_") for token in tokens.values())
    registry = FileRegistry(server.registry, first_port=0)
    imported = registry.get("1001")
    assert imported is not None
    assert (imported.port, imported.public_key, imported.aliases) == (
        11081,
        b"",
        ["shop.example.com"],
    )
    assert imported.vitae["hostname"] == "ana"
    assert len(imported.vitae["legacyKeyFingerprint"].split(":")) == 16  # the original's MD5 form
    # Audited by whoever ran it: each registration (its aliases in the same record), one
    # summary, then each claim token.
    assert audited(server) == [
        ("registration.imported", "offline", "1001"),
        ("registration.imported", "offline", "1003"),
        ("registry.imported", "offline", ""),
        ("token.created", "offline", "1"),
        ("token.created", "offline", "2"),
    ]
    records = log_records(server.audit_log)
    assert records[0]["aliases"] == ["shop.example.com"], records
    assert (records[2]["registrations"], records[2]["source"]) == (
        2,
        f"the original petit's registry {source}",
    ), records
    assert [r.get("for_id") for r in records[3:]] == ["1001", "1003"], records

    again = await server.cli("import-registry", "--from-file", str(source))
    assert again.stdout.startswith("Imported 0 registration(s)"), again
    assert "2 already there, 0 conflict(s)" in again.stdout, again
    assert len(audited(server)) == 5  # nothing added, nothing audited twice

    await server.start()
    assert (await http_request(server.http_port, "shop.example.com")).status == 503
    listed = await server.cli("registrations")
    assert "1003  11083  (awaiting its claim)" in listed.stdout, listed
    # Nobody can take the keyless ID by registering: new registrations get new IDs and ports.
    fresh = await signed_request(server, REGISTER_PATH, register_request(generate_key()))
    assert (fresh["id"], fresh["port"]) != ("1001", 11081), fresh
    assert int(str(fresh["id"])) >= 1004, fresh

    client = PetitClient(tmp_path / "customer", server, reaper)
    await client.init(python_backend.port)
    claimed = await client.cli("register", "--token", tokens["1001"])
    assert "Registered with ID 1001" in claimed.stdout, claimed
    client.registration_id = "1001"
    await client.start()
    response = await http_request(server.http_port, "shop.example.com")
    assert response.status == 200, response
    assert response.body == PythonBackend.GET_BODY

    # The claim token worked once; a claim token for a keyed registration cannot be made.
    reuse = await signed_request(
        server, REGISTER_PATH, register_request(generate_key(), token=tokens["1001"])
    )
    assert reuse["type"] == "error", reuse
    assert "claim token is unknown, used or revoked" in str(reuse["error"])
    refused = await server.cli("token", "create", "--for", "1001", check=False)
    assert "already has a key" in refused.stderr, refused


async def test_original_redis_imports_into_a_running_redis_node(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    seed_original_redis(redis_server)
    server = await server_factory(
        registry={"backend": "redis", "url": redis_server.url, "prefix": "petit:"}
    )
    result = await server.cli("import-registry", "--from-redis", redis_server.url)
    assert result.stdout.startswith("Imported 2 registration(s) (2 awaiting a key)"), result

    async def known() -> bool:
        reply = await server.control("STATUS 4001")
        return reply.get("success") is not False

    await wait_until(known, 5, what="the running node to see the import")
    detail = (await server.control("STATUS 4001"))["connections"]
    assert isinstance(detail, list)
    assert detail[0]["port"] == 11081
    assert detail[0]["aliases"] == ["shop.example.com"]
    assert (await http_request(server.http_port, "shop.example.com")).status == 503
    fresh = await signed_request(server, REGISTER_PATH, register_request(generate_key()))
    assert fresh["id"] == "4003", fresh  # after the original's g2c/max/id

    again = await server.cli("import-registry", "--from-redis", redis_server.url)
    assert "Imported 0 registration(s)" in again.stdout, again
    assert "2 already there" in again.stdout, again


async def test_migration_round_trip_keeps_everything(
    server_factory: ServerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    server = await server_factory(requireToken=True)
    secrets = [
        (await server.cli("token", "create", "--note", f"n{n}")).stdout.strip() for n in range(5)
    ]
    ids = []
    for secret in secrets[:3]:
        request = register_request(generate_key(), token=secret)
        ids.append(str((await signed_request(server, REGISTER_PATH, request))["id"]))
    await server.cli("addalias", "shop.example.com", ids[1])
    await server.cli("token", "revoke", "4")
    await server.stop()
    original = FileRegistry(server.registry, first_port=0).snapshot()
    online = len(log_records(server.audit_log))

    url = redis_server.url
    await server.cli("migrate-registry", "--to", "redis", "--url", url, "--dry-run")
    moved = await server.cli("migrate-registry", "--to", "redis", "--url", url)
    assert moved.stdout.startswith("Imported 3 registration(s) (0 awaiting a key) and 5 token(s)")
    assert audited(server, online) == [
        *(("registration.imported", "offline", rid) for rid in ids),
        *(("token.imported", "offline", str(n)) for n in range(1, 6)),
        ("registry.imported", "offline", ""),
    ]
    states = [r["state"] for r in log_records(server.audit_log)[online + 3 : online + 8]]
    assert states == ["used", "used", "used", "revoked", "unused"], states
    assert 'set [server.registry] backend = "redis"' in moved.stdout
    edit_config(server.config, "server", registry={"backend": "redis", "url": url})
    await server.start()
    assert (await http_request(server.http_port, "shop.example.com")).status == 503
    listed = (await server.control("TOKEN LIST"))["tokens"]
    assert isinstance(listed, list)
    assert [t["state"] for t in listed] == ["used", "used", "used", "revoked", "unused"]
    assert [t["usedBy"] for t in listed[:3]] == ids
    await server.stop()

    back = tmp_path / "back.json"
    returned = await server.cli("migrate-registry", "--to", "file", "--file", str(back))
    assert returned.stdout.startswith(
        "Imported 3 registration(s) (0 awaiting a key) and 5 token(s)"
    )
    assert FileRegistry(back, first_port=0).snapshot() == original
    twice = await server.cli("migrate-registry", "--to", "file", "--file", str(back))
    assert "Imported 0 registration(s)" in twice.stdout, twice
    assert "8 already there" in twice.stdout, twice


async def test_migration_needs_the_server_stopped(
    server: PetitServer, redis_server: RedisServer
) -> None:
    result = await server.cli(
        "migrate-registry", "--to", "redis", "--url", redis_server.url, check=False
    )
    assert result.returncode == 6, result
    assert result.stderr.startswith("error: the server is running and uses the registry "), result
    assert result.stderr.rstrip().endswith("stop it first (petit-server stop)")


async def test_a_corrupt_original_file_is_one_line(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory(start=False)
    broken = tmp_path / "registry"
    broken.write_text('{"registeredIds": {"1001": ')
    result = await server.cli("import-registry", "--from-file", str(broken), check=False)
    assert result.returncode == 3, result
    assert result.stderr.startswith(f"error: registry {broken} is corrupt (line 1"), result


async def test_a_large_import_reports_progress_and_keeps_ed25519_keys(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    customer = generate_key()
    pem = (
        customer.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    count = 1200
    with redis_server.client() as client:
        pipe = client.pipeline(transaction=False)
        for n in range(count):
            rid = str(5001 + n)
            pipe.sadd("g2c/allids", rid)
            pipe.set(f"g2c/ids/{rid}/port", str(20000 + n))
            pipe.set(f"g2c/ids/{rid}/key", pem)
        pipe.execute()
    registry = {"backend": "redis", "url": redis_server.url}
    server = await server_factory(start=False, registry=registry)
    result = await server.cli("import-registry", "--from-redis", redis_server.url)
    assert result.stdout.startswith(f"Imported {count} registration(s) (0 awaiting a key)"), result
    progress = [line for line in result.stderr.splitlines() if line.startswith("imported ")]
    assert progress == ["imported 500/1200", "imported 1000/1200", "imported 1200/1200"], result
    await server.start()
    listed = await server.cli("registrations")
    assert len(listed.stdout.splitlines()) == count + 1  # the header and one row each
    assert listed.stdout.count(key_fingerprint(public_key_raw(customer))) == count

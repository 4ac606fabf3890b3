"""Server processes sharing one Redis registry: what one node changes, every node knows.

Without cluster mode (tests/integration/test_cluster.py), a request is answered by the node
the client is connected to.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import trio

from petit.auth import generate_key
from petit.transport import REGISTER_PATH, UNREGISTER_PATH
from tests.integration.harness import (
    UNAVAILABLE,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    RedisServer,
    ServerFactory,
    edit_config,
    free_port,
    free_port_block,
    http_request,
    register_request,
    signed_request,
    tail,
    unregister_request,
    wait_until,
)

pytestmark = pytest.mark.integration

SEEN = 5.0  # seconds for one node's change to show on another (it takes ~0.2 s)


def redis_registry(redis_server: RedisServer, prefix: str = "petit:") -> dict[str, object]:
    """The ``[server.registry]`` table of a node using ``redis_server``."""
    return {"backend": "redis", "url": redis_server.url, "prefix": prefix}


async def status_of(server: PetitServer, registration_id: str) -> dict[str, object]:
    reply = await server.control(f"STATUS {registration_id}")
    if reply.get("success") is False:
        return {}
    connections = reply["connections"]
    assert isinstance(connections, list), reply
    detail = connections[0]
    assert isinstance(detail, dict)
    return detail


async def answers(server: PetitServer, host: str, status: int) -> bool:
    return (await http_request(server.http_port, host)).status == status


async def test_two_servers_share_registrations_aliases_and_tokens(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    redis_server: RedisServer,
) -> None:
    first_port = free_port_block()
    a = await server_factory(registry=redis_registry(redis_server), firstPort=first_port)
    b = await server_factory(
        registry=redis_registry(redis_server), firstPort=first_port, requireToken=True
    )
    client = await client_factory(a, python_backend.port)
    rid = client.registration_id

    # B knows the registration A made (not connected to B: no forwarding yet).
    detail = await status_of(b, rid)
    assert detail["registeredId"] == rid, detail
    assert detail["connected"] is False, detail
    assert await answers(a, client.host, 200)
    assert (await http_request(b.http_port, client.host)).body == UNAVAILABLE

    # An alias added through B routes on A.
    await b.cli("addalias", "shop.example.com", rid)
    await wait_until(lambda: answers(a, "shop.example.com", 200), SEEN, what="A to route alias")

    # A token made on A registers once on B; A sees it used.
    created = await a.cli("token", "create", "--note", "made on A")
    secret = created.stdout.strip()
    reply = await signed_request(b, REGISTER_PATH, register_request(generate_key(), token=secret))
    assert reply["type"] == "registered", reply
    assert (reply["id"], reply["port"]) == (str(int(rid) + 1), first_port + 1), reply
    again = await signed_request(b, REGISTER_PATH, register_request(generate_key(), token=secret))
    assert again["type"] == "error", again

    async def used_on_a() -> bool:
        tokens = (await a.control("TOKEN LIST"))["tokens"]
        assert isinstance(tokens, list)
        return [t["usedBy"] for t in tokens] == [reply["id"]]

    await wait_until(used_on_a, SEEN, what="A to list the token as used")

    # Removing the alias on A stops it routing on A.
    await a.cli("removealias", "shop.example.com")
    assert await answers(a, "shop.example.com", 404)

    # Unregistered through B (proven with its key), the registration goes from A too, and A
    # ends the tunnel that served it.
    reply = await signed_request(b, UNREGISTER_PATH, unregister_request(client.key(), rid))
    assert reply == {"type": "unregistered", "id": rid}, reply
    await wait_until(lambda: answers(a, client.host, 404), SEEN, what="A to forget it")
    await wait_until(
        lambda: "serves no registration any more" in tail(a.log, 50), SEEN, what="A to close"
    )


async def test_the_client_registers_and_unregisters_through_any_of_its_servers(
    server_factory: ServerFactory,
    python_backend: PythonBackend,
    redis_server: RedisServer,
    reaper: Reaper,
    tmp_path: Path,
) -> None:
    """``register`` goes to the first listed server that answers (here the second: nothing
    listens at the first), ``unregister`` to whichever answers: they share the registry."""
    first_port = free_port_block()
    a = await server_factory(registry=redis_registry(redis_server), firstPort=first_port)
    b = await server_factory(
        start=False, registry=redis_registry(redis_server), firstPort=first_port
    )
    shutil.copytree(a.directory / "certificates", b.directory / "certificates", dirs_exist_ok=True)
    await b.start()
    client = PetitClient(tmp_path / "client", a, reaper)
    await client.init(python_backend.port)
    nowhere = f"127.0.0.1:{free_port()}"
    servers = [nowhere, f"127.0.0.1:{b.tunnel_port}", f"127.0.0.1:{a.tunnel_port}"]
    edit_config(client.config, "client", servers=servers)

    rid = await client.register()
    await wait_until(lambda: _known(a, rid), SEEN, what=f"A to know {rid}, made on B")
    made_on_b = [json.loads(line) for line in (b.directory / "logs" / "audit.log").open()]
    assert [(r["event"], r["id"]) for r in made_on_b] == [("registration.created", rid)]

    edit_config(client.config, "client", servers=[nowhere, f"127.0.0.1:{a.tunnel_port}"])
    await client.cli("unregister", "-r", rid)
    await wait_until(lambda: _gone(b, rid), SEEN, what=f"B to forget {rid}")


async def _known(server: PetitServer, registration_id: str) -> bool:
    return (await status_of(server, registration_id)).get("registeredId") == registration_id


async def _gone(server: PetitServer, registration_id: str) -> bool:
    return await status_of(server, registration_id) == {}


async def test_registrations_on_two_servers_at_once_never_collide(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    first_port = free_port_block()
    nodes = [
        await server_factory(registry=redis_registry(redis_server), firstPort=first_port)
        for _ in range(2)
    ]
    replies: list[dict[str, object]] = []

    async def register(server: PetitServer) -> None:
        request = register_request(generate_key())
        replies.append(await signed_request(server, REGISTER_PATH, request))

    async with trio.open_nursery() as nursery:
        for n in range(16):
            nursery.start_soon(register, nodes[n % 2])
    assert all(r["type"] == "registered" for r in replies), replies
    assert len({r["id"] for r in replies}) == len({r["port"] for r in replies}) == 16


async def test_servers_ride_out_a_redis_restart(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    redis_server: RedisServer,
) -> None:
    server = await server_factory(registry=redis_registry(redis_server))
    client = await client_factory(server, python_backend.port)
    await server.cli("addalias", "shop.example.com", client.registration_id)

    await redis_server.stop()
    assert await answers(server, client.host, 200)  # routing from what the node knows
    assert await answers(server, "shop.example.com", 200)
    usage = await server.admin_json(f"/usage/{client.registration_id}")
    assert (usage["source"], usage["requests"]) == ("node", 2), usage  # this node's memory
    refused = await server.cli("addalias", "www.example.com", client.registration_id, check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: Alias not added: the registry is unavailable (Redis")
    reply = await signed_request(server, REGISTER_PATH, register_request(generate_key()))
    assert reply["type"] == "error", reply
    assert "registry is unavailable" in str(reply["error"]), reply

    await redis_server.start()

    async def alias_added() -> bool:
        added = await server.cli("addalias", "www.example.com", client.registration_id, check=False)
        return added.returncode == 0

    await wait_until(alias_added, 10, what="the server to use Redis again", poll=0.3)
    assert await answers(server, "www.example.com", 200)
    log = tail(server.log, 200)
    assert "is unreachable" in log, log
    assert "is reachable again" in log, log


async def test_usage_on_either_node_is_the_sum_of_both(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    redis_server: RedisServer,
) -> None:
    """The client is connected to A only: A answers its requests, B answers 503 for it. Both
    count, in one total that either node's admin API serves."""
    first_port = free_port_block()
    a = await server_factory(registry=redis_registry(redis_server), firstPort=first_port)
    b = await server_factory(registry=redis_registry(redis_server), firstPort=first_port)
    client = await client_factory(a, python_backend.port)
    rid = client.registration_id
    for _ in range(3):
        assert await answers(a, client.host, 200)
    for _ in range(2):
        assert await answers(b, client.host, 503)

    async def shows_both(server: PetitServer) -> bool:
        usage = await server.admin_json(f"/usage/{rid}")
        assert usage["source"] == "shared", usage
        return bool(usage["requests"] == 5)

    for server in (a, b):
        await wait_until(partial(shows_both, server), SEEN, what="both nodes' flushes", poll=0.2)
    stats = await b.admin_json(f"/stats/{rid}")
    assert stats == {"successes": 3, "errors": 0, "unavailables": 2, "source": "shared"}
    assert (await a.admin_json("/counts/requests"))["count"] == 5
    every = await a.admin_json("/usage")
    assert every["registrations"][rid]["statuses"]["5xx"] == 2, every

    # A node that stops adds what it had not flushed yet before it exits.
    for _ in range(4):
        assert await answers(a, client.host, 200)
    await a.stop()
    assert (await b.admin_json(f"/usage/{rid}"))["requests"] == 9


async def test_starting_without_redis_is_one_line(server_factory: ServerFactory) -> None:
    port = free_port()
    url = f"redis://:sekrit@127.0.0.1:{port}/0"
    server = await server_factory(start=False, registry={"backend": "redis", "url": url})
    result = await server.cli("start", check=False)
    assert result.returncode == 5, result
    assert result.stderr.startswith(
        f"error: cannot reach the Redis registry at redis://:****@127.0.0.1:{port}/0: "
    ), result
    assert result.stderr.rstrip().endswith("start redis-server or fix [server.registry] url")
    assert result.stderr.count("\n") == 1, result
    assert "sekrit" not in result.stderr + result.stdout

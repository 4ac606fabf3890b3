"""Several server nodes sharing a real redis-server: forwarding, failover, Redis restarts, and
peer links that only nodes knowing the cluster secret can use.

The nodes share one CA and server certificate (copied from the first) and the registry, in
the same redis-server as the node directory ([server.cluster] redisUrl defaults to the
registry's url). Each client registers through a different node.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from petit.connection import Role, TunnelConnection
from petit.session import SessionClosedError, StreamCarrier, StreamRefusedError, TunnelSession
from petit_server.config import ClusterConfig
from petit_server.edge.cluster import Directory
from tests.integration.harness import (
    REDIS_SERVER,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    RedisServer,
    ServerFactory,
    edit_config,
    free_port_block,
    http_request,
    payload,
    reset_at_once,
    tail,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

SECRET = "test-cluster-secret-" + "0" * 16
HEARTBEAT = 0.25  # seconds, heartbeatInterval
NODE_TIMEOUT = 2.0  # seconds, nodeTimeout
FAILOVER = 5.0  # seconds within which every registration must answer again through every node
SETTLE = 10.0  # seconds for a fresh cluster to learn every node's sessions


@dataclass
class Cluster:
    """Server nodes by node id, sharing one redis-server, and the clients registered on them."""

    redis: RedisServer
    nodes: dict[str, PetitServer]
    clients: list[PetitClient]


async def start_nodes(
    names: list[str],
    server_factory: ServerFactory,
    redis: RedisServer,
    *,
    secrets_by_node: dict[str, str] | None = None,
    prefix: str = "petit:",
) -> dict[str, PetitServer]:
    """Initialised (not started) nodes with the first one's certificates, the Redis registry
    (under ``prefix``) and cluster settings; each listens for raw TCP ports on its own
    loopback address, so their ports never clash."""
    first_port = free_port_block()
    registry = {"backend": "redis", "url": redis.url, "prefix": prefix}
    nodes = {
        name: await server_factory(start=False, firstPort=first_port, registry=registry)
        for name in names
    }
    first = nodes[names[0]]
    for index, (name, node) in enumerate(nodes.items()):
        if node is not first:
            shutil.copytree(
                first.directory / "certificates",
                node.directory / "certificates",
                dirs_exist_ok=True,
            )
        cluster = {
            "nodeId": name,
            "internalAddr": "127.0.0.1",
            "internalPort": 0,
            "secret": (secrets_by_node or {}).get(name, SECRET),
            "heartbeatInterval": HEARTBEAT,
            "nodeTimeout": NODE_TIMEOUT,
        }
        edit_config(node.config, "server", tcpAddr=f"127.0.0.{index + 1}", cluster=cluster)
    return nodes


async def start_cluster(
    backend: PythonBackend,
    server_factory: ServerFactory,
    redis: RedisServer,
    reaper: Reaper,
    tmp_path: Path,
) -> Cluster:
    """Three nodes; three clients, each registered through another node (its first server).
    The first two keep one session to whichever node they reach (so most requests must be
    forwarded), the third one to every node."""
    nodes = await start_nodes(["a", "b", "c"], server_factory, redis)
    for node in nodes.values():
        await node.start()
    first = nodes["a"]
    addresses = [f"127.0.0.1:{node.tunnel_port}" for node in nodes.values()]
    clients = []
    for index, sessions in enumerate((1, 1, 0)):
        client = PetitClient(tmp_path / f"client-{index}", first, reaper)
        await client.init(backend.port)
        servers = addresses[index:] + addresses[:index]
        edit_config(client.config, "client", servers=servers, serverSessions=sessions)
        await client.register()
        await client.start()
        clients.append(client)
    cluster = Cluster(redis, nodes, clients)
    await every_registration_answers(cluster, within=SETTLE)
    return cluster


async def answers(node: PetitServer, client: PetitClient) -> bool:
    """A request for the client's registration through this node reaches its backend."""
    body = f"to {client.registration_id} via {node.directory.name}".encode()
    response = await http_request(node.http_port, client.host, "POST", "/echo", body, timeout=10)
    return response.status == 200 and response.body == body


async def answers_on_tcp_port(node: PetitServer, client: PetitClient) -> bool:
    """The client's raw TCP port on this node carries bytes to its private service.

    A node binds the port of a registration another node holds once it has seen that
    registration online (after HTTP forwarding already works): wait for it to say so.
    """

    async def listening() -> bool:
        reply = await node.control(f"STATUS {client.registration_id}")
        connections = reply["connections"]
        assert isinstance(connections, list), reply
        return bool(connections[0]["tcpListening"])

    await wait_until(listening, 10, what=f"{node.directory.name} to listen on the TCP port")
    reply = await node.control(f"STATUS {client.registration_id}")
    connections = reply["connections"]
    assert isinstance(connections, list), reply
    address = tomllib.loads(node.config.read_text())["server"]["tcpAddr"]
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(address, connections[0]["port"])
        async with stream:
            await stream.send_all(b"GET /bytes/1000 HTTP/1.0\r\n\r\n")
            received = bytearray()
            while chunk := await stream.receive_some():
                received += chunk
    status_line = bytes(received).partition(b"\r\n")[0]
    return (
        status_line.startswith(b"HTTP/1.")
        and b" 200 " in status_line
        and received.endswith(payload(1000))
    )


async def every_registration_answers(cluster: Cluster, *, within: float) -> None:
    """Every registration answers through every node, all within one deadline."""
    deadline = trio.current_time() + within
    for node in cluster.nodes.values():
        for client in cluster.clients:
            left = max(deadline - trio.current_time(), 0.0)
            try:
                await wait_until(
                    lambda n=node, c=client: answers(n, c),  # type: ignore[misc]
                    left,
                    what=f"{client.host} through {node.directory.name}",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{tail(node.log)}") from None


async def holders(cluster: Cluster, client: PetitClient) -> set[str]:
    """The ids of the nodes the client has a connected session to."""
    status = await client.control_status()
    servers = status["servers"]
    assert isinstance(servers, list), status
    ports = {int(s["server"].rpartition(":")[2]) for s in servers if s["status"] == "connected"}
    return {name for name, node in cluster.nodes.items() if node.tunnel_port in ports}


async def cluster_view(node: PetitServer) -> dict[str, object]:
    reply = await node.control("STATUS")
    view = reply["cluster"]
    assert isinstance(view, dict), reply
    return view


async def test_every_node_serves_every_registration_through_failures(
    server_factory: ServerFactory,
    python_backend: PythonBackend,
    redis_server: RedisServer,
    reaper: Reaper,
    tmp_path: Path,
) -> None:
    cluster = await start_cluster(python_backend, server_factory, redis_server, reaper, tmp_path)

    everywhere = cluster.clients[2]
    await wait_until(
        lambda: _held_by(cluster, everywhere, set(cluster.nodes)), SETTLE, what="3 sessions"
    )
    # Forwarded: a node without a session for a registration answered for it all the same.
    forwarded = 0
    for name, node in cluster.nodes.items():
        for client in cluster.clients:
            if name not in await holders(cluster, client):
                assert await node.sessions_of(client.registration_id) == 0
                assert await answers(node, client)
                assert await answers_on_tcp_port(node, client)
                forwarded += 1
    assert forwarded >= 4  # two clients with one session each, three nodes

    # Redis killed and restarted (with the registry it had written): the nodes notice, keep
    # serving from what they knew, then write the directory again by themselves. The outage
    # outlasts nodeTimeout, so Redis comes back with every node's record expired; no request
    # may fail while the nodes publish theirs again.
    await cluster.redis.kill()
    killed_at = trio.current_time()
    for node in cluster.nodes.values():
        await wait_until(
            lambda n=node: _redis_is(n, "unreachable"),  # type: ignore[misc]
            NODE_TIMEOUT + 2,
            what=f"{node.directory.name} to notice redis is gone",
        )
    await every_registration_answers(cluster, within=FAILOVER)
    await trio.sleep(max(0.0, killed_at + NODE_TIMEOUT + HEARTBEAT - trio.current_time()))
    await cluster.redis.start()
    await answers_throughout_recovery(cluster)

    # kill -9 the node holding the first client: every registration answers again through
    # the remaining nodes within FAILOVER seconds, and the dead node is forgotten.
    (victim,) = await holders(cluster, cluster.clients[0])
    cluster.nodes[victim].kill()
    survivors = {name: node for name, node in cluster.nodes.items() if name != victim}
    cluster.nodes = survivors
    await every_registration_answers(cluster, within=FAILOVER)
    for name, node in survivors.items():
        rest = set(survivors) - {name}
        await wait_until(
            lambda n=node, r=rest: _sees(n, r),  # type: ignore[misc]
            NODE_TIMEOUT + 2,
            what=f"{name} to forget {victim}",
        )


async def answers_throughout_recovery(cluster: Cluster) -> None:
    """Every registration answers through every node, on HTTP and with its TCP port open, on
    every round from Redis's return until every node sees every other again and two
    heartbeats more have passed (when a node would forget a peer whose record is missing)."""
    settled_at: float | None = None
    with trio.fail_after(NODE_TIMEOUT * 2 + SETTLE):
        while settled_at is None or trio.current_time() < settled_at + 2 * HEARTBEAT:
            for name, node in cluster.nodes.items():
                for client in cluster.clients:
                    assert await answers(node, client), f"{client.host} through {name}"
                    reply = await node.control(f"STATUS {client.registration_id}")
                    connections = reply["connections"]
                    assert isinstance(connections, list), reply
                    assert connections[0]["tcpListening"], f"{client.host} TCP port on {name}"
            if settled_at is None and all(
                [
                    await _sees(node, set(cluster.nodes) - {name})
                    for name, node in cluster.nodes.items()
                ]
            ):
                settled_at = trio.current_time()


async def _held_by(cluster: Cluster, client: PetitClient, nodes: set[str]) -> bool:
    return await holders(cluster, client) == nodes


async def _redis_is(node: PetitServer, state: str) -> bool:
    return (await cluster_view(node))["redis"] == state


async def _sees(node: PetitServer, peers: set[str]) -> bool:
    view = await cluster_view(node)
    known = view["peers"]
    assert isinstance(known, dict), view
    return view["redis"] == "ok" and set(known) == peers


async def test_a_node_without_the_secret_gets_no_stream(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    redis_server: RedisServer,
) -> None:
    """A node with another secret, and a hand-made peer that cannot prove the secret, are
    refused: nothing reaches the private service."""
    redis = redis_server
    nodes = await start_nodes(
        ["good", "rogue"], server_factory, redis, secrets_by_node={"rogue": "x" * 32}
    )
    good, rogue = nodes["good"], nodes["rogue"]
    await good.start()
    client = await client_factory(good, python_backend.port)
    await rogue.start()
    await wait_until(
        lambda: _sees(rogue, {"good"}), NODE_TIMEOUT + 2, what="rogue to see good's record"
    )
    # Peers that reset at once or send no TLS at all cost the node nothing.
    for _ in range(20):  # some of them reach the node's accept() already reset
        reset_at_once(good.ports["cluster"])
    with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
        async with await trio.open_tcp_stream("127.0.0.1", good.ports["cluster"]) as garbage:
            await garbage.send_all(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n")
            assert await garbage.receive_some() == b""  # the node hangs up

    assert await answers(good, client)
    seen = python_backend.connections

    response = await http_request(rogue.http_port, client.host, timeout=10)
    assert response.status == 502, response

    # A peer that completes TLS but sends a made-up proof cannot open a stream.
    tcp = await trio.open_tcp_stream("127.0.0.1", good.ports["cluster"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = trio.SSLStream(tcp, context, server_hostname="localhost")
    forged = json.dumps({"node": "mallory", "proof": secrets.token_hex(32)}).encode()
    session = TunnelSession(TunnelConnection(Role.SERVER), StreamCarrier(tls), ping_interval=5)

    async def accept_any_hello(hello: bytes) -> bytes:
        return forged

    with trio.fail_after(10):
        await session.handshake_as_server(secrets.token_bytes(32), accept_any_hello)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                with pytest.raises((SessionClosedError, StreamRefusedError)):
                    await session.open_stream(client.registration_id)
        except* trio.BrokenResourceError:
            pass  # the node hung up while the session was still writing
    assert python_backend.connections == seen
    assert "the secret does not match" in good.log.read_text()
    assert "failed the link proof" in rogue.log.read_text()

    shown = (await good.cli("config")).stdout  # the cluster table, its secrets masked
    assert SECRET not in shown
    assert '"redisUrl": "********"' in shown  # the Redis URLs may hold a password
    assert '"url": "********"' in shown  # [server.registry]
    assert '"secret": "********"' in shown
    assert '"nodeId": "good"' in shown


async def test_installations_with_other_prefixes_share_a_redis_but_not_a_directory(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """Two clusters on one redis-server, told apart by [server.registry] prefix: each node
    sees only the other node of its own installation."""
    one = await start_nodes(["one-a", "one-b"], server_factory, redis_server, prefix="one:")
    two = await start_nodes(["two-a", "two-b"], server_factory, redis_server, prefix="two:")
    nodes = one | two
    for node in nodes.values():
        await node.start()
    for name, node in nodes.items():
        peer = {other for other in (one if name in one else two) if other != name}
        await wait_until(
            lambda n=node, p=peer: _sees(n, p),  # type: ignore[misc]
            SETTLE,
            what=f"{name} to see only {sorted(peer)}",
        )
    with redis_server.client() as client:
        keys = {str(key) for key in client.scan_iter(match="*cluster*")}
    assert keys == {
        f"{prefix}cluster:{rest}"
        for prefix, names in (("one:", one), ("two:", two))
        for rest in ["nodes", *(f"node:{name}" for name in names)]
    }, keys


async def test_a_node_that_left_the_directory_is_never_published_again(
    redis_server: RedisServer,
) -> None:
    """On stop, sessions detaching while streams drain wake the heartbeat: once the node has
    left, a beat must not write its record back, or the others forward to a stopped node."""
    config = ClusterConfig(
        redis_url=redis_server.url,
        node_id="leaving",
        internal_addr="127.0.0.1",
        internal_port=0,
        advertise_addr="127.0.0.1",
        secret=secrets.token_hex(16),
    )
    directory = Directory(config, "petit:", held=lambda: {"1001"}, on_peers_changed=lambda: None)
    record = "petit:cluster:node:leaving"
    with redis_server.client() as client, trio.fail_after(SETTLE):
        async with trio.open_nursery() as nursery:
            await nursery.start(directory.run)
            await wait_until(lambda: client.exists(record) == 1, SETTLE, what="the record")
            await directory.leave()
            assert client.exists(record) == 0
            await directory._beat()  # what a session detaching during the drain triggers
            assert client.exists(record) == 0
            nursery.cancel_scope.cancel()

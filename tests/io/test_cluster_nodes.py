"""The cluster's per-node bookkeeping, in process (no redis-server: the directory's records
are fed in as a heartbeat would read them)."""

from __future__ import annotations

import json

import pytest
import trio

from petit.session import SessionClosedError
from petit_server.config import ClusterConfig
from petit_server.edge.cluster import Cluster
from petit_server.edge.hub import Hub
from tests.integration.harness import free_port


async def test_nodes_gone_from_the_directory_are_forgotten() -> None:
    config = ClusterConfig(
        redis_url="redis://127.0.0.1:1/0",  # never used: no heartbeat runs here
        node_id="me",
        internal_addr="127.0.0.1",
        internal_port=0,
        advertise_addr="127.0.0.1",
        secret="s" * 32,
    )
    cluster = Cluster(
        config, Hub(), key_prefix="petit:", ping_interval=5, open_timeout=5, handshake_timeout=5
    )
    port = free_port()  # connecting is refused at once
    for generation in range(3):  # a node restarted under a new ID each time
        node_id = f"node-{generation}"
        record = json.dumps({"host": "127.0.0.1", "port": port, "ids": ["1001"]})
        cluster.directory._update([(node_id, record)])
        with trio.fail_after(10), pytest.raises(SessionClosedError):
            await cluster.open_stream("1001")  # the dial fails: the node is noted as failed
        assert set(cluster._failed_at) == set(cluster._dialing) == {node_id}
    cluster.directory._update([])
    assert not cluster._failed_at
    assert not cluster._dialing

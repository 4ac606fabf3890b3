"""kill -9 the server in the middle of registrations and traffic, again and again.

Every restart must work without cleanup, the registry must parse and hold every registration
``petit-client register`` reported, and the running client must come back by itself.
``PETIT_SOAK=1`` runs 50 cycles instead of 5.
"""

from __future__ import annotations

import json
import re

import h11
import pytest
import trio

from tests.integration.harness import (
    SOAK,
    ClientFactory,
    PetitServer,
    PythonBackend,
    ServerFactory,
    edit_config,
    free_port,
    http_request,
    tail,
    wait_until,
)

pytestmark = pytest.mark.integration

CYCLES = 50 if SOAK else 5
DYING_SERVER_ERRORS = (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError)
RECONNECT_BOUND = 5.0  # seconds from the server being ready to the client being connected


def registered_ids(server: PetitServer) -> set[str]:
    """The IDs in the registry file; it must parse, whatever moment the server died at."""
    document = json.loads(server.registry.read_text())
    return set(document["registrations"])


async def test_kill9_during_registrations_and_traffic(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    server = await server_factory(start=False)
    edit_config(
        server.config, "server", backPort=free_port(), proxyPort=free_port(), listenPort=free_port()
    )
    await server.start()
    client = await client_factory(server, python_backend.port)
    registrar = await client_factory(server, python_backend.port, start=False)
    reported = {client.registration_id, registrar.registration_id}
    since = (await client.wait_connected()).get("connectedSince")
    answered = 0

    async def register(cycle: int, done_this_cycle: list[str]) -> None:
        for number in range(100):
            result = await registrar.cli("register", "-t", f"c{cycle}n{number}", check=False)
            if match := re.search(r"Registered with ID (\d+)", result.stdout):
                reported.add(match[1])
                done_this_cycle.append(match[1])

    async def traffic() -> None:
        nonlocal answered
        while True:
            try:
                response = await http_request(server.http_port, client.host, timeout=5)
            except (*DYING_SERVER_ERRORS, ExceptionGroup) as exc:
                if isinstance(exc, ExceptionGroup) and exc.split(DYING_SERVER_ERRORS)[1]:
                    raise
                continue  # the server is being killed: traffic only has to be there
            answered += response.status == 200

    for cycle in range(CYCLES):
        done_this_cycle: list[str] = []
        wanted = 1 + cycle % 2  # kill after one or two, with the next one under way
        async with trio.open_nursery() as nursery:
            nursery.start_soon(register, cycle, done_this_cycle)
            nursery.start_soon(traffic)
            await wait_until(
                lambda: len(done_this_cycle) >= wanted,  # noqa: B023 - awaited right here
                30,
                what=f"cycle {cycle}: {wanted} registration(s)",
            )
            server.kill()
            await wait_until(lambda: server.running() is None, 10, what="the kill to land")
            nursery.cancel_scope.cancel()

        missing = reported - registered_ids(server)
        assert not missing, f"cycle {cycle}: reported registrations lost: {sorted(missing)}"
        await server.start()  # no cleanup: the stale lock and pid file are taken over
        ready = trio.current_time()
        try:
            since = (await client.wait_connected(RECONNECT_BOUND, not_since=since)).get(
                "connectedSince"
            )
        except AssertionError as exc:
            raise AssertionError(f"cycle {cycle}: {exc}\nserver:\n{tail(server.log)}") from None
        print(f"cycle {cycle}: client back {trio.current_time() - ready:.2f}s after ready")
        response = await http_request(server.http_port, client.host)
        assert response.status == 200, response

    assert reported <= registered_ids(server)
    print(f"{CYCLES} kill -9 cycles survived; {len(reported)} registrations kept; {answered} OK")

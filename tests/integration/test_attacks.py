"""Regression tests for the original petit's attacks (inventory 7.1) against a real server.

Each attack comes from a hand-made client (petit's own pieces, built in-process) or the real
CLI. Every one must be refused while the victim is unaffected: its client keeps its original
session, its registration keeps its key, and its requests still reach its backend. The
handshake attacks (forged, replayed or widened hellos) live in test_security.py.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from petit.auth import generate_key
from petit.control import ETX
from petit.transport import REGISTER_PATH, UNREGISTER_PATH
from petit_server.registry.base import ENROLLMENT_REFUSED
from tests.integration.harness import (
    UNAVAILABLE,
    ClientFactory,
    MakeRequest,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    ServerFactory,
    http_request,
    register_request,
    registry_entry,
    signed_request,
    unregister_request,
    wait_until,
)

pytestmark = pytest.mark.integration

UNREGISTER_REFUSED = {
    "type": "error",
    "error": "unregistration refused: not proven with the registration's key",
}


@dataclass
class Victim:
    """A legitimate, connected client and what must not change about it."""

    server: PetitServer
    client: PetitClient
    since: object
    public_key: str

    @classmethod
    async def of(cls, server: PetitServer, client: PetitClient) -> Victim:
        status = await client.control_status()
        entry = registry_entry(server, client.registration_id)
        assert entry is not None
        return cls(server, client, status["connectedSince"], entry["public_key"])

    @property
    def id(self) -> str:
        return self.client.registration_id

    async def assert_unharmed(self, *hosts: str) -> None:
        """Same session, same key, and requests (on its own Host and ``hosts``) reach it."""
        status = await self.client.control_status()
        assert status["status"] == "connected", status
        assert status["connectedSince"] == self.since, "the victim lost its session"
        entry = registry_entry(self.server, self.id)
        assert entry is not None, "the victim's registration is gone"
        assert entry["public_key"] == self.public_key, "the victim's ID has another key"
        for host in (self.client.host, *hosts):
            response = await http_request(self.server.http_port, host)
            assert (response.status, response.body) == (200, PythonBackend.GET_BODY), host


@pytest.fixture
async def victim(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> Victim:
    return await Victim.of(server, await client_factory(server, python_backend.port))


async def register(server: PetitServer, **extra: object) -> dict[str, object]:
    """Register a fresh key in-process; the reply."""
    return await signed_request(server, REGISTER_PATH, register_request(generate_key(), **extra))


# ----------------------------------------------------------------------------- (1) ID takeover


async def test_a_registration_never_receives_an_existing_id(
    server: PetitServer, victim: Victim
) -> None:
    # The original honoured a "preferred" ID without checking who owned it (C2).
    claims = {"id": victim.id, "registeredId": victim.id, "preferred": {"id": victim.id}}
    # (A token is ignored by a server without requireToken.)
    reply = await register(server, **claims, token="pt_not-checked-here")
    assert reply["type"] == "registered", reply
    assert reply["id"] == str(int(victim.id) + 1)

    # Registering the victim's public key needs the victim's private key.
    attacker_key = generate_key()
    forged = register_request(attacker_key)

    def with_victims_key(nonce: bytes, fingerprint: bytes) -> dict[str, object]:
        victims_key = base64.b64encode(bytes.fromhex(victim.public_key)).decode()
        return {**forged(nonce, fingerprint), "public_key": victims_key}

    refused = await signed_request(server, REGISTER_PATH, with_victims_key)
    assert refused == {
        "type": "error",
        "error": "the registration is not signed by the key it registers",
    }
    registrations = json.loads(server.registry.read_text())["registrations"]
    assert sorted(registrations) == [victim.id, reply["id"]]
    await victim.assert_unharmed()


def verbatim(message: str) -> MakeRequest:
    """Send ``message`` as it is, whatever the nonce."""
    return lambda nonce, fingerprint: message


async def test_malformed_requests_are_answered_and_harm_nobody(
    server: PetitServer, victim: Victim
) -> None:
    for path, kind in ((REGISTER_PATH, "register"), (UNREGISTER_PATH, "unregister")):
        for message in (
            "{not json",
            "[1, 2]",
            '{"type": "hello"}',
            json.dumps({"type": kind}),
            json.dumps({"type": kind, "id": victim.id, "public_key": "!!", "signature": "!!"}),
        ):
            reply = await signed_request(server, path, verbatim(message))
            assert reply["type"] == "error", (path, message, reply)
    await victim.assert_unharmed()


# ----------------------------------------------------------------------------- (2) unregister


async def test_unregistering_another_clients_id_is_refused(
    server: PetitServer, victim: Victim
) -> None:
    attacker_key = generate_key()
    own = await signed_request(server, REGISTER_PATH, register_request(attacker_key))
    own_id = str(own["id"])

    # Signed by the attacker's own, registered, key: refused like an ID that does not exist.
    for target in (victim.id, "999999"):
        reply = await signed_request(
            server, UNREGISTER_PATH, unregister_request(attacker_key, target)
        )
        assert reply == UNREGISTER_REFUSED, target

    # The original unregistered a whole list after checking only its first ID's key (C3).
    listed = unregister_request(attacker_key, own_id)

    def both(nonce: bytes, fingerprint: bytes) -> dict[str, object]:
        return {**listed(nonce, fingerprint), "id": [own_id, victim.id]}

    assert await signed_request(server, UNREGISTER_PATH, both) == UNREGISTER_REFUSED

    # The victim's own signature, replayed from another connection (another nonce).
    genuine = unregister_request(victim.client.key(), victim.id)

    def replayed(nonce: bytes, fingerprint: bytes) -> dict[str, object]:
        return genuine(bytes(32), fingerprint)

    assert await signed_request(server, UNREGISTER_PATH, replayed) == UNREGISTER_REFUSED
    await victim.assert_unharmed()

    # The endpoint does work for the key that proves its own ID.
    mine = await signed_request(server, UNREGISTER_PATH, unregister_request(attacker_key, own_id))
    assert mine == {"type": "unregistered", "id": own_id}
    assert registry_entry(server, own_id) is None
    await victim.assert_unharmed()


# ----------------------------------------------------------------------------- (3) aliases


async def test_alias_hijack_is_refused(server: PetitServer, victim: Victim) -> None:
    await server.cli("addalias", "shop.example.com", victim.id)
    attacker = str((await register(server))["id"])

    taken = await server.cli("addalias", "shop.example.com", attacker, check=False)
    assert (taken.returncode, taken.stderr) == (
        1,
        "error: Alias not added: Alias shop.example.com already exists.\n",
    )
    # The original checked aliases before the ID rule, so an alias shaped like the victim's
    # ID route took its traffic (C6).
    for shaped in (f"{victim.id}.example.com", f"{victim.id}-app.localhost"):
        refused = await server.cli("addalias", shaped, attacker, check=False)
        assert refused.returncode == 1, refused
        assert "looks like an ID route" in refused.stderr
    assert (await server.control(f"ADDALIAS {attacker} SHOP.Example.com"))["success"] is False
    assert await server.control(f"DELALIAS {attacker} shop.example.com") == {
        "success": False,
        "error": f"shop.example.com is not an alias of {attacker}.",
    }
    assert (registry_entry(server, attacker) or {})["aliases"] == []
    await victim.assert_unharmed("shop.example.com", f"{victim.id}.example.com")


# ----------------------------------------------------------------------------- (4) control port


async def control_from(source: str, port: int, command: str) -> dict[str, object]:
    """A control command sent from the loopback address ``source``."""
    with trio.fail_after(5):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(command.encode() + ETX)
            await stream.send_eof()
            reply = b""
            while chunk := await stream.receive_some():
                reply += chunk
    document = json.loads(reply)
    assert isinstance(document, dict)
    return document


async def test_control_port_refuses_addresses_not_allowed(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    server = await server_factory(listenAllow=["127.0.0.2"])
    victim = await Victim.of(server, await client_factory(server, python_backend.port))
    port = server.control_port

    for command in ("STOP", f"ADDALIAS {victim.id} evil.example.com", "STATUS", "TOKEN LIST"):
        reply = await control_from("127.0.0.1", port, command)
        assert reply == {"success": False, "error": "not allowed from 127.0.0.1"}, command
    assert server.running() is not None
    assert (await http_request(server.http_port, "evil.example.com")).body == UNAVAILABLE
    await victim.assert_unharmed()

    # The allow list does admit what it lists, and STOP from there stops the server.
    assert (await control_from("127.0.0.2", port, "PING"))["success"] is True
    assert (await control_from("127.0.0.2", port, "STOP"))["success"] is True
    await wait_until(lambda: server.running() is None, 15, what="the server to stop")


# ----------------------------------------------------------------------------- (5) tokens


async def test_registration_without_a_valid_token_is_refused(
    server_factory: ServerFactory, tmp_path: Path, reaper: Reaper, python_backend: PythonBackend
) -> None:
    server = await server_factory(requireToken=True)
    victims_token = (await server.cli("token", "create", "--note", "victim")).stdout.strip()
    revoked = (await server.cli("token", "create")).stdout.strip()
    await server.cli("token", "revoke", "2")
    client = PetitClient(tmp_path / "victim", server, reaper)
    await client.init(python_backend.port)
    registered = await client.cli("register", "--token", victims_token)
    client.registration_id = re.findall(r"Registered with ID (\d+)", registered.stdout)[0]
    await client.start()
    victim = await Victim.of(server, client)

    refusal = {"type": "error", "error": ENROLLMENT_REFUSED}
    assert await register(server) == refusal
    for token in ("", "pt_made-up", victims_token, revoked, 12345):
        assert await register(server, token=token) == refusal, token
    without = await client.cli("register", "-t", "again", check=False)
    assert without.returncode != 0
    assert ENROLLMENT_REFUSED in without.stderr

    assert list(json.loads(server.registry.read_text())["registrations"]) == [victim.id]
    await victim.assert_unharmed()
    # A fresh token still works, once.
    fresh = (await server.cli("token", "create")).stdout.strip()
    assert (await register(server, token=fresh))["type"] == "registered"
    assert await register(server, token=fresh) == refusal

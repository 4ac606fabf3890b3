"""The admin API against a real server, client and backend: auth, and data that matches the
traffic actually sent through the tunnel."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.integration.harness import (
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    ServerFactory,
    edit_config,
    free_port_block,
    http_request,
    log_records,
    raw_exchange,
    wait_until,
)

pytestmark = pytest.mark.integration

READ_ENDPOINTS = [
    "/ping",
    "/status",
    "/registry",
    "/usage",
    "/sessions",
    "/aliases",
    "/errors",
    "/metrics",
    "/counts/registrations",
    "/counts/requests",
]


def http_get(host: str, target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def http_post(host: str, body: bytes) -> bytes:
    head = f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


@pytest.fixture
async def online(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> tuple[PetitServer, PetitClient]:
    """A server whose one registration is online, its raw TCP ports on loopback."""
    server = await server_factory(firstPort=free_port_block(), tcpAddr="127.0.0.1")
    client = await client_factory(server, python_backend.port)
    return server, client


async def test_every_endpoint_refuses_a_missing_or_wrong_token(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, client = online
    paths = [
        *READ_ENDPOINTS,
        f"/usage/{client.registration_id}",
        f"/stats/{client.registration_id}",
    ]
    wrong = server.admin_token[:-1] + ("A" if server.admin_token[-1] != "A" else "B")
    for path in paths:
        for token in (None, wrong, "short"):
            response = await server.admin(path, token=token)
            assert response.status == 401, (path, token, response)
            assert response.header("www-authenticate") == 'Bearer realm="petit-admin"'
            assert json.loads(response.body)["success"] is False
        assert (await server.admin(path)).status == 200, path
    basic = await http_request(
        server.admin_port,
        "127.0.0.1",
        target="/status",
        headers=[("Authorization", f"Basic {server.admin_token}")],
    )
    assert basic.status == 401
    audit = server.audit_log
    denied = [r for r in log_records(audit) if r["event"] == "admin.denied"]
    assert {(r["method"], r["path"]) for r in denied} >= {("GET", "/status")}
    for log in (audit, server.log):
        assert server.admin_token not in log.read_text()
    assert server.admin_token not in server.outputs["init"].stdout
    assert "********" in (await server.cli("config")).stdout


async def test_the_dashboard_page_needs_no_token_and_holds_no_data(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, client = online
    for path in ("/", "/dashboard"):
        page = await server.admin(path, token=None)
        assert page.status == 200
        assert page.header("content-type") == "text/html; charset=utf-8"
        assert "default-src 'none'" in (page.header("content-security-policy") or "")
        assert client.registration_id.encode() not in page.body


async def test_usage_counts_match_the_traffic_sent(
    online: tuple[PetitServer, PetitClient], python_backend: PythonBackend
) -> None:
    server, client = online
    rid, port = client.registration_id, server.http_port
    requests = [http_get(client.host, f"/bytes/{n}") for n in (10, 5000, 70000)]
    requests.append(http_post(client.host, b"x" * 12345))
    sent_in = sent_out = 0
    for request in requests:
        answer = await raw_exchange(port, request)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        sent_in, sent_out = sent_in + len(request), sent_out + len(answer)
    unrouted = await raw_exchange(port, http_get("nobody.localhost", "/"))
    assert unrouted.startswith(b"HTTP/1.1 404 ")

    usage = await server.admin_json(f"/usage/{rid}")
    assert usage["registeredId"] == rid
    assert usage["online"] is True
    assert usage["requests"] == 4
    assert usage["statuses"] == {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 0, "5xx": 0}
    assert (usage["bytesIn"], usage["bytesOut"]) == (sent_in, sent_out)
    assert sum(usage["latency"]["counts"]) == 4
    assert usage["latency"]["buckets"][-1] == "+Inf"
    assert usage["latency"]["sum"] > 0
    assert usage["lastSeen"] is not None
    stats = await server.admin_json(f"/stats/{rid}")
    assert stats == {"successes": 4, "errors": 0, "unavailables": 0}

    registration = await server.admin_json(f"/registry/{rid}")
    tcp_port = registration["connections"][0]["port"]
    tcp_request = http_get(client.host, "/bytes/3000")
    tcp_answer = await raw_exchange(tcp_port, tcp_request)
    assert tcp_answer.startswith(b"HTTP/1.1 200 ")
    tcp = (await server.admin_json(f"/usage/{rid}"))["tcp"]
    assert tcp == {"connections": 1, "bytesIn": len(tcp_request), "bytesOut": len(tcp_answer)}

    await client.stop()
    await wait_until(
        lambda: _offline(server, rid), 10, what=f"{rid} to go offline on the admin API"
    )
    refused = await raw_exchange(port, http_get(client.host, "/after"))
    assert refused.startswith(b"HTTP/1.1 503 ")
    stats = await server.admin_json(f"/stats/{rid}")
    assert stats == {"successes": 4, "errors": 0, "unavailables": 1}
    errors = (await server.admin_json("/errors"))["errors"]
    assert errors[0]["registeredId"] == rid
    assert (errors[0]["status"], errors[0]["method"], errors[0]["path"]) == (503, "GET", "/after")
    assert await _count(server, "requests") == 5
    assert await _count(server, "errors") == 1
    assert await _count(server, "requests?type=success") == 4
    assert await _count(server, "registrations") == 1
    assert await _count(server, "online") == 0
    assert await _count(server, "registers") == 1
    assert await _count(server, "registers?end=2000-01-01T00:00:00") == 0
    assert (await server.admin("/counts/requests?type=bogus")).status == 400


async def _offline(server: PetitServer, rid: str) -> bool:
    status = await server.admin_json("/status")
    return bool(status["disconnected"] == [rid])


async def _count(server: PetitServer, what: str) -> int:
    count = (await server.admin_json(f"/counts/{what}"))["count"]
    assert isinstance(count, int)
    return count


async def test_status_registry_sessions_and_ping(online: tuple[PetitServer, PetitClient]) -> None:
    server, client = online
    rid = client.registration_id
    status = await server.admin_json("/status")
    assert (status["total"], status["connected"], status["disconnected"]) == (1, [rid], [])
    assert status["sessions"] == 1
    registry = await server.admin_json("/registry")
    assert registry["status"] == "running"
    [entry] = registry["connections"]
    assert (entry["registeredId"], entry["connected"]) == (rid, True)
    [session] = (await server.admin_json("/sessions"))["sessions"]
    assert session["registeredIds"] == [rid]
    assert session["remote"] == "127.0.0.1"
    assert session["since"] == entry["since"]
    assert (session["streams"], session["draining"]) == (0, False)
    ping = await server.admin_json("/ping")
    assert ping["success"] is True
    assert ping["uptime"] >= 0


async def test_aliases_added_and_removed_through_the_api_route_and_are_audited(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, client = online
    rid = client.registration_id
    body = json.dumps({"alias": "shop.example.com", "registeredId": rid}).encode()
    added = await server.admin("/aliases", method="POST", body=body)
    assert added.status == 200, added
    assert (await server.admin_json("/aliases"))["aliases"] == {"shop.example.com": rid}
    routed = await http_request(server.http_port, "shop.example.com", target="/")
    assert routed.body == PythonBackend.GET_BODY
    again = await server.admin("/aliases", method="POST", body=body)
    assert again.status == 400
    assert "already exists" in json.loads(again.body)["error"]
    unknown = json.dumps({"alias": "x.example.com", "registeredId": "9999"}).encode()
    assert (await server.admin("/aliases", method="POST", body=unknown)).status == 404
    assert (await server.admin("/aliases", method="POST", body=b"[1]")).status == 400
    not_alias = await server.admin("/aliases/nobody.example.com", method="DELETE")
    assert not_alias.status == 404
    removed = await server.admin("/aliases/shop.example.com", method="DELETE")
    assert removed.status == 200, removed
    assert (await server.admin_json("/aliases"))["aliases"] == {}
    gone = await http_request(server.http_port, "shop.example.com", target="/")
    assert gone.status == 404
    denied = await server.admin("/aliases/x.example.com", method="DELETE", token=None)
    assert denied.status == 401
    changes = [
        (r["event"], r["actor"])
        for r in log_records(server.audit_log)
        if r["event"].startswith("alias.")
    ]
    assert changes == [("alias.added", "admin:127.0.0.1"), ("alias.removed", "admin:127.0.0.1")]


async def test_a_policy_set_by_the_api_and_the_cli_is_shown_kept_and_audited(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, client = online
    rid = client.registration_id
    assert (await server.admin_json(f"/policy/{rid}"))["policy"] == {}
    body = json.dumps({"allow": ["10.0.0.0/8"], "responseTimeout": 120}).encode()
    changed = await server.admin(f"/policy/{rid}", method="PUT", body=body)
    assert changed.status == 200, changed
    refused = await http_request(server.http_port, client.host, target="/")
    assert refused.status == 403
    bad = await server.admin(f"/policy/{rid}", method="PUT", body=b'{"rateLimit": "fast"}')
    assert bad.status == 400
    assert json.loads(bad.body)["error"] == "rateLimit is a number, not 'fast'"
    assert (await server.admin("/policy/9999", method="PUT", body=b"{}")).status == 404

    shown = await server.cli("policy", rid)
    assert shown.stdout == (
        f"Policy of registration {rid}:\n  responseTimeout = 120\n  allow = 10.0.0.0/8\n"
    )
    reset = await server.cli("policy", rid, "allow=", "responseTimeout=")
    assert reset.stdout == f"Registration {rid} follows the server's settings.\n"
    assert (await http_request(server.http_port, client.host, target="/")).status == 200
    typo = await server.cli("policy", rid, "alow=10.0.0.0/8", check=False)
    assert (typo.returncode, typo.stderr.splitlines()[0]) == (
        1,
        "error: Policy not changed: unknown policy key 'alow'; the keys: responseTimeout, "
        "openTimeout, idleTimeout, maxRequestBody, allow, deny, rateLimit, rateBurst, "
        "maxStreams, bandwidth",
    )
    changes = [
        (r["event"], r["actor"])
        for r in log_records(server.audit_log)
        if r["event"] == "policy.changed"
    ]
    by_cli = f"control:uid={os.getuid()}"  # the CLI reached the running server's control port
    assert changes == [("policy.changed", "admin:127.0.0.1"), ("policy.changed", by_cli)]


async def test_unknown_ids_paths_and_methods_get_json_errors(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, _ = online
    for path in ("/usage/9999", "/stats/9999", "/registry/9999", "/nothing", "/counts/nope"):
        response = await server.admin(path)
        assert response.status == 404, (path, response)
        assert response.header("content-type") == "application/json"
        assert json.loads(response.body)["success"] is False
    assert "No such registeredId 9999." in (await server.admin("/usage/9999")).body.decode()
    wrong_method = await server.admin("/status", method="POST", body=b"{}")
    assert (wrong_method.status, wrong_method.header("allow")) == (405, "GET")


def _samples(text: str, name: str) -> Iterator[Sample]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                yield sample


async def test_metrics_parse_and_match_the_traffic(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, client = online
    rid = client.registration_id
    for _ in range(3):
        assert (await http_request(server.http_port, client.host, target="/")).status == 200
    response = await server.admin("/metrics")
    assert response.status == 200
    assert (response.header("content-type") or "").startswith("text/plain; version=0.0.4")
    text = response.body.decode()
    by_code = {
        s.labels["code"]: s.value
        for s in _samples(text, "petit_http_requests_total")
        if s.labels["registration"] == rid
    }
    assert by_code == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 0, "5xx": 0}
    [count] = [
        s.value
        for s in _samples(text, "petit_http_request_duration_seconds_count")
        if s.labels["registration"] == rid
    ]
    assert count == 3
    [online_now] = [s.value for s in _samples(text, "petit_registrations_online")]
    assert online_now == 1
    [sessions] = [s.value for s in _samples(text, "petit_sessions")]
    assert sessions == 1
    sent = {
        s.labels["registration"]: s.value for s in _samples(text, "petit_http_sent_bytes_total")
    }
    assert sent[rid] > 3 * len(PythonBackend.GET_BODY)
    assert sent["other"] == 0


async def test_oversized_and_malformed_requests_are_refused_with_json(
    online: tuple[PetitServer, PetitClient],
) -> None:
    server, client = online
    bearer = f"Authorization: Bearer {server.admin_token}\r\n"
    alias = json.dumps({"alias": "shop.example.com", "registeredId": client.registration_id})
    chunked = f"POST /aliases HTTP/1.1\r\nHost: a\r\n{bearer}Transfer-Encoding: chunked\r\n\r\n"
    bad_chunk = f"{chunked}{len(alias):x}\r\n{alias}\r\nnot-a-chunk-size\r\n\r\n"
    refused = await raw_exchange(server.admin_port, bad_chunk.encode())
    assert refused.startswith(b"HTTP/1.1 400 "), refused[:200]
    assert (await server.admin_json("/aliases"))["aliases"] == {}  # refused, so not acted on
    big = b"{" + b" " * 20000 + b"}"
    head = f"POST /aliases HTTP/1.1\r\nHost: a\r\n{bearer}Content-Length: {len(big)}\r\n\r\n"
    too_large = await raw_exchange(server.admin_port, head.encode() + big)
    assert too_large.startswith(b"HTTP/1.1 413 "), too_large[:200]
    garbage = await raw_exchange(server.admin_port, b"NOT HTTP AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 "), garbage[:200]
    assert b'"success": false' in garbage


async def test_without_an_admin_token_the_api_is_off(server_factory: ServerFactory) -> None:
    server = await server_factory(start=False)
    document = tomllib.loads(server.config.read_text())
    del document["server"]["adminToken"]
    server.config.write_text(tomli_w.dumps(document))
    await server.start()
    assert "admin" not in server.ports
    assert "admin API off: set adminToken" in server.log.read_text()


async def test_a_short_admin_token_is_a_config_error(server_factory: ServerFactory) -> None:
    server = await server_factory(start=False)
    edit_config(server.config, "server", adminToken="short")
    result = await server.cli("start", check=False)
    assert result.returncode == 3, result
    assert "server.adminToken: expected at least 16 characters" in result.stderr
    assert "short" not in result.stderr.replace("server.adminToken", "")

"""HTTPS ingress: PEM and PKCS#12 certificates, the chain, reload from disk, redirect from HTTP.

Certificates come from trustme: a root, an intermediate it signs, and leaves for
``*.example.test`` that the intermediate signs, so a client trusting only the root succeeds
only if the server sends the intermediate.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from petit.errors import ConfigError
from petit.logs import LogSettings
from petit_server.config import ServerConfig
from petit_server.edge.https import certificate_source
from petit_server.edge.ingress import https_location
from tests.integration.harness import (
    ClientFactory,
    CliResult,
    PetitClient,
    PetitServer,
    ServerFactory,
    edit_config,
    http_request,
    log_records,
    run_cli,
)

pytestmark = pytest.mark.integration

DOMAIN = "example.test"
STALE_CERTIFICATE = "still serving the previous HTTPS certificate"


class HeaderEcho(BaseHTTPRequestHandler):
    """Answers every GET with the request's headers as a JSON object."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(dict(self.headers.items())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Quiet."""


@pytest.fixture
def header_backend() -> Iterator[int]:
    """A loopback HTTP backend echoing request headers; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeaderEcho)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def root() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def intermediate(root: trustme.CA) -> trustme.CA:
    return root.create_child_ca()


def replace_file(path: Path, data: bytes) -> None:
    """Replace a file the way deploy tools do: write aside, then rename over it."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)


def leaf_der(leaf: trustme.LeafCert) -> bytes:
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return certificate.public_bytes(serialization.Encoding.DER)


def host_of(client: PetitClient) -> str:
    return f"{client.registration_id}.{DOMAIN}"


async def curl_trusting(root_pem: Path, *args: str) -> CliResult:
    """curl trusting only ``root_pem``; the caller checks the exit status."""
    argv = ["curl", "--silent", "--show-error", "--cacert", str(root_pem), *args]
    return await run_cli(argv, check=False, timeout=30)


def https_url(server: PetitServer, client: PetitClient, path: str = "/") -> list[str]:
    """curl arguments for https://<ID>.example.test:<https port>PATH on loopback."""
    host, port = host_of(client), server.ports["https"]
    return ["--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}{path}"]


async def served_certificate(server: PetitServer, client: PetitClient, root_pem: Path) -> bytes:
    """The DER leaf the HTTPS port presents (verified against ``root_pem``)."""
    context = ssl.create_default_context(cafile=str(root_pem))
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream("127.0.0.1", server.ports["https"])
        tls = trio.SSLStream(tcp, context, server_hostname=host_of(client))
        try:
            await tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
        finally:
            await trio.aclose_forcefully(tls)
    assert isinstance(der, bytes)
    return der


def write_pem(directory: Path, name: str, *pems: bytes) -> Path:
    path = directory / name
    path.write_bytes(b"".join(pems))
    return path


def pkcs12_bundle(leaf: trustme.LeafCert, password: bytes) -> bytes:
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    leaf_certificate, *chain = (
        x509.load_pem_x509_certificate(p.bytes()) for p in leaf.cert_chain_pems
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # trustme's default
    return pkcs12.serialize_key_and_certificates(
        b"petit", key, leaf_certificate, chain, serialization.BestAvailableEncryption(password)
    )


async def test_pem_reload_without_restart_keeps_the_old_certificate_when_broken(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    header_backend: int,
    root: trustme.CA,
    intermediate: trustme.CA,
    tmp_path: Path,
) -> None:
    root_pem = write_pem(tmp_path, "root.pem", root.cert_pem.bytes())
    first = intermediate.issue_cert(f"*.{DOMAIN}")
    first_leaf, first_chain = (pem.bytes() for pem in first.cert_chain_pems)
    certificate = write_pem(tmp_path, "cert.pem", first_leaf)
    key = write_pem(tmp_path, "key.pem", first.private_key_pem.bytes())
    server = await server_factory(
        secureProxyPort=0, httpsCertificate=str(certificate), httpsKey=str(key)
    )
    client = await client_factory(server, header_backend)
    assert server.ports["https"] not in (0, server.http_port)

    refused = await curl_trusting(root_pem, *https_url(server, client))
    assert refused.returncode == 60, refused  # the leaf alone: the intermediate is missing

    replace_file(certificate, first_leaf + first_chain)  # the leaf followed by its chain
    served = await curl_trusting(root_pem, *https_url(server, client, "/orders?id=7"))
    assert served.returncode == 0, served
    seen = json.loads(served.stdout)
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == f"{host_of(client)}:{server.ports['https']}"
    plain = await http_request(server.http_port, host_of(client))
    assert json.loads(plain.body)["x-forwarded-proto"] == "http"
    assert await served_certificate(server, client, root_pem) == leaf_der(first)

    second = intermediate.issue_cert(f"*.{DOMAIN}")
    replace_file(key, second.private_key_pem.bytes())
    replace_file(certificate, b"".join(pem.bytes() for pem in second.cert_chain_pems))
    assert await served_certificate(server, client, root_pem) == leaf_der(second)

    replace_file(certificate, b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    for _ in range(2):  # the broken file is reported once, not per connection
        assert await served_certificate(server, client, root_pem) == leaf_der(second)
    assert (await curl_trusting(root_pem, *https_url(server, client))).returncode == 0
    stale = [r for r in log_records(server.log) if STALE_CERTIFICATE in r["message"]]
    assert len(stale) == 1, stale
    assert stale[0]["level"] == "ERROR"
    assert f"{certificate} holds no valid PEM certificate" in stale[0]["message"]


async def test_chain_file_and_redirect_from_http(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    header_backend: int,
    root: trustme.CA,
    intermediate: trustme.CA,
    tmp_path: Path,
) -> None:
    root_pem = write_pem(tmp_path, "root.pem", root.cert_pem.bytes())
    leaf = intermediate.issue_cert(f"*.{DOMAIN}")
    server = await server_factory(
        secureProxyPort=0,
        httpsCertificate=str(write_pem(tmp_path, "cert.pem", leaf.cert_chain_pems[0].bytes())),
        httpsKey=str(write_pem(tmp_path, "key.pem", leaf.private_key_pem.bytes())),
        httpsChain=str(write_pem(tmp_path, "chain.pem", intermediate.cert_pem.bytes())),
        httpsRedirect=True,
    )
    client = await client_factory(server, header_backend)
    host, http_port, https_port = host_of(client), server.http_port, server.ports["https"]

    response = await http_request(http_port, f"{host}:{http_port}", target="/a/b?c=d")
    assert response.status == 308
    assert response.header("location") == f"https://{host}:{https_port}/a/b?c=d"

    followed = await curl_trusting(
        root_pem,
        "--location",
        "--write-out",
        "\n%{url_effective}",
        "--resolve",
        f"{host}:{http_port}:127.0.0.1",
        "--resolve",
        f"{host}:{https_port}:127.0.0.1",
        f"http://{host}:{http_port}/start",
    )
    assert followed.returncode == 0, followed
    body, effective = followed.stdout.splitlines()
    assert effective == f"https://{host}:{https_port}/start"
    assert json.loads(body)["x-forwarded-proto"] == "https"


async def test_pkcs12_with_password(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    header_backend: int,
    root: trustme.CA,
    intermediate: trustme.CA,
    tmp_path: Path,
) -> None:
    root_pem = write_pem(tmp_path, "root.pem", root.cert_pem.bytes())
    bundle = tmp_path / "public.p12"
    bundle.write_bytes(pkcs12_bundle(intermediate.issue_cert(f"*.{DOMAIN}"), b"s3cret"))
    server = await server_factory(
        start=False, secureProxyPort=0, httpsPkcs12=str(bundle), httpsPkcs12Password="wrong"
    )
    failed = await server.cli("start", check=False)
    assert failed.returncode != 0, failed
    assert failed.stderr.strip() == (
        f"error: HTTPS: cannot open {bundle}: not PKCS#12, or httpsPkcs12Password is wrong"
    ), failed

    edit_config(server.config, "server", httpsPkcs12Password="s3cret")
    await server.start()
    client = await client_factory(server, header_backend)
    served = await curl_trusting(root_pem, *https_url(server, client))
    assert served.returncode == 0, served
    assert json.loads(served.stdout)["x-forwarded-proto"] == "https"


@pytest.mark.parametrize(
    ("host", "port", "target", "location"),
    [
        ("1001.example.test:8090", 8453, b"/a?b=c", b"https://1001.example.test:8453/a?b=c"),
        ("1001.example.test", 443, b"/", b"https://1001.example.test/"),
        ("[::1]:8090", 8453, b"/x", b"https://[::1]:8453/x"),
        ("127.0.0.1", 443, b"*", b"https://127.0.0.1/"),
        ("evil.test/path", 443, b"/", None),
        ("user@evil.test", 443, b"/", None),
        ("", 443, b"/", None),
    ],
)
def test_redirect_location(host: str, port: int, target: bytes, location: bytes | None) -> None:
    assert https_location(host, port, target) == location


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"https_certificate": Path("c.pem")}, "set both httpsCertificate and httpsKey"),
        ({"https_key": Path("k.pem")}, "set both httpsCertificate and httpsKey"),
        (
            {"https_certificate": Path("c.pem"), "https_key": Path("k"), "https_pkcs12": Path("p")},
            "or httpsPkcs12, not both",
        ),
        ({"https_redirect": True}, "httpsRedirect need an HTTPS certificate"),
        ({"https_chain": Path("chain.pem")}, "httpsChain and httpsRedirect need"),
    ],
)
def test_half_an_https_setup_is_a_config_error(settings: dict[str, Any], message: str) -> None:
    config = ServerConfig(
        path=Path("/srv/config.toml"),
        registry_file=Path("/srv/registry.json"),
        certificate=Path("/srv/server.crt"),
        key=Path("/srv/server.key"),
        log=LogSettings(file=Path("/srv/server.log"), audit_file=Path("/srv/audit.log")),
        **settings,
    )
    with pytest.raises(ConfigError, match=message):
        certificate_source(config)


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
async def test_old_tls_versions_are_refused_with_an_alert_that_says_so(
    version: str,
    server_factory: ServerFactory,
    root: trustme.CA,
    tmp_path: Path,
) -> None:
    """TLS 1.0/1.1 callers get OpenSSL's protocol_version alert, on the HTTPS ingress and
    the tunnel endpoint, not a silent close ("unexpected eof")."""
    leaf = root.issue_cert(f"*.{DOMAIN}")
    server = await server_factory(
        secureProxyPort=0,
        httpsCertificate=str(write_pem(tmp_path, "cert.pem", leaf.cert_chain_pems[0].bytes())),
        httpsKey=str(write_pem(tmp_path, "key.pem", leaf.private_key_pem.bytes())),
    )
    for port in (server.ports["https"], server.tunnel_port):
        # SECLEVEL=0: this OpenSSL would not even offer TLS 1.0/1.1 otherwise.
        argv = ["openssl", "s_client", version, "-cipher", "DEFAULT@SECLEVEL=0"]
        result = await run_cli([*argv, "-connect", f"127.0.0.1:{port}"], check=False, timeout=30)
        assert result.returncode != 0, result
        assert "alert protocol version" in result.stderr, (port, result.stderr)

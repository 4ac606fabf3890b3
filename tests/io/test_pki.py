"""Certificates from the private CA pass (and fail) real TLS handshakes as the tunnel needs."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from petit import ca as issuing, pki
from petit.errors import ConfigError


@pytest.fixture(scope="module")
def ca() -> issuing.IssuedCertificate:
    return issuing.create_ca()


@pytest.fixture(scope="module")
def server_certificate(ca: issuing.IssuedCertificate) -> issuing.IssuedCertificate:
    return issuing.issue_server_certificate(ca, ["Tunnel.Example.com", "localhost", "10.1.2.3"])


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def server_context(tmp_path: Path, server_certificate: issuing.IssuedCertificate) -> ssl.SSLContext:
    return pki.server_ssl_context(
        write(tmp_path / "server.crt", server_certificate.cert_pem),
        write(tmp_path / "server.key", server_certificate.key_pem),
    )


def pinned_client_context(tmp_path: Path, ca: issuing.IssuedCertificate) -> ssl.SSLContext:
    context = pki.client_ssl_context(write(tmp_path / "ca.crt", ca.cert_pem))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on
    return context


async def handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, hostname: str
) -> bytes | ssl.SSLCertVerificationError:
    """Run both sides over memory streams: the peer certificate the client got, or its refusal."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_transport, server_context, server_side=True)
    client = trio.SSLStream(client_transport, client_context, server_hostname=hostname)
    outcome: bytes | ssl.SSLCertVerificationError = b""

    async def run_server() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the client refused us
            await server.do_handshake()

    async def run_client() -> None:
        nonlocal outcome
        try:
            await client.do_handshake()
        except trio.BrokenResourceError as exc:
            if not isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise
            outcome = exc.__cause__
            await client_transport.aclose()  # so the server stops waiting
        else:
            outcome = client.getpeercert(binary_form=True)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            nursery.start_soon(run_client)
    return outcome


@pytest.mark.parametrize("hostname", ["localhost", "tunnel.example.com", "10.1.2.3", "::1"])
async def test_pinned_ca_verifies_the_server(
    tmp_path: Path,
    ca: issuing.IssuedCertificate,
    server_certificate: issuing.IssuedCertificate,
    server_context: ssl.SSLContext,
    hostname: str,
) -> None:
    peer_der = await handshake(server_context, pinned_client_context(tmp_path, ca), hostname)

    assert isinstance(peer_der, bytes)
    assert pki.certificate_fingerprint(peer_der) == pki.certificate_fingerprint(
        pki.pem_to_der(server_certificate.cert_pem)
    )
    assert pki.fingerprint_hex(peer_der) == pki.fingerprint_hex(server_certificate.cert_pem)


async def test_hostname_mismatch_is_refused(
    tmp_path: Path, ca: issuing.IssuedCertificate, server_context: ssl.SSLContext
) -> None:
    outcome = await handshake(server_context, pinned_client_context(tmp_path, ca), "evil.example")

    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in outcome.verify_message


async def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, server_context: ssl.SSLContext
) -> None:
    other_ca = issuing.create_ca("someone else's CA")
    outcome = await handshake(
        server_context, pinned_client_context(tmp_path, other_ca), "localhost"
    )

    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in outcome.verify_message


async def test_system_trust_store_does_not_know_the_private_ca(
    server_context: ssl.SSLContext,
) -> None:
    outcome = await handshake(server_context, pki.client_ssl_context(None), "localhost")

    assert isinstance(outcome, ssl.SSLCertVerificationError)


def test_ca_extensions(ca: issuing.IssuedCertificate) -> None:
    certificate = x509.load_pem_x509_certificate(ca.cert_pem)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value

    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    certificate.verify_directly_issued_by(certificate)


def test_server_certificate_names_and_extensions(
    ca: issuing.IssuedCertificate, server_certificate: issuing.IssuedCertificate
) -> None:
    certificate = x509.load_pem_x509_certificate(server_certificate.cert_pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value

    assert names.get_values_for_type(x509.DNSName) == ["tunnel.example.com", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert constraints.ca is False
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))


def test_fingerprint_forms() -> None:
    ca = issuing.create_ca()
    der = pki.pem_to_der(ca.cert_pem)

    assert re.fullmatch(r"sha256(:[0-9a-f]{2}){32}", pki.fingerprint_hex(der))
    assert pki.fingerprint_hex(ca.cert_pem) == pki.fingerprint_hex(der)
    assert bytes.fromhex(pki.fingerprint_hex(der)[7:].replace(":", "")) == (
        pki.certificate_fingerprint(der)
    )


def test_pem_to_der_takes_the_first_certificate_of_a_chain(
    ca: issuing.IssuedCertificate, server_certificate: issuing.IssuedCertificate
) -> None:
    chain = server_certificate.cert_pem + ca.cert_pem

    assert pki.pem_to_der(chain) == pki.pem_to_der(server_certificate.cert_pem)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        pki.pem_to_der(b"garbage")


def test_unloadable_files_are_config_errors(
    tmp_path: Path, ca: issuing.IssuedCertificate, server_certificate: issuing.IssuedCertificate
) -> None:
    cert_file = write(tmp_path / "server.crt", server_certificate.cert_pem)
    wrong_key = write(tmp_path / "ca.key", ca.key_pem)

    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        pki.server_ssl_context(cert_file, wrong_key)
    with pytest.raises(ConfigError, match="cannot load the CA certificate"):
        pki.client_ssl_context(tmp_path / "missing.crt")


def test_contexts_require_tls_1_2_and_verification(
    tmp_path: Path, server_context: ssl.SSLContext
) -> None:
    client_context = pki.client_ssl_context(None)

    assert server_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context.verify_mode == ssl.CERT_REQUIRED
    assert client_context.check_hostname

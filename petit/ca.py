"""A private CA for the tunnel: the server issues its own certificate, the client pins the CA.

No public CA is involved, so the client trusts only the CA the operator copied from the
server; fingerprints (petit.pki) let the tunnel handshake bind identities to that exact
certificate. Only ``petit-server init`` issues certificates, so only it imports this module and
cryptography's X.509 with it (2.5 MB a running server does not carry).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from petit.errors import ConfigError

ALWAYS_INCLUDED_NAMES = ("localhost", "127.0.0.1", "::1")  # local checks always verify
CLOCK_SKEW = datetime.timedelta(hours=1)  # backdate so a peer with a slow clock accepts it


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM (the key is unencrypted PKCS#8)."""

    cert_pem: bytes
    key_pem: bytes


def create_ca(common_name: str = "petit private CA", *, days: int = 3650) -> IssuedCertificate:
    """A self-signed CA that can sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCertificate(_certificate_pem(certificate), _private_key_pem(key))


def issue_server_certificate(
    ca: IssuedCertificate, hostnames: Sequence[str], *, days: int = 825
) -> IssuedCertificate:
    """A TLS server certificate for ``hostnames`` (plus the local names), signed by ``ca``."""
    ca_certificate = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key: recreate the CA with petit")
    ca_key_id = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = _subject_alt_names([*hostnames, *ALWAYS_INCLUDED_NAMES])  # CN is ignored
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "petit server")])
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_certificate.not_valid_after_utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id.value),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCertificate(_certificate_pem(certificate), _private_key_pem(key))


def _subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """IP literals as IPAddress, the rest as DNSName; duplicates dropped, order kept."""
    entries: list[x509.GeneralName] = []
    for name in names:
        entry: x509.GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name.lower().rstrip("."))
        if entry not in entries:
            entries.append(entry)
    return entries


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

"""The tunnel's certificates at run time: TLS contexts and fingerprints.

The client trusts only the CA the operator copied from the server (petit.ca issues both);
fingerprints let the tunnel handshake bind identities to that exact certificate. Everything
here is the standard library's ``ssl`` and ``hashlib``: OpenSSL parses and checks the
certificates as it loads them, so neither process imports cryptography's X.509 to run.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from petit.errors import ConfigError


def certificate_fingerprint(cert_der: bytes) -> bytes:
    """SHA-256 of the DER encoding: what the tunnel handshake compares."""
    return hashlib.sha256(cert_der).digest()


def fingerprint_hex(cert_der_or_pem: bytes) -> str:
    """The fingerprint as people compare it: ``sha256:ab:cd:...``. Accepts PEM or DER."""
    der = cert_der_or_pem
    if cert_der_or_pem.lstrip().startswith(b"-----BEGIN"):
        der = pem_to_der(cert_der_or_pem)
    return "sha256:" + certificate_fingerprint(der).hex(":")


def pem_to_der(cert_pem: bytes) -> bytes:
    """DER of the first certificate in ``cert_pem`` (a chain file starts with the leaf).

    Only the armour is taken off: the certificates given here are ones OpenSSL has loaded
    (the server's own) or petit.ca has just issued.
    """
    text = cert_pem.decode("ascii", "replace")
    begin = text.find(ssl.PEM_HEADER)
    end = text.find(ssl.PEM_FOOTER, begin)
    if begin < 0 or end < 0:
        raise ConfigError("not a PEM certificate: no BEGIN/END CERTIFICATE lines")
    try:
        return ssl.PEM_cert_to_DER_cert(text[begin : end + len(ssl.PEM_FOOTER)])
    except ValueError as exc:  # binascii.Error: the base64 inside is broken
        raise ConfigError(f"not a PEM certificate: {exc}") from None


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS >= 1.2 server context; ``cert_file`` may hold the leaf followed by its chain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file} with key {key_file}: {exc}"
        ) from None
    return context


def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """TLS >= 1.2 client context that always verifies the chain and the hostname.

    With ``ca_file`` only that CA is trusted (pinning); without, the system's CAs are.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA certificate {ca_file}: {exc}") from None
    if ca_file is not None and not context.cert_store_stats()["x509"]:  # a CRL alone loads
        raise ConfigError(f"cannot load the CA certificate {ca_file}: it holds no certificate")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED  # already the default: stated, never relaxed
    context.check_hostname = True
    return context

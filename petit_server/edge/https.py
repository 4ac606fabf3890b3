"""HTTPS ingress: TLS in front of the HTTP ingress, with certificates reloaded from disk.

# Theory of operation

- The certificate is either PEM files (leaf, optionally followed by its intermediate chain,
  or the chain in a file of its own, and an unencrypted key) or one PKCS#12 bundle with a
  password. Either way it is turned into PEM, checked with ``cryptography`` (so a mistake is
  named in one line), and loaded into a TLS >= 1.2 ``SSLContext`` through files in a private
  temporary directory (0700, files 0600) that exist only for the ``load_cert_chain`` call.
  cryptography is imported where a certificate is read: a server without HTTPS never
  carries its X.509 and PKCS#12 code (2.5 MB of RSS).
- Each new connection stats the configured files (mtime, size, inode). When they changed, the
  context is rebuilt in a worker thread before the handshake, so a renewed certificate is
  served without a restart. A replacement that does not load is logged once and the previous
  context keeps serving until the files change again.
- Each connection is handshaken under ``handshake_timeout``, then served by the HTTP ingress
  with ``X-Forwarded-Proto: https``.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from petit.errors import ConfigError
from petit.listen import serve_tcp
from petit.tls import server_handshake
from petit_server.config import ServerConfig
from petit_server.edge.ingress import Routing, handle_public_connection

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger("petit.https")

FileSignature = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: cannot stat


@dataclass(frozen=True, slots=True)
class PemFiles:
    """A PEM certificate (the leaf, optionally followed by its chain), key and optional chain."""

    certificate: Path
    key: Path
    chain: Path | None

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file the certificate is read from."""
        return tuple(path for path in (self.certificate, self.key, self.chain) if path is not None)

    def read(self) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
        """Leaf first, then its chain; and the private key."""
        certificates = _pem_certificates(self.certificate)
        if self.chain is not None:
            certificates += _pem_certificates(self.chain)
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_private_key(_read(self.key), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"HTTPS: {self.key} is not an unencrypted PEM private key ({exc})"
            ) from None
        return certificates, key


@dataclass(frozen=True, slots=True)
class Pkcs12File:
    """A PKCS#12 bundle: private key, certificate and chain, maybe under a password."""

    path: Path
    password: str | None = field(repr=False)

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file the certificate is read from."""
        return (self.path,)

    def read(self) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
        """Leaf first, then its chain; and the private key."""
        from cryptography.hazmat.primitives.serialization import pkcs12

        password = None if self.password is None else self.password.encode()
        try:
            key, leaf, chain = pkcs12.load_key_and_certificates(_read(self.path), password)
        except (ValueError, TypeError):
            raise ConfigError(
                f"HTTPS: cannot open {self.path}: not PKCS#12, or httpsPkcs12Password is wrong"
            ) from None
        if key is None or leaf is None:
            raise ConfigError(f"HTTPS: {self.path} must hold a private key and its certificate")
        return [leaf, *chain], key


CertificateSource = PemFiles | Pkcs12File


def certificate_source(config: ServerConfig) -> CertificateSource | None:
    """The configured HTTPS certificate, None when HTTPS is off; ConfigError for half a setup."""
    certificate, key = config.https_certificate, config.https_key
    if config.https_pkcs12 is not None:
        if certificate is not None or key is not None:
            raise ConfigError(
                f"{config.path}: set either httpsCertificate + httpsKey or httpsPkcs12, not both"
            )
        return Pkcs12File(config.https_pkcs12, config.https_pkcs12_password)
    if certificate is not None and key is not None:
        return PemFiles(certificate, key, config.https_chain)
    if certificate is not None or key is not None:
        raise ConfigError(f"{config.path}: set both httpsCertificate and httpsKey, or neither")
    if config.https_chain is not None or config.https_redirect:
        raise ConfigError(
            f"{config.path}: httpsChain and httpsRedirect need an HTTPS certificate: "
            "set httpsCertificate + httpsKey, or httpsPkcs12"
        )
    return None


def load_context(source: CertificateSource) -> ssl.SSLContext:
    """A fresh TLS >= 1.2 server context (blocking); ConfigError says what is wrong."""
    from cryptography.hazmat.primitives import serialization

    certificates, key = source.read()
    if key.public_key() != certificates[0].public_key():
        raise ConfigError(
            f"HTTPS: the private key does not belong to the certificate in {source.paths[0]}"
        )
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with tempfile.TemporaryDirectory(prefix="petit-https-") as private:  # mode 0700
            chain_file = _write_private(Path(private, "chain.pem"), chain_pem)
            key_file = _write_private(Path(private, "key.pem"), key_pem)
            context.load_cert_chain(chain_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"HTTPS: cannot use the certificate: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"HTTPS: cannot stage the certificate in {tempfile.gettempdir()}: {exc.strerror}"
        ) from None
    return context


def _signature(source: CertificateSource) -> tuple[FileSignature, ...]:
    """What changes when any of the files is replaced or rewritten."""
    return tuple(_stat(path) for path in source.paths)


class ReloadingContext:
    """The current server ``SSLContext``, rebuilt when the certificate files change."""

    def __init__(self, source: CertificateSource) -> None:
        self._source = source
        self._signature = _signature(source)  # taken first: a change while loading is seen
        self._context = load_context(source)
        self._lock = trio.Lock()

    async def current(self) -> ssl.SSLContext:
        """The context for a new connection, reloaded first if the files changed."""
        signature = _signature(self._source)
        if signature == self._signature:
            return self._context
        async with self._lock:
            if signature != self._signature:  # not already reloaded by another connection
                try:
                    self._context = await trio.to_thread.run_sync(load_context, self._source)
                except ConfigError as exc:
                    log.error("%s; still serving the previous HTTPS certificate", exc)
                else:
                    log.info("HTTPS certificate reloaded from %s", self._source.paths[0])
                self._signature = signature  # a broken file is tried again once it changes
        return self._context


async def serve_https(
    routing: Routing,
    certificates: ReloadingContext,
    *,
    host: str,
    port: int,
    handshake_timeout: float,
    handler_nursery: trio.Nursery,
    shared: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for public HTTPS; report the bound port; handlers run in ``handler_nursery``
    (``shared``: the port is the workers', ``petit.listen``)."""
    tls = _Handshake(certificates, handshake_timeout)

    async def handler(connection: trio.SocketStream) -> None:
        await handle_public_connection(connection, routing=routing, tls=tls)

    await serve_tcp(
        handler,
        port,
        host=host,
        what="HTTPS ingress",
        handler_nursery=handler_nursery,
        shared=shared,
        task_status=task_status,
    )


@dataclass(frozen=True, slots=True)
class _Handshake:
    """Turns an accepted connection into a handshaken TLS stream, or raises."""

    certificates: ReloadingContext
    timeout: float

    async def __call__(self, connection: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        stream = trio.SSLStream(
            connection, await self.certificates.current(), server_side=True, https_compatible=True
        )
        with trio.fail_after(self.timeout):
            await server_handshake(stream)
        return stream


def _stat(path: Path) -> FileSignature:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"HTTPS: cannot read {path}: {exc.strerror}") from None


def _pem_certificates(path: Path) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise ConfigError(f"HTTPS: {path} holds no valid PEM certificate") from None


def _write_private(path: Path, data: bytes) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    return path

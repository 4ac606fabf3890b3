"""The tunnel's carrier: binary WebSocket messages over TLS (``petit.websocket``).

The client opens the TLS connection itself so it can read the server certificate it
verified and bind its fingerprint into the handshake, and so that connection may run
through an HTTP CONNECT proxy (``petit.proxy``).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from petit.errors import PetitError
from petit.listen import show_address
from petit.pki import certificate_fingerprint
from petit.proxy import ConnectHandshake, ProxyError, ProxyURL, select_proxy
from petit.websocket import CLOSE_WAIT, HandshakeError, WebSocket, connect

log = logging.getLogger("petit.transport")

TUNNEL_PATH = "/petit/v1"
REGISTER_PATH = "/petit/v1/register"
UNREGISTER_PATH = "/petit/v1/unregister"
PROXY_RECEIVE = 16 * 1024  # bytes per read of the proxy's CONNECT answer


class ServerUnreachableError(PetitError):
    """The tunnel endpoint could not be reached or did not speak TLS + WebSocket."""


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where the tunnel endpoint is."""

    host: str
    port: int

    def __str__(self) -> str:
        """host:port as a Host header and people write it (an IPv6 address in brackets)."""
        return show_address(self.host, self.port)


@asynccontextmanager
async def open_websocket(
    address: ServerAddress, ssl_context: ssl.SSLContext, path: str, *, proxy: str | None = None
) -> AsyncIterator[tuple[WebSocket, bytes]]:
    """Dial the server; yield the WebSocket and the SHA-256 of the certificate it presented.

    ``proxy`` is the configured proxy URL; without one, HTTPS_PROXY applies. NO_PROXY is
    honoured either way (curl's rules, see ``petit.proxy.select_proxy``). TLS verification
    and SNI are for the server itself, proxy or not.

    Raises:
        ConfigError: the proxy URL that applies is not a usable http:// URL.
        ServerUnreachableError: connection refused, proxy refused, TLS verification failed,
            or no WebSocket.
    """
    via = select_proxy(address.host, proxy, os.environ)
    through = f" through the proxy {via}" if via is not None else ""
    tcp = await _open_stream(address, via)
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=address.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(tls)
        cause = exc.__cause__ or exc
        raise ServerUnreachableError(
            f"TLS with the server at {address}{through} failed: {cause}"
        ) from None
    certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None, "a verified TLS peer always has a certificate"
    try:
        websocket = await connect(tls, str(address), path)
    except BaseException as exc:
        await trio.aclose_forcefully(tls)
        if isinstance(exc, HandshakeError | trio.BrokenResourceError):
            raise ServerUnreachableError(
                f"the server at {address}{through} did not accept a WebSocket on {path}: {exc}"
            ) from None
        raise
    try:
        yield websocket, certificate_fingerprint(certificate)
    finally:
        with trio.move_on_after(CLOSE_WAIT, shield=True):
            await websocket.aclose()
        await trio.aclose_forcefully(tls)


async def _open_stream(address: ServerAddress, proxy: ProxyURL | None) -> trio.SocketStream:
    """A TCP stream to the server: direct, or a tunnel opened by CONNECT through ``proxy``."""
    if proxy is None:
        try:
            return await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise ServerUnreachableError(
                f"cannot reach the server at {address}: {_why(exc)}"
            ) from None
    log.debug("connecting to %s through the proxy %s", address, proxy)
    try:
        tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        raise ServerUnreachableError(f"cannot reach the proxy {proxy}: {_why(exc)}") from None
    handshake = ConnectHandshake(proxy, address.host, address.port)
    try:
        await tcp.send_all(handshake.request)
        while not handshake.receive_data(await tcp.receive_some(PROXY_RECEIVE)):
            pass
    except BaseException as exc:
        await trio.aclose_forcefully(tcp)
        if isinstance(exc, ProxyError):
            raise ServerUnreachableError(str(exc)) from None
        if isinstance(exc, trio.BrokenResourceError):
            raise ServerUnreachableError(
                f"the proxy {proxy} dropped the connection during CONNECT to {address}: {exc}"
            ) from None
        raise
    return tcp


def _why(exc: OSError) -> str:
    """Why a connect failed, in the system's words ("Connection refused")."""
    attempts = exc.__cause__  # trio groups the errors of each address it tried
    last = attempts.exceptions[-1] if isinstance(attempts, BaseExceptionGroup) else exc
    failure = last if isinstance(last, OSError) else exc
    if failure.errno is not None and failure.errno > 0:
        return os.strerror(failure.errno)
    return failure.strerror or str(failure)  # resolver errors have negative codes

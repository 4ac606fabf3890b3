"""The tunnel's carrier: binary WebSocket messages over TLS (trio-websocket).

The client opens the TLS connection itself, rather than through ``open_websocket_url``, so
it can read the server certificate it verified and bind its fingerprint into the handshake,
and so that connection may run through an HTTP CONNECT proxy (``petit.proxy``).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from petit.errors import PetitError, RemoteProtocolError
from petit.pki import certificate_fingerprint
from petit.proxy import ConnectHandshake, ProxyError, ProxyURL, select_proxy

log = logging.getLogger("petit.transport")

TUNNEL_PATH = "/petit/v1"
REGISTER_PATH = "/petit/v1/register"
UNREGISTER_PATH = "/petit/v1/unregister"
# trio-websocket reads 4 KiB at a time by default, which costs about half the throughput.
RECEIVE_BUFFER = 256 * 1024  # bytes
MAX_MESSAGE = 4 * 1024 * 1024  # bytes; our writer sends at most 256 KiB + 48 per message
PROXY_RECEIVE = 16 * 1024  # bytes per read of the proxy's CONNECT answer


class ServerUnreachableError(PetitError):
    """The tunnel endpoint could not be reached or did not speak TLS + WebSocket."""


class WebSocketCarrier:
    """Frames travel in binary WebSocket messages; any message boundary is allowed."""

    def __init__(self, websocket: WebSocketConnection) -> None:
        self._websocket = websocket

    async def send(self, data: bytes) -> None:
        """Send one binary message."""
        try:
            await self._websocket.send_message(data)
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("the tunnel WebSocket is closed") from exc

    async def receive(self) -> bytes:
        """Return the next non-empty binary message, or b"" once the WebSocket closed."""
        while True:
            try:
                message = await self._websocket.get_message()
            except ConnectionClosed:
                return b""
            if isinstance(message, str):
                raise RemoteProtocolError("text WebSocket message on the tunnel")
            if message:
                return message

    async def aclose(self) -> None:
        """Close the WebSocket."""
        await self._websocket.aclose()


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where the tunnel endpoint is."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@asynccontextmanager
async def open_websocket(
    address: ServerAddress, ssl_context: ssl.SSLContext, path: str, *, proxy: str | None = None
) -> AsyncIterator[tuple[WebSocketConnection, bytes]]:
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
    async with trio.open_nursery() as nursery:
        try:
            websocket = await wrap_client_stream(
                nursery,
                tls,
                address.host,
                path,
                max_message_size=MAX_MESSAGE,
                receive_buffer_size=RECEIVE_BUFFER,
            )
        except (HandshakeError, ConnectionClosed, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(tls)
            raise ServerUnreachableError(
                f"the server at {address}{through} did not accept a WebSocket on {path}: {exc}"
            ) from None
        try:
            yield websocket, certificate_fingerprint(certificate)
        finally:
            with trio.move_on_after(1, shield=True):
                await websocket.aclose()
            nursery.cancel_scope.cancel()


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

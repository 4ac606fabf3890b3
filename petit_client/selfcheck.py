"""The client's own end-to-end check of each registration's public URL (``loopbackInterval``).

# Theory of operation

- Every ``loopbackInterval`` seconds (300 by default, as the original; 0 turns it off) the
  client sends ``GET <endpoint>/-g2c-intercept`` for each registration its tunnel carries,
  ``<endpoint>`` being the public URL the server gave it at registration. The request goes
  out as any visitor's would, through the server's ingress, and comes back down this
  client's own tunnel, where the client answers it itself: a 200 ``{"success": true}``
  proves the path callers take, DNS and ingress included, without touching the private
  service.
- Names under ``.localhost`` are loopback (RFC 6761), as curl and browsers treat them, so
  the default ``http://REGID.localhost:8090`` checks a server on the same machine.
- ``https`` endpoints are verified: the system's trust store and the server CA the client
  pins. The URL comes from our own verified server; only ``scheme://host[:port]`` of it is
  used (a path, query, fragment or user part is refused, not followed) and only the tunnel
  check's fixed path is asked for. A bad URL is a failed check, never a crash.
- Bounded: one request per registration per interval, ``CHECK_TIMEOUT`` for the whole
  exchange, an answer of at most ``MAX_ANSWER`` bytes.
- The result shows in ``status`` (``loopback`` per registration) and the client's log: each
  failure is a warning (one per registration per interval), the first success after a
  failure (or at start) an info line; failures trigger nothing else, as in the original.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import h11
import trio

from petit.connection import PROBE
from petit.pki import client_ssl_context

CHECK_TIMEOUT: Final = 10.0  # seconds for one check, connect to answer
MAX_ANSWER: Final = 64 * 1024  # bytes of the answer read at most


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check of one registration's public URL."""

    url: str
    at: float  # time.time() of the check
    error: str  # "" when the tunnel check answered through the public URL

    def to_json(self) -> dict[str, object]:
        """As ``status`` shows it."""
        return {"url": self.url, "at": self.at, "ok": not self.error, "error": self.error}


def public_ssl_context(ca: Path | None) -> ssl.SSLContext:
    """Verification for public https URLs: the system's CAs, and the pinned server CA."""
    context = client_ssl_context(None)
    if ca is not None:
        context.load_verify_locations(cafile=ca)
    return context


def check_target(endpoint: str) -> tuple[urllib.parse.SplitResult, str]:
    """The public URL's scheme, host and port, and the URL a check asks for: always the
    tunnel check's own path, as the original did, whatever else the endpoint says.

    Raises:
        ValueError: ``endpoint`` is no plain http(s)://host[:port] URL (a path, query,
            fragment or user part is refused: the check must ask for nothing else).
    """
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"cannot check {endpoint!r}: only http:// and https:// URLs")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"cannot check {endpoint!r}: a public URL is scheme://host[:port]")
    parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    return parts, f"{parts.scheme}://{parts.netloc}{PROBE}"


async def check(endpoint: str, ssl_context: ssl.SSLContext) -> CheckResult:
    """Ask ``endpoint``'s tunnel check, within CHECK_TIMEOUT. Never raises for what the
    endpoint or the network does: every failure is the result's ``error``."""
    try:
        parts, url = check_target(endpoint)
    except ValueError as exc:  # UnicodeError too (an unencodable host name)
        return CheckResult(endpoint, time.time(), str(exc))
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            error = await _ask(parts, url, ssl_context)
    except trio.TooSlowError:
        error = f"no answer within {CHECK_TIMEOUT:g} s"
    except (
        OSError,
        ValueError,
        trio.BrokenResourceError,
        ssl.SSLError,
        h11.ProtocolError,
    ) as exc:
        error = str(exc) or type(exc).__name__
    return CheckResult(url, time.time(), error)


async def _ask(parts: urllib.parse.SplitResult, url: str, ssl_context: ssl.SSLContext) -> str:
    """'' if ``url`` answered 200 ``{"success": true}``, else what it did instead."""
    host = parts.hostname
    assert host is not None, "check_target refuses URLs without a host"
    local = host == "localhost" or host.endswith(".localhost")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1" if local else host, port)
    if parts.scheme == "https":
        stream = trio.SSLStream(stream, ssl_context, server_hostname=host, https_compatible=True)
    async with stream:
        http = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=PROBE,
            headers=[("host", parts.netloc), ("connection", "close"), ("user-agent", "petit")],
        )
        await stream.send_all(http.send(request) + (http.send(h11.EndOfMessage()) or b""))
        status, body = await _answer(stream, http)
    if status != 200:
        return f"{url} answered {status}"
    try:
        answered = json.loads(body)
    except ValueError:
        answered = None
    if not isinstance(answered, dict) or answered.get("success") is not True:
        return f"{url} answered 200 but not the tunnel check's answer (another service?)"
    return ""


async def _answer(stream: trio.abc.Stream, http: h11.Connection) -> tuple[int, bytes]:
    """The response's status and (at most MAX_ANSWER bytes of) body."""
    status, body = 0, b""
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            if len(body) > MAX_ANSWER:
                return status, body[:MAX_ANSWER]
            http.receive_data(bytes(await stream.receive_some(MAX_ANSWER)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, body

"""The server side of a TLS handshake, with the refusal's alert actually sent.

trio marks an SSLStream broken as soon as OpenSSL raises, without sending what OpenSSL
queued for the peer: the alert that says why (``protocol_version`` for a TLS 1.0/1.1 caller,
``handshake_failure`` for no shared cipher). The caller then sees an unexpected EOF instead of
the reason. ``server_handshake`` sends those pending bytes (bounded: ``ALERT_TIMEOUT``) before
the error propagates. They sit in trio's outgoing memory BIO, a private attribute: if trio
renames it, no alert is sent (the old behaviour) and tests/integration/test_https.py fails.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import trio

ALERT_TIMEOUT = 1.0  # seconds to hand a refusal's alert to the kernel


async def server_handshake(tls: trio.SSLStream[Any]) -> None:
    """``tls.do_handshake()``; on a TLS refusal, the alert goes out before the error."""
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):
            await _send_pending_alert(tls)
        raise


async def _send_pending_alert(tls: trio.SSLStream[Any]) -> None:
    outgoing = getattr(tls, "_outgoing", None)  # trio's MemoryBIO towards the peer
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with (
        trio.move_on_after(ALERT_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await tls.transport_stream.send_all(outgoing.read())

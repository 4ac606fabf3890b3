"""A registration's bandwidth cap (its policy's ``bandwidth``): bytes per second each way,
shared by every connection to its private service.

The hub wraps each stream it opens for a capped registration in a ``CappedStream``. Bytes
towards the service wait for the registration's upload bucket before they are sent; bytes
from the service wait for its download bucket after they are read (kept for the next call,
not lost, if that wait is cancelled). So the reader stops reading, the tunnel's flow
control stops the client, and the client stops reading the service: nothing piles up while
a caller waits. It applies to HTTP, WebSocket and raw TCP alike, since all of them are
streams the hub opened. A bucket holds a tenth of a second's bytes, so a long transfer
stays within a few percent of the cap. A cancelled wait gives its bytes back. The cap holds
per server node: on a cluster where two nodes hold sessions for one registration, each
node caps its own share.
"""

from __future__ import annotations

import trio

from petit.session import Drained

MIN_BURST = 16 * 1024  # bytes: even a tiny cap passes one TCP segment's worth at once
PIECE = 64 * 1024  # bytes read at most per receive, so waits stay short and even


class ByteRate:
    """A token bucket of bytes that lets a transfer run ahead into debt, then sleeps it off:
    concurrent streams each wait their share, and the total keeps to the rate."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._burst = max(MIN_BURST, rate // 10)
        self._tokens = float(self._burst)
        self._when = trio.current_time()

    async def take(self, size: int) -> None:
        """Let ``size`` bytes pass, waiting while the bucket is in debt. Cancelled, it
        gives them back: they never passed."""
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._when) * self.rate) - size
        self._when = now
        if self._tokens < 0:
            try:
                await trio.sleep(-self._tokens / self.rate)  # the cap itself, not a sync
            except trio.Cancelled:
                self.give_back(size)
                raise

    def give_back(self, size: int) -> None:
        """Return ``size`` bytes taken but not used."""
        self._tokens = min(self._burst, self._tokens + size)


class CappedStream(trio.abc.HalfCloseableStream):
    """A stream to a private service whose bytes pass the registration's two buckets."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, up: ByteRate, down: ByteRate) -> None:
        self._stream = stream
        self._up = up
        self._down = down
        self._unpaid: bytes | bytearray = b""  # read from the service, not yet paid for

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._up.take(len(data))
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    def drains_into(self, sock: trio.socket.SocketType) -> None:
        """Pass on the socket the bytes end in (``petit.session.Drained``) to the tunnel
        stream, when it is one."""
        if isinstance(self._stream, Drained):
            self._stream.drains_into(sock)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        # Read, then pay: a cancellation while paying keeps the bytes for the next call, since
        # a receive must never lose what it read (paying first would let idle readers hold
        # the bucket's tokens while they wait).
        if not self._unpaid:
            self._unpaid = await self._stream.receive_some(PIECE)
            if not self._unpaid:
                return self._unpaid  # EOF
        data = self._unpaid[: max_bytes or PIECE]
        await self._down.take(len(data))
        self._unpaid = self._unpaid[len(data) :]
        return data

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Bandwidth:
    """The buckets of every capped registration (one pair each, kept while its cap holds)."""

    def __init__(self) -> None:
        self._rates: dict[str, tuple[ByteRate, ByteRate]] = {}

    def cap(
        self, stream: trio.abc.HalfCloseableStream, registration_id: str, rate: int | None
    ) -> trio.abc.HalfCloseableStream:
        """``stream`` under the registration's cap, or as it is when it has none."""
        if rate is None:
            self._rates.pop(registration_id, None)
            return stream
        pair = self._rates.get(registration_id)
        if pair is None or pair[0].rate != rate:
            pair = self._rates[registration_id] = (ByteRate(rate), ByteRate(rate))
        return CappedStream(stream, *pair)

    def forget(self, registration_id: str) -> None:
        """The registration is gone: its buckets go too."""
        self._rates.pop(registration_id, None)

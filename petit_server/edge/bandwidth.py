"""A registration's bandwidth cap (its policy's ``bandwidth``): bytes per second each way,
shared by every connection to its private service.

The hub wraps each stream it opens for a capped registration in a ``CappedStream``. Bytes
towards the service wait for the registration's upload bucket before they are sent;
bytes from the service wait for its download bucket after they are read, so the reader
stops reading, the tunnel's flow control stops the client, and the client stops reading
the service: nothing piles up while a caller waits. It applies to HTTP, WebSocket and raw
TCP alike, since all of them are streams the hub opened. A bucket holds a tenth of a
second's bytes, so a long transfer stays within a few percent of the cap.
"""

from __future__ import annotations

import trio

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
        """Let ``size`` bytes pass, waiting while the bucket is in debt."""
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._when) * self.rate) - size
        self._when = now
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)  # the cap itself, not synchronisation


class CappedStream(trio.abc.HalfCloseableStream):
    """A stream to a private service whose bytes pass the registration's two buckets."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, up: ByteRate, down: ByteRate) -> None:
        self._stream = stream
        self._up = up
        self._down = down

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._up.take(len(data))
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(min(max_bytes or PIECE, PIECE))
        await self._down.take(len(data))
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

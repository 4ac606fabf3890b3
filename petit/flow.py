"""Per-stream credit windows (h2 style), so a slow consumer stalls only its own stream.

The receiver grants credit back only when the application has *consumed* bytes, not when they
arrive: that turns a slow local socket into backpressure on the far peer instead of memory
growth in the reader. A window may grow (never shrink) when the connection measured that it,
not the link or the reader, limited a round trip: the extra is granted at once.
"""

from __future__ import annotations

from typing import Final

from petit.errors import FlowControlError, LocalProtocolError

LARGEST_WINDOW: Final = 2**31 - 1  # bytes, as h2's LARGEST_FLOW_CONTROL_WINDOW


class SendWindow:
    """Credit the peer has granted us: how many DATA payload bytes we may still send."""

    __slots__ = ("available",)

    def __init__(self, available: int) -> None:
        assert 0 <= available <= LARGEST_WINDOW
        self.available = available

    def consume(self, size: int) -> None:
        """Spend ``size`` bytes of credit on DATA we are sending."""
        assert size >= 0
        if size > self.available:
            raise LocalProtocolError(f"sending {size} bytes with only {self.available} of credit")
        self.available -= size

    def grant(self, delta: int) -> None:
        """Add the increment of a WINDOW_UPDATE the peer sent.

        Raises:
            FlowControlError: ``delta`` is not positive or the window would exceed LARGEST_WINDOW.
        """
        if delta <= 0:
            raise FlowControlError(f"window increment {delta} is not positive")
        if self.available + delta > LARGEST_WINDOW:
            raise FlowControlError(
                f"window increment {delta} overflows {self.available} past {LARGEST_WINDOW}"
            )
        self.available += delta


class ReceiveWindow:
    """Credit we have granted the peer, and what we owe it back once the application consumes.

    Invariant: ``available + received-but-unconsumed + consumed-but-unacknowledged == size``.
    """

    __slots__ = ("_consumed_unacked", "_unconsumed", "available", "size")

    def __init__(self, size: int) -> None:
        assert 0 < size <= LARGEST_WINDOW
        self.size = size  # the window we advertise when fully open
        self.available = size  # bytes the peer may still send before it must wait
        self._unconsumed = 0
        self._consumed_unacked = 0

    def data_received(self, size: int) -> None:
        """Record ``size`` DATA payload bytes from the peer.

        Raises:
            FlowControlError: the peer sent more than the credit it had.
        """
        if size > self.available:
            raise FlowControlError(f"peer sent {size} bytes with only {self.available} of credit")
        self.available -= size
        self._unconsumed += size

    def data_consumed(self, size: int) -> int:
        """Record that the application took ``size`` bytes; return a WINDOW_UPDATE increment or 0.

        Credit goes back in batches: once half the window is consumed but unacknowledged, or when
        the peer is completely blocked. This avoids a WINDOW_UPDATE per DATA frame.
        """
        assert size >= 0
        if size > self._unconsumed:
            raise LocalProtocolError(
                f"consuming {size} bytes but only {self._unconsumed} were received"
            )
        self._unconsumed -= size
        self._consumed_unacked += size
        if self._consumed_unacked >= self.size // 2 or self.available == 0:
            increment, self._consumed_unacked = self._consumed_unacked, 0
            self.available += increment
            return increment
        return 0

    def grow(self, extra: int) -> None:
        """Enlarge the window by ``extra`` bytes, all granted now (the WINDOW_UPDATE to send)."""
        assert 0 < extra <= LARGEST_WINDOW - self.size
        self.size += extra
        self.available += extra

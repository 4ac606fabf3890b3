"""Errors petit raises on purpose, each saying whose fault it is.

``LocalProtocolError`` means *we* misused the protocol (a petit bug); ``RemoteProtocolError``
means the peer broke it. Both carry the ``ErrorCode`` to put on the wire.
"""

from __future__ import annotations

import enum
from typing import TypeVar

Failure = TypeVar("Failure", bound=BaseException)


class ErrorCode(enum.IntEnum):
    """Reason codes carried by RESET and GOAWAY frames (on the wire: never renumber)."""

    NO_ERROR = 0
    PROTOCOL = 1
    FLOW_CONTROL = 2
    FRAME_SIZE = 3
    STREAM_CLOSED = 4
    REFUSED = 5  # the local target refused the connection, or no such registration
    CANCEL = 6  # the opener no longer wants the stream
    AUTH = 7  # the handshake did not prove any identity
    INTERNAL = 8
    TIMEOUT = 9  # keepalive or handshake deadline passed
    SHUTDOWN = 10  # the peer is going away on purpose (GOAWAY while draining)

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Map a wire value to a code; unknown values become PROTOCOL rather than crashing."""
        try:
            return cls(value)
        except ValueError:
            return cls.PROTOCOL


class PetitError(Exception):
    """Root of every error petit raises on purpose."""


class ProtocolError(PetitError):
    """The tunnel protocol was violated. Abstract: raise a subclass."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We asked the state machine for something the protocol forbids right now: a petit bug."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. The connection is closed and a GOAWAY is queued."""


class FlowControlError(RemoteProtocolError):
    """The peer sent more DATA than the credit we granted, or overflowed a window."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.FLOW_CONTROL)


class AuthError(PetitError):
    """An identity could not be proven (bad signature, unknown key, refused registration)."""


class ConfigError(PetitError):
    """A config or state file is missing, unreadable or invalid; the message names the key."""


def first_leaf(group: BaseExceptionGroup[Failure]) -> Failure:
    """The first error inside (possibly nested) exception groups.

    Nurseries wrap failures in groups; owners that stop at the first failure want the error
    itself, so they can catch its type and report it.
    """
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first

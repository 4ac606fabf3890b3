"""The PROXY protocol (HAProxy, v1 text and v2 binary): the caller's address, as a load
balancer in front of the ingress tells it. Sans-IO: bytes in, a result out.

# Theory of operation

- A load balancer that passes TCP through (L4) hides the caller: the ingress sees the
  balancer's address. With the PROXY protocol the balancer first sends one header naming the
  caller, then the caller's bytes (for HTTPS, the TLS handshake follows the header).
- ``read_header(data)`` looks at the bytes received so far: ``None`` while they may still
  become a header, else a ``ProxyHeader`` with the caller's address (``None`` for v1
  UNKNOWN and v2 LOCAL, which mean "use the connection's own peer": health checks) and the
  header's size. Bytes that start like no header give ``NO_HEADER`` (size 0): a balancer's
  own request, say. A malformed header raises ``ProxyProtocolError``.
- Whether to believe a header is the caller's decision, not this module's: petit reads one
  only from peers in ``trustedProxies``; anyone else's ``PROXY ...`` line is a bad HTTP
  request.
- Bounded: a v1 header is at most 107 bytes (the spec's limit), a v2 header at most
  ``MAX_V2_SIZE`` (addresses plus TLVs, which are skipped).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from petit.errors import PetitError

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # bytes, CRLF included (the spec's worst case)
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_SIZE: Final = 16 + 1024  # bytes: the fixed part, addresses and a few TLVs
_V2_FIXED = struct.Struct("!12sBBH")
_V2_IPV4 = struct.Struct("!4s4sHH")
_V2_IPV6 = struct.Struct("!16s16sHH")


class ProxyProtocolError(PetitError):
    """A PROXY protocol header from a trusted peer that is malformed (the peer's fault)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """The caller's address (None: use the connection's peer) and the header's size."""

    source: str | None
    size: int


NO_HEADER: Final = ProxyHeader(None, 0)


def read_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Raises:
        ProxyProtocolError: ``data`` starts a PROXY header that is malformed or too long.
    """
    if data.startswith(V2_SIGNATURE):
        return _read_v2(data)
    if data.startswith(V1_PREFIX):
        return _read_v1(data)
    if V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]) or V1_PREFIX.startswith(
        data[: len(V1_PREFIX)]
    ):
        return None  # a prefix of one of them: wait for more
    return NO_HEADER


def _read_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 header longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    size = end + 2
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(None, size)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 header: {data[:end]!r}")
    _, family, source, destination, source_port, destination_port = fields
    version = 4 if family == b"TCP4" else 6
    for address in (source, destination):
        _address(address, version)
    for port in (source_port, destination_port):
        if not port.isdigit() or int(port) > 65535 or (port != b"0" and port.startswith(b"0")):
            raise ProxyProtocolError(f"PROXY v1 header with a bad port: {port!r}")
    return ProxyHeader(str(_address(source, version)), size)


def _address(text: bytes, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"PROXY v1 header with a bad address: {text!r}") from None
    if address.version != version:
        raise ProxyProtocolError(f"PROXY v1 header: {text!r} is not IPv{version}")
    return address


def _read_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED.size:
        return None
    _, version_command, family, length = _V2_FIXED.unpack_from(data)
    size = _V2_FIXED.size + length
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2 header with command {command}")
    if size > MAX_V2_SIZE:
        raise ProxyProtocolError(f"PROXY v2 header of {size} bytes (at most {MAX_V2_SIZE})")
    if len(data) < size:
        return None
    if command == 0:  # LOCAL: the balancer speaks for itself (a health check)
        return ProxyHeader(None, size)
    transport = family & 0x0F
    addresses = {0x10: _V2_IPV4, 0x20: _V2_IPV6}.get(family & 0xF0)
    if transport != 1 or addresses is None:  # not TCP over IPv4/IPv6 (UNSPEC, UDP, UNIX)
        return ProxyHeader(None, size)
    if length < addresses.size:
        raise ProxyProtocolError("PROXY v2 header too short for its addresses")
    source, _, _, _ = addresses.unpack_from(data, _V2_FIXED.size)
    return ProxyHeader(str(ipaddress.ip_address(source)), size)

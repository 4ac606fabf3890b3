"""The PROXY protocol header parser (v1 text, v2 binary): exact results, incremental input,
and nothing but ProxyProtocolError for any bytes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from petit.proxyprotocol import (
    MAX_V2_SIZE,
    NO_HEADER,
    ProxyHeader,
    ProxyProtocolError,
    read_header,
)
from tests.proto.helpers import proxy_v2

addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: a.compressed)
)
ports = st.integers(min_value=0, max_value=65535)
REQUEST = b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n"


def proxy_v1(source: str, port: int) -> bytes:
    version = ipaddress.ip_address(source).version
    destination = "192.0.2.1" if version == 4 else "2001:db8::1"
    return f"PROXY TCP{version} {source} {destination} {port} 443\r\n".encode()


@given(addresses, ports)
def test_v1_names_the_source_and_ends_at_its_crlf(source: str, port: int) -> None:
    header = proxy_v1(source, port)
    assert read_header(header + REQUEST) == ProxyHeader(source, len(header))


@given(addresses, ports)
def test_v2_names_the_source_and_ends_at_its_length(source: str, port: int) -> None:
    header = proxy_v2(source, port)
    assert read_header(header + REQUEST) == ProxyHeader(source, len(header))


@given(addresses, ports, st.sampled_from(["v1", "v2"]))
def test_every_prefix_of_a_header_asks_for_more(source: str, port: int, version: str) -> None:
    header = proxy_v1(source, port) if version == "v1" else proxy_v2(source, port)
    for end in range(len(header)):
        assert read_header(header[:end]) is None, header[:end]


def test_v2_tlvs_are_skipped_and_local_or_other_families_name_no_caller() -> None:
    header = proxy_v2("198.51.100.4")
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP, 3 bytes
    longer = header[:14] + (len(header) - 16 + len(tlv)).to_bytes(2, "big") + header[16:] + tlv
    assert read_header(longer + REQUEST) == ProxyHeader("198.51.100.4", len(longer))
    local = header[:12] + b"\x20" + header[13:]  # command LOCAL: a health check
    assert read_header(local) == ProxyHeader(None, len(header))
    unix = header[:13] + b"\x31" + header[14:]  # AF_UNIX: no IP address to name
    assert read_header(unix) == ProxyHeader(None, len(header))
    assert read_header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == ProxyHeader(None, 35)


@pytest.mark.parametrize(
    "start", [b"GET / HTTP/1.1\r\n", b"POST /", b"PROPFIND /", b"PUT /x", b"\x16\x03\x01\x02\x00"]
)
def test_what_starts_like_no_header_is_passed_on_untouched(start: bytes) -> None:
    assert read_header(start) is NO_HEADER


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"PROXY TCP4 198.51.100.300 192.0.2.1 1 2\r\n", "bad address"),
        (b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n", "is not IPv4"),
        (b"PROXY TCP4 198.51.100.3 192.0.2.1 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.3 192.0.2.1 080 2\r\n", "bad port"),
        (b"PROXY TCP4 198.51.100.3 192.0.2.1 1\r\n", "malformed"),
        (b"PROXY UDP4 198.51.100.3 192.0.2.1 1 2\r\n", "malformed"),
        (b"PROXY " + b"1" * 101, "longer than 107 bytes"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12), "version 1"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + bytes(12), "command 2"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4), "too short"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", f"at most {MAX_V2_SIZE}"),
    ],
)
def test_malformed_headers_are_the_peers_fault(data: bytes, complaint: str) -> None:
    with pytest.raises(ProxyProtocolError, match=complaint):
        read_header(data)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_or_a_clear_error(data: bytes) -> None:
    try:
        header = read_header(data)
    except ProxyProtocolError:
        return
    assert header is None or 0 <= header.size <= len(data)

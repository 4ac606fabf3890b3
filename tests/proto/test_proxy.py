"""Choosing a proxy (URL, environment, no_proxy) and the CONNECT exchange, without I/O."""

from __future__ import annotations

import base64

import pytest

from petit.errors import ConfigError
from petit.proxy import (
    ConnectHandshake,
    ProxyError,
    ProxyURL,
    bypasses_proxy,
    parse_proxy_url,
    select_proxy,
)

PASSWORD = "pa:ss@w/rd"  # every character that must be percent-encoded in a URL
ENCODED = "pa%3Ass%40w%2Frd"


# ----------------------------------------------------------------------------- proxy URLs


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://proxy.example.com:3128", ProxyURL("proxy.example.com", 3128)),
        ("http://proxy.example.com", ProxyURL("proxy.example.com", 80)),
        ("http://proxy.example.com:3128/", ProxyURL("proxy.example.com", 3128)),
        ("HTTP://Proxy.Example.COM:3128", ProxyURL("proxy.example.com", 3128)),
        ("proxy.example.com:3128", ProxyURL("proxy.example.com", 3128)),  # curl: http implied
        ("  http://10.0.0.1:8080  ", ProxyURL("10.0.0.1", 8080)),
        ("http://[2001:db8::1]:3128", ProxyURL("2001:db8::1", 3128)),
        ("http://alice:secret@p:3128", ProxyURL("p", 3128, "alice", "secret")),
        (f"http://al%20ice:{ENCODED}@p:3128", ProxyURL("p", 3128, "al ice", PASSWORD)),
        ("http://alice@p:3128", ProxyURL("p", 3128, "alice", "")),
    ],
)
def test_proxy_urls_parse(value: str, expected: ProxyURL) -> None:
    assert parse_proxy_url(value, source="HTTPS_PROXY") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://alice:s3cret@p:3128", "HTTPS_PROXY: https:// proxies are not supported"),
        ("socks5://alice:s3cret@p:1080", "HTTPS_PROXY: socks5:// proxies are not supported"),
        ("http://alice:s3cret@p:99999", "HTTPS_PROXY: not a valid proxy URL"),
        ("http://alice:s3cret@p:port", "HTTPS_PROXY: not a valid proxy URL"),
        ("http://alice:s3cret@p:0", "HTTPS_PROXY: not a valid proxy URL"),
        ("http://alice:s3cret@:3128", "HTTPS_PROXY: not a valid proxy URL"),
        ("http://alice:s3cret@[::1:3128", "HTTPS_PROXY: not a valid proxy URL"),
    ],
)
def test_unusable_proxy_urls_are_named_without_the_password(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_proxy_url(value, source="HTTPS_PROXY")
    text = str(caught.value)
    assert text.startswith(message)
    assert "http://[USER:PASSWORD@]HOST[:PORT]" in text  # says what to write instead
    assert "s3cret" not in text
    assert "\n" not in text


def test_the_password_stays_out_of_repr_and_str() -> None:
    proxy = parse_proxy_url(f"http://alice:{ENCODED}@proxy.example.com:3128", source="x")
    assert PASSWORD not in repr(proxy)
    assert ENCODED not in repr(proxy)
    assert "alice" in repr(proxy)
    assert str(proxy) == "proxy.example.com:3128"
    assert str(ProxyURL("::1", 3128)) == "[::1]:3128"


def test_basic_credentials() -> None:
    assert ProxyURL("p", 1).authorization is None
    token = ProxyURL("p", 1, "alice", PASSWORD).authorization
    assert token == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert ProxyURL("p", 1, "", "only-password").authorization is not None


# ----------------------------------------------------------------------------- no_proxy


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypass"),
    [
        ("tunnel.example.com", "*", True),
        ("tunnel.example.com", "localhost, *", True),
        ("tunnel.example.com", "example.com", True),
        ("tunnel.example.com", ".example.com", True),
        ("example.com", ".example.com", True),
        ("tunnel.example.com", "tunnel.example.com", True),
        ("TUNNEL.Example.com.", "tunnel.example.COM", True),
        ("tunnel.example.com", " other.org , example.com ", True),
        ("tunnel.example.com", "badexample.com", False),
        ("tunnel.example.com", "other.example.com", False),
        ("tunnel.example.com", "com.example", False),
        ("tunnel.example.com", "", False),
        ("tunnel.example.com", ",,", False),
        ("10.1.2.3", "10.1.2.3", True),
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.4,192.168.0.0/16", False),
        ("10.1.2.3", "2.3", False),  # not a domain suffix of an address
        ("::1", "::1", True),
        ("::1", "[::1]", True),
        ("[2001:db8::5]", "2001:db8::/32", True),
        ("2001:db8::5", "2001:db9::/32", False),
        ("localhost", "127.0.0.1", False),  # names are not resolved, as in curl
    ],
)
def test_no_proxy(host: str, no_proxy: str, bypass: bool) -> None:
    assert bypasses_proxy(host, no_proxy) is bypass


# ----------------------------------------------------------------------------- which proxy


def test_the_configured_proxy_wins_over_the_environment() -> None:
    environ = {"HTTPS_PROXY": "http://env:1"}
    assert select_proxy("s.example", "http://conf:2", environ) == ProxyURL("conf", 2)
    assert select_proxy("s.example", None, environ) == ProxyURL("env", 1)
    assert select_proxy("s.example", None, {}) is None


def test_lower_case_variables_come_first_and_blank_ones_count_as_unset() -> None:
    both = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    assert select_proxy("s.example", None, both) == ProxyURL("lower", 1)
    assert select_proxy("s.example", None, {**both, "https_proxy": " "}) == ProxyURL("upper", 2)
    assert select_proxy("s.example", None, {"http_proxy": "http://plain:3"}) is None


def test_no_proxy_applies_to_the_configured_proxy_too() -> None:
    for name in ("no_proxy", "NO_PROXY"):
        environ = {"HTTPS_PROXY": "http://env:1", name: "example.com"}
        assert select_proxy("s.example.com", "http://conf:2", environ) is None
        assert select_proxy("s.example.com", None, environ) is None
        assert select_proxy("s.example.org", None, environ) == ProxyURL("env", 1)


def test_a_bad_url_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^\[client\] proxy: https://"):
        select_proxy("s.example", "https://p:1", {})
    with pytest.raises(ConfigError, match=r"^https_proxy: socks5://"):
        select_proxy("s.example", None, {"https_proxy": "socks5://p:1"})
    assert select_proxy("s.example", None, {"https_proxy": "socks5://p", "NO_PROXY": "*"}) is None


# ----------------------------------------------------------------------------- CONNECT


def handshake(proxy: ProxyURL | None = None) -> ConnectHandshake:
    return ConnectHandshake(proxy or ProxyURL("proxy", 3128), "tunnel.example.com", 3014)


def feed_byte_by_byte(connect: ConnectHandshake, data: bytes) -> list[bool]:
    """What ``receive_data`` said after each byte."""
    return [connect.receive_data(data[i : i + 1]) for i in range(len(data))]


def test_connect_request_bytes() -> None:
    assert handshake().request == (
        b"CONNECT tunnel.example.com:3014 HTTP/1.1\r\nHost: tunnel.example.com:3014\r\n\r\n"
    )
    with_user = handshake(ProxyURL("proxy", 3128, "alice", PASSWORD)).request
    token = base64.b64encode(f"alice:{PASSWORD}".encode())
    assert with_user.endswith(b"\r\nProxy-Authorization: Basic " + token + b"\r\n\r\n")
    ipv6 = ConnectHandshake(ProxyURL("proxy", 3128), "2001:db8::1", 3014).request
    assert ipv6.startswith(b"CONNECT [2001:db8::1]:3014 HTTP/1.1\r\nHost: [2001:db8::1]:3014\r\n")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 Connection established\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nProxy-Agent: tinyproxy\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 Tunnel\r\n\r\n",
    ],
)
def test_a_2xx_answer_opens_the_tunnel_on_its_last_byte(answer: bytes) -> None:
    said = feed_byte_by_byte(handshake(), answer)
    assert said == [False] * (len(answer) - 1) + [True]


def test_the_whole_answer_at_once() -> None:
    assert handshake().receive_data(b"HTTP/1.1 200 Connection established\r\n\r\n") is True


def test_bytes_after_the_answer_are_refused() -> None:
    with pytest.raises(ProxyError, match="sent data before the tunnel"):
        handshake().receive_data(b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01")


@pytest.mark.parametrize(
    ("proxy", "answer", "message"),
    [
        (
            ProxyURL("proxy", 3128, "alice", "s3cret"),
            b"HTTP/1.0 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="x"\r\nContent-Length: 5\r\n\r\nno!!!',
            "proxy proxy:3128 refused CONNECT to tunnel.example.com:3014: "
            "407 Proxy Authentication Required (check the proxy user and password)",
        ),
        (
            ProxyURL("proxy", 3128),
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            "proxy proxy:3128 refused CONNECT to tunnel.example.com:3014: "
            "407 Proxy Authentication Required "
            "(the proxy needs a user and password: http://[USER:PASSWORD@]HOST[:PORT])",
        ),
        (
            ProxyURL("proxy", 3128, "alice", "s3cret"),
            b"HTTP/1.1 401 Unauthorized\r\n\r\n",  # tinyproxy, for wrong credentials
            "proxy proxy:3128 refused CONNECT to tunnel.example.com:3014: "
            "401 Unauthorized (check the proxy user and password)",
        ),
        (
            ProxyURL("proxy", 3128),
            b"HTTP/1.1 403 Access violation\r\nConnection: close\r\n\r\n",
            "proxy proxy:3128 refused CONNECT to tunnel.example.com:3014: "
            "403 Access violation (the proxy does not allow tunnels to this server and port)",
        ),
        (
            ProxyURL("proxy", 3128),
            b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
            "proxy proxy:3128 refused CONNECT to tunnel.example.com:3014: 502 Bad Gateway",
        ),
    ],
)
def test_refusals_say_what_to_do(proxy: ProxyURL, answer: bytes, message: str) -> None:
    connect = handshake(proxy)
    head = answer.index(b"\r\n\r\n") + 3
    assert feed_byte_by_byte(connect, answer[:head]) == [False] * head
    with pytest.raises(ProxyError) as caught:
        connect.receive_data(answer[head:])
    assert str(caught.value) == message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 200 Connection established\r\n",  # then closed
        b"",  # closed without a word
    ],
)
def test_no_valid_answer(answer: bytes) -> None:
    def answer_then_close() -> None:
        connect = handshake()
        feed_byte_by_byte(connect, answer)
        connect.receive_data(b"")

    with pytest.raises(ProxyError, match=r"^the proxy proxy:3128 gave no valid answer to CONNECT"):
        answer_then_close()

"""Reaching the server through an HTTP CONNECT proxy, without I/O.

Which proxy applies follows curl, so a client behaves like the other tools on the machine:
the configured URL, else ``https_proxy``/``HTTPS_PROXY`` (the tunnel is TLS), unless
``no_proxy``/``NO_PROXY`` lists the server. The CONNECT exchange itself is parsed by h11;
``petit.transport`` moves the bytes. The proxy password never appears in a repr or a message.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11

from petit.errors import ConfigError, PetitError

CONFIG_SOURCE = "[client] proxy"
PROXY_FORM = "http://[USER:PASSWORD@]HOST[:PORT]"
DEFAULT_PORT = 80  # the http:// scheme's port (as urllib, requests and Go; curl assumes 1080)


class ProxyError(PetitError):
    """The proxy refused the CONNECT or did not answer it with HTTP."""


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """An HTTP proxy to tunnel through."""

    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    def __str__(self) -> str:
        return authority(self.host, self.port)

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic), or None when the URL has no user."""
        if not self.username and not self.password:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


def authority(host: str, port: int) -> str:
    """``host:port`` as HTTP writes it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_proxy_url(value: str, *, source: str) -> ProxyURL:
    """Parse ``http://[user:password@]host[:port]``; a bare ``host:port`` means http, like curl.

    ``source`` names where the value came from; messages never repeat the URL (it may hold
    a password).
    """
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # a bad IPv6 literal, a port out of range or not a number
        raise _invalid_url(source) from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ConfigError(
            f"{source}: https:// proxies are not supported; use an http:// proxy ({PROXY_FORM}),"
            " the tunnel through it is TLS anyway"
        )
    if scheme != "http":
        raise ConfigError(f"{source}: {scheme}:// proxies are not supported; use {PROXY_FORM}")
    if port == 0 or not parts.hostname:
        raise _invalid_url(source)
    return ProxyURL(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def _invalid_url(source: str) -> ConfigError:
    return ConfigError(f"{source}: not a valid proxy URL; expected {PROXY_FORM}")


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether a ``no_proxy`` list sends ``host`` direct.

    Entries are ``*`` (everything), a host name that also covers its subdomains (a leading
    dot changes nothing), or an IP address or CIDR block matched against IP literals. As in
    curl, names are not resolved.
    """
    name = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().strip("[]").rstrip(".").lower()
        if entry == "*":
            return True
        if not entry:
            continue
        if address is None:
            domain = entry.lstrip(".")
            if name == domain or name.endswith(f".{domain}"):
                return True
            continue
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a name: it cannot match an IP literal
    return False


def select_proxy(host: str, configured: str | None, environ: Mapping[str, str]) -> ProxyURL | None:
    """The proxy to reach ``host`` through, or None to dial it directly.

    Raises:
        ConfigError: the proxy URL that applies is not a usable http:// URL.
    """
    no_proxy = _first_set(environ, "no_proxy", "NO_PROXY")
    if no_proxy is not None and bypasses_proxy(host, no_proxy[1]):
        return None
    if configured is not None:
        return parse_proxy_url(configured, source=CONFIG_SOURCE)
    from_environment = _first_set(environ, "https_proxy", "HTTPS_PROXY")
    if from_environment is None:
        return None
    name, value = from_environment
    return parse_proxy_url(value, source=name)


def _first_set(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` set to something non-blank, as (name, value)."""
    return next(((n, environ[n]) for n in names if environ.get(n, "").strip()), None)


class ConnectHandshake:
    """One CONNECT exchange: send ``request``, then feed the proxy's bytes to ``receive_data``."""

    def __init__(self, proxy: ProxyURL, host: str, port: int) -> None:
        self._proxy = proxy
        self._target = authority(host, port)
        self._http = h11.Connection(h11.CLIENT)
        headers = [("Host", self._target)]
        if proxy.authorization is not None:
            headers.append(("Proxy-Authorization", proxy.authorization))
        self.request: bytes = self._http.send(
            h11.Request(method="CONNECT", target=self._target, headers=headers)
        ) + self._http.send(h11.EndOfMessage())

    def receive_data(self, data: bytes) -> bool:
        """Take bytes from the proxy (b"" once it closed); True once the tunnel is open.

        Raises:
            ProxyError: the proxy refused, closed early, or did not speak HTTP.
        """
        self._http.receive_data(data)
        try:
            while True:
                event = self._http.next_event()
                if event is h11.NEED_DATA:
                    return False
                if isinstance(event, h11.Response):
                    break
                assert isinstance(event, h11.InformationalResponse), event
        except h11.RemoteProtocolError as exc:
            raise ProxyError(
                f"the proxy {self._proxy} gave no valid answer to CONNECT {self._target}: {exc}"
            ) from None
        if self._http.their_state is not h11.SWITCHED_PROTOCOL:  # h11 switches on 2xx only
            status, reason = event.status_code, event.reason.decode("latin-1")
            raise ProxyError(
                f"proxy {self._proxy} refused CONNECT to {self._target}: "
                f"{status} {reason}{self._hint(status)}"
            )
        if self._http.trailing_data[0]:
            # TLS speaks first: until our ClientHello, the server has nothing to send.
            raise ProxyError(
                f"the proxy {self._proxy} sent data before the tunnel to {self._target} was used"
            )
        return True

    def _hint(self, status: int) -> str:
        """What the user can do about a refusal, when the status says."""
        if status in (401, 407):  # tinyproxy answers wrong credentials with 401
            if self._proxy.authorization is None:
                return f" (the proxy needs a user and password: {PROXY_FORM})"
            return " (check the proxy user and password)"
        if status == 403:
            return " (the proxy does not allow tunnels to this server and port)"
        return ""

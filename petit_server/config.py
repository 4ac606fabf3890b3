"""The server's configuration: the ``[server]`` table of its TOML file, read strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from petit.config import LOG_LEVELS, load_toml, root_table

DEFAULT_CONFIG_PATH = Path("~/.petit/config.toml").expanduser()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything ``petit-server start`` needs; paths are absolute."""

    path: Path
    bind_addr: str = "0.0.0.0"  # noqa: S104 - the tunnel endpoint and ingress are public by design
    back_port: int = 3014
    proxy_port: int = 8090
    listen_addr: str = "127.0.0.1"
    listen_port: int = 3016
    listen_allow: tuple[str, ...] = ("127.0.0.1", "::1")
    registry_file: Path
    certificate: Path
    key: Path
    first_port: int = 11081
    tcp_addr: str = "0.0.0.0"  # noqa: S104 - per-registration TCP ports are public by design
    secure_proxy_port: int = 8453
    https_certificate: Path | None = None  # PEM, may hold the intermediate chain after the leaf
    https_key: Path | None = None
    https_chain: Path | None = None
    https_pkcs12: Path | None = None
    https_pkcs12_password: str | None = field(default=None, repr=False)
    https_redirect: bool = False
    require_token: bool = False
    ping_interval: float = 15.0
    handshake_timeout: float = 10.0
    open_timeout: float = 15.0
    shutdown_grace: float = 5.0
    header_timeout: float = 10.0
    response_timeout: float = 60.0
    log_level: str = "info"
    vitae: dict[str, str] = field(default_factory=dict)
    # [server.registry]: where registrations live (file, or a Redis shared by several nodes)
    registry_backend: str = "file"
    registry_url: str = "redis://127.0.0.1:6379/0"
    registry_prefix: str = "petit:"

    @property
    def directory(self) -> Path:
        """The config directory, where lock, pid and log files live."""
        return self.path.parent

    def endpoint_for(self, registration_id: str) -> str:
        """The public URL template filled in for one registration."""
        return self.vitae.get("endpoint", "http://REGID.localhost:8090").replace(
            "REGID", registration_id
        )


def load_server_config(path: Path) -> ServerConfig:
    """Read and validate the server config; ConfigError names the offending key."""
    path = path.expanduser().resolve()
    document = load_toml(path, init_hint=f"petit-server init -c {path}")
    server = root_table(document, "server", path)
    registry = server.table("registry")
    config = ServerConfig(
        path=path,
        bind_addr=server.string("bindAddr", "0.0.0.0"),  # noqa: S104
        back_port=server.port("backPort", 3014),
        proxy_port=server.port("proxyPort", 8090),
        listen_addr=server.string("listenAddr", "127.0.0.1"),
        listen_port=server.port("listenPort", 3016),
        listen_allow=tuple(server.string_list("listenAllow", ["127.0.0.1", "::1"])),
        registry_file=server.path("registryfile", "./registry.json"),
        certificate=server.path("certificate", "./certificates/server.crt"),
        key=server.path("key", "./certificates/server.key"),
        first_port=server.port("firstPort", 11081),
        tcp_addr=server.string("tcpAddr", "0.0.0.0"),  # noqa: S104
        secure_proxy_port=server.port("secureProxyPort", 8453),
        https_certificate=server.optional_path("httpsCertificate"),
        https_key=server.optional_path("httpsKey"),
        https_chain=server.optional_path("httpsChain"),
        https_pkcs12=server.optional_path("httpsPkcs12"),
        https_pkcs12_password=server.optional_string("httpsPkcs12Password"),
        https_redirect=server.boolean("httpsRedirect", False),
        require_token=server.boolean("requireToken", False),
        ping_interval=server.number("pingInterval", 15.0, low=0.05, high=3600),
        handshake_timeout=server.number("handshakeTimeout", 10.0, low=0.1, high=600),
        open_timeout=server.number("openTimeout", 15.0, low=0.1, high=600),
        shutdown_grace=server.number("shutdownGrace", 5.0, low=0, high=600),
        header_timeout=server.number("headerTimeout", 10.0, low=0.1, high=600),
        response_timeout=server.number("responseTimeout", 60.0, low=0.1, high=3600),
        log_level=server.choice("logLevel", "info", LOG_LEVELS),
        vitae=server.scalars("vitae"),
        registry_backend=registry.choice("backend", "file", ("file", "redis")),
        registry_url=registry.string("url", "redis://127.0.0.1:6379/0"),
        registry_prefix=registry.string("prefix", "petit:"),
    )
    registry.finish()
    server.finish()
    return config


def default_config_text(*, hostname: str) -> str:
    """The commented config ``petit-server init`` writes."""
    return f"""\
# petit server configuration. Relative paths are relative to this file's directory.
[server]
# Address the tunnel endpoint and the HTTP ingress listen on.
bindAddr = "0.0.0.0"
# Tunnel endpoint: clients dial wss://{hostname}:3014/petit/v1
backPort = 3014
# HTTP ingress, routed by Host: <ID>.<domain>, <ID>-anything.<domain>, or an alias.
proxyPort = 8090
# Control port: STOP, STATUS, PING, ADDALIAS, DELALIAS, TOKEN, each ended by \\x03. Loopback
# only by default, and only peers in listenAllow are answered.
listenAddr = "127.0.0.1"
listenPort = 3016
listenAllow = ["127.0.0.1", "::1"]
# Registrations (IDs, public keys, ports, aliases) and hashed enrollment tokens, written
# atomically.
registryfile = "./registry.json"
# TLS certificate (may include the intermediate chain) and key of the tunnel endpoint.
certificate = "./certificates/server.crt"
key = "./certificates/server.key"
# First raw TCP port handed to a registration, and the address those ports listen on.
# A registration's port listens only while its client is connected.
firstPort = 11081
tcpAddr = "0.0.0.0"
# HTTPS ingress, enabled when a certificate is configured: a PEM certificate (the
# intermediate chain may follow the leaf, or go in httpsChain) and unencrypted key, or a
# PKCS#12 file. Files replaced on disk are picked up by the next connection, no restart; a
# replacement that does not load is logged and the previous certificate stays in use.
secureProxyPort = 8453
# httpsCertificate = "./certificates/public.crt"
# httpsKey = "./certificates/public.key"
# httpsChain = "./certificates/chain.crt"
# httpsPkcs12 = "./certificates/public.p12"
# httpsPkcs12Password = "secret"
# Answer plain HTTP with a redirect to HTTPS (when HTTPS is enabled).
httpsRedirect = false
# Require a one-time enrollment token (petit-server token create) to register.
requireToken = false
# Seconds between keepalive pings; a tunnel silent for two intervals is dropped.
pingInterval = 15
# Seconds a public request waits for the client to reach its local service.
openTimeout = 15
# Seconds a public request waits for the private service's response head (then 504).
responseTimeout = 60
# Seconds in-flight requests get to finish on STOP, SIGINT or SIGTERM.
shutdownGrace = 5
# debug, info, warning or error
logLevel = "info"

[server.vitae]
environment = "local"
# Public URL of a registration; REGID is replaced by its ID.
endpoint = "http://REGID.localhost:8090"

[server.registry]
# "file" (registryfile above) or "redis": a redis-server shared by several server nodes.
backend = "file"
# url = "redis://127.0.0.1:6379/0"
# prefix = "petit:"
"""

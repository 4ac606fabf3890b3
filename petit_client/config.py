"""The client's configuration: ``[client]``, ``[client.local]`` and ``[client.vitae]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from petit.config import Table, load_toml, root_table
from petit.errors import ConfigError
from petit.logs import LogSettings, log_keys, read_log_settings
from petit.proxy import parse_proxy_url
from petit.transport import ServerAddress

DEFAULT_CONFIG_PATH = Path("~/.petit/config.toml").expanduser()


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalTarget:
    """The private service a registration's streams are spliced to."""

    host: str = "localhost"
    port: int = 8080
    tls: bool = False
    tls_verify: bool = True  # only an explicit tlsVerify = false accepts any certificate
    ca: Path | None = None  # None: the system trust store
    # What the client does with the raw TCP port's bytes towards a TLS service: pass them
    # untouched (the caller speaks TLS with the service itself), or wrap them in its TLS as
    # it does HTTP requests (the caller speaks plain).
    tcp_tls: str = "passthrough"

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({'tls' if self.tls else 'plain'})"


def read_local_target(table: Table, defaults: LocalTarget) -> LocalTarget:
    """A ``[local]`` table (the client's, or a tenant's over the client's), finished."""
    target = LocalTarget(
        host=table.string("host", defaults.host),
        port=table.integer("port", defaults.port, low=1, high=65535),
        tls=table.boolean("tls", defaults.tls),
        tls_verify=table.boolean("tlsVerify", defaults.tls_verify),
        ca=table.optional_path("ca") or defaults.ca,
        tcp_tls=table.choice("tcpTls", defaults.tcp_tls, ("passthrough", "terminate")),
    )
    table.finish()
    return target


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Everything the client needs; paths are absolute."""

    path: Path
    server: ServerAddress  # the first of ``servers``
    ca: Path | None  # None: the system trust store
    servers: tuple[ServerAddress, ...] = ()  # empty: just ``server``
    server_sessions: int = 0  # sessions kept, each to another server; 0: one per server
    listen_addr: str = "127.0.0.1"
    listen_port: int = 3015
    status_port: int = 3017  # JSON status over HTTP, on 127.0.0.1 only
    ping_interval: float = 15.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    reconnect_max_delay: float = 5.0
    loopback_interval: float = 300.0  # seconds between self-checks of the public URLs; 0: off
    log: LogSettings  # logLevel, logFile, auditFile, logMaxBytes, logBackups, logFormat
    proxy: str | None = field(default=None, repr=False)  # may hold credentials
    local: LocalTarget = field(default_factory=LocalTarget)
    vitae: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        """The config directory: tenants, keys, lock, pid and logs live here."""
        return self.path.parent

    @property
    def tunnel_servers(self) -> tuple[ServerAddress, ...]:
        """Every server the client may keep a session to, in the configured order."""
        return self.servers or (self.server,)

    @property
    def session_count(self) -> int:
        """How many sessions the client keeps at once, each to a different server."""
        return self.server_sessions or len(self.tunnel_servers)


def _checked_proxy(value: str | None) -> str | None:
    """Refuse a malformed proxy URL when the config loads, not at the first dial."""
    if value is not None:
        parse_proxy_url(value, source="client.proxy")
    return value


def load_client_config(path: Path) -> ClientConfig:
    """Read and validate the client config; ConfigError names the offending key."""
    path = path.expanduser().resolve()
    document = load_toml(path, init_hint=f"petit-client init -c {path}")
    client = root_table(document, "client", path)
    single = ServerAddress(client.string("host", "localhost"), client.port("backPort", 3014))
    servers = tuple(
        parse_server_address(value, default_port=single.port, key="client.servers")
        for value in client.string_list("servers", [])
    )
    server_sessions = client.integer("serverSessions", 0, low=0, high=max(len(servers), 1))
    config = ClientConfig(
        path=path,
        server=servers[0] if servers else single,
        servers=servers,
        server_sessions=server_sessions,
        ca=client.optional_path("ca"),
        listen_addr=client.addresses("listenAddr", "127.0.0.1"),
        listen_port=client.port("listenPort", 3015),
        status_port=client.port("statusPort", 3017),
        ping_interval=client.number("pingInterval", 15.0, low=0.05, high=3600),
        handshake_timeout=client.number("handshakeTimeout", 10.0, low=0.1, high=600),
        connect_timeout=client.number("connectTimeout", 10.0, low=0.1, high=600),
        reconnect_max_delay=client.number("reconnectMaxDelay", 5.0, low=0.1, high=3600),
        loopback_interval=client.number("loopbackInterval", 300.0, low=0, high=86_400),
        log=read_log_settings(client, "client"),
        proxy=_checked_proxy(client.optional_string("proxy")),
        local=read_local_target(client.table("local"), LocalTarget()),
        vitae=client.scalars("vitae"),
    )
    client.finish()
    return config


def parse_server_address(value: str, *, default_port: int, key: str) -> ServerAddress:
    """``HOST``, ``HOST:PORT`` or ``[IPv6]:PORT``; ConfigError names ``key``."""
    host, port = value, str(default_port)
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return ServerAddress(host, int(port))


def config_document(config: ClientConfig) -> dict[str, object]:
    """The effective config in the file's own layout, safe to print: no proxy password."""
    client: dict[str, object] = {
        "host": config.server.host,
        "backPort": config.server.port,
        **({"servers": [str(s) for s in config.servers]} if config.servers else {}),
        "serverSessions": config.server_sessions,
        **({"ca": str(config.ca)} if config.ca else {}),
        "listenAddr": config.listen_addr,
        "listenPort": config.listen_port,
        "statusPort": config.status_port,
        "pingInterval": config.ping_interval,
        "handshakeTimeout": config.handshake_timeout,
        "connectTimeout": config.connect_timeout,
        "reconnectMaxDelay": config.reconnect_max_delay,
        "loopbackInterval": config.loopback_interval,
        **log_keys(config.log),
        **({"proxy": mask_password(config.proxy)} if config.proxy else {}),
        "vitae": dict(config.vitae),
        "local": {
            "host": config.local.host,
            "port": config.local.port,
            "tls": config.local.tls,
            "tlsVerify": config.local.tls_verify,
            "tcpTls": config.local.tcp_tls,
            **({"ca": str(config.local.ca)} if config.local.ca else {}),
        },
    }
    return {"client": client}


def mask_password(url: str) -> str:
    """``url`` with the password of its user part replaced by ``****``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_part, _, host_part = parts.netloc.rpartition("@")
    user = user_part.partition(":")[0]
    return parts._replace(netloc=f"{user}:****@{host_part}").geturl()


def default_config_text(*, host: str, port: int, ca: str | None) -> str:
    """The commented config ``petit-client init`` writes (the original's layout)."""
    ca_line = f'ca = "{ca}"' if ca else '# ca = "./ca.crt"'
    return f"""\
# petit client configuration. Relative paths are relative to this file's directory.
[client]
# The petit server's tunnel endpoint: wss://host:backPort/petit/v1
host = "{host}"
backPort = {port}
# CA that signed the server certificate (pinned at init); without it the system
# trust store is used. Verification is never off.
{ca_line}
# Control port (STOP, STATUS, PING, LOG <level>, RELOAD, each ended by \\x03), loopback only.
listenAddr = "127.0.0.1"
listenPort = 3015
# What status shows, as JSON over HTTP: curl http://127.0.0.1:3017/status (127.0.0.1 only).
statusPort = 3017
# Seconds between keepalive pings; a tunnel silent for two intervals is re-dialled.
pingInterval = 15
# Longest wait between reconnection attempts, in seconds.
reconnectMaxDelay = 5
# Seconds between checks of each registration's public URL through the server
# (GET <endpoint>/-g2c-intercept, answered by this client): shown by status; 0 turns it off.
loopbackInterval = 300
# debug, info, warning or error (petit-client log LEVEL changes it while running)
logLevel = "info"
# JSON lines, rotated at logMaxBytes keeping logBackups old files; registrations,
# unregistrations and evictions also go to auditFile.
logFile = "./logs/client.log"
auditFile = "./logs/client-audit.log"
# Reach the server through an HTTP CONNECT proxy (HTTPS_PROXY is used when this is unset).
# proxy = "http://user:password@proxy.example.com:3128"

[client.vitae]
brand = "ce"

# The private service the server's callers reach. With tls = true its certificate is
# verified against the system trust store, or against the CA pinned with ca; set
# tlsVerify = false only for a self-signed local service you trust.
[client.local]
host = "localhost"
port = 8080
tls = false
tlsVerify = true
# ca = "./local-ca.crt"
# With tls = true, the raw TCP port's bytes pass untouched ("passthrough": callers speak TLS
# with the service themselves) or the client wraps them in its TLS as it does HTTP requests
# ("terminate": callers speak plain).
tcpTls = "passthrough"
"""

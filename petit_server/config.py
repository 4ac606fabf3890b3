"""The server's configuration: the ``[server]`` table of its TOML file, read strictly."""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from petit.auth import MAX_WORKERS  # each holds a session per client: docs/many-cores.md
from petit.config import Table, load_toml, root_table
from petit.control import parse_networks
from petit.errors import ConfigError
from petit.logs import LogSettings, read_log_settings
from petit_server.policy import Policy, PolicyError, default_policy

DEFAULT_CONFIG_PATH = Path("~/.petit/config.toml").expanduser()
MIN_ADMIN_TOKEN = 16  # characters; init writes 43 (32 random bytes)
MIN_CLUSTER_SECRET = 16  # characters of the shared cluster secret
DEFAULT_REGISTRY_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REGISTRY_PREFIX = "petit:"  # of every Redis key petit writes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """``[server.cluster]``: this node's place among several server nodes (on when
    ``redisUrl`` is set)."""

    redis_url: str = field(repr=False)  # may hold a password
    node_id: str
    internal_addr: str
    internal_port: int
    advertise_addr: str  # where the other nodes reach internal_port
    secret: str = field(repr=False)
    heartbeat_interval: float = 1.0
    node_timeout: float = 5.0
    key_prefix: str | None = None  # of the node directory's keys; None: the registry's prefix


@dataclass(frozen=True, slots=True)
class WorkerPlace:
    """Which of the server's worker processes this one is (``petit_server.workers``)."""

    index: int  # 0 .. count - 1
    count: int


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
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For/Forwarded we keep
    proxy_protocol: bool = False  # trusted peers may send a PROXY header (v1/v2) first
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
    require_token: bool = True
    ping_interval: float = 15.0
    handshake_timeout: float = 10.0
    open_timeout: float = 15.0
    shutdown_grace: float = 5.0
    header_timeout: float = 10.0
    response_timeout: float = 60.0
    idle_timeout: float = 75.0
    max_connections: int = 10_000
    max_connections_per_address: int = 256
    max_streams_per_registration: int = 1000
    registrations_per_minute: int = 10
    log: LogSettings  # logLevel, logFile, auditFile, logMaxBytes, logBackups, logFormat
    vitae: dict[str, str] = field(default_factory=dict)
    # [server.registry]: where registrations live (file, or a Redis shared by several nodes)
    registry_backend: str = "file"
    registry_url: str = field(default=DEFAULT_REGISTRY_URL, repr=False)  # has a password?
    registry_prefix: str = DEFAULT_REGISTRY_PREFIX
    # Admin API (petit_server/ops/admin.py): off while admin_token is unset.
    admin_addr: str = "127.0.0.1"
    admin_port: int = 8100
    admin_token: str | None = field(default=None, repr=False)
    cluster: ClusterConfig | None = None  # None: a single node
    workers: int = 1  # processes serving the public ports (petit_server.workers)
    worker: WorkerPlace | None = None  # set in a worker process only, never read from TOML
    default_policy: Policy = field(default_factory=Policy)  # [server.policy]

    @property
    def directory(self) -> Path:
        """The config directory, where lock, pid and log files live."""
        return self.path.parent

    def endpoint_for(self, registration_id: str) -> str:
        """The public URL template filled in for one registration."""
        return self.vitae.get("endpoint", "http://REGID.localhost:8090").replace(
            "REGID", registration_id
        )


def _default_policy(server: Table) -> Policy:
    try:
        return default_policy(server.mapping("policy"))
    except PolicyError as exc:
        raise ConfigError(f"{server.dotted('policy')}: {exc}") from None


def load_server_config(path: Path) -> ServerConfig:
    """Read and validate the server config; ConfigError names the offending key."""
    path = path.expanduser().resolve()
    document = load_toml(path, init_hint=f"petit-server init -c {path}")
    server = root_table(document, "server", path)
    registry = server.table("registry")
    backend = registry.choice("backend", "file", ("file", "redis"))
    registry_url = registry.string("url", DEFAULT_REGISTRY_URL)
    config = ServerConfig(
        path=path,
        bind_addr=server.addresses("bindAddr", "0.0.0.0"),  # noqa: S104
        back_port=server.port("backPort", 3014),
        proxy_port=server.port("proxyPort", 8090),
        listen_addr=server.addresses("listenAddr", "127.0.0.1"),
        listen_port=server.port("listenPort", 3016),
        listen_allow=tuple(server.string_list("listenAllow", ["127.0.0.1", "::1"])),
        trusted_proxies=_checked_networks(server.string_list("trustedProxies", [])),
        proxy_protocol=server.boolean("proxyProtocol", False),
        registry_file=server.path("registryfile", "./registry.json"),
        certificate=server.path("certificate", "./certificates/server.crt"),
        key=server.path("key", "./certificates/server.key"),
        first_port=server.port("firstPort", 11081),
        tcp_addr=server.addresses("tcpAddr", "0.0.0.0"),  # noqa: S104
        secure_proxy_port=server.port("secureProxyPort", 8453),
        https_certificate=server.optional_path("httpsCertificate"),
        https_key=server.optional_path("httpsKey"),
        https_chain=server.optional_path("httpsChain"),
        https_pkcs12=server.optional_path("httpsPkcs12"),
        https_pkcs12_password=server.optional_string("httpsPkcs12Password"),
        https_redirect=server.boolean("httpsRedirect", False),
        require_token=server.boolean("requireToken", True),
        ping_interval=server.number("pingInterval", 15.0, low=0.05, high=3600),
        handshake_timeout=server.number("handshakeTimeout", 10.0, low=0.1, high=600),
        open_timeout=server.number("openTimeout", 15.0, low=0.1, high=600),
        shutdown_grace=server.number("shutdownGrace", 5.0, low=0, high=600),
        header_timeout=server.number("headerTimeout", 10.0, low=0.1, high=600),
        response_timeout=server.number("responseTimeout", 60.0, low=0.1, high=3600),
        idle_timeout=server.number("idleTimeout", 75.0, low=0.1, high=86400),
        max_connections=server.integer("maxConnections", 10_000, low=1, high=10_000_000),
        max_connections_per_address=server.integer(
            "maxConnectionsPerAddress", 256, low=1, high=10_000_000
        ),
        max_streams_per_registration=server.integer(
            "maxStreamsPerRegistration", 1000, low=1, high=1_000_000
        ),
        registrations_per_minute=server.integer(
            "registrationsPerMinute", 10, low=1, high=1_000_000
        ),
        log=read_log_settings(server, "server"),
        vitae=server.scalars("vitae"),
        registry_backend=backend,
        registry_url=registry_url,
        registry_prefix=registry.string("prefix", DEFAULT_REGISTRY_PREFIX),
        # Admin API
        admin_addr=server.addresses("adminAddr", "127.0.0.1"),
        admin_port=server.port("adminPort", 8100),
        admin_token=_admin_token(server.optional_string("adminToken")),
        cluster=read_cluster(server.table("cluster"), registry_url if backend == "redis" else None),
        workers=server.integer("workers", 1, low=1, high=MAX_WORKERS),
        default_policy=_default_policy(server),
    )
    registry.finish()
    server.finish()
    if config.workers > 1 and backend != "redis":
        raise ConfigError(
            f"server.workers: {config.workers} workers share their registrations through "
            'Redis: set [server.registry] backend = "redis" (scripts/bootstrap redis), '
            "or workers = 1"
        )
    if config.workers > 1 and config.cluster is not None:
        raise ConfigError(
            "server.workers: workers on a cluster node are not supported yet: remove "
            "[server.cluster], or run one node per core (docs/many-cores.md)"
        )
    return config


def _admin_token(token: str | None) -> str | None:
    if token is not None and len(token) < MIN_ADMIN_TOKEN:
        raise ConfigError(
            f"server.adminToken: expected at least {MIN_ADMIN_TOKEN} characters "
            "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
        )
    return token


def read_cluster(table: Table, registry_url: str | None) -> ClusterConfig | None:
    """``[server.cluster]``, checked whole even when off. On when ``redisUrl`` is set, or,
    with a Redis registry (``registry_url``), when ``secret`` is: the node directory then
    lives in the registry's Redis, so one URL serves both."""
    secret = table.optional_string("secret")
    redis_url = table.optional_string("redisUrl")
    if redis_url is None and secret is not None:
        redis_url = registry_url
    node_id = table.optional_string("nodeId")
    internal_addr = table.string("internalAddr", "0.0.0.0")  # noqa: S104 - peers on other hosts
    internal_port = table.port("internalPort", 3018)
    advertise_addr = table.optional_string("advertiseAddr")
    heartbeat = table.number("heartbeatInterval", 1.0, low=0.05, high=60)
    timeout = table.number("nodeTimeout", 5.0, low=0.2, high=600)
    table.finish()
    if redis_url is None:
        return None
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"server.cluster.redisUrl: expected a redis://, rediss:// or unix:// URL, "
            f"got {redis_url.split('@')[-1]!r}"
        )
    if secret is None or len(secret) < MIN_CLUSTER_SECRET:
        raise ConfigError(
            f"server.cluster.secret: expected the nodes' shared secret, at least "
            f"{MIN_CLUSTER_SECRET} characters (e.g. openssl rand -hex 32)"
        )
    if timeout < 2 * heartbeat:
        raise ConfigError(
            f"server.cluster.nodeTimeout: expected at least twice heartbeatInterval "
            f"({2 * heartbeat:g}), got {timeout:g}"
        )
    if advertise_addr is None:
        advertise_addr = socket.gethostname() if _unspecified(internal_addr) else internal_addr
    return ClusterConfig(
        redis_url=redis_url,
        node_id=node_id or f"{socket.gethostname()}-{internal_port}",
        internal_addr=internal_addr,
        internal_port=internal_port,
        advertise_addr=advertise_addr,
        secret=secret,
        heartbeat_interval=heartbeat,
        node_timeout=timeout,
    )


def _unspecified(address: str) -> bool:
    """True for a wildcard bind address (0.0.0.0, ::), which peers cannot dial."""
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def default_config_text(
    *,
    hostname: str,
    admin_token: str | None = None,
    listen_addr: str = "127.0.0.1",
    admin_addr: str = "127.0.0.1",
) -> str:
    """The commented config ``petit-server init`` writes (with a fresh admin token, and the
    addresses of the control port and the admin API it was given)."""
    token_line = "# adminToken = " if admin_token is None else "adminToken = "
    # The addresses are written with json.dumps: a JSON string is a valid TOML string.
    return f"""\
# petit server configuration. Relative paths are relative to this file's directory.
[server]
# Address the tunnel endpoint and the HTTP ingress listen on: one address, "*" for every
# IPv4 and IPv6 address, or a list (["0.0.0.0", "::"]); the same for every *Addr key.
bindAddr = "0.0.0.0"
# Tunnel endpoint: clients dial wss://{hostname}:3014/petit/v1
backPort = 3014
# HTTP ingress, routed by Host: <ID>.<domain>, <ID>-anything.<domain>, or an alias.
proxyPort = 8090
# Control port: STOP, STATUS, PING, LOG, ADDALIAS, DELALIAS, TOKEN, each ended by \\x03. Loopback
# only by default, and only peers in listenAllow are answered.
listenAddr = {json.dumps(listen_addr)}
listenPort = 3016
listenAllow = ["127.0.0.1", "::1"]
# Load balancers in front of the ingress (CIDRs): their X-Forwarded-For is kept and extended.
# Anyone else's X-Forwarded-*, Forwarded, X-Real-IP and True-Client-IP are replaced by ours.
trustedProxies = []
# With true, a trusted load balancer that passes TCP through (L4) may start each connection
# with a PROXY protocol header (v1 or v2) naming the caller, on the HTTP and HTTPS ingress.
proxyProtocol = false
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
# Require a one-time enrollment token (petit-server token create) to register; false lets
# anyone who reaches the tunnel endpoint register.
requireToken = true
# Seconds between keepalive pings; a tunnel silent for two intervals is dropped.
pingInterval = 15
# Seconds a public request waits for the client to reach its local service.
openTimeout = 15
# Seconds a public request waits for the private service's response head (then 504).
responseTimeout = 60
# Seconds a public keep-alive connection may wait for its next request.
idleTimeout = 75
# Public connections (HTTP, HTTPS and the raw TCP ports together) open at once, in all and
# from one address; past either a new one is refused at once (HTTP: 503; TCP: closed).
maxConnections = 10000
maxConnectionsPerAddress = 256
# Streams (public connections, HTTP or raw TCP) one registration may have open at once, over
# all its sessions; the next caller gets 503.
maxStreamsPerRegistration = 1000
# Registrations one source address may make per minute (a burst of as many, then steadily).
registrationsPerMinute = 10
# Seconds in-flight requests get to finish on STOP, SIGINT or SIGTERM.
shutdownGrace = 5
# Processes serving the public ports, one per core to use; more than 1 needs the Redis
# registry below (docs/many-cores.md).
workers = 1
# debug, info, warning or error (petit-server log LEVEL changes it while running)
logLevel = "info"
# JSON lines, rotated at logMaxBytes keeping logBackups old files; changes to
# registrations, aliases and tokens also go to auditFile.
logFile = "./logs/server.log"
auditFile = "./logs/audit.log"
# Admin API: JSON, /metrics and /dashboard, for requests bearing "Authorization: Bearer
# <adminToken>". Loopback only by default; off while adminToken is unset.
adminAddr = {json.dumps(admin_addr)}
adminPort = 8100
{token_line}"{admin_token or "a long random secret"}"

[server.vitae]
environment = "local"
# Public URL of a registration; REGID is replaced by its ID.
endpoint = "http://REGID.localhost:8090"

[server.policy]
# Limits every registration gets unless its own policy sets the key (petit-server policy ID
# KEY=VALUE): maxRequestBody, allow, deny, rateLimit, rateBurst, bandwidth. None by default.
# allow = ["10.0.0.0/8"]
# rateLimit = 50

[server.registry]
# "file" (registryfile above) or "redis": a redis-server shared by several server nodes.
backend = "file"
# url = "redis://127.0.0.1:6379/0"
# prefix = "petit:"
"""


def _checked_networks(entries: list[str]) -> tuple[str, ...]:
    """``trustedProxies`` as given, each checked to be an IP address or a CIDR network."""
    parse_networks(entries, "[server] trustedProxies")
    return tuple(entry.strip() for entry in entries)

"""Server and client configs: the written defaults load, and every mistake is named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from petit.errors import ConfigError
from petit.logs import LogSettings
from petit.transport import ServerAddress
from petit_client.config import (
    ClientConfig,
    LocalTarget,
    default_config_text as client_config_text,
    load_client_config,
)
from petit_server.config import (
    ServerConfig,
    default_config_text as server_config_text,
    load_server_config,
)


def write(directory: Path, text: str) -> Path:
    path = directory / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def server_text() -> str:
    return server_config_text(hostname="tunnel.example.com")


def client_text() -> str:
    return client_config_text(host="tunnel.example.com", port=3014, ca="./ca.crt")


def edited(text: str, after: str, line: str) -> str:
    """``text`` with ``line`` inserted right after the line ``after`` (a table header)."""
    assert after + "\n" in text
    return text.replace(after + "\n", f"{after}\n{line}\n", 1)


def replaced(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# The defaults ``init`` writes.


def test_default_server_config_loads_as_the_documented_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, server_text())
    assert load_server_config(path) == ServerConfig(
        path=path,
        registry_file=tmp_path / "registry.json",
        certificate=tmp_path / "certificates" / "server.crt",
        key=tmp_path / "certificates" / "server.key",
        log=LogSettings(file=tmp_path / "logs/server.log", audit_file=tmp_path / "logs/audit.log"),
        vitae={"environment": "local", "endpoint": "http://REGID.localhost:8090"},
    )


def test_a_new_install_requires_an_enrollment_token(tmp_path: Path) -> None:
    """Secure by default: what init writes, and a config without the key, both require one."""
    assert load_server_config(write(tmp_path, server_text())).require_token
    assert load_server_config(write(tmp_path, "[server]\n")).require_token


@pytest.mark.parametrize("ca", ["./ca.crt", None])
def test_default_client_config_loads_as_the_documented_defaults(
    tmp_path: Path, ca: str | None
) -> None:
    path = write(tmp_path, client_config_text(host="tunnel.example.com", port=4014, ca=ca))
    assert load_client_config(path) == ClientConfig(
        path=path,
        server=ServerAddress("tunnel.example.com", 4014),
        ca=None if ca is None else tmp_path / "ca.crt",
        local=LocalTarget(host="localhost", port=8080, tls=False),
        log=LogSettings(
            file=tmp_path / "logs/client.log", audit_file=tmp_path / "logs/client-audit.log"
        ),
        vitae={"brand": "ce"},
    )


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    text = replaced(server_text(), 'registryfile = "./registry.json"', 'registryfile = "../r.json"')
    (tmp_path / "etc").mkdir()
    config = load_server_config(write(tmp_path / "etc", text))
    assert config.registry_file.resolve() == (tmp_path / "r.json").resolve()


# Mistakes.


@pytest.mark.parametrize(
    ("text", "dotted_key"),
    [
        (edited(server_text(), "[server]", "backport = 3014"), "server.backport"),
        (edited(server_text(), "[server]", "[server.limits]\nx = 1"), "server.limits"),
    ],
)
def test_unknown_server_key_is_named(tmp_path: Path, text: str, dotted_key: str) -> None:
    with pytest.raises(ConfigError, match=dotted_key.replace(".", r"\.")):
        load_server_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "dotted_key"),
    [
        (edited(client_text(), "[client]", "hots = 1"), "client.hots"),
        (edited(client_text(), "[client.local]", "tsl = true"), "client.local.tsl"),
    ],
)
def test_unknown_client_key_is_named(tmp_path: Path, text: str, dotted_key: str) -> None:
    with pytest.raises(ConfigError, match=dotted_key.replace(".", r"\.")):
        load_client_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("old", "new", "dotted_key"),
    [
        ("backPort = 3014", 'backPort = "x"', "server.backPort"),
        ("backPort = 3014", "backPort = 70000", "server.backPort"),
        ("backPort = 3014", "backPort = true", "server.backPort"),
        ("pingInterval = 15", "pingInterval = -1", "server.pingInterval"),
        ("pingInterval = 15", 'pingInterval = "15"', "server.pingInterval"),
        ('logLevel = "info"', 'logLevel = "verbose"', "server.logLevel"),
        ('listenAllow = ["127.0.0.1", "::1"]', 'listenAllow = "127.0.0.1"', "server.listenAllow"),
        ('bindAddr = "0.0.0.0"', 'bindAddr = ""', "server.bindAddr"),
        ('environment = "local"', "environment = [1]", "server.vitae"),
    ],
)
def test_wrong_server_value_names_the_key(
    tmp_path: Path, old: str, new: str, dotted_key: str
) -> None:
    with pytest.raises(ConfigError, match=dotted_key.replace(".", r"\.") + ":"):
        load_server_config(write(tmp_path, replaced(server_text(), old, new)))


@pytest.mark.parametrize(
    ("old", "new", "dotted_key"),
    [
        ("backPort = 3014", 'backPort = "x"', "client.backPort"),
        ("pingInterval = 15", "pingInterval = -1", "client.pingInterval"),
        ("port = 8080", "port = 0", "client.local.port"),
        ("tls = false", 'tls = "no"', "client.local.tls"),
        ('host = "localhost"', "host = 1", "client.local.host"),
        ('ca = "./ca.crt"', "ca = 1", "client.ca"),
    ],
)
def test_wrong_client_value_names_the_key(
    tmp_path: Path, old: str, new: str, dotted_key: str
) -> None:
    with pytest.raises(ConfigError, match=dotted_key.replace(".", r"\.") + ":"):
        load_client_config(write(tmp_path, replaced(client_text(), old, new)))


def test_wrong_table_type_names_the_key(tmp_path: Path) -> None:
    text = edited(
        replaced(client_text(), "[client.local]", "[client.other]"), "[client]", "local = 1"
    )
    with pytest.raises(ConfigError, match=r"client\.local:"):
        load_client_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "load"),
    [(server_text(), load_server_config), (client_text(), load_client_config)],
)
def test_invalid_toml_names_the_file(
    tmp_path: Path, text: str, load: Callable[[Path], object]
) -> None:
    path = write(tmp_path, text + "\nthis is = = not toml\n")
    with pytest.raises(ConfigError, match="not valid TOML") as error:
        load(path)
    assert str(path) in str(error.value)


def test_missing_server_config_says_to_run_init(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as error:
        load_server_config(path)
    assert f'run "petit-server init -c {path}" first' in str(error.value)


def test_missing_client_config_says_to_run_init(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as error:
        load_client_config(path)
    assert f'run "petit-client init -c {path}" first' in str(error.value)


def test_config_without_its_own_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, client_text())  # a client file given to the server
    with pytest.raises(ConfigError, match=r"no \[server\] table"):
        load_server_config(path)


def test_a_trusted_proxy_that_is_no_network_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, server_text().replace("trustedProxies = []", 'trustedProxies = ["lb"]'))
    with pytest.raises(
        ConfigError,
        match=r"\[server\] trustedProxies entry 'lb' is not an IP address or CIDR network",
    ):
        load_server_config(path)


@pytest.mark.parametrize(("text", "table"), [("[sever]\n", "sever"), ("[clinet]\n", "clinet")])
def test_a_misspelled_table_is_an_error_naming_it(tmp_path: Path, text: str, table: str) -> None:
    """A misspelled table would leave every setting at its default without a word."""
    server = write(tmp_path, server_text() + text)
    with pytest.raises(ConfigError, match=rf"unknown table \[{table}\]; petit reads only"):
        load_server_config(server)
    client = write(tmp_path, client_text() + text)
    with pytest.raises(ConfigError, match=rf"unknown table \[{table}\]"):
        load_client_config(client)


def test_client_and_server_may_share_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, server_text() + "\n" + client_text())
    assert load_server_config(path).back_port == 3014
    assert load_client_config(path).server == ServerAddress("tunnel.example.com", 3014)


def test_client_config_refuses_a_malformed_proxy_url_at_load(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[client]\nproxy = "socks5://127.0.0.1:1080"\n')
    with pytest.raises(ConfigError, match=r"client\.proxy"):
        load_client_config(config)


# Several server nodes: [server.cluster] and the client's servers.

CLUSTER = '[server.cluster]\nredisUrl = "redis://10.0.0.9:6379/0"\nsecret = "' + "s" * 32 + '"\n'


def cluster_text(line: str) -> str:
    """A server config in cluster mode with ``line`` added, or replacing the key it sets."""
    key = line.split(" = ")[0]
    kept = [old for old in CLUSTER.splitlines() if not old.startswith(key + " = ")]
    return "[server]\n" + "\n".join([*kept, line]) + "\n"


def test_cluster_is_off_unless_redis_url_is_set(tmp_path: Path) -> None:
    text = "[server]\n[server.cluster]\ninternalPort = 4000\n"
    assert load_server_config(write(tmp_path, text)).cluster is None


def test_cluster_redis_url_defaults_to_the_redis_registry(tmp_path: Path) -> None:
    secret = 'secret = "' + "s" * 32 + '"\n'
    registry = '[server.registry]\nbackend = "redis"\nurl = "redis://10.0.0.7:6379/1"\n'
    text = "[server]\n" + registry + "[server.cluster]\n" + secret
    cluster = load_server_config(write(tmp_path, text)).cluster
    assert cluster is not None
    assert cluster.redis_url == "redis://10.0.0.7:6379/1"
    # Its own redisUrl wins; with the file registry, a secret alone turns nothing on.
    own = load_server_config(write(tmp_path, "[server]\n" + registry + CLUSTER)).cluster
    assert own is not None
    assert own.redis_url == "redis://10.0.0.9:6379/0"
    text = "[server]\n[server.cluster]\n" + secret
    assert load_server_config(write(tmp_path, text)).cluster is None


def test_cluster_defaults(tmp_path: Path) -> None:
    cluster = load_server_config(write(tmp_path, "[server]\n" + CLUSTER)).cluster
    assert cluster is not None
    assert cluster.redis_url == "redis://10.0.0.9:6379/0"
    assert (cluster.internal_addr, cluster.internal_port) == ("0.0.0.0", 3018)
    assert cluster.node_id.endswith("-3018")
    assert cluster.advertise_addr not in ("", "0.0.0.0")  # the hostname: peers can dial it
    assert (cluster.heartbeat_interval, cluster.node_timeout) == (1.0, 5.0)
    assert "s" * 32 not in repr(cluster)
    assert "10.0.0.9" not in repr(cluster)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('secret = "short"', r"server\.cluster\.secret: .*at least 16"),
        ('redisUrl = "http://x"', r"server\.cluster\.redisUrl: expected a redis://"),
        ("nodeTimeout = 1", r"server\.cluster\.nodeTimeout: expected at least twice"),
        ("internalPort = -1", r"server\.cluster\.internalPort:"),
        ("heartbeat = 1", r"unknown key\(s\) server\.cluster\.heartbeat"),
    ],
)
def test_wrong_cluster_value_names_the_key(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(write(tmp_path, cluster_text(line)))


def test_client_servers_replace_host_and_default_to_back_port(tmp_path: Path) -> None:
    text = (
        '[client]\nbackPort = 4000\nservers = ["a.example.com:3014", "b.example.com", "[::1]:9"]\n'
    )
    config = load_client_config(write(tmp_path, text))
    assert config.tunnel_servers == (
        ServerAddress("a.example.com", 3014),
        ServerAddress("b.example.com", 4000),
        ServerAddress("::1", 9),
    )
    assert config.server == ServerAddress("a.example.com", 3014)
    assert config.session_count == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('servers = ["a:x"]', r"client\.servers: expected HOST:PORT"),
        ('servers = [":3014"]', r"client\.servers: expected HOST:PORT"),
        ('servers = ["a:1", "b:2"]\nserverSessions = 3', r"client\.serverSessions:"),
        ("serverSessions = 2", r"client\.serverSessions:"),
    ],
)
def test_wrong_client_servers_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_client_config(write(tmp_path, f"[client]\n{line}\n"))

"""Registrations the client holds, one directory each under ``tenants/``.

``tenants/<name>/key`` is the registration's Ed25519 key (mode 0600, written atomically so
it is never world-readable), ``registration`` holds the ID, port and public URL the server
assigned. A tenant may carry its own ``config.toml`` with a ``[local]`` target; otherwise
the client's ``[client.local]`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit.auth import is_valid_id, load_private_key
from petit.config import Table, load_toml
from petit.errors import ConfigError
from petit.statefile import read_json, write_atomic, write_json_atomic
from petit_client.config import ClientConfig, LocalTarget

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Tenant:
    """One registration held by this client."""

    name: str
    directory: Path
    registration_id: str
    port: int
    endpoint: str
    local: LocalTarget

    def key(self) -> Ed25519PrivateKey:
        """The registration's private key."""
        return load_private_key((self.directory / "key").read_bytes())


def tenants_directory(config: ClientConfig) -> Path:
    """Where tenant directories live."""
    return config.directory / "tenants"


def save_registration(
    config: ClientConfig, name: str, key_pem: bytes, registration: dict[str, object]
) -> Path:
    """Store a new registration's key and assignment; return the tenant directory."""
    directory = tenants_directory(config) / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(directory / "key", key_pem, mode=0o600)
    write_json_atomic(directory / "registration", registration, mode=0o600)
    return directory


def registered_tenants(config: ClientConfig) -> list[Tenant]:
    """Every tenant that holds a registration, by name."""
    root = tenants_directory(config)
    if not root.is_dir():
        return []
    return [
        _load_tenant(config, directory)
        for directory in sorted(root.iterdir())
        if (directory / "registration").exists()
    ]


def _load_tenant(config: ClientConfig, directory: Path) -> Tenant:
    document = read_json(directory / "registration", what="registration")
    where = f"registration {directory / 'registration'}"
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    rid, port, endpoint = document.get("id"), document.get("port"), document.get("endpoint", "")
    if not isinstance(rid, str) or not is_valid_id(rid) or not isinstance(port, int):
        raise ConfigError(f"{where}: 'id' and 'port' are required")
    if not (directory / "key").exists():
        raise ConfigError(f"{where}: its key file is missing; unregister and register again")
    return Tenant(
        name=directory.name,
        directory=directory,
        registration_id=rid,
        port=port,
        endpoint=str(endpoint),
        local=_tenant_local(config, directory),
    )


def _tenant_local(config: ClientConfig, directory: Path) -> LocalTarget:
    tenant_config = directory / "config.toml"
    if not tenant_config.exists():
        return config.local
    document = load_toml(tenant_config, init_hint="petit-client lease")
    root = Table(document, "tenant", directory)
    root.string("name", directory.name)
    root.integer("index", 0, low=0, high=1_000_000)
    local = root.table("local")
    target = LocalTarget(
        host=local.string("host", config.local.host),
        port=local.integer("port", config.local.port, low=1, high=65535),
        tls=local.boolean("tls", config.local.tls),
    )
    local.finish()
    root.finish()
    return target

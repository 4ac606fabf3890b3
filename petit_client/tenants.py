"""The client's tenants: one directory each under ``tenants/``, registered or only leased.

``tenants/<name>/key`` is the registration's Ed25519 key (mode 0600, written atomically so
it is never world-readable), ``registration`` holds the ID, port and public URL the server
assigned; its presence is what "registered" means. A lease (``petit-client lease``) is a
tenant directory with its own ``config.toml`` naming a ``[local]`` target, waiting to be
registered; tenants without one use the client's ``[client.local]``.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit.auth import is_valid_id, load_private_key
from petit.config import Table, load_toml
from petit.errors import ConfigError
from petit.statefile import read_json, write_atomic, write_json_atomic
from petit_client.config import ClientConfig, LocalTarget, read_local_target

DEFAULT_TENANT = "default"
LEASE_NAME = "lease"  # the ``name`` the original wrote into every lease's config.toml


@dataclass(frozen=True, slots=True)
class Registration:
    """What the server assigned to a tenant's key."""

    registration_id: str
    port: int
    endpoint: str


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant directory."""

    name: str
    directory: Path
    local: LocalTarget
    index: int  # leases are numbered in the order they were made; others are 0
    leased: bool  # it has its own config.toml, which outlives unregistering
    registration: Registration | None

    def key(self) -> Ed25519PrivateKey:
        """The registration's private key."""
        return load_private_key((self.directory / "key").read_bytes())


def tenants_directory(config: ClientConfig) -> Path:
    """Where tenant directories live."""
    return config.directory / "tenants"


def all_tenants(config: ClientConfig) -> list[Tenant]:
    """Every tenant, registered or not, leases in the order they were made."""
    root = tenants_directory(config)
    if not root.is_dir():
        return []
    tenants = [_load_tenant(config, d) for d in root.iterdir() if d.is_dir()]
    return sorted(tenants, key=lambda t: (t.index, t.name))


def registered_tenants(config: ClientConfig) -> dict[str, Tenant]:
    """Registration ID -> its tenant, for every registered tenant."""
    return {
        t.registration.registration_id: t for t in all_tenants(config) if t.registration is not None
    }


def save_registration(
    config: ClientConfig, name: str, key_pem: bytes, registration: Registration
) -> Path:
    """Store a new registration's key and assignment; return the tenant directory."""
    directory = tenants_directory(config) / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(directory / "key", key_pem, mode=0o600)
    document = {
        "id": registration.registration_id,
        "port": registration.port,
        "endpoint": registration.endpoint,
    }
    write_json_atomic(directory / "registration", document, mode=0o600)
    return directory


def forget_registration(tenant: Tenant) -> None:
    """Drop a tenant's registration and key; a lease keeps its directory for a new one."""
    if not tenant.leased:
        remove_tenant(tenant)
        return
    (tenant.directory / "registration").unlink(missing_ok=True)
    (tenant.directory / "key").unlink(missing_ok=True)


def remove_tenant(tenant: Tenant) -> None:
    """Delete a tenant's directory with everything in it."""
    shutil.rmtree(tenant.directory)


def new_lease(config: ClientConfig, local: LocalTarget) -> Path:
    """Make an unregistered tenant directory that routes to ``local``; return it."""
    index = max((t.index for t in all_tenants(config)), default=0) + 1
    directory = tenants_directory(config) / secrets.token_hex(8)
    directory.mkdir(parents=True, mode=0o700)
    document = {
        "name": LEASE_NAME,
        "index": index,
        "local": {"host": local.host, "port": local.port, "tls": local.tls},
    }
    write_atomic(directory / "config.toml", tomli_w.dumps(document).encode(), mode=0o600)
    return directory


def _load_tenant(config: ClientConfig, directory: Path) -> Tenant:
    local, index = config.local, 0
    leased = (directory / "config.toml").exists()
    if leased:
        document = load_toml(directory / "config.toml", init_hint="petit-client lease")
        root = Table(document, "tenant", directory)
        root.string("name", LEASE_NAME)
        index = root.integer("index", 0, low=0, high=1_000_000)
        local = read_local_target(root.table("local"), config.local)
        root.finish()
    registration = None
    if (directory / "registration").exists():
        registration = _load_registration(directory)
    return Tenant(directory.name, directory, local, index, leased, registration)


def _load_registration(directory: Path) -> Registration:
    document = read_json(directory / "registration", what="registration")
    where = f"registration {directory / 'registration'}"
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    rid, port, endpoint = document.get("id"), document.get("port"), document.get("endpoint", "")
    if not isinstance(rid, str) or not is_valid_id(rid) or not isinstance(port, int):
        raise ConfigError(f"{where}: 'id' and 'port' are required")
    if not (directory / "key").exists():
        raise ConfigError(f"{where}: its key file is missing; evict the tenant and register again")
    return Registration(rid, port, str(endpoint))

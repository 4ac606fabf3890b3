"""The client's daemon process (petit.daemon): ``python -P -m petit_client.daemon CONFIG``."""

from __future__ import annotations

from pathlib import Path

from petit.daemon import Daemon, daemon_main
from petit.errors import ConfigError
from petit_client.config import load_client_config
from petit_client.service import ClientService
from petit_client.tenants import registered_tenants


def open_daemon(config_path: Path) -> Daemon:
    """The client of ``config_path``; ConfigError while it has no registration to serve."""
    config = load_client_config(config_path)
    if not registered_tenants(config):
        raise ConfigError(
            f"This client isn't registered: run petit-client register -c {config.path}"
        )
    return Daemon("client", config.path, config.log, ClientService(config).serve)


if __name__ == "__main__":
    daemon_main("petit_client", open_daemon)

"""The server's daemon process (petit.daemon): ``python -P -m petit_server.daemon CONFIG``."""

from __future__ import annotations

from pathlib import Path

from petit.daemon import Daemon, daemon_main
from petit_server.config import load_server_config
from petit_server.service import ServerService


def open_daemon(config_path: Path) -> Daemon:
    """The server of ``config_path`` (the workers' supervisor with ``workers`` > 1). Its
    registry is read here: ``start`` calls this before spawning, so a corrupt one is a
    one-line error from the command itself."""
    config = load_server_config(config_path)
    if config.workers > 1:
        from petit_server.workers import Supervisor  # a single server needs none of it

        return Daemon("server", config.path, config.log, Supervisor(config).serve)
    return Daemon("server", config.path, config.log, ServerService(config).serve)


if __name__ == "__main__":
    daemon_main("petit_server", open_daemon)

"""The configured registry backend, chosen in one place.

The Redis backend is an optional extra (``petit[redis]``), imported only when chosen; the
file backend needs nothing. Both implement ``base.Registry``.
"""

from __future__ import annotations

from collections.abc import Callable

from petit.errors import ConfigError
from petit_server.config import ServerConfig
from petit_server.registry.base import Registry
from petit_server.registry.file_backend import FileRegistry


def open_registry(
    config: ServerConfig, *, load: bool = True, on_removed: Callable[[str], None] | None = None
) -> Registry:
    """The configured backend. A file is read at once; Redis is read at once with ``load``
    (blocking: for the CLI), else by its ``run`` task. ``on_removed(id)`` is called when
    another node removed a registration."""
    if config.registry_backend == "file":
        return FileRegistry(config.registry_file, first_port=config.first_port)
    try:
        from petit_server.registry.redis_backend import (
            RedisRegistry,  # the optional extra, only when chosen
        )
    except ImportError:
        raise ConfigError(
            '[server.registry] backend = "redis" needs the redis package: '
            "pip install 'petit[redis]'"
        ) from None
    registry = RedisRegistry(
        config.registry_url,
        prefix=config.registry_prefix,
        first_port=config.first_port,
        on_removed=on_removed,
    )
    if load:
        try:
            registry.load()
        except BaseException:
            registry.close()
            raise
    return registry

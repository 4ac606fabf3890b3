"""Shared fixtures: real petit servers and clients (through their CLIs) and real backends.

Processes are owned by ``reaper``, a plain (sync) fixture whose teardown kills every process
group a test started, even when the test failed or its async fixtures were cancelled.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.faulthandler import fault_handler_stderr_fd_key
from hypothesis import HealthCheck, settings

from tests.integration.harness import (
    NGINX,
    REDIS_SERVER,
    ClientFactory,
    NginxBackend,
    PetitServer,
    PythonBackend,
    Reaper,
    RedisServer,
    ServerFactory,
)

# Property tests judge behaviour, not speed: on a loaded 2-core CI machine hypothesis's
# timing checks (deadline, too_slow) fail tests whose code is fine.
settings.register_profile("petit", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("petit")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """``@pytest.mark.time_limit(SECONDS)``: this test's own hang limit.

    pytest dumps every thread's stack when a test outlives ``faulthandler_timeout``; a test
    that legitimately runs longer (the container build) re-arms that dump with its own limit,
    so a dump in the log always means a real hang.
    """
    marker = item.get_closest_marker("time_limit")
    if marker is not None and fault_handler_stderr_fd_key in item.config.stash:
        seconds = float(marker.args[0])
        faulthandler.dump_traceback_later(
            seconds, file=item.config.stash[fault_handler_stderr_fd_key]
        )


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Kills, at teardown, every process the test started."""
    processes = Reaper()
    yield processes
    processes.reap()


@pytest.fixture
def server_factory(tmp_path: Path, reaper: Reaper) -> ServerFactory:
    """``await server_factory(start=True, **server_config_overrides)``."""
    return ServerFactory(tmp_path, reaper)


@pytest.fixture
async def server(server_factory: ServerFactory) -> PetitServer:
    """An initialised, started petit server on loopback, every port chosen by the system."""
    return await server_factory()


@pytest.fixture
def client_factory(tmp_path: Path, reaper: Reaper) -> ClientFactory:
    """``await client_factory(server, backend_port, start=True)``: init + register (+ start)."""
    return ClientFactory(tmp_path, reaper)


@pytest.fixture
def python_backend() -> Iterator[PythonBackend]:
    """A threaded HTTP/1.1 backend on 127.0.0.1:0 (echo, chunked, /bytes/N, /slow/N)."""
    backend = PythonBackend()
    yield backend
    backend.close()


@pytest.fixture
async def nginx_backend(tmp_path: Path, reaper: Reaper) -> NginxBackend:
    """A real nginx serving static files (1 KiB, 10 MiB) on a free loopback port."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light); ./run-tests installs it")
    return await NginxBackend.start(tmp_path / "nginx", reaper)


@pytest.fixture
async def redis_server(tmp_path: Path, reaper: Reaper) -> RedisServer:
    """A private redis-server on a free loopback port, data in the test's temp directory."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis", reaper)
    await server.start()
    return server

"""One worker process of a server with ``workers`` > 1 (``petit_server.workers``):
``python -P -m petit_server.worker CONFIG INDEX COUNT``, started by its supervisor only.

It serves as a single server does, with the ports, link secret and control port the
supervisor gives it; its ports go to the supervisor as one JSON line on stdout once ready,
and a failure as one ``error:`` line on stderr. Its stdin is a pipe from the supervisor:
when it ends (the supervisor asks it to stop, or died however it died) the worker drains
and exits, as a single server does on SIGTERM. SIGTERM and SIGINT still stop it too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from petit.daemon import FAILURES, Daemon, ExitCode, end_with_error, name_process, run_daemon
from petit.lockfile import ProcessLock
from petit.logs import set_level
from petit_server.config import WorkerPlace, load_server_config
from petit_server.service import ServerService
from petit_server.workers import LOG_LEVEL_ENV, PORTS_ENV, SECRET_ENV, worker_config


def open_worker(config_path: Path, index: int, count: int) -> Daemon:
    """The worker ``index`` of ``count``, with what its supervisor put in the environment."""
    secret = os.environ.pop(SECRET_ENV)
    ports = json.loads(os.environ.pop(PORTS_ENV))
    log_level = os.environ.pop(LOG_LEVEL_ENV, None)
    place = WorkerPlace(index, count)
    config = worker_config(load_server_config(config_path), place, ports, secret)

    def report_ready(bound: dict[str, int]) -> None:
        print(json.dumps({"ready": bound}), flush=True)  # noqa: T201 - to the supervisor

    service = ServerService(config, on_ready=report_ready)

    async def serve(stop: trio.Event, lock: ProcessLock) -> None:
        if log_level is not None:
            set_level(log_level)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_at_end_of_stdin, stop)
            await service.serve(stop, lock)
            nursery.cancel_scope.cancel()

    return Daemon(f"server-w{index}", config.path, config.log, serve)


async def _stop_at_end_of_stdin(stop: trio.Event) -> None:
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass  # the supervisor writes nothing: only the end matters
    stop.set()


def main() -> None:
    match sys.argv[1:]:
        case [config, index, count] if index.isdigit() and count.isdigit():
            pass
        case _:
            print("usage: python -m petit_server.worker CONFIG INDEX COUNT", file=sys.stderr)  # noqa: T201
            sys.exit(ExitCode.USAGE)
    name_process(f"petit-server-w{index}")
    try:
        daemon = open_worker(Path(config), int(index), int(count))
    except FAILURES as exc:
        sys.exit(end_with_error(exc))
    sys.exit(run_daemon(daemon, verbose=False, detached=True))


if __name__ == "__main__":
    main()

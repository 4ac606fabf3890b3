"""One worker process of a server with ``workers`` > 1 (``petit_server.workers``):
``python -P -m petit_server.worker CONFIG INDEX COUNT``, started by its supervisor only.

It serves as a single server does, with the ports, link secret and control port the
supervisor gives it; its ports go to the supervisor as one JSON line on stdout once ready,
and a failure as one ``error:`` line on stderr. It ends when its supervisor does.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from petit.daemon import FAILURES, Daemon, ExitCode, end_with_error, name_process, run_daemon
from petit_server.config import WorkerPlace, load_server_config
from petit_server.service import ServerService
from petit_server.workers import PORTS_ENV, SECRET_ENV, worker_config

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def end_with_parent() -> None:
    """SIGTERM this process when its supervisor dies, however it dies (Linux), and stop at
    once if it died before we asked."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(ExitCode.FAILURE)


def open_worker(config_path: Path, index: int, count: int) -> Daemon:
    """The worker ``index`` of ``count``, with what its supervisor put in the environment."""
    secret = os.environ.pop(SECRET_ENV)
    ports = json.loads(os.environ.pop(PORTS_ENV))
    place = WorkerPlace(index, count)
    config = worker_config(load_server_config(config_path), place, ports, secret)

    def report_ready(bound: dict[str, int]) -> None:
        print(json.dumps({"ready": bound}), flush=True)  # noqa: T201 - to the supervisor

    service = ServerService(config, on_ready=report_ready)
    return Daemon(f"server-w{index}", config.path, config.log, service.serve)


def main() -> None:
    match sys.argv[1:]:
        case [config, index, count] if index.isdigit() and count.isdigit():
            pass
        case _:
            print("usage: python -m petit_server.worker CONFIG INDEX COUNT", file=sys.stderr)  # noqa: T201
            sys.exit(ExitCode.USAGE)
    end_with_parent()
    name_process(f"petit-server-w{index}")
    try:
        daemon = open_worker(Path(config), int(index), int(count))
    except FAILURES as exc:
        sys.exit(end_with_error(exc))
    sys.exit(run_daemon(daemon, verbose=False, detached=True))


if __name__ == "__main__":
    main()

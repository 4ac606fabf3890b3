"""Lock and pid files: a live holder is refused, a dead one's leftovers are taken over."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from petit.errors import ConfigError
from petit.lockfile import AlreadyRunningError, PidInfo, ProcessLock, read_pid

HOLD_LOCK_SCRIPT = """
import sys
from pathlib import Path
from petit.errors import ConfigError
from petit.lockfile import ProcessLock

lock = ProcessLock(Path(sys.argv[1]), "server")
lock.acquire()
lock.write_pid(4242)
print("locked", flush=True)
sys.stdin.read()
"""


def test_acquire_write_pid_and_release(tmp_path: Path) -> None:
    lock = ProcessLock(tmp_path, "server")

    assert lock.acquire() is False
    lock.write_pid(3016, ports=[8443])

    assert read_pid(tmp_path, "server") == PidInfo(os.getpid(), 3016, {"ports": [8443]})
    assert not stat.S_IMODE(lock.lock_path.stat().st_mode) & stat.S_IWOTH
    assert stat.S_IMODE(lock.pid_path.stat().st_mode) == 0o644

    lock.release()
    lock.release()
    assert os.listdir(tmp_path) == []
    assert read_pid(tmp_path, "server") is None


def test_write_pid_again_replaces_extra(tmp_path: Path) -> None:
    with ProcessLock(tmp_path, "client") as lock:
        lock.write_pid(3017, ports=[1])
        lock.write_pid(3017, ports=[2], state="up")

        assert read_pid(tmp_path, "client") == PidInfo(
            os.getpid(), 3017, {"ports": [2], "state": "up"}
        )
    assert os.listdir(tmp_path) == []


def test_second_holder_is_refused_with_the_pid(tmp_path: Path) -> None:
    with ProcessLock(tmp_path, "server") as first:
        with pytest.raises(AlreadyRunningError, match=r"\(its pid file is not written yet\)") as e:
            ProcessLock(tmp_path, "server").acquire()
        assert e.value.pid is None

        first.write_pid(3016)
        with pytest.raises(AlreadyRunningError, match=f"^already running on pid {os.getpid()}$"):
            ProcessLock(tmp_path, "server").acquire()

        assert read_pid(tmp_path, "server") == PidInfo(os.getpid(), 3016, {})


def test_roles_do_not_share_a_lock(tmp_path: Path) -> None:
    with ProcessLock(tmp_path, "server"), ProcessLock(tmp_path, "client") as client:
        assert client.lock_path.name == "client.lock"


def test_stale_pid_file_without_lock_is_taken_over(tmp_path: Path) -> None:
    lock = ProcessLock(tmp_path, "server")
    lock.pid_path.write_text('{"pid": 999999, "listen": 3016}')

    assert read_pid(tmp_path, "server") is None
    assert lock.acquire() is True
    assert not lock.pid_path.exists()  # the dead process's pid is never reported
    lock.release()


def test_lock_file_without_pid_file_is_stale(tmp_path: Path) -> None:
    lock = ProcessLock(tmp_path, "server")
    lock.lock_path.touch()

    assert read_pid(tmp_path, "server") is None
    assert lock.acquire() is True
    lock.release()


@pytest.mark.parametrize(
    "content",
    ["{", "[1, 2]", '{"pid": "12", "listen": 3016}', '{"pid": 12, "listen": true}', '{"pid": 1}'],
)
def test_corrupt_pid_file_reads_as_none(tmp_path: Path, content: str) -> None:
    with ProcessLock(tmp_path, "server") as lock:
        lock.pid_path.write_text(content)

        assert read_pid(tmp_path, "server") is None
        with pytest.raises(AlreadyRunningError) as excinfo:
            ProcessLock(tmp_path, "server").acquire()
        assert excinfo.value.pid is None


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot create .*server\.lock"):
        ProcessLock(tmp_path / "missing", "server").acquire()


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK_SCRIPT, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "locked\n"
            assert read_pid(tmp_path, "server") == PidInfo(holder.pid, 4242, {})
            with pytest.raises(AlreadyRunningError) as excinfo:
                ProcessLock(tmp_path, "server").acquire()
            assert excinfo.value.pid == holder.pid
        finally:
            holder.kill()
            holder.wait(timeout=10)

    assert read_pid(tmp_path, "server") is None
    lock = ProcessLock(tmp_path, "server")
    assert lock.acquire() is True
    lock.release()

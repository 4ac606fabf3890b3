"""``service install`` writes a systemd unit that systemd-analyze accepts, for both daemons."""

from __future__ import annotations

import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")


def _cli(role: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / f"petit-{role}"), *args], capture_output=True, text=True, timeout=60
    )


def _init(role: str, config: Path) -> None:
    extra = ["--hostname", "localhost"] if role == "server" else ["--server", "localhost:3014"]
    assert _cli(role, "init", "-c", str(config), *extra).returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("role", ["client", "server"])
def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path, role: str) -> None:
    assert ANALYZE is not None
    config, units = tmp_path / "state" / "config.toml", tmp_path / "units"
    _init(role, config)
    installed = _cli(
        role,
        "service",
        "install",
        "-c",
        str(config),
        "--unit-dir",
        str(units),
        "--user",
        "petit",
        "--no-create-user",
    )
    assert installed.returncode == 0, installed.stderr
    unit = units / f"petit-{role}.service"
    text = unit.read_text()
    assert f"ExecStart={VENV_BIN / f'petit-{role}'} start --foreground -c {config}" in text
    assert "Restart=on-failure" in text
    assert "User=petit" in text
    assert "NoNewPrivileges=yes" in text
    assert f"ReadWritePaths={config.parent}" in text
    verified = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr  # warnings (bad values) land here

    removed = _cli(role, "service", "uninstall", "-c", str(config), "--unit-dir", str(units))
    assert removed.returncode == 0
    assert not unit.exists()
    again = _cli(role, "service", "uninstall", "-c", str(config), "--unit-dir", str(units))
    assert again.returncode != 0
    assert again.stderr.count("\n") == 1, again.stderr
    assert "is not installed" in again.stderr


@pytest.mark.integration
def test_install_without_config_says_to_run_init(tmp_path: Path) -> None:
    result = _cli(
        "client",
        "service",
        "install",
        "-c",
        str(tmp_path / "none.toml"),
        "--unit-dir",
        str(tmp_path),
        "--no-create-user",
    )
    assert result.returncode == 3, result.stderr  # the config is missing, as for start
    assert f'run "petit-client init -c {tmp_path / "none.toml"}" first' in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("useradd") is None or not hasattr(pwd, "getpwnam"), reason="no useradd"
)
def test_install_creates_the_service_user_owning_the_state(tmp_path: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("creating a system user needs root")
    user = f"petit-t{secrets.token_hex(3)}"
    config = tmp_path / "state" / "config.toml"
    _init("server", config)
    try:
        result = _cli(
            "server",
            "service",
            "install",
            "-c",
            str(config),
            "--unit-dir",
            str(tmp_path / "units"),
            "--user",
            user,
        )
        assert result.returncode == 0, result.stderr
        owner = pwd.getpwnam(user).pw_uid
        assert config.parent.stat().st_uid == owner
        assert (config.parent / "certificates" / "server.key").stat().st_uid == owner
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)

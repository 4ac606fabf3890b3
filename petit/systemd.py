"""systemd units for petit-client and petit-server, so a reboot never needs a person.

The original told users to start the connector again by hand after every reboot. The unit
runs the daemon in the foreground as a dedicated user, restarts it on failure, and confines
it: read-only system and home, writes only to its config directory, no new privileges, only
the socket families and system calls a network service needs.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
from pathlib import Path

from petit.errors import PetitError
from petit.statefile import write_atomic

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_USER = "petit"


class ServiceInstallError(PetitError):
    """The unit could not be installed or removed."""


def unit_name(role: str) -> str:
    """``petit-client.service`` or ``petit-server.service``."""
    return f"petit-{role}.service"


def unit_text(*, role: str, executable: Path, config: Path, user: str) -> str:
    """The unit file for one daemon."""
    state = config.parent
    description = {
        "client": "petit client: outbound tunnel from a private service to a petit server",
        "server": "petit server: tunnel endpoint and public ingress for petit clients",
    }[role]
    return f"""\
[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
User={user}
Group={user}
ExecStart={executable} start --foreground -c {config}
Restart=on-failure
RestartSec=2
TimeoutStopSec=30
KillSignal=SIGTERM
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={state}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
CapabilityBoundingSet=
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""


def install(
    *, role: str, executable: Path, config: Path, user: str, unit_dir: Path, create_user: bool
) -> Path:
    """Write the unit (and create the service user owning the config directory)."""
    if not config.exists():
        raise ServiceInstallError(
            f'no config at "{config}": run petit-{role} init -c {config} first'
        )
    if create_user:
        _ensure_user(user, home=config.parent)
        shutil.chown(config.parent, user, user)
        for path in config.parent.rglob("*"):
            shutil.chown(path, user, user)
    path = unit_dir / unit_name(role)
    unit_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path,
        unit_text(role=role, executable=executable, config=config, user=user).encode(),
        mode=0o644,
    )
    _daemon_reload(unit_dir)
    return path


def uninstall(*, role: str, unit_dir: Path) -> Path:
    """Remove the unit file (the service user and the state are kept)."""
    path = unit_dir / unit_name(role)
    if not path.exists():
        raise ServiceInstallError(f"{path} is not installed")
    path.unlink()
    _daemon_reload(unit_dir)
    return path


def _ensure_user(user: str, *, home: Path) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise ServiceInstallError(
                f"user {user} does not exist and useradd is missing"
            ) from None
        subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--home-dir",
                str(home),
                "--shell",
                "/usr/sbin/nologin",
                user,
            ],
            check=True,
            capture_output=True,
        )


def _daemon_reload(unit_dir: Path) -> None:
    """Tell a running systemd about the change (only for the system unit directory)."""
    if unit_dir == DEFAULT_UNIT_DIR and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False, capture_output=True)

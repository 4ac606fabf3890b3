"""``petit-server``: set up, run and control the server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import click

from petit import __version__
from petit.cli import (
    CliError,
    ExitCode,
    config_option as shared_config_option,
    control_command,
    exit_codes,
    running_daemon,
    start_daemon,
    stop_daemon,
    verbose_option,
)
from petit.pki import create_ca, fingerprint_hex, issue_server_certificate
from petit.statefile import write_atomic
from petit_server.config import (
    DEFAULT_CONFIG_PATH,
    default_config_text,
    load_server_config,
)
from petit_server.registry import FileRegistry
from petit_server.service import ServerService

config_option = shared_config_option(DEFAULT_CONFIG_PATH, "Server")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run the petit server: the tunnel endpoint and public ingress for petit clients."""


@main.command()
@config_option
@verbose_option
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    help="Name clients use to reach this server (repeatable); localhost is always included.",
)
def init(config_path: Path, verbose: bool, hostnames: tuple[str, ...]) -> None:
    """Write a commented config, a private CA and a server certificate."""
    path = config_path.expanduser().resolve()
    if path.exists():
        raise CliError(f'Configuration file "{path}" already exists.', ExitCode.FAILURE)
    names = list(hostnames) or [socket.getfqdn()]
    with exit_codes():
        path.parent.mkdir(parents=True, exist_ok=True)
        certificates = path.parent / "certificates"
        certificates.mkdir(mode=0o700, exist_ok=True)
        ca = create_ca()
        server = issue_server_certificate(ca, names)
        write_atomic(certificates / "ca.key", ca.key_pem, mode=0o600)
        write_atomic(certificates / "ca.crt", ca.cert_pem, mode=0o644)
        write_atomic(certificates / "server.key", server.key_pem, mode=0o600)
        write_atomic(certificates / "server.crt", server.cert_pem, mode=0o644)
        write_atomic(path, default_config_text(hostname=names[0]).encode(), mode=0o600)
        config = load_server_config(path)
        FileRegistry(config.registry_file, first_port=config.first_port).save()
    click.echo(f'Created configuration file "{path}".')
    click.echo(f'Created registry file "{config.registry_file}".')
    click.echo(f'Created CA "{certificates / "ca.crt"}" ({fingerprint_hex(ca.cert_pem)}).')
    click.echo(
        f'Created server certificate "{certificates / "server.crt"}" for '
        f"{', '.join(names)}, localhost."
    )
    click.echo(f"Clients pin the CA: petit-client init --ca {certificates / 'ca.crt'}")


@main.command()
@config_option
@verbose_option
@click.option("--foreground", is_flag=True, help="Stay attached instead of backgrounding.")
def start(config_path: Path, verbose: bool, foreground: bool) -> None:
    """Start the server (in the background unless --foreground)."""
    with exit_codes():
        config = load_server_config(config_path)
    start_daemon(
        name="server",
        module="petit_server",
        started="Server started with pid {pid}.",
        config_path=config.path,
        log_level=config.log_level,
        verbose=verbose,
        foreground=foreground,
        serve=ServerService(config).serve,
    )


@main.command()
@config_option
@verbose_option
def stop(config_path: Path, verbose: bool) -> None:
    """Stop the running server (STOP on its control port)."""
    with exit_codes():
        config = load_server_config(config_path)
    click.echo(stop_daemon(config.directory, "server", _control_host(config.listen_addr)))


@main.command()
@config_option
@verbose_option
@click.argument("registration_id", required=False)
def status(config_path: Path, verbose: bool, registration_id: str | None) -> None:
    """Show the running server's registrations and which are connected (JSON)."""
    with exit_codes():
        config = load_server_config(config_path)
        info = running_daemon(config.directory, "server")
        command = "STATUS" if registration_id is None else f"STATUS {registration_id}"
        reply = control_command(_control_host(config.listen_addr), info.listen, command)
    if reply.get("success") is False:
        raise CliError(str(reply.get("error")), ExitCode.FAILURE)
    click.echo(json.dumps({"pid": info.pid, **reply}, indent=2))


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"petit server version {__version__}")


def _control_host(listen_addr: str) -> str:
    return "127.0.0.1" if listen_addr in ("0.0.0.0", "", "::") else listen_addr  # noqa: S104

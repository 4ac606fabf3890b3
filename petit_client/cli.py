"""``petit-client``: register with a petit server and keep the tunnel to a private service up."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import click
import trio

from petit import __version__, messages
from petit.auth import (
    generate_key,
    private_key_to_pem,
    public_key_raw,
    register_transcript,
    sign,
)
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
from petit.errors import ConfigError
from petit.pki import client_ssl_context
from petit.statefile import write_atomic
from petit.transport import REGISTER_PATH, ServerAddress, open_websocket
from petit_client.config import (
    DEFAULT_CONFIG_PATH,
    ClientConfig,
    default_config_text,
    load_client_config,
)
from petit_client.service import ClientService
from petit_client.tenants import DEFAULT_TENANT, registered_tenants, save_registration

config_option = shared_config_option(DEFAULT_CONFIG_PATH, "Client")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Expose a private service to a petit server through an outbound TLS tunnel."""


def _parse_server(value: str) -> ServerAddress:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not port:
        return ServerAddress(value.strip("[]"), 3014)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST or HOST:PORT")
    return ServerAddress(host, int(port))


@main.command()
@config_option
@verbose_option
@click.option(
    "--server",
    "server",
    default="localhost:3014",
    show_default=True,
    help="The server's tunnel endpoint, HOST[:PORT].",
)
@click.option(
    "--ca",
    "ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Pin this CA certificate (from petit-server init); default: system trust.",
)
@click.option(
    "--local", "local", default=None, help="Private service HOST:PORT (default localhost:8080)."
)
def init(config_path: Path, verbose: bool, server: str, ca: Path | None, local: str | None) -> None:
    """Write the client config (the CA given with --ca is copied beside it)."""
    path = config_path.expanduser().resolve()
    if path.exists():
        raise CliError(f'Configuration file "{path}" exists.', ExitCode.FAILURE)
    address = _parse_server(server)
    with exit_codes():
        path.parent.mkdir(parents=True, exist_ok=True)
        if ca is not None:
            write_atomic(path.parent / "ca.crt", ca.read_bytes(), mode=0o644)
        text = default_config_text(
            host=address.host, port=address.port, ca="./ca.crt" if ca else None
        )
        if local is not None:
            target = _parse_server(local)
            text = text.replace(
                'host = "localhost"\nport = 8080', f'host = "{target.host}"\nport = {target.port}'
            )
        write_atomic(path, text.encode(), mode=0o600)
        load_client_config(path)
    click.echo(f'Created configuration file "{path}".')


@main.command()
@config_option
@verbose_option
@click.option("-t", "--tenant", "tenant", default=None, help="Register under this tenant name.")
def register(config_path: Path, verbose: bool, tenant: str | None) -> None:
    """Create a key and register it with the server; print the ID and public URL."""
    with exit_codes():
        config = load_client_config(config_path)
    name = tenant or DEFAULT_TENANT
    if not TENANT_NAME.match(name):
        raise CliError(
            f"tenant name {name!r}: use letters, digits, '.', '_' or '-'", ExitCode.USAGE
        )
    with exit_codes():
        existing = {t.name: t for t in registered_tenants(config)}
    if name in existing:
        raise CliError(
            f"Client is already registered as {existing[name].registration_id} (tenant {name}); "
            "use -t NAME for another registration.",
            ExitCode.FAILURE,
        )
    click.echo("Generating key ...", err=True)
    key = generate_key()
    click.echo(f"Registering with {config.server} ...", err=True)
    with exit_codes():
        reply = trio.run(_register, config, key)
    if reply.get("type") != "registered":
        raise CliError(f"Unable to register: {reply.get('error', reply)}", ExitCode.AUTH)
    rid, port, endpoint = reply.get("id"), reply.get("port"), reply.get("endpoint")
    with exit_codes():
        directory = save_registration(
            config, name, private_key_to_pem(key), {"id": rid, "port": port, "endpoint": endpoint}
        )
    click.echo(f'Registered with ID {rid} (tenant "{name}", key in {directory / "key"}).')
    click.echo(f"Public URL: {endpoint}")


async def _register(config: ClientConfig, key: object) -> dict[str, object]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    assert isinstance(key, Ed25519PrivateKey)
    context = client_ssl_context(config.ca)
    with trio.fail_after(config.connect_timeout + config.handshake_timeout):
        async with open_websocket(config.server, context, REGISTER_PATH) as (
            websocket,
            fingerprint,
        ):
            challenge = messages.decode(await websocket.get_message(), what="challenge")
            nonce = base64.b64decode(str(challenge.get("nonce", "")))
            public = public_key_raw(key)
            signature = sign(key, register_transcript(nonce, fingerprint, public))
            await websocket.send_message(
                messages.encode(
                    {
                        "type": "register",
                        "public_key": base64.b64encode(public).decode(),
                        "signature": base64.b64encode(signature).decode(),
                        "vitae": config.vitae,
                    }
                )
            )
            return messages.decode(await websocket.get_message(), what="registration reply")


@main.command()
@config_option
@verbose_option
@click.option("--foreground", is_flag=True, help="Stay attached instead of backgrounding.")
def start(config_path: Path, verbose: bool, foreground: bool) -> None:
    """Open the tunnel (in the background unless --foreground) and keep it up."""
    with exit_codes():
        config = load_client_config(config_path)
        if not registered_tenants(config):
            raise ConfigError(
                f"This client isn't registered: run petit-client register -c {config.path}"
            )
    start_daemon(
        name="client",
        module="petit_client",
        started="Client started on pid {pid}.",
        config_path=config.path,
        log_level=config.log_level,
        verbose=verbose,
        foreground=foreground,
        serve=ClientService(config).serve,
    )


@main.command()
@config_option
@verbose_option
def stop(config_path: Path, verbose: bool) -> None:
    """Stop the running client (STOP on its control port)."""
    with exit_codes():
        config = load_client_config(config_path)
    click.echo(stop_daemon(config.directory, "client", "127.0.0.1"))


@main.command()
@config_option
@verbose_option
def status(config_path: Path, verbose: bool) -> None:
    """Show the running client's connection state (JSON)."""
    with exit_codes():
        config = load_client_config(config_path)
        info = running_daemon(config.directory, "client")
        reply = control_command("127.0.0.1", info.listen, "STATUS")
    click.echo(json.dumps({"pid": info.pid, **reply}, indent=2))


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"petit client version {__version__}")

"""``petit-server``: set up, run and control the server."""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
import time
from functools import partial
from pathlib import Path

import click
import trio

from petit import __version__
from petit.cli import (
    CliError,
    CommandGroup,
    config_option as shared_config_option,
    control_command,
    exit_codes,
    progress,
    running_daemon,
    service_commands,
    start_daemon,
    stop_daemon,
    verbose_option,
)
from petit.config import LOG_LEVELS
from petit.daemon import ExitCode
from petit.listen import local_address, show_address
from petit.lockfile import AlreadyRunningError, ProcessLock, read_pid
from petit.logs import LogSettings, audit_to_file, cli_actor, log_keys
from petit.pki import fingerprint_hex
from petit.statefile import write_atomic
from petit_server.config import (
    DEFAULT_CONFIG_PATH,
    ClusterConfig,
    ServerConfig,
    default_config_text,
    load_server_config,
)
from petit_server.daemon import open_daemon
from petit_server.policy import Policy
from petit_server.registry.backend import open_registry
from petit_server.registry.base import Registry, apply_command
from petit_server.registry.file_backend import FileRegistry
from petit_server.registry.importer import import_registry, migrate_registry

config_option = shared_config_option(DEFAULT_CONFIG_PATH, "Server")


def _words(
    context: click.Context, parameter: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    """Each argument one word (see ``_one_word``)."""
    return tuple(_one_word(context, parameter, value) for value in values)


def _one_word(context: click.Context, parameter: click.Parameter, value: str) -> str:
    """Arguments travel as words of a control command (a space would split them); an address
    in the config is one word too."""
    if value.split() != [value]:
        raise click.BadParameter("must be one word, without spaces")
    return value


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--listen-addr",
    default="127.0.0.1",
    show_default=True,
    callback=_one_word,
    help='Address of the control port (listenAddr): an address, or "*" for every one.',
)
@click.option(
    "--admin-addr",
    default="127.0.0.1",
    show_default=True,
    callback=_one_word,
    help='Address of the admin API (adminAddr): an address, or "*" for every one.',
)
def init(
    config_path: Path,
    verbose: bool,
    hostnames: tuple[str, ...],
    listen_addr: str,
    admin_addr: str,
) -> None:
    """Write a commented config, a private CA and a server certificate."""
    path = config_path.expanduser().resolve()
    if path.exists():
        raise CliError(f'Configuration file "{path}" already exists.', ExitCode.CONFIG)
    names = list(hostnames) or [socket.getfqdn()]
    with exit_codes():
        path.parent.mkdir(parents=True, exist_ok=True)
        certificates = path.parent / "certificates"
        certificates.mkdir(mode=0o700, exist_ok=True)
        # Issuing needs cryptography's X.509; the running server, which imports this module
        # too, does not (petit.ca).
        from petit.ca import create_ca, issue_server_certificate

        with progress("Generating the CA and the server certificate"):
            ca = create_ca()
            server = issue_server_certificate(ca, names)
        write_atomic(certificates / "ca.key", ca.key_pem, mode=0o600)
        write_atomic(certificates / "ca.crt", ca.cert_pem, mode=0o644)
        write_atomic(certificates / "server.key", server.key_pem, mode=0o600)
        write_atomic(certificates / "server.crt", server.cert_pem, mode=0o644)
        text = default_config_text(
            hostname=names[0],
            admin_token=secrets.token_urlsafe(32),
            listen_addr=listen_addr,
            admin_addr=admin_addr,
        )
        write_atomic(path, text.encode(), mode=0o600)
        config = load_server_config(path)
        FileRegistry(config.registry_file, first_port=config.first_port).save()
    click.echo(f'Created configuration file "{path}".')
    click.echo(f'Created registry file "{config.registry_file}".')
    click.echo(f'Created CA "{certificates / "ca.crt"}" ({fingerprint_hex(ca.cert_pem)}).')
    covered = ", ".join(dict.fromkeys([*names, "localhost"]))  # localhost always, once
    click.echo(f'Created server certificate "{certificates / "server.crt"}" for {covered}.')
    click.echo(f"Clients pin the CA: petit-client init --ca {certificates / 'ca.crt'}")
    click.echo(
        f"Each client registers with a one-time token: petit-server token create -c {path}, "
        "then petit-client register --token TOKEN (requireToken = false lets anyone register)."
    )
    click.echo(f"Control port on {show_address(config.listen_addr, config.listen_port)}.")
    click.echo(
        f"Admin API on {show_address(config.admin_addr, config.admin_port)} "
        f"(token: petit-server config --admin-token -c {path})."
    )


@main.command()
@config_option
@verbose_option
@click.option("--foreground", is_flag=True, help="Stay attached instead of backgrounding.")
def start(config_path: Path, verbose: bool, foreground: bool) -> None:
    """Start the server (in the background unless --foreground)."""
    start_daemon(
        "petit_server",
        config_path,
        open_daemon=open_daemon,
        started="Server started with pid {pid}.",
        verbose=verbose,
        foreground=foreground,
    )


@main.command()
@config_option
@verbose_option
def stop(config_path: Path, verbose: bool) -> None:
    """Stop the running server (STOP on its control port)."""
    with exit_codes():
        config = load_server_config(config_path)
    click.echo(stop_daemon(config.directory, "server", local_address(config.listen_addr)))


@main.command()
@config_option
@verbose_option
@click.argument("registration_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the control port's JSON reply.")
def status(config_path: Path, verbose: bool, registration_id: str | None, as_json: bool) -> None:
    """Show the running server's registrations and which are connected."""
    with exit_codes():
        config = load_server_config(config_path)
        info = running_daemon(config.directory, "server")
    command = "STATUS" if registration_id is None else f"STATUS {registration_id}"
    reply = _control(config, info.listen, command)
    if as_json:
        click.echo(json.dumps({"pid": info.pid, **reply}, indent=2))
        return
    click.echo(f'Server has status "{reply.get("status")}" on pid {info.pid}.')
    if workers := _objects(reply.get("workers")):
        each = (f"{w.get('index')} {w.get('state')} (pid {w.get('pid')})" for w in workers)
        click.echo(f"Workers: {', '.join(each)}.")
    for connection in _objects(reply.get("connections")):
        mark = "+" if connection.get("connected") else "-"
        click.echo(
            f" {mark} {connection.get('registeredId')} {connection.get('port')} "
            f"{connection.get('fingerprint')}"
        )
        if registration_id is not None:
            _echo_details(connection)


def _echo_details(connection: dict[str, object]) -> None:
    """The original's indented detail lines: sessions, vitae, aliases."""
    for session in _objects(connection.get("sessions")):
        vitae = session.get("vitae")
        hostname = vitae.get("hostname") if isinstance(vitae, dict) else None
        name = f'"{hostname}" ' if hostname else ""
        click.echo(
            f"      {name}@ {session.get('remote')} since {_when(session.get('since'))}, "
            f"{session.get('streams')} stream(s) in flight"
        )
    vitae = connection.get("vitae")
    if isinstance(vitae, dict) and vitae:
        click.echo("      " + ", ".join(f"{k}={v}" for k, v in sorted(vitae.items())))
    for alias in _strings(connection.get("aliases")):
        click.echo(f"      = {alias}")
    policy = connection.get("policy")
    if isinstance(policy, dict) and policy:
        click.echo("      policy " + ", ".join(f"{k}={v}" for k, v in policy.items()))


@main.command()
@config_option
@verbose_option
def registrations(config_path: Path, verbose: bool) -> None:
    """List registrations (from the registry) and, if the server runs, who is online."""
    with exit_codes():
        config = load_server_config(config_path)
        registry = _read_registry(config)
        info = read_pid(config.directory, "server")
    online: dict[str, dict[str, object]] = {}
    if info is not None:
        reply = _control(config, info.listen, "STATUS")
        online = {str(c.get("registeredId")): c for c in _objects(reply.get("connections"))}
    every = registry.all()
    if not every:
        click.echo("No registrations.")
        return
    rows = []
    for registration in every:
        live = online.get(registration.registration_id, {})
        connected = live.get("connected") is True
        rows.append(
            [
                registration.registration_id,
                str(registration.port),
                registration.fingerprint,
                ", ".join(registration.aliases) or "-",
                "yes" if connected else "no",
                _when(live.get("since")) if connected else "-",
                ", ".join(_strings(live.get("remotes"))) if connected else "-",
            ]
        )
    click.echo(_table(["ID", "PORT", "KEY", "ALIASES", "ONLINE", "SINCE", "REMOTE"], rows))
    if info is None:
        click.echo("(the server is not running)")


@main.command("config")
@config_option
@verbose_option
@click.option(
    "--admin-token",
    "admin_token",
    is_flag=True,
    help="Print only the admin API's bearer token (for scripts: TOKEN=$(... --admin-token)).",
)
def show_config(config_path: Path, verbose: bool, admin_token: bool) -> None:
    """Verify the config and print it as the server reads it (secrets masked), and the registry."""
    with exit_codes():
        config = load_server_config(config_path)
        if admin_token:
            if config.admin_token is None:
                raise CliError(
                    f"{config.path} sets no [server] adminToken, so the admin API is off: "
                    "add one (petit-server init writes one) and restart",
                    ExitCode.CONFIG,
                )
            click.echo(config.admin_token)
            return
        registry = _read_registry(config)
    click.echo(f"Verified configuration file at {config.path}.")
    click.echo(f'"config": {json.dumps(_effective_config(config), indent=2)}')
    entries = registry.all()
    tokens = registry.tokens()
    unused = sum(token.state == "unused" for token in tokens)
    click.echo(
        f"{registry.where[:1].upper()}{registry.where[1:]}: {len(entries)} registration(s), "
        f"{len(tokens)} enrollment token(s) ({unused} unused)."
    )
    for registration in entries:
        fingerprint = registration.fingerprint
        click.echo(f"  id: {registration.registration_id}, fingerprint: {fingerprint}")
        for alias in registration.aliases:
            click.echo(f"      a.k.a. {alias}")


def _effective_config(config: ServerConfig | ClusterConfig) -> dict[str, object]:
    """The ``[server]`` table as loaded, under the file's key names; secrets masked.

    A field hidden from the dataclass repr is a secret; the sub-tables ([server.registry],
    [server.cluster]) are shown as tables too.
    """
    renamed = {"registry_file": "registryfile", "default_policy": "policy"}
    table: dict[str, object] = {}
    registry: dict[str, object] = {}  # [server.registry]: the registry_* fields but the file
    for spec in dataclasses.fields(config):
        if spec.name == "path":
            continue
        value = getattr(config, spec.name)
        if isinstance(value, LogSettings):
            table.update(log_keys(value))
            continue
        if not spec.repr and value is not None:
            value = "********"
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, ClusterConfig):
            value = _effective_config(value)
        elif isinstance(value, Policy):
            value = value.to_json()
        head, *rest = spec.name.split("_")
        if head == "registry" and spec.name not in renamed:
            registry["".join(rest)] = value
            continue
        table[renamed.get(spec.name, head + "".join(word.capitalize() for word in rest))] = value
    if registry:
        table["registry"] = registry
    return table


@main.command()
@config_option
@verbose_option
@click.argument("alias", callback=_one_word)
@click.argument("registration_id", metavar="ID", callback=_one_word)
def addalias(config_path: Path, verbose: bool, alias: str, registration_id: str) -> None:
    """Route the hostname ALIAS to registration ID, like <ID>.<domain>."""
    _registry_command(config_path, f"ADDALIAS {registration_id} {alias}", "Alias not added")
    click.echo("Alias added.")


@main.command()
@config_option
@verbose_option
@click.argument("registration_id", metavar="ID", callback=_one_word)
@click.argument("assignments", metavar="[KEY=VALUE]...", nargs=-1, callback=_words)
def policy(
    config_path: Path, verbose: bool, registration_id: str, assignments: tuple[str, ...]
) -> None:
    """Show or change registration ID's own policy (KEY= resets a key to the server's).

    Keys: responseTimeout, openTimeout, idleTimeout (seconds), maxRequestBody (bytes),
    allow, deny (visitor address ranges, comma-separated CIDRs), rateLimit (requests per
    second per visitor), rateBurst, maxStreams.
    """
    command = " ".join(["POLICY", registration_id, *assignments])
    reply = _registry_command(config_path, command, "Policy not changed")
    shown = reply.get("policy")
    if not isinstance(shown, dict) or not shown:
        click.echo(f"Registration {registration_id} follows the server's settings.")
        return
    click.echo(f"Policy of registration {registration_id}:")
    for key, value in shown.items():
        if isinstance(value, list):
            value = ",".join(value)
        click.echo(f"  {key} = {value:g}" if isinstance(value, float) else f"  {key} = {value}")


@main.command()
@config_option
@verbose_option
@click.argument("alias", callback=_one_word)
def removealias(config_path: Path, verbose: bool, alias: str) -> None:
    """Stop routing the hostname ALIAS."""
    _registry_command(config_path, f"DELALIAS {alias}", "Alias not deleted")
    click.echo("Alias deleted.")


@main.group()
def token() -> None:
    """Enrollment tokens: one-time permissions to register (with requireToken = true)."""


@token.command("create")
@config_option
@verbose_option
@click.option("--note", default="", help="What the token is for (shown by token list).")
@click.option(
    "--for",
    "for_id",
    metavar="ID",
    callback=lambda c, p, v: v if v is None else _one_word(c, p, v),
    help="A claim token: gives a key to registration ID, imported without a usable one.",
)
def token_create(config_path: Path, verbose: bool, note: str, for_id: str | None) -> None:
    """Create a token and print it; it is shown only this once."""
    command = f"TOKEN CREATE {note}" if for_id is None else f"TOKEN CLAIM {for_id} {note}"
    reply = _registry_command(config_path, command, "Token not created")
    secret = reply.get("token")
    click.echo(secret)
    click.echo(
        f"Created token {reply.get('id')}; it is shown only once. "
        f"Register with: petit-client register --token {secret}",
        err=True,
    )


@token.command("list")
@config_option
@verbose_option
def token_list(config_path: Path, verbose: bool) -> None:
    """List tokens: id, note, created, state (never the secret)."""
    reply = _registry_command(config_path, "TOKEN LIST", "Tokens not listed")
    tokens = _objects(reply.get("tokens"))
    if not tokens:
        click.echo("No tokens.")
        return
    rows = [
        [
            str(t.get("id")),
            str(t.get("note")) or "-",
            _when(t.get("created")),
            str(t.get("state")),
            str(t.get("usedBy") or "-"),
        ]
        for t in tokens
    ]
    click.echo(_table(["ID", "NOTE", "CREATED", "STATE", "USED BY"], rows))


@token.command("revoke")
@config_option
@verbose_option
@click.argument("token_id", metavar="ID", callback=_one_word)
def token_revoke(config_path: Path, verbose: bool, token_id: str) -> None:
    """Revoke an unused token."""
    _registry_command(config_path, f"TOKEN REVOKE {token_id}", "Token not revoked")
    click.echo(f"Token {token_id} revoked.")


def _registry_command(config_path: Path, command: str, failure: str) -> dict[str, object]:
    """Run a registry command where it cannot race the server.

    While the server runs, its control port runs the command on the live registry. Otherwise
    we take the server's lock (so the server cannot start meanwhile) and run the very same
    command on the registry file. A refusal becomes ``<failure>: <reason>`` and exit 1.
    """
    with exit_codes():
        config = load_server_config(config_path)
        lock = ProcessLock(config.directory, "server")
        try:
            lock.acquire()
        except AlreadyRunningError:
            info = read_pid(config.directory, "server")
            if info is None:
                raise CliError("The server is starting; try again.", ExitCode.RUNNING) from None
            reply = _control(config, info.listen, command, failure)
        else:
            try:
                verb, *args = command.split()
                registry = _read_registry(config)
                try:
                    with audit_to_file(config.log):
                        offline = trio.run(
                            partial(apply_command, registry, verb, args, actor=cli_actor())
                        )
                finally:
                    registry.close()
            finally:
                lock.release()
            assert offline is not None, f"{verb} is a registry command"
            reply = offline
    if reply.get("success") is not True:
        raise CliError(f"{failure}: {reply.get('error')}", ExitCode.FAILURE)
    return reply


def _control(
    config: ServerConfig, port: int, command: str, failure: str | None = None
) -> dict[str, object]:
    """Send a command to the running server; a refusal becomes a one-line error."""
    with exit_codes():
        reply = control_command(local_address(config.listen_addr), port, command)
    if reply.get("success") is False:
        error = reply.get("error")
        raise CliError(f"{failure}: {error}" if failure else str(error), ExitCode.FAILURE)
    return reply


def _read_registry(config: ServerConfig) -> Registry:
    return open_registry(config)


def _objects(value: object) -> list[dict[str, object]]:
    """The JSON objects in a reply's list (anything else is skipped)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


# Logs: the level of the running server (the client has the same command).


@main.command()
@config_option
@verbose_option
@click.argument("level", type=click.Choice(LOG_LEVELS, case_sensitive=False))
def log(config_path: Path, verbose: bool, level: str) -> None:
    """Change the running server's log level (debug, info, warning or error)."""
    with exit_codes():
        config = load_server_config(config_path)
        info = running_daemon(config.directory, "server")
    reply = _control(config, info.listen, f"LOG {level.lower()}")
    click.echo(f'Logging level set to "{reply.get("level", level)}".')


@main.command()
@config_option
@verbose_option
def version(config_path: Path, verbose: bool) -> None:
    """Print the version."""
    click.echo(f"petit server version {__version__}")


main.add_command(service_commands("server", DEFAULT_CONFIG_PATH, load_server_config))
main.add_command(import_registry)
main.add_command(migrate_registry)

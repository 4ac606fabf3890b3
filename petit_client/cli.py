"""``petit-client``: register with a petit server and keep the tunnel to a private service up.

Commands that change the registrations (register, unregister, evict) tell a running client
to RELOAD, so it serves the new set without a restart.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import click
import tomli_w
import trio

from petit import __version__, messages
from petit.auth import (
    b64decode,
    generate_key,
    is_valid_id,
    private_key_to_pem,
)
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
from petit.control import ControlError, send_control
from petit.daemon import ExitCode
from petit.errors import ConfigError, RemoteProtocolError
from petit.listen import local_address
from petit.lockfile import PidInfo, read_pid
from petit.logs import audit, audit_to_file, cli_actor
from petit.pki import client_ssl_context
from petit.statefile import write_atomic
from petit.transport import (
    REGISTER_PATH,
    UNREGISTER_PATH,
    ServerAddress,
    ServerUnreachableError,
    open_websocket,
)
from petit_client.config import (
    DEFAULT_CONFIG_PATH,
    ClientConfig,
    LocalTarget,
    config_document,
    default_config_text,
    load_client_config,
)
from petit_client.daemon import open_daemon
from petit_client.tenants import (
    DEFAULT_TENANT,
    Registration,
    Tenant,
    all_tenants,
    forget_registration,
    new_lease,
    registered_tenants,
    remove_tenant,
    save_registration,
    tenants_directory,
)

config_option = shared_config_option(DEFAULT_CONFIG_PATH, "Client")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RequestFor = Callable[[bytes, bytes], dict[str, object]]  # (nonce, server cert fingerprint)


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Expose a private service to a petit server through an outbound TLS tunnel."""


def _parse_server(value: str) -> ServerAddress:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not port:
        return ServerAddress(value.strip("[]"), 3014)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST or HOST:PORT")
    return ServerAddress(host, int(port))


def _load(config_path: Path) -> ClientConfig:
    with exit_codes():
        return load_client_config(config_path)


def _tenants(config: ClientConfig) -> list[Tenant]:
    with exit_codes():
        return all_tenants(config)


def _ask_client(
    config: ClientConfig, command: str, refused: ExitCode = ExitCode.FAILURE
) -> dict[str, object]:
    """Send a control command to the running client; CliError with ``refused`` unless it
    succeeded."""
    with exit_codes():
        info = running_daemon(config.directory, "client")
        reply = control_command(local_address(config.listen_addr), info.listen, command)
    if not reply.get("success"):
        raise CliError(str(reply.get("error", reply)), refused)
    return reply


def _reload_running_client(config: ClientConfig) -> None:
    """Make a running client pick up changed registrations (nothing to do if none runs)."""
    info = read_pid(config.directory, "client")
    if info is None:
        return
    try:
        _ask_client(config, "RELOAD")
    except CliError as exc:
        click.echo(
            f"warning: the running client did not reload ({exc.format_message()}); "
            f"restart it with petit-client stop, then start, -c {config.path}",
            err=True,
        )
        return
    click.echo(f"Client on pid {info.pid} reloaded.")


# ----------------------------------------------------------------------------- setup


def _can_anchor_trust(pem: bytes) -> bool:
    """Whether a certificate in ``pem`` can be the anchor of the server's chain: a CA, or a
    self-signed certificate (a server's own, pinned). A certificate a CA issued to a server
    cannot: OpenSSL then fails every handshake with "unable to get local issuer certificate"
    (Python 3.13 accepts it as a partial chain; pinned or not, it breaks when the server's
    certificate is re-issued)."""
    from cryptography import x509  # only this command parses X.509; the daemon never does

    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:  # a form OpenSSL reads and cryptography does not (TRUSTED CERTIFICATE)
        return True  # OpenSSL loaded it: its handshake is the judge
    for certificate in certificates:
        try:
            if certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return True
        except x509.ExtensionNotFound:
            pass
        if certificate.issuer == certificate.subject:
            return True
    return False


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
        raise CliError(f'Configuration file "{path}" exists.', ExitCode.CONFIG)
    address = _parse_server(server)
    with exit_codes():
        pem = None
        if ca is not None:
            pem = ca.read_bytes()
            try:
                client_ssl_context(ca)  # OpenSSL loads it as the client will
            except ConfigError:
                raise ConfigError(
                    f"--ca {ca} holds no PEM certificate: give the server's "
                    "certificates/ca.crt (from petit-server init)"
                ) from None
            if not _can_anchor_trust(pem):
                raise ConfigError(
                    f"--ca {ca} is a certificate some CA issued to a server, not a CA: give "
                    "the CA that issued it (petit-server init made certificates/ca.crt)"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        if pem is not None:
            write_atomic(path.parent / "ca.crt", pem, mode=0o644)
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
@click.option(
    "-l", "--host", "host", metavar="HOST", help="Local service host (default: [client.local])."
)
@click.option(
    "-p",
    "--port",
    "port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Local service port (default: [client.local]).",
)
@click.option("-s", "--secure", is_flag=True, help="Reach the local service over TLS.")
def lease(
    config_path: Path, verbose: bool, host: str | None, port: int | None, secure: bool
) -> None:
    """Make a new, unregistered tenant for another local service (then: register)."""
    config = _load(config_path)
    local = LocalTarget(host=host or config.local.host, port=port or config.local.port, tls=secure)
    with exit_codes():
        directory = new_lease(config, local)
    click.echo(f'New lease at "{directory}".')


@main.command()
@config_option
@verbose_option
def tenants(config_path: Path, verbose: bool) -> None:
    """List the tenants: registered ones with their ID, then leases waiting to register."""
    found = _tenants(_load(config_path))
    if not found:
        click.echo("No tenants found.")
        return
    click.echo("Found tenants:")
    for tenant in found:
        if tenant.registration is not None:
            click.echo(f" - {tenant.name} {tenant.registration.registration_id}  {tenant.local}")
        else:
            click.echo(f"   {tenant.name}  {tenant.local}")


@main.command("config")
@config_option
@verbose_option
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["toml", "json"]),
    default="toml",
    show_default=True,
    help="How to print the configuration (with json, only the document goes to stdout).",
)
def show_config(config_path: Path, verbose: bool, output_format: str) -> None:
    """Check the configuration and print it as in effect, secrets masked."""
    config = _load(config_path)
    with exit_codes():
        ids = list(registered_tenants(config))
    registered = "This client isn't registered."
    if ids:
        registered = f"Registered with IDs [{', '.join(ids)}]"
    document = config_document(config)
    as_json = output_format == "json"
    click.echo(registered, err=as_json)
    click.echo(f"Verified configuration file at {config.path}.", err=as_json)
    click.echo(json.dumps(document, indent=2) if as_json else tomli_w.dumps(document).rstrip())


@main.command()
@config_option
@verbose_option
def version(config_path: Path, verbose: bool) -> None:
    """Print the version."""
    click.echo(f"petit client version {__version__}")


# ----------------------------------------------------------------------------- registrations


async def _exchange(
    config: ClientConfig, path: str, request_for: RequestFor, what: str
) -> tuple[ServerAddress, dict[str, object]]:
    """One signed request: the server's nonce in, our request out, its reply back; and the
    server that answered.

    The servers are tried in the configured order until one takes the request (the nodes of
    a cluster share one registry). Once a request is sent its outcome is final, whatever it
    is, so a registration is never made twice.
    """
    timeout = config.connect_timeout + config.handshake_timeout
    unreached: list[str] = []
    for server in config.tunnel_servers:
        sent = False
        try:
            with trio.fail_after(timeout):
                async with open_websocket(
                    server, client_ssl_context(config.ca), path, proxy=config.proxy
                ) as (websocket, fingerprint):
                    challenge = messages.decode(await websocket.get_message(), what="challenge")
                    nonce = b64decode(str(challenge.get("nonce", "")), what="challenge nonce")
                    request = messages.encode(request_for(nonce, fingerprint))
                    await websocket.send_message(request)
                    sent = True
                    reply = messages.decode(await websocket.get_message(), what=f"{what} reply")
                    return server, reply
        except trio.TooSlowError:
            error = f"no {what} answer from the server at {server} within {timeout:g} s"
        except trio.BrokenResourceError:
            error = f"the server at {server} closed the connection without a {what} answer"
        except ServerUnreachableError as exc:
            error = str(exc)
        if sent:
            raise ServerUnreachableError(error)
        unreached.append(error)
    raise ServerUnreachableError("; ".join(unreached))


def _check_reply(reply: dict[str, object], expected_type: str, failure: str) -> None:
    if reply.get("type") != expected_type:
        raise CliError(f"{failure}: {reply.get('error', reply)}", ExitCode.AUTH)


@main.command()
@config_option
@verbose_option
@click.option(
    "-t",
    "--tenant",
    "tenant",
    default=None,
    metavar="NAME",
    help='Tenant to register (default: the first unregistered lease, else "default").',
)
@click.option(
    "--token",
    envvar="PETIT_TOKEN",
    metavar="TOKEN",
    help="One-time enrollment token, when the server requires one (default: $PETIT_TOKEN).",
)
def register(config_path: Path, verbose: bool, tenant: str | None, token: str | None) -> None:
    """Create a key and register it with the server; print the ID and public URL."""
    config = _load(config_path)
    name = _tenant_to_register(config, tenant)
    with progress("Generating a key"):
        key = generate_key()

    def request_for(nonce: bytes, fingerprint: bytes) -> dict[str, object]:
        extra: dict[str, object] = {"vitae": config.vitae, **({"token": token} if token else {})}
        return messages.register_request(key, nonce, fingerprint, **extra)

    with exit_codes(), progress(f"Registering with {_servers(config)}"):
        server, reply = trio.run(_exchange, config, REGISTER_PATH, request_for, "registration")
    _check_reply(reply, "registered", "Unable to register")
    with exit_codes():
        registration = _registration_from(reply)
        directory = save_registration(config, name, private_key_to_pem(key), registration)
    rid = registration.registration_id
    _audit(
        config,
        "registration.created",
        f"registered {rid} for tenant {name}",
        id=rid,
        tenant=name,
        server=str(server),
    )
    click.echo(f'Registered with ID {rid} (tenant "{name}", key in {directory / "key"}).')
    click.echo(f"Public URL: {registration.endpoint}")
    _reload_running_client(config)


def _tenant_to_register(config: ClientConfig, requested: str | None) -> str:
    """The named tenant, else the first unregistered lease, else the default tenant."""
    existing = _tenants(config)
    if requested is None:
        waiting = [t for t in existing if t.leased and t.registration is None]
        name = waiting[0].name if waiting else DEFAULT_TENANT
    elif TENANT_NAME.match(requested):
        name = requested
    else:
        raise CliError(
            f"tenant name {requested!r}: use letters, digits, '.', '_' or '-'", ExitCode.USAGE
        )
    for tenant in existing:
        if tenant.name == name and tenant.registration is not None:
            raise CliError(
                f"Client is already registered as {tenant.registration.registration_id} "
                f"(tenant {name}); use -t NAME for another registration.",
                ExitCode.CONFIG,
            )
    return name


def _registration_from(reply: dict[str, object]) -> Registration:
    rid, port, endpoint = reply.get("id"), reply.get("port"), reply.get("endpoint", "")
    if not isinstance(rid, str) or not is_valid_id(rid) or not isinstance(port, int):
        raise RemoteProtocolError(f"registration reply without a valid 'id' and 'port': {reply}")
    return Registration(rid, port, str(endpoint))


def _unregister(config: ClientConfig, tenant: Tenant) -> None:
    """Prove the tenant's key to the server, which deletes its registration; drop our files."""
    assert tenant.registration is not None, "callers pick registered tenants"
    rid = tenant.registration.registration_id
    with exit_codes():
        key = tenant.key()

    def request_for(nonce: bytes, fingerprint: bytes) -> dict[str, object]:
        return messages.unregister_request(key, nonce, fingerprint, rid)

    with exit_codes(), progress(f"Unregistering {rid} from {_servers(config)}"):
        server, reply = trio.run(_exchange, config, UNREGISTER_PATH, request_for, "unregistration")
    _check_reply(reply, "unregistered", f"Unable to unregister {rid} (tenant {tenant.name})")
    with exit_codes():
        forget_registration(tenant)
    _audit(
        config,
        "registration.deleted",
        f"unregistered {rid} (tenant {tenant.name})",
        id=rid,
        tenant=tenant.name,
        server=str(server),
    )


def _servers(config: ClientConfig) -> str:
    """The servers a registration request may go to, for progress labels."""
    return " or ".join(str(server) for server in config.tunnel_servers)


def _audit(config: ClientConfig, event: str, message: str, **fields: object) -> None:
    """An audit record of a change this command made, in the client's audit file (the
    command makes it itself, whether the daemon runs or not: ``cli:<user>``)."""
    with exit_codes(), audit_to_file(config.log):
        audit(event, message, actor=cli_actor("cli"), **fields)


def _find_tenant(config: ClientConfig, registration_id: str | None, name: str | None) -> Tenant:
    """The tenant holding ``registration_id``, or the one called ``name``."""
    for tenant in _tenants(config):
        if registration_id is not None:
            if tenant.registration and tenant.registration.registration_id == registration_id:
                return tenant
        elif tenant.name == name:
            return tenant
    if registration_id is not None:
        raise CliError(f"No tenant found with ID {registration_id}.", ExitCode.FAILURE)
    raise CliError(f"No such tenant {tenants_directory(config) / str(name)}.", ExitCode.FAILURE)


def _tenant_options(function: Callable[..., None]) -> Callable[..., None]:
    """``-r/--regid ID`` and ``-t/--tenant NAME``: which tenant a command acts on."""
    function = click.option(
        "-t", "--tenant", "name", metavar="NAME", help="The tenant called NAME."
    )(function)
    return click.option(
        "-r", "--regid", "registration_id", metavar="ID", help="The tenant registered as ID."
    )(function)


@main.command()
@config_option
@verbose_option
@_tenant_options
@click.option("-a", "--all", "every", is_flag=True, help="Every registered tenant.")
def unregister(
    config_path: Path, verbose: bool, registration_id: str | None, name: str | None, every: bool
) -> None:
    """Delete registrations on the server (proving their keys), then their keys here.

    Use exactly one of -r, -t or -a. A leased tenant keeps its directory for a new
    registration; use evict to remove it.
    """
    if sum((registration_id is not None, name is not None, every)) != 1:
        raise CliError("Must use exactly one of -a -r -t.", ExitCode.USAGE)
    config = _load(config_path)
    if every:
        chosen = [t for t in _tenants(config) if t.registration is not None]
        if not chosen:
            raise CliError("Client is not registered.", ExitCode.CONFIG)
    else:
        chosen = [_find_tenant(config, registration_id, name)]
        if chosen[0].registration is None:
            raise CliError(f"Tenant {chosen[0].directory} is not registered.", ExitCode.CONFIG)
    for tenant in chosen:
        _unregister(config, tenant)
    paths = ", ".join(str(t.directory) for t in chosen)
    click.echo(f"Unregistered all tenants {paths}." if every else f"Unregistered tenant {paths}.")
    _reload_running_client(config)


@main.command()
@config_option
@verbose_option
@_tenant_options
def evict(config_path: Path, verbose: bool, registration_id: str | None, name: str | None) -> None:
    """Unregister a tenant if it is registered, then delete its directory (-r or -t)."""
    if registration_id is None and name is None:
        raise CliError("No target specified (use '-r' or '-t').", ExitCode.USAGE)
    if registration_id is not None and name is not None:
        raise CliError("Can't use '-r' and '-t' together.", ExitCode.USAGE)
    config = _load(config_path)
    tenant = _find_tenant(config, registration_id, name)
    if tenant.registration is not None:
        _unregister(config, tenant)
    with exit_codes():
        if tenant.directory.exists():  # unregistering removed it unless it is a lease
            remove_tenant(tenant)
    _audit(
        config,
        "tenant.evicted",
        f"evicted tenant {tenant.name}",
        tenant=tenant.name,
        directory=str(tenant.directory),
    )
    click.echo(f"Evicted tenant at {tenant.directory}.")
    if tenant.registration is not None:
        _reload_running_client(config)


# ----------------------------------------------------------------------------- the daemon


@main.command()
@config_option
@verbose_option
@click.option("--foreground", is_flag=True, help="Stay attached instead of backgrounding.")
def start(config_path: Path, verbose: bool, foreground: bool) -> None:
    """Open the tunnel (in the background unless --foreground) and keep it up.

    In the background, wait until the tunnel is up, or until the first attempt failed
    (the client keeps trying), and say which.
    """
    started = start_daemon(
        "petit_client",
        config_path,
        open_daemon=open_daemon,
        started="Client started on pid {pid}.",
        verbose=verbose,
        foreground=foreground,
    )
    _report_tunnel(_load(config_path), started)


def _report_tunnel(config: ClientConfig, started: PidInfo) -> None:
    """Wait until the new daemon's tunnel is up, or for one attempt per configured server;
    say how it went. With one server its first error ends the wait; with several, an error
    only says one server failed (the client tries the next), so the wait goes on."""
    servers_count = len(config.tunnel_servers)
    timeout = (config.connect_timeout + config.handshake_timeout) * servers_count
    host = local_address(config.listen_addr)

    async def first_attempts() -> dict[str, object]:
        reply: dict[str, object] = {}
        with trio.move_on_after(timeout):
            while True:
                reply = await send_control(host, started.listen, "STATUS")
                if reply.get("status") == "connected" or (
                    servers_count == 1 and reply.get("lastError")
                ):
                    break
                await trio.sleep(0.1)
        return reply

    servers = " or ".join(map(str, config.tunnel_servers))
    with progress(f"Waiting for the tunnel to {servers}"):
        try:
            reply = trio.run(first_attempts)
        except ControlError as exc:
            reply = {"lastError": str(exc)}
    if reply.get("status") == "connected":
        ids = [
            r.get("id")
            for r in _objects(reply.get("registration"))
            if r.get("state") == "connected"
        ]
        server = reply.get("server", config.server)  # the one it reached, of several
        click.echo(f"Tunnel up to {server} for {', '.join(map(str, ids))}.")
        return
    why = reply.get("lastError") or f"not up within {timeout:g} s"
    click.echo(
        f"warning: the tunnel is not up yet ({why}); the client keeps trying "
        f"(petit-client status -c {config.path})",
        err=True,
    )


@main.command()
@config_option
@verbose_option
def stop(config_path: Path, verbose: bool) -> None:
    """Stop the running client (STOP on its control port)."""
    config = _load(config_path)
    click.echo(stop_daemon(config.directory, "client", local_address(config.listen_addr)))


@main.command()
@config_option
@verbose_option
@click.option("--json", "as_json", is_flag=True, help="Print the STATUS reply as JSON.")
def status(config_path: Path, verbose: bool, as_json: bool) -> None:
    """Show the running client's state, each server's session, traffic, reconnects and last
    error, then each registration (+ connected, - not)."""
    config = _load(config_path)
    with exit_codes():
        info = running_daemon(config.directory, "client")
        reply = control_command(local_address(config.listen_addr), info.listen, "STATUS")
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(
        f'Client has status "{reply.get("status")}" on pid {info.pid}, up {reply.get("uptime")} s.'
    )
    _echo_servers(config, reply)
    click.echo(
        f"{reply.get('activeStreams')} stream(s) in flight, {reply.get('bytesIn')} bytes in, "
        f"{reply.get('bytesOut')} bytes out, {reply.get('reconnects')} reconnect(s)."
    )
    if reply.get("lastError"):
        click.echo(f"Last error at {_when(reply.get('lastErrorAt'))}: {reply.get('lastError')}")
    for registration in _objects(reply.get("registration")):
        mark = "+" if registration.get("state") == "connected" else "-"
        click.echo(
            f" {mark} {registration.get('id')} {registration.get('tenant')} "
            f"{registration.get('state')} -> {registration.get('local')}: "
            f"{registration.get('activeStreams')} stream(s), {registration.get('bytesIn')} bytes "
            f"in, {registration.get('bytesOut')} bytes out"
        )
        check = registration.get("loopback")
        if isinstance(check, dict):
            outcome = "ok" if check.get("ok") else f"failed: {check.get('error')}"
            click.echo(f"     loopback check at {_when(check.get('at'))}: {outcome}")
    if info.extra.get("ports"):
        ports = info.extra["ports"]
        if isinstance(ports, dict) and "status" in ports:
            click.echo(f"As JSON: curl http://127.0.0.1:{ports['status']}/status")


def _echo_servers(config: ClientConfig, reply: dict[str, object]) -> None:
    """One line per server: each configured one (then any other the daemon, started with an
    older config, has a session to), with its session's state, since when, its last error;
    a server with workers has a line per worker session."""
    sessions: dict[str, list[dict[str, object]]] = {}
    for session in _objects(reply.get("servers")):
        sessions.setdefault(str(session.get("server")), []).append(session)
    for server in dict.fromkeys([*map(str, config.tunnel_servers), *sessions]):
        if server not in sessions:  # serverSessions < servers: a spare for a session that fails
            click.echo(f"Server {server}: standby (serverSessions = {config.session_count})")
            continue
        for session in sorted(sessions[server], key=_worker_order):
            state = str(session.get("status"))
            if state == "connected":
                state += f" since {_when(session.get('connectedSince'))}"
            if session.get("lastError"):
                state += f", last error: {session.get('lastError')}"
            worker = "" if session.get("worker") is None else f" worker {session['worker']}"
            click.echo(f"Server {server}{worker}: {state}")


def _worker_order(session: dict[str, object]) -> int:
    """A server's sessions by worker index; one without (still dialling) first."""
    worker = session.get("worker")
    return worker if isinstance(worker, int) else -1


def _objects(value: object) -> list[dict[str, object]]:
    """The JSON objects in a reply's list (anything else is skipped)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


@main.command()
@config_option
@verbose_option
def sping(config_path: Path, verbose: bool) -> None:
    """Ask the running client to ping the server through the tunnel; print the round trip."""
    # A PING the client cannot answer means the server is out of its reach (tunnel down).
    reply = _ask_client(_load(config_path), "PING", refused=ExitCode.UNAVAILABLE)
    round_trip = reply.get("roundTrip")
    if not isinstance(round_trip, int | float):
        raise CliError(f"the client answered PING without a round trip: {reply}")
    click.echo(f"Server ping: {round_trip * 1000:.1f} ms")


@main.command()
@config_option
@verbose_option
@click.argument("level", type=click.Choice(LOG_LEVELS, case_sensitive=False))
def log(config_path: Path, verbose: bool, level: str) -> None:
    """Change the running client's log level (debug, info, warning or error)."""
    reply = _ask_client(_load(config_path), f"LOG {level.lower()}")
    click.echo(f'Logging level set to "{reply.get("level", level)}".')


main.add_command(service_commands("client", DEFAULT_CONFIG_PATH, load_client_config))

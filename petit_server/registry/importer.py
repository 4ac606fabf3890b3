"""``petit-server import-registry`` and ``migrate-registry``: registrations from the original
petit (its Redis keys or its JSON registry file) or from another petit backend.

What is kept: IDs, ports, aliases, vitae, and petit's own keys and tokens. What cannot be:
the original petit's keys are RSA (it used them for SSH and an RSA-OAEP challenge), and the
tunnel handshake proves Ed25519 keys only. Such a registration is imported *keyless*: it
keeps its ID, port and aliases and answers 503 until its customer claims it with a claim
token bound to that ID (``token create --for ID``, or ``--claim-tokens FILE`` here), which
gives it the customer's new Ed25519 key once. Nobody can prove a keyless registration
meanwhile, and a registration that has a key can never be claimed: the no-takeover rule
holds. The RSA key's MD5 fingerprint (the one the original showed) stays in the vitae as
``legacyKeyFingerprint`` so the operator can tell the customers apart.

Imports are idempotent: what is already there (same ID and port, same key or claimed since)
is counted as unchanged; nothing in the target is ever replaced (a conflict is reported and
that registration skipped).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import click
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from petit.auth import is_valid_id
from petit.cli import (
    CliError,
    config_option as shared_config_option,
    exit_codes,
    verbose_option,
)
from petit.daemon import ExitCode
from petit.errors import ConfigError, PetitError
from petit.lockfile import AlreadyRunningError, ProcessLock
from petit.logs import audit, audit_to_file, cli_actor
from petit.statefile import read_json, write_atomic
from petit_server.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_REGISTRY_PREFIX,
    ServerConfig,
    load_server_config,
)
from petit_server.registry.backend import open_registry
from petit_server.registry.base import (
    Registration,
    Registry,
    RegistryError,
    Snapshot,
    check_alias,
    plan_merge,
    redacted_url,
)
from petit_server.registry.file_backend import FileRegistry

config_option = shared_config_option(DEFAULT_CONFIG_PATH, "Server")
ORIGINAL_PREFIX = "g2c/"


@dataclasses.dataclass
class Source:
    """What was read, from where (for the audit trail), and what of it cannot be imported
    (one line each)."""

    snapshot: Snapshot
    origin: str
    skipped: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def read_file_source(path: Path) -> Source:
    """A registry file: the original petit's (``registeredIds``) or petit's own."""
    document = read_json(path, what="registry")
    if isinstance(document, dict) and isinstance(document.get("registeredIds"), dict):
        return _original_file(path, document)
    return Source(FileRegistry(path, first_port=0).snapshot(), f"registry {path}")


def _original_file(path: Path, document: dict[str, Any]) -> Source:
    source = Source(Snapshot(), f"the original petit's registry {path}")
    for rid, entry in document["registeredIds"].items():
        if not isinstance(entry, dict):
            source.skipped.append(f"ID {rid}: not an object in {path}")
            continue
        port, pem, vitae = entry.get("port"), entry.get("key"), entry.get("vitae")
        _add_original(source, str(rid), port, pem, vitae, entry.get("aliases") or [])
    highest = document.get("maxRegisteredId")
    if isinstance(highest, int):
        source.snapshot.next_id = max(source.snapshot.next_id, highest + 1)
    return source


def read_redis_source(url: str, prefix: str | None) -> Source:
    """A Redis: the original petit's keys (``g2c/allids``...) or petit's own."""
    try:
        import redis  # the optional extra, only when a Redis is named
    except ImportError:
        raise ConfigError(
            "--from-redis needs the redis package: pip install 'petit[redis]'"
        ) from None
    client = redis.Redis.from_url(url, socket_timeout=10, decode_responses=True)
    try:
        original = prefix if prefix is not None else ORIGINAL_PREFIX
        if client.exists(f"{original}allids"):
            return _original_redis(client, original, url)
        petit_prefix = prefix if prefix is not None else DEFAULT_REGISTRY_PREFIX
        from petit_server.registry.redis_backend import RedisRegistry

        registry = RedisRegistry(url, prefix=petit_prefix, first_port=0)
        try:
            registry.load()
            return Source(registry.snapshot(), registry.where)
        finally:
            registry.close()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise PetitError(f"cannot reach Redis at {redacted_url(url)}: {exc}") from None
    except redis.ResponseError as exc:
        raise ConfigError(f"Redis at {redacted_url(url)}: {exc}") from None
    finally:
        client.close()


def _original_redis(client: Any, prefix: str, url: str) -> Source:
    """The original's keys: ``allids``, ``ids/<id>/{port,key,vitae}``, ``aliases/<alias>``."""
    source = Source(
        Snapshot(), f"the original petit's Redis {redacted_url(url)} (prefix {prefix!r})"
    )
    ids = sorted(client.smembers(f"{prefix}allids"))
    aliases: dict[str, list[str]] = {}
    alias_head = f"{prefix}aliases/"
    alias_keys = sorted(client.scan_iter(match=f"{alias_head}*", count=1000))
    owners = client.mget(alias_keys) if alias_keys else []
    for alias_key, owner in zip(alias_keys, owners, strict=True):
        if owner is not None:
            aliases.setdefault(str(owner), []).append(alias_key[len(alias_head) :])
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        for field in ("port", "key", "vitae"):
            pipe.get(f"{prefix}ids/{rid}/{field}")
    replies = pipe.execute()
    for index, rid in enumerate(ids):
        port, pem, vitae_text = replies[3 * index : 3 * index + 3]
        try:
            vitae = json.loads(vitae_text) if vitae_text else {}
        except json.JSONDecodeError:
            source.skipped.append(f"ID {rid}: vitae is not JSON (imported without it)")
            vitae = {}
        _add_original(source, rid, port, pem, vitae, aliases.pop(rid, []))
    for owner, names in sorted(aliases.items()):
        source.skipped.append(f"alias(es) {', '.join(names)}: ID {owner} is not registered")
    highest = client.get(f"{prefix}max/id")
    if highest is not None and str(highest).isdigit():
        source.snapshot.next_id = max(source.snapshot.next_id, int(highest) + 1)
    return source


def _add_original(
    source: Source, rid: str, port: object, pem: object, vitae: object, aliases: object
) -> None:
    """One registration of the original petit, as petit keeps it (or a skipped line)."""
    if not is_valid_id(rid):
        source.skipped.append(f"ID {rid}: not a number (petit IDs are decimal numbers)")
        return
    try:
        port_number = int(str(port))
    except ValueError:
        source.skipped.append(f"ID {rid}: no valid port ({port!r})")
        return
    if not 1 <= port_number <= 65535:
        source.skipped.append(f"ID {rid}: port {port_number} out of range")
        return
    public_key, facts = _original_key(pem)
    kept_aliases = []
    for alias in aliases if isinstance(aliases, list) else []:
        try:
            check_alias(str(alias).lower())
        except RegistryError as exc:
            source.skipped.append(f"ID {rid}: alias {alias!r} dropped: {exc}")
            continue
        kept_aliases.append(str(alias).lower())
    source.snapshot.registrations.append(
        Registration(
            registration_id=rid,
            public_key=public_key,
            port=port_number,
            created=time.time(),
            vitae={**_flat(vitae), **facts},
            aliases=kept_aliases,
        )
    )
    source.snapshot.next_id = max(source.snapshot.next_id, int(rid) + 1)


def _original_key(pem: object) -> tuple[bytes, dict[str, str]]:
    """The 32-byte key if the original stored an Ed25519 one, else keyless plus what the
    operator needs to recognise the old key."""
    # Here, not at the top: the server's CLI module, which the running server imports too,
    # registers this command; only an import reads PEM keys.
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(str(pem).encode())
    except (ValueError, TypeError):
        return b"", {"legacyKeyFingerprint": "unreadable"}
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw, {}
    try:
        openssh = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    except ValueError:
        return b"", {"legacyKeyFingerprint": "unreadable"}
    blob = base64.b64decode(openssh.split()[1])
    # MD5 only to show the fingerprint the original petit showed, never to check anything.
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return b"", {"legacyKeyFingerprint": ":".join(digest[i : i + 2] for i in range(0, 32, 2))}


def _flat(vitae: object) -> dict[str, str]:
    """Vitae as petit keeps them: strings (nested values as JSON)."""
    if not isinstance(vitae, dict):
        return {}
    return {
        str(k): v if isinstance(v, str) else json.dumps(v)
        for k, v in vitae.items()
        if v is not None
    }


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass
class Outcome:
    """What an import did (or, dry, would do)."""

    registrations: int = 0
    keyless: list[str] = dataclasses.field(default_factory=list)  # IDs awaiting a claim
    tokens: int = 0
    unchanged: int = 0
    conflicts: list[str] = dataclasses.field(default_factory=list)
    claim_tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # ID -> secret


async def import_snapshot(
    target: Registry, source: Source, *, dry_run: bool, claim_tokens: bool
) -> Outcome:
    """Merge ``source`` into ``target``; progress on stderr for large imports.

    Audited as ``offline:<user>``: one record per registration and token added (by the
    backend's ``merge``), one ``registry.imported`` summary, and each claim token created.
    """
    plan = plan_merge(target.snapshot(), source.snapshot)
    outcome = Outcome(
        registrations=len(plan.registrations),
        keyless=[r.registration_id for r in plan.registrations if not r.public_key],
        tokens=len(plan.tokens),
        unchanged=plan.unchanged,
        conflicts=list(plan.conflicts),
    )
    if dry_run:
        return outcome
    large = len(plan.registrations) + len(plan.tokens) > 1000

    def progress(done: int, total: int) -> None:
        if large:
            click.echo(f"imported {done}/{total}", err=True)

    actor = cli_actor()
    late = await target.merge(plan, progress, actor=actor)
    outcome.conflicts += late
    outcome.registrations -= len(late)
    if outcome.registrations or outcome.tokens:  # nothing added, nothing to audit
        audit(
            "registry.imported",
            f"imported {outcome.registrations} registration(s) and {outcome.tokens} token(s) "
            f"from {source.origin}",
            actor=actor,
            source=source.origin,
            target=target.where,
            registrations=outcome.registrations,
            tokens=outcome.tokens,
            unchanged=outcome.unchanged,
            conflicts=len(outcome.conflicts),
        )
    imported = {r.registration_id for r in target.all()}
    outcome.keyless = [rid for rid in outcome.keyless if rid in imported]
    if claim_tokens:
        for rid in outcome.keyless:
            _, secret = await target.create_token(
                f"claim for imported ID {rid}", for_id=rid, actor=actor
            )
            outcome.claim_tokens[rid] = secret
    return outcome


def _report(outcome: Outcome, target: Registry, *, dry_run: bool, claim_file: Path | None) -> None:
    for conflict in outcome.conflicts:
        click.echo(f"not imported: {conflict}", err=True)
    verb = "Would import" if dry_run else "Imported"
    click.echo(
        f"{verb} {outcome.registrations} registration(s) ({len(outcome.keyless)} awaiting a key) "
        f"and {outcome.tokens} token(s) into the {target.where}; {outcome.unchanged} already "
        f"there, {len(outcome.conflicts)} conflict(s)."
    )
    if outcome.keyless:
        click.echo(
            f"{len(outcome.keyless)} registration(s) had an RSA key from the original petit, which "
            "petit's Ed25519 handshake cannot use: they keep their ID, port and aliases and "
            "answer 503 until claimed. For each, give the customer a claim token "
            + (
                f"(written to {claim_file}, one 'ID TOKEN' per line)"
                if claim_file is not None and not dry_run
                else "(petit-server token create --for ID)"
            )
            + "; they run: petit-client register --token <token> (on petit's client) and keep "
            "their ID and URL."
        )
    if outcome.conflicts:
        raise CliError(
            f"{len(outcome.conflicts)} registration(s) not imported (see above); "
            "nothing in the target was replaced",
            ExitCode.FAILURE,
        )


def _write_into(
    config: ServerConfig,
    target_config: ServerConfig,
    source: Source,
    *,
    dry_run: bool,
    claim_file: Path | None,
    locked: bool,
) -> None:
    """Import ``source`` into the registry ``target_config`` names, and report.

    With ``locked`` the server must be stopped, and cannot start meanwhile (its lock is held).
    """
    for line in source.skipped:
        click.echo(f"skipped: {line}", err=True)
    lock = ProcessLock(config.directory, "server")
    if locked:
        try:
            lock.acquire()
        except AlreadyRunningError:
            running = open_registry(config, load=False)  # only to name it
            running.close()
            raise CliError(
                f"the server is running and uses the {running.where}: "
                "stop it first (petit-server stop)",
                ExitCode.RUNNING,
            ) from None
    try:
        target = open_registry(target_config)
        try:
            # A dry run changes nothing, so it audits nothing (and creates no audit file).
            with contextlib.nullcontext() if dry_run else audit_to_file(config.log):
                outcome = trio.run(
                    lambda: import_snapshot(
                        target, source, dry_run=dry_run, claim_tokens=claim_file is not None
                    )
                )
        finally:
            target.close()
    finally:
        if locked:
            lock.release()
    if outcome.claim_tokens and claim_file is not None:
        lines = "".join(f"{rid} {secret}\n" for rid, secret in sorted(outcome.claim_tokens.items()))
        write_atomic(claim_file, lines.encode(), mode=0o600)
    _report(outcome, target, dry_run=dry_run, claim_file=claim_file)


# ----------------------------------------------------------------------------- commands

_dry_run = click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")


@click.command("import-registry")
@config_option
@verbose_option
@click.option(
    "--from-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A registry file: the original petit's JSON registry, or a petit registry.json.",
)
@click.option("--from-redis", metavar="URL", help="A Redis holding the original petit's keys.")
@click.option(
    "--from-prefix",
    metavar="PREFIX",
    help=f"Key prefix in --from-redis (default {ORIGINAL_PREFIX}, "
    f"else petit's {DEFAULT_REGISTRY_PREFIX}).",
)
@_dry_run
@click.option(
    "--claim-tokens",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Create a claim token for each registration imported without a usable key and "
    "write 'ID TOKEN' lines to this file (mode 0600).",
)
def import_registry(
    config_path: Path,
    verbose: bool,
    from_file: Path | None,
    from_redis: str | None,
    from_prefix: str | None,
    dry_run: bool,
    claim_tokens: Path | None,
) -> None:
    """Import the original petit's registry (Redis keys or JSON file) into this server's
    registry (file or Redis), keeping IDs, ports, keys and aliases."""
    if (from_file is None) == (from_redis is None):
        raise CliError("give exactly one of --from-file PATH and --from-redis URL", ExitCode.USAGE)
    with exit_codes():
        config = load_server_config(config_path)
        source = (
            read_file_source(from_file)
            if from_file is not None
            else read_redis_source(str(from_redis), from_prefix)
        )
        # A registry file is only written while the server is stopped; Redis may be written
        # while nodes run: they pick the new registrations up.
        locked = config.registry_backend == "file"
        _write_into(config, config, source, dry_run=dry_run, claim_file=claim_tokens, locked=locked)


@click.command("migrate-registry")
@config_option
@verbose_option
@click.option("--to", "backend", type=click.Choice(["file", "redis"]), required=True)
@click.option("--url", help="With --to redis: the Redis (default [server.registry] url).")
@click.option("--prefix", help="With --to redis: the key prefix (default: [server.registry]).")
@click.option(
    "--file",
    "file_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --to file: the registry file (default registryfile).",
)
@_dry_run
def migrate_registry(
    config_path: Path,
    verbose: bool,
    backend: str,
    url: str | None,
    prefix: str | None,
    file_path: Path | None,
    dry_run: bool,
) -> None:
    """Copy this server's registry, tokens included, to the other backend; then point
    [server.registry] backend at it and restart the server."""
    with exit_codes():
        config = load_server_config(config_path)
        target_config = dataclasses.replace(
            config,
            registry_backend=backend,
            registry_url=url or config.registry_url,
            registry_prefix=prefix or config.registry_prefix,
            registry_file=(file_path or config.registry_file).resolve(),
        )
        if _same_registry(config, target_config):
            raise CliError(f"the registry is already in the {backend} backend", ExitCode.USAGE)
        # A migration moves everything at one moment: the server is stopped meanwhile.
        source = open_registry(config)
        try:
            snapshot = Source(source.snapshot(), source.where)
        finally:
            source.close()
        _write_into(config, target_config, snapshot, dry_run=dry_run, claim_file=None, locked=True)
    if not dry_run:
        setting = (
            "and url to the URL you migrated to"  # not echoed: it may hold a password
            if backend == "redis"
            else f'and registryfile = "{target_config.registry_file}"'
        )
        click.echo(
            f'Now set [server.registry] backend = "{backend}" {setting} in {config.path} '
            "and restart the server."
        )


def _same_registry(one: ServerConfig, other: ServerConfig) -> bool:
    if one.registry_backend != other.registry_backend:
        return False
    if one.registry_backend == "file":
        return one.registry_file == other.registry_file
    return (one.registry_url, one.registry_prefix) == (other.registry_url, other.registry_prefix)

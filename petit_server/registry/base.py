"""What every registry backend shares: the records, the ``Registry`` interface, the rules.

Two backends implement ``Registry``: ``FileRegistry`` (``file_backend.py``: one JSON file, the
default) and ``RedisRegistry`` (``redis_backend.py``: shared by several server nodes);
``backend.py`` picks the configured one. Reads (``route``, ``public_key_of``, ``get``) are
synchronous and answer from memory (``RegistryView``), because they run per request and per
handshake; changes are ``async`` so that a backend that talks to a network store can do so
without blocking the trio loop. The checks, audit records, token rules and control commands
live here once, so the backends cannot drift apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from petit.auth import is_valid_id, key_fingerprint
from petit.errors import AuthError, PetitError
from petit.logs import audit
from petit_server.policy import Policy, PolicyError, parse_assignments, policy_from_json
from petit_server.usage import RegistrationUsage, UsageStore

FIRST_ID = 1001
FORMAT_VERSION = 1
ENROLLMENT_PREFIX = "pt_"
LAST_PORT = 65535  # registrations' TCP ports run from [server] firstPort up to this
CLAIM_PREFIX = "pc_"  # a token bound to one registration that awaits its key (see importer)
SERVER_ACTOR = "server"  # who changed the registry, in audit records, unless the caller says
MAX_NOTE = 200  # characters
MAX_HOSTNAME = 253  # characters, the DNS limit
ENROLLMENT_REFUSED = (
    "registration refused: a valid enrollment token is required (petit-server token create)"
)
CLAIM_REFUSED = (
    "registration refused: this claim token is unknown, used or revoked "
    "(ask the operator for a new one: petit-server token create --for ID)"
)
COMMAND_USAGE = {
    "ADDALIAS": "ADDALIAS <id> <alias>",
    "DELALIAS": "DELALIAS [<id>] <alias>",
    "TOKEN": "TOKEN CREATE [note...] | TOKEN CLAIM <id> [note...] | TOKEN LIST | TOKEN REVOKE <id>",
    "POLICY": "POLICY <id> [key=value...] (an empty value resets the key)",
}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ID_HEAD = re.compile(r"[0-9]+(?:[.-]|$)")


class RegistryError(PetitError):
    """A registry change was refused; the message is what the operator reads."""


class RegistryUnavailableError(PetitError):
    """The registry's store cannot be reached right now; the change was not made."""


@dataclass(slots=True)
class Registration:
    """One registered client identity.

    An empty ``public_key`` is a registration imported from the original petit, whose RSA key
    the Ed25519 handshake cannot use: it keeps its ID, port and aliases, routes nowhere until
    its customer claims it with a claim token bound to its ID, and no key proves it meanwhile.
    """

    registration_id: str
    public_key: bytes
    port: int
    created: float
    vitae: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)  # its own limits (policy.py)

    @property
    def fingerprint(self) -> str:
        """The key's short form for status output, or why there is none yet."""
        return key_fingerprint(self.public_key) if self.public_key else "(awaiting its claim)"

    def to_json(self) -> dict[str, object]:
        """The registry file's form."""
        document: dict[str, object] = {
            "public_key": self.public_key.hex(),
            "port": self.port,
            "created": self.created,
            "vitae": self.vitae,
            "aliases": self.aliases,
        }
        if self.policy:  # only when set: registries written before policies stay as they were
            document["policy"] = self.policy.to_json()
        return document


@dataclass(slots=True)
class EnrollmentToken:
    """A one-time permission to register; only the SHA-256 of its secret is kept.

    With ``for_id`` it is a claim token: it does not create a registration but gives a key
    to that existing, keyless one (an imported registration), keeping its ID.
    """

    token_id: str
    digest: str  # hex SHA-256 of the secret
    note: str
    created: float
    used_by: str | None = None
    used_at: float | None = None
    revoked_at: float | None = None
    for_id: str | None = None

    @property
    def state(self) -> str:
        """``unused``, ``used`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        return "unused" if self.used_by is None else "used"

    def to_json(self) -> dict[str, object]:
        """The registry file's form."""
        return {
            "sha256": self.digest,
            "note": self.note,
            "created": self.created,
            "used_by": self.used_by,
            "used_at": self.used_at,
            "revoked_at": self.revoked_at,
            "for_id": self.for_id,
        }


@dataclass(slots=True)
class Snapshot:
    """A whole registry as plain data: what import and migration move between backends."""

    registrations: list[Registration] = field(default_factory=list)
    tokens: list[EnrollmentToken] = field(default_factory=list)
    next_id: int = FIRST_ID


@dataclass(slots=True)
class MergePlan:
    """What merging a snapshot into a registry would do (nothing is changed by planning)."""

    registrations: list[Registration] = field(default_factory=list)  # to add
    tokens: list[EnrollmentToken] = field(default_factory=list)  # to add
    unchanged: int = 0  # already there, identical
    conflicts: list[str] = field(default_factory=list)  # refused, one line each
    next_id: int = FIRST_ID


Progress = Callable[[int, int], None]  # (done, total)


class Registry(Protocol):
    """What the server, the CLI and the importer use, whatever the backend."""

    @property
    def where(self) -> str:
        """Where the registry lives, for messages (a file, or a Redis URL without password)."""

    def get(self, registration_id: str) -> Registration | None: ...
    def public_key_of(self, registration_id: str) -> bytes | None: ...
    def all(self) -> list[Registration]: ...
    def route(self, host: str) -> str | None: ...
    def tokens(self) -> list[EnrollmentToken]: ...
    def snapshot(self) -> Snapshot: ...

    # ``actor`` (who asked: ``tunnel:<ip>``, ``control``, ``admin:<ip>``, ``offline:<user>``)
    # goes into the audit records each change writes.
    async def register(
        self,
        public_key: bytes,
        vitae: dict[str, str],
        *,
        token: str | None = None,
        actor: str = SERVER_ACTOR,
    ) -> Registration: ...
    async def unregister(self, registration_id: str, *, actor: str = SERVER_ACTOR) -> None: ...
    async def add_alias(
        self, alias: str, registration_id: str, *, actor: str = SERVER_ACTOR
    ) -> None: ...
    async def remove_alias(
        self, alias: str, registration_id: str | None = None, *, actor: str = SERVER_ACTOR
    ) -> None: ...
    async def set_policy(
        self, registration_id: str, changes: Mapping[str, object], *, actor: str = SERVER_ACTOR
    ) -> Policy: ...
    async def create_token(
        self, note: str, *, for_id: str | None = None, actor: str = SERVER_ACTOR
    ) -> tuple[EnrollmentToken, str]: ...
    async def revoke_token(self, token_id: str, *, actor: str = SERVER_ACTOR) -> None: ...
    async def merge(
        self, plan: MergePlan, progress: Progress | None = None, *, actor: str = SERVER_ACTOR
    ) -> list[str]:
        """Add a planned import, auditing each registration and token it adds; what another
        writer took meanwhile comes back as conflicts."""

    def close(self) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the in-memory view fresh while the server runs (a no-op for a file)."""

    async def catch_up(self, registration_ids: Sequence[str]) -> None:
        """Bring these registrations' view up to date before a hello is checked, so one
        registered on another node a moment ago is known here (a no-op for a file)."""

    async def share_usage(self, usage: UsageStore) -> None:
        """Add this node's usage to totals shared by every node, until cancelled (returns at
        once for a file: this node's memory is the only record)."""

    async def usage_totals(
        self, registration_ids: Sequence[str]
    ) -> dict[str, RegistrationUsage] | None:
        """Every node's usage of these registrations, or None if usage is not shared (a file).
        RegistryError or RegistryUnavailableError if the shared totals cannot be read."""


class RegistryView:
    """The in-memory registry both backends keep and answer reads from: the request path and
    handshakes never wait on storage."""

    def __init__(self) -> None:
        self._registrations: dict[str, Registration] = {}
        self._tokens: dict[str, EnrollmentToken] = {}
        self._alias_owner: dict[str, str] = {}
        self._next_id = FIRST_ID

    def get(self, registration_id: str) -> Registration | None:
        """The registration with this ID, if any."""
        return self._registrations.get(registration_id)

    def public_key_of(self, registration_id: str) -> bytes | None:
        """The registered public key of an ID, or None (also while it awaits its claim)."""
        registration = self._registrations.get(registration_id)
        return None if registration is None else registration.public_key or None

    def all(self) -> list[Registration]:
        """Every registration, by ID."""
        return sorted(self._registrations.values(), key=lambda r: int(r.registration_id))

    def route(self, host: str) -> str | None:
        """The registration a Host header names: an alias first, then ``<ID>[-…].<domain>``."""
        return route_host(host, self._alias_owner, self._registrations)

    def tokens(self) -> list[EnrollmentToken]:
        """Every token ever created, oldest first."""
        return sorted(self._tokens.values(), key=lambda t: int(t.token_id))


# -------------------------------------------------------------------- shared by both backends


def audit_registered(
    registration: Registration, token_id: str | None, *, claimed: bool, actor: str
) -> None:
    """The audit records of a new registration (or a claimed one) and of the token it used;
    both backends write the same records."""
    rid = registration.registration_id
    audit(
        "registration.claimed" if claimed else "registration.created",
        f"{'claimed' if claimed else 'registered'} {rid}",
        actor=actor,
        id=rid,
        port=registration.port,
        fingerprint=registration.fingerprint,
    )
    if token_id is not None:
        audit(
            "token.used",
            f"token {token_id} registered {rid}",
            actor=actor,
            token=token_id,
            id=rid,
        )


def audit_unregistered(registration_id: str, aliases: list[str], *, actor: str) -> None:
    """The audit record of a removed registration (with the aliases that went with it)."""
    audit(
        "registration.deleted",
        f"unregistered {registration_id}",
        actor=actor,
        id=registration_id,
        aliases=aliases,
    )


def audit_alias(event: str, alias: str, registration_id: str, *, actor: str) -> None:
    """The audit record of ``alias.added`` or ``alias.removed``."""
    preposition = "to" if event == "alias.added" else "from"
    verb = event.partition(".")[2]
    audit(
        event,
        f"alias {alias} {verb} {preposition} {registration_id}",
        actor=actor,
        alias=alias,
        id=registration_id,
    )


def audit_policy(registration_id: str, policy: Policy, *, actor: str) -> None:
    """The audit record of a changed registration policy (the whole policy after it)."""
    shown = policy.to_json()
    audit(
        "policy.changed",
        f"policy of {registration_id} is now {json.dumps(shown) if shown else 'the defaults'}",
        actor=actor,
        id=registration_id,
        policy=shown,
    )


def audit_imported(registration: Registration, *, actor: str) -> None:
    """The audit record of a registration an import or migration added, aliases included
    (one record, not one more per alias)."""
    rid = registration.registration_id
    audit(
        "registration.imported",
        f"imported {rid}",
        actor=actor,
        id=rid,
        port=registration.port,
        fingerprint=registration.fingerprint,
        aliases=registration.aliases,
    )


def audit_token_created(token: EnrollmentToken, *, actor: str, imported: bool = False) -> None:
    """The audit record of a new token: its ID and note (a claim token: its ID to claim);
    an imported one (``token.imported``) also says whether it was used or revoked."""
    fields: dict[str, object] = {"token": token.token_id, "note": token.note}
    if token.for_id is not None:
        fields["for_id"] = token.for_id
    if imported:
        fields["state"] = token.state
    event, verb = ("token.imported", "imported") if imported else ("token.created", "created")
    audit(event, f"token {token.token_id} {verb}", actor=actor, **fields)


def audit_token_revoked(token_id: str, *, actor: str) -> None:
    """The audit record of a revoked token."""
    audit("token.revoked", f"token {token_id} revoked", actor=actor, token=token_id)


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redacted_url(url: str) -> str:
    """The URL with its passwords masked (in the user info and a ``password`` query
    parameter, both of which redis-py reads), for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:****@{host}"))
    return _QUERY_PASSWORD.sub(r"\1****", url)


def registration_id_for_host(host: str) -> str | None:
    """The original petit's routing rule: the digits before the first ``-`` or ``.``."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.split(":", 1)[0]
    for separator in ("-", "."):
        head, found, _ = name.partition(separator)
        if found and head.isdigit() and not head.startswith("0"):
            return head
    return None


def route_host(
    host: str, alias_owner: dict[str, str], registrations: dict[str, Registration]
) -> str | None:
    """The routing rule on a registry's data: an alias first, then ``<ID>[-…].<domain>``.
    A fully qualified name's final dot (``shop.example.com.``) names the same host."""
    name = host.strip().lower().partition(":")[0].removesuffix(".")
    owner = alias_owner.get(name)
    if owner is not None:
        return owner
    registration_id = registration_id_for_host(host)
    return registration_id if registration_id in registrations else None


def token_to_present(token: str | None, *, require_token: bool) -> str | None:
    """The token a registration request must be checked against: every claim token (so a
    mistyped one is refused rather than silently registering a new ID), an enrollment token
    only when the server requires one (otherwise it is ignored, as before)."""
    if token is not None and (require_token or token.startswith(CLAIM_PREFIX)):
        return token
    if require_token:
        raise AuthError(ENROLLMENT_REFUSED)
    return None


def new_token(token_id: str, note: str, for_id: str | None) -> tuple[EnrollmentToken, str]:
    """A fresh token (checked note) and its secret."""
    if len(note) > MAX_NOTE or not note.isprintable():
        raise RegistryError(f"A token note is at most {MAX_NOTE} printable characters.")
    prefix = ENROLLMENT_PREFIX if for_id is None else CLAIM_PREFIX
    secret = prefix + secrets.token_urlsafe(24)
    token = EnrollmentToken(
        token_id=token_id,
        digest=token_digest(secret),
        note=note,
        created=time.time(),
        for_id=for_id,
    )
    return token, secret


def check_claimable(registration: Registration | None, registration_id: str) -> None:
    """A claim token is only for an existing registration that has no key yet."""
    if registration is None:
        raise RegistryError(f"No such registeredId {registration_id}.")
    if registration.public_key:
        raise RegistryError(
            f"Registration {registration_id} already has a key: only a registration imported "
            "without a usable key can be claimed."
        )


def plan_merge(target: Snapshot, source: Snapshot) -> MergePlan:
    """What importing ``source`` into ``target`` adds, keeping IDs, ports, keys and aliases.

    Idempotent: what is already there identically is counted as unchanged. Nothing in the
    target is ever replaced: an ID held by another key, a port or an alias held by another
    ID is a conflict, and that registration is not imported.
    """
    plan = MergePlan(next_id=max(target.next_id, source.next_id))
    by_id = {r.registration_id: r for r in target.registrations}
    port_owner = {r.port: r.registration_id for r in target.registrations}
    alias_owner = {a: r.registration_id for r in target.registrations for a in r.aliases}
    for registration in sorted(source.registrations, key=lambda r: int(r.registration_id)):
        rid = registration.registration_id
        plan.next_id = max(plan.next_id, int(rid) + 1)
        existing = by_id.get(rid)
        if existing is not None:
            if _same_identity(existing, registration):
                plan.unchanged += 1
            else:
                plan.conflicts.append(f"ID {rid} already exists with another key or port")
            continue
        if registration.port in port_owner:
            owner = port_owner[registration.port]
            plan.conflicts.append(f"ID {rid}: port {registration.port} belongs to ID {owner}")
            continue
        taken = [a for a in registration.aliases if a in alias_owner]
        if taken:
            owner = alias_owner[taken[0]]
            plan.conflicts.append(f"ID {rid}: alias {taken[0]} belongs to ID {owner}")
            continue
        plan.registrations.append(registration)
        by_id[rid] = registration
        port_owner[registration.port] = rid
        alias_owner.update(dict.fromkeys(registration.aliases, rid))
    digests = {t.digest for t in target.tokens}
    token_ids = {int(t.token_id) for t in target.tokens}
    for token in source.tokens:
        if token.digest in digests:
            plan.unchanged += 1
            continue
        if int(token.token_id) in token_ids:  # keep the secret and state, not the number
            token = copy.deepcopy(token)
            token.token_id = str(max(token_ids) + 1)
        plan.tokens.append(token)
        digests.add(token.digest)
        token_ids.add(int(token.token_id))
    return plan


def _same_identity(existing: Registration, imported: Registration) -> bool:
    """Already imported: same port and key, or imported keyless and claimed since."""
    return existing.port == imported.port and imported.public_key in (existing.public_key, b"")


async def apply_command(
    registry: Registry, verb: str, args: list[str], *, actor: str
) -> dict[str, object] | None:
    """The control commands that change the registry, as the live server and offline edits
    both run them: ``ADDALIAS <id> <alias>``, ``DELALIAS [<id>] <alias>``, ``TOKEN CREATE
    [note…]``, ``TOKEN CLAIM <id> [note…]``, ``TOKEN LIST``, ``TOKEN REVOKE <id>``,
    ``POLICY <id> [key=value…]`` (shown when no change is given). None if ``verb`` is none
    of them. ``actor`` (``control``, ``admin:<ip>``, ``offline:<user>``)
    goes into the audit records.
    """
    subcommand = args[0].upper() if verb == "TOKEN" and args else ""
    try:
        match verb, args:
            case "ADDALIAS", [registration_id, alias]:
                await registry.add_alias(alias, registration_id, actor=actor)
            case "DELALIAS", [alias]:
                await registry.remove_alias(alias, actor=actor)
            case "DELALIAS", [registration_id, alias]:
                await registry.remove_alias(alias, registration_id, actor=actor)
            case "TOKEN", [_, *note] if subcommand == "CREATE":
                token, secret = await registry.create_token(" ".join(note), actor=actor)
                return {"success": True, "id": token.token_id, "token": secret}
            case "TOKEN", [_, for_id, *note] if subcommand == "CLAIM":
                token, secret = await registry.create_token(
                    " ".join(note), for_id=for_id, actor=actor
                )
                return {"success": True, "id": token.token_id, "token": secret}
            case "TOKEN", [_] if subcommand == "LIST":
                return {"success": True, "tokens": [_token_summary(t) for t in registry.tokens()]}
            case "TOKEN", [_, token_id] if subcommand == "REVOKE":
                await registry.revoke_token(token_id, actor=actor)
            case "POLICY", [registration_id]:
                registration = registry.get(registration_id)
                if registration is None:
                    raise RegistryError(f"No such registeredId {registration_id}.")
                return {
                    "success": True,
                    "id": registration_id,
                    "policy": registration.policy.to_json(),
                }
            case "POLICY", [registration_id, *assignments]:
                policy = await registry.set_policy(
                    registration_id, parse_assignments(assignments), actor=actor
                )
                return {"success": True, "id": registration_id, "policy": policy.to_json()}
            case (("ADDALIAS" | "DELALIAS" | "TOKEN" | "POLICY"), _):
                return {"success": False, "error": f"usage: {COMMAND_USAGE[verb]}"}
            case _:
                return None
    except (RegistryError, RegistryUnavailableError, PolicyError) as exc:
        return {"success": False, "error": str(exc)}
    except OSError as exc:
        return {"success": False, "error": f"cannot save {registry.where}: {exc.strerror or exc}"}
    return {"success": True}


def _token_summary(token: EnrollmentToken) -> dict[str, object]:
    return {
        "id": token.token_id,
        "note": token.note,
        "created": token.created,
        "state": token.state,
        "usedBy": token.used_by,
        "usedAt": token.used_at,
        "forId": token.for_id,
    }


def check_alias(alias: str) -> None:
    """An alias is a DNS hostname that cannot be mistaken for an ID route."""
    labels = alias.split(".")
    if len(alias) > MAX_HOSTNAME or not all(_LABEL.fullmatch(label) for label in labels):
        raise RegistryError(
            f"Alias {alias!r} is not a hostname: use letters, digits, '-' and '.' "
            f"(labels of 1-63 characters, {MAX_HOSTNAME} in all)."
        )
    if _ID_HEAD.match(alias):
        raise RegistryError(
            f"Alias {alias} looks like an ID route (<ID>.<domain>): "
            "start it with something other than digits."
        )


def token_digest(secret: str) -> str:
    """What the registry keeps of a token: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def registration_from_json(rid: str, entry: object) -> Registration:
    """A registration from its stored JSON form; ValueError/TypeError/KeyError if malformed."""
    if not is_valid_id(rid) or not isinstance(entry, dict):
        raise ValueError("bad ID or entry")
    public_key = bytes.fromhex(entry["public_key"])
    if len(public_key) not in (0, 32):
        raise ValueError("public_key must be 32 bytes (or empty: awaiting its claim)")
    vitae = entry.get("vitae", {})
    aliases = entry.get("aliases", [])
    policy = policy_from_json(entry.get("policy", {}))
    if not isinstance(vitae, dict) or not isinstance(aliases, list):
        raise TypeError("vitae must be an object and aliases a list")
    port = int(entry["port"])
    if not 1 <= port <= LAST_PORT:
        raise ValueError(f"port {port} is not a TCP port (1-{LAST_PORT})")
    return Registration(
        registration_id=rid,
        public_key=public_key,
        port=port,
        created=float(entry.get("created", 0.0)),
        vitae={str(k): str(v) for k, v in vitae.items()},
        aliases=[str(a) for a in aliases],
        policy=policy,
    )


def token_from_json(token_id: str, entry: object) -> EnrollmentToken:
    """A token from its stored JSON form; ValueError/TypeError/KeyError if malformed."""
    if not token_id.isdigit() or not isinstance(entry, dict):
        raise ValueError("bad ID or entry")
    digest = entry["sha256"]
    if not isinstance(digest, str) or len(bytes.fromhex(digest)) != 32:
        raise ValueError("sha256 must be 64 hex digits")
    for_id = entry.get("for_id")
    return EnrollmentToken(
        token_id=token_id,
        digest=digest,
        note=str(entry.get("note", "")),
        created=float(entry["created"]),
        used_by=None if entry.get("used_by") is None else str(entry["used_by"]),
        used_at=_optional_time(entry.get("used_at")),
        revoked_at=_optional_time(entry.get("revoked_at")),
        for_id=None if for_id is None else str(for_id),
    )


def _optional_time(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float):
        raise TypeError("times must be numbers")
    return float(value)

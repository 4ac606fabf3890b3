"""The embedded registry: registrations, their aliases and enrollment tokens in one JSON file.

Plain data with synchronous methods: trio switches tasks only at ``await``, so no lock is
needed inside the process; the server's process lock keeps other processes out (offline
edits by the CLI take that same lock). Every change is one atomic write (temp file, fsync,
rename), so a kill -9 at any moment leaves either the old or the new file, never a torn one,
and a change whose write fails is undone in memory too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from petit.auth import is_valid_id, key_fingerprint
from petit.errors import AuthError, ConfigError, PetitError
from petit.logs import audit
from petit.statefile import read_json, write_json_atomic
from petit_server.ingress import registration_id_for_host

FIRST_ID = 1001
FORMAT_VERSION = 1
ENROLLMENT_PREFIX = "pt_"
SERVER_ACTOR = "server"  # who changed the registry, in audit records, unless the caller says
MAX_NOTE = 200  # characters
MAX_HOSTNAME = 253  # characters, the DNS limit
ENROLLMENT_REFUSED = (
    "registration refused: a valid enrollment token is required (petit-server token create)"
)
COMMAND_USAGE = {
    "ADDALIAS": "ADDALIAS <id> <alias>",
    "DELALIAS": "DELALIAS [<id>] <alias>",
    "TOKEN": "TOKEN CREATE [note...] | TOKEN LIST | TOKEN REVOKE <id>",
}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ID_HEAD = re.compile(r"[0-9]+(?:[.-]|$)")


class RegistryError(PetitError):
    """A registry change was refused; the message is what the operator reads."""


@dataclass(slots=True)
class Registration:
    """One registered client identity."""

    registration_id: str
    public_key: bytes
    port: int
    created: float
    vitae: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The registry file's form."""
        return {
            "public_key": self.public_key.hex(),
            "port": self.port,
            "created": self.created,
            "vitae": self.vitae,
            "aliases": self.aliases,
        }


@dataclass(slots=True)
class EnrollmentToken:
    """A one-time permission to register; only the SHA-256 of its secret is kept."""

    token_id: str
    digest: str  # hex SHA-256 of the secret
    note: str
    created: float
    used_by: str | None = None
    used_at: float | None = None
    revoked_at: float | None = None

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
        }


class FileRegistry:
    """Registrations and enrollment tokens persisted in a JSON file."""

    def __init__(self, path: Path, *, first_port: int) -> None:
        self.path = path
        self._first_port = first_port
        self._registrations: dict[str, Registration] = {}
        self._tokens: dict[str, EnrollmentToken] = {}
        self._alias_owner: dict[str, str] = {}
        self._next_id = FIRST_ID
        if path.exists():
            self._load()

    def _load(self) -> None:
        document = read_json(self.path, what="registry")
        where = f"registry {self.path}"
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{where}: not a petit registry (version {FORMAT_VERSION})")
        entries = document.get("registrations")
        next_id = document.get("next_id")
        tokens = document.get("tokens", {})
        if not isinstance(entries, dict) or not isinstance(next_id, int):
            raise ConfigError(f"{where}: 'registrations' and 'next_id' are required")
        if not isinstance(tokens, dict):
            raise ConfigError(f"{where}: 'tokens' must be an object")
        for rid, entry in entries.items():
            try:
                self._registrations[rid] = _registration_from_json(rid, entry)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: registration {rid} is malformed ({exc})") from None
        for token_id, entry in tokens.items():
            try:
                self._tokens[token_id] = _token_from_json(token_id, entry)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: token {token_id} is malformed ({exc})") from None
        self._next_id = max([next_id, *(int(r) + 1 for r in self._registrations)])
        self._index_aliases()
        bound = sum(len(r.aliases) for r in self._registrations.values())
        if bound != len(self._alias_owner):
            raise ConfigError(f"{where}: an alias is bound to more than one registration")

    def _index_aliases(self) -> None:
        self._alias_owner = {
            alias: rid for rid, reg in self._registrations.items() for alias in reg.aliases
        }

    def save(self) -> None:
        """Write the whole registry atomically."""
        write_json_atomic(
            self.path,
            {
                "version": FORMAT_VERSION,
                "next_id": self._next_id,
                "registrations": {
                    rid: reg.to_json() for rid, reg in sorted(self._registrations.items())
                },
                "tokens": {tid: token.to_json() for tid, token in self._tokens.items()},
            },
        )

    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        """Apply the body's change and save it; if either fails, memory is as it was."""
        before = copy.deepcopy((self._registrations, self._tokens, self._next_id))
        try:
            yield
            self.save()
        except BaseException:
            self._registrations, self._tokens, self._next_id = before
            raise
        finally:
            self._index_aliases()

    # ---------------------------------------------------------------- registrations

    def get(self, registration_id: str) -> Registration | None:
        """The registration with this ID, if any."""
        return self._registrations.get(registration_id)

    def public_key_of(self, registration_id: str) -> bytes | None:
        """The registered public key of an ID, or None."""
        registration = self._registrations.get(registration_id)
        return None if registration is None else registration.public_key

    def all(self) -> list[Registration]:
        """Every registration, by ID."""
        return sorted(self._registrations.values(), key=lambda r: int(r.registration_id))

    def register(
        self,
        public_key: bytes,
        vitae: dict[str, str],
        *,
        token: str | None = None,
        actor: str = SERVER_ACTOR,
    ) -> Registration:
        """Create a registration with a fresh ID and port; saved before it is returned.

        With ``token`` (the server requires one), it must be a valid unused enrollment token;
        it is consumed in the same save, so it can never register twice.
        """
        enrollment = None if token is None else self._unused_token(token)
        used_ports = {r.port for r in self._registrations.values()}
        port = self._first_port
        while port in used_ports:
            port += 1
        registration = Registration(
            registration_id=str(self._next_id),
            public_key=public_key,
            port=port,
            created=time.time(),
            vitae=vitae,
        )
        with self._change():
            self._next_id += 1
            self._registrations[registration.registration_id] = registration
            if enrollment is not None:
                enrollment.used_by = registration.registration_id
                enrollment.used_at = registration.created
        rid = registration.registration_id
        audit(
            "registration.created",
            f"registered {rid}",
            actor=actor,
            id=rid,
            port=registration.port,
            fingerprint=key_fingerprint(public_key),
        )
        if enrollment is not None:
            audit(
                "token.used",
                f"token {enrollment.token_id} registered {rid}",
                actor=actor,
                token=enrollment.token_id,
                id=rid,
            )
        return registration

    def unregister(self, registration_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Remove a registration and its aliases (the caller has checked the proof)."""
        registration = self._registrations.get(registration_id)
        if registration is None:
            return
        with self._change():
            del self._registrations[registration_id]
        audit(
            "registration.deleted",
            f"unregistered {registration_id}",
            actor=actor,
            id=registration_id,
            aliases=registration.aliases,
        )

    # ---------------------------------------------------------------- aliases

    def route(self, host: str) -> str | None:
        """The registration a Host header names: an alias first, then ``<ID>[-…].<domain>``."""
        name = host.strip().lower().partition(":")[0]
        owner = self._alias_owner.get(name)
        if owner is not None:
            return owner
        registration_id = registration_id_for_host(host)
        return registration_id if registration_id in self._registrations else None

    def add_alias(self, alias: str, registration_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Bind a hostname to a registration; RegistryError says why not."""
        alias = alias.lower()
        _check_alias(alias)
        registration = self._registrations.get(registration_id)
        if registration is None:
            raise RegistryError(f"No such registeredId {registration_id}.")
        if alias in self._alias_owner:
            raise RegistryError(f"Alias {alias} already exists.")
        with self._change():
            registration.aliases.append(alias)
        audit(
            "alias.added",
            f"alias {alias} added to {registration_id}",
            actor=actor,
            alias=alias,
            id=registration_id,
        )

    def remove_alias(
        self, alias: str, registration_id: str | None = None, *, actor: str = SERVER_ACTOR
    ) -> None:
        """Unbind a hostname (from ``registration_id`` only, when given)."""
        alias = alias.lower()
        owner = self._alias_owner.get(alias)
        if owner is None:
            raise RegistryError(f"{alias} is not an alias.")
        if registration_id is not None and owner != registration_id:
            raise RegistryError(f"{alias} is not an alias of {registration_id}.")
        with self._change():
            self._registrations[owner].aliases.remove(alias)
        audit(
            "alias.removed",
            f"alias {alias} removed from {owner}",
            actor=actor,
            alias=alias,
            id=owner,
        )

    # ---------------------------------------------------------------- enrollment tokens

    def tokens(self) -> list[EnrollmentToken]:
        """Every token ever created, oldest first."""
        return sorted(self._tokens.values(), key=lambda t: int(t.token_id))

    def create_token(self, note: str, *, actor: str = SERVER_ACTOR) -> tuple[EnrollmentToken, str]:
        """A new token and its secret (the only time the secret exists outside the client)."""
        if len(note) > MAX_NOTE or not note.isprintable():
            raise RegistryError(f"A token note is at most {MAX_NOTE} printable characters.")
        secret = ENROLLMENT_PREFIX + secrets.token_urlsafe(24)
        token = EnrollmentToken(
            token_id=str(max((int(t) for t in self._tokens), default=0) + 1),
            digest=_digest(secret),
            note=note,
            created=time.time(),
        )
        with self._change():
            self._tokens[token.token_id] = token
        audit(
            "token.created",
            f"token {token.token_id} created",
            actor=actor,
            token=token.token_id,
            note=note,
        )
        return token, secret

    def revoke_token(self, token_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Make an unused token worthless."""
        token = self._tokens.get(token_id)
        if token is None:
            raise RegistryError(f"No such token {token_id}.")
        if token.state != "unused":
            raise RegistryError(f"Token {token_id} is already {token.state}.")
        with self._change():
            self._tokens[token_id].revoked_at = time.time()
        audit("token.revoked", f"token {token_id} revoked", actor=actor, token=token_id)

    def _unused_token(self, secret: str) -> EnrollmentToken:
        digest = _digest(secret)
        for token in self._tokens.values():
            if hmac.compare_digest(token.digest, digest) and token.state == "unused":
                return token
        raise AuthError(ENROLLMENT_REFUSED)


def apply_command(
    registry: FileRegistry, verb: str, args: list[str], *, actor: str
) -> dict[str, object] | None:
    """The control commands that change the registry, as the live server and offline edits
    both run them: ``ADDALIAS <id> <alias>``, ``DELALIAS [<id>] <alias>``, ``TOKEN CREATE
    [note…]``, ``TOKEN LIST``, ``TOKEN REVOKE <id>``. None if ``verb`` is none of them.
    ``actor`` (``control``, ``offline:<user>``) goes into the audit records.
    """
    subcommand = args[0].upper() if verb == "TOKEN" and args else ""
    try:
        match verb, args:
            case "ADDALIAS", [registration_id, alias]:
                registry.add_alias(alias, registration_id, actor=actor)
            case "DELALIAS", [alias]:
                registry.remove_alias(alias, actor=actor)
            case "DELALIAS", [registration_id, alias]:
                registry.remove_alias(alias, registration_id, actor=actor)
            case "TOKEN", [_, *note] if subcommand == "CREATE":
                token, secret = registry.create_token(" ".join(note), actor=actor)
                return {"success": True, "id": token.token_id, "token": secret}
            case "TOKEN", [_] if subcommand == "LIST":
                return {"success": True, "tokens": [_token_summary(t) for t in registry.tokens()]}
            case "TOKEN", [_, token_id] if subcommand == "REVOKE":
                registry.revoke_token(token_id, actor=actor)
            case (("ADDALIAS" | "DELALIAS" | "TOKEN"), _):
                return {"success": False, "error": f"usage: {COMMAND_USAGE[verb]}"}
            case _:
                return None
    except RegistryError as exc:
        return {"success": False, "error": str(exc)}
    except OSError as exc:
        return {"success": False, "error": f"cannot save {registry.path}: {exc.strerror or exc}"}
    return {"success": True}


def _token_summary(token: EnrollmentToken) -> dict[str, object]:
    return {
        "id": token.token_id,
        "note": token.note,
        "created": token.created,
        "state": token.state,
        "usedBy": token.used_by,
        "usedAt": token.used_at,
    }


def _check_alias(alias: str) -> None:
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


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _registration_from_json(rid: str, entry: object) -> Registration:
    if not is_valid_id(rid) or not isinstance(entry, dict):
        raise ValueError("bad ID or entry")
    public_key = bytes.fromhex(entry["public_key"])
    if len(public_key) != 32:
        raise ValueError("public_key must be 32 bytes")
    vitae = entry.get("vitae", {})
    aliases = entry.get("aliases", [])
    if not isinstance(vitae, dict) or not isinstance(aliases, list):
        raise TypeError("vitae must be an object and aliases a list")
    return Registration(
        registration_id=rid,
        public_key=public_key,
        port=int(entry["port"]),
        created=float(entry.get("created", 0.0)),
        vitae={str(k): str(v) for k, v in vitae.items()},
        aliases=[str(a) for a in aliases],
    )


def _token_from_json(token_id: str, entry: object) -> EnrollmentToken:
    if not token_id.isdigit() or not isinstance(entry, dict):
        raise ValueError("bad ID or entry")
    digest = entry["sha256"]
    if not isinstance(digest, str) or len(bytes.fromhex(digest)) != 32:
        raise ValueError("sha256 must be 64 hex digits")
    return EnrollmentToken(
        token_id=token_id,
        digest=digest,
        note=str(entry.get("note", "")),
        created=float(entry["created"]),
        used_by=None if entry.get("used_by") is None else str(entry["used_by"]),
        used_at=_optional_time(entry.get("used_at")),
        revoked_at=_optional_time(entry.get("revoked_at")),
    )


def _optional_time(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float):
        raise TypeError("times must be numbers")
    return float(value)

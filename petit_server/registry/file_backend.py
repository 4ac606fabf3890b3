"""The embedded registry backend: registrations and tokens in one JSON file (the default).

Plain data, read from memory (``RegistryView``): trio switches tasks only at ``await``, so
reads need no lock inside the process; the server's process lock keeps other processes out,
and offline edits by the CLI take that same lock. Changes run one at a time (a ``trio.Lock``:
check, apply, save). Every change is one atomic write (temp file, fsync, rename), so a kill -9
at any moment leaves either the old or the new file, never a torn one, and a change whose
write fails is undone in memory too. The file's text is kept rendered per entry, so a change
re-renders only what it touched, and the write runs in a worker thread: at 100,000
registrations a change no longer stalls requests.
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from petit.errors import AuthError, ConfigError
from petit.statefile import read_json, write_atomic
from petit_server.policy import Policy
from petit_server.registry.base import (
    CLAIM_PREFIX,
    CLAIM_REFUSED,
    ENROLLMENT_REFUSED,
    FORMAT_VERSION,
    LAST_PORT,
    SERVER_ACTOR,
    EnrollmentToken,
    MergePlan,
    Progress,
    Registration,
    RegistryError,
    RegistryView,
    Snapshot,
    audit_alias,
    audit_imported,
    audit_policy,
    audit_registered,
    audit_token_created,
    audit_token_revoked,
    audit_unregistered,
    check_alias,
    check_claimable,
    new_token,
    registration_from_json,
    token_digest,
    token_from_json,
)
from petit_server.usage import RegistrationUsage, UsageStore


class FileRegistry(RegistryView):
    """Registrations and enrollment tokens persisted in a JSON file."""

    def __init__(self, path: Path, *, first_port: int) -> None:
        super().__init__()
        self.path = path
        self._first_port = first_port
        self._text = _RegistryText()
        self._changing = trio.Lock()  # one change (check, apply, save) at a time
        if path.exists():
            self._load()
        self._text.render(self._registrations, self._tokens, self._registrations, self._tokens)

    @property
    def where(self) -> str:
        """The file, for messages."""
        return f"registry {self.path}"

    def _load(self) -> None:
        document = read_json(self.path, what="registry")
        where = self.where
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{where}: not a petit registry (version {FORMAT_VERSION})")
        entries = document.get("registrations")
        next_id = document.get("next_id")
        tokens = document.get("tokens", {})
        if not isinstance(entries, dict) or not isinstance(next_id, int):
            raise ConfigError(f"{where}: 'registrations' and 'next_id' are required")
        if not isinstance(tokens, dict):
            raise ConfigError(f"{where}: 'tokens' must be an object")
        owners: dict[int, str] = {}
        for rid, entry in entries.items():
            try:
                self._registrations[rid] = registration = registration_from_json(rid, entry)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: registration {rid} is malformed ({exc})") from None
            if (owner := owners.setdefault(registration.port, rid)) != rid:
                raise ConfigError(
                    f"{where}: registrations {owner} and {rid} both have port "
                    f"{registration.port}: give one of them a free port"
                )
        for token_id, entry in tokens.items():
            try:
                self._tokens[token_id] = token_from_json(token_id, entry)
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
        write_atomic(self.path, self._text.document(self._next_id))

    @contextlib.asynccontextmanager
    async def _change(
        self, registrations: Sequence[str] = (), tokens: Sequence[str] = ()
    ) -> AsyncIterator[None]:
        """Apply the body's change to the entries it names and save; if either fails, memory
        is as it was. Only those entries are copied and re-rendered, and the file is written
        in a worker thread: at 100,000 registrations a change costs the event loop
        milliseconds, not the seconds a deep copy and a full re-encode took."""
        before = copy.deepcopy(
            (
                {r: self._registrations.get(r) for r in registrations},
                {t: self._tokens.get(t) for t in tokens},
                self._next_id,
            )
        )
        try:
            yield
            self._text.render(self._registrations, self._tokens, registrations, tokens)
            document = self._text.document(self._next_id)
            with trio.CancelScope(shield=True):  # memory and file must not disagree
                await trio.to_thread.run_sync(write_atomic, self.path, document)
        except BaseException:
            old_registrations, old_tokens, self._next_id = before
            _restore(self._registrations, old_registrations)
            _restore(self._tokens, old_tokens)
            self._text.render(self._registrations, self._tokens, registrations, tokens)
            raise
        finally:
            self._index_aliases()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to keep fresh: this process is the file's only writer."""
        task_status.started()

    async def catch_up(self, registration_ids: Sequence[str]) -> None:
        """Nothing to catch up: this process is the file's only writer."""

    async def share_usage(self, usage: UsageStore) -> None:
        """Nothing to share: usage stays in this process's memory."""

    async def usage_totals(
        self, registration_ids: Sequence[str]
    ) -> dict[str, RegistrationUsage] | None:
        """No shared totals: the usage store in memory is the record."""
        return None

    # ---------------------------------------------------------------- registrations

    def snapshot(self) -> Snapshot:
        """A deep copy of everything."""
        return copy.deepcopy(Snapshot(self.all(), self.tokens(), self._next_id))

    async def register(
        self,
        public_key: bytes,
        vitae: dict[str, str],
        *,
        token: str | None = None,
        actor: str = SERVER_ACTOR,
    ) -> Registration:
        """Create a registration with a fresh ID and port; saved before it is returned.

        With ``token`` (the server requires one, or it is a claim token), it must be a valid
        unused token; it is consumed in the same save, so it can never register twice. A
        claim token gives ``public_key`` to the keyless registration it is bound to instead.
        """
        async with self._changing:
            return await self._register(public_key, vitae, token, actor)

    async def _register(
        self, public_key: bytes, vitae: dict[str, str], token: str | None, actor: str
    ) -> Registration:
        enrollment = None if token is None else self._unused_token(token)
        if enrollment is not None and enrollment.for_id is not None:
            return await self._claim(enrollment, public_key, vitae, actor)
        used_ports = {r.port for r in self._registrations.values()}
        port = next((p for p in range(self._first_port, LAST_PORT + 1) if p not in used_ports), 0)
        if not port:
            raise RegistryError(
                f"no TCP port is free from firstPort {self._first_port} to {LAST_PORT}: "
                "unregister unused registrations or lower [server] firstPort"
            )
        registration = Registration(
            registration_id=str(self._next_id),
            public_key=public_key,
            port=port,
            created=time.time(),
            vitae=vitae,
        )
        token_ids = [] if enrollment is None else [enrollment.token_id]
        async with self._change([registration.registration_id], token_ids):
            self._next_id += 1
            self._registrations[registration.registration_id] = registration
            if enrollment is not None:
                enrollment.used_by = registration.registration_id
                enrollment.used_at = registration.created
        token_id = None if enrollment is None else enrollment.token_id
        audit_registered(registration, token_id, claimed=False, actor=actor)
        return registration

    async def _claim(
        self, enrollment: EnrollmentToken, public_key: bytes, vitae: dict[str, str], actor: str
    ) -> Registration:
        registration = self._registrations.get(enrollment.for_id or "")
        if registration is None or registration.public_key:
            raise AuthError(CLAIM_REFUSED)  # never replace a key: no takeover
        async with self._change([registration.registration_id], [enrollment.token_id]):
            registration.public_key = public_key
            registration.vitae = {**registration.vitae, **vitae}
            enrollment.used_by = registration.registration_id
            enrollment.used_at = time.time()
        audit_registered(registration, enrollment.token_id, claimed=True, actor=actor)
        return registration

    async def unregister(self, registration_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Remove a registration and its aliases (the caller has checked the proof)."""
        async with self._changing:
            registration = self._registrations.get(registration_id)
            if registration is None:
                return
            async with self._change([registration_id]):
                del self._registrations[registration_id]
        audit_unregistered(registration_id, registration.aliases, actor=actor)

    async def merge(
        self, plan: MergePlan, progress: Progress | None = None, *, actor: str = SERVER_ACTOR
    ) -> list[str]:
        """Add a planned import in one save (the plan was made from this registry's snapshot)."""
        rids = [registration.registration_id for registration in plan.registrations]
        token_ids = [token.token_id for token in plan.tokens]
        async with self._changing, self._change(rids, token_ids):
            for registration in plan.registrations:
                self._registrations[registration.registration_id] = copy.deepcopy(registration)
            for token in plan.tokens:
                self._tokens[token.token_id] = copy.deepcopy(token)
            self._next_id = max(self._next_id, plan.next_id)
        for registration in plan.registrations:
            audit_imported(registration, actor=actor)
        for token in plan.tokens:
            audit_token_created(token, actor=actor, imported=True)
        if progress is not None:
            progress(len(plan.registrations), len(plan.registrations))
        return []

    def close(self) -> None:
        """Nothing to close: the file is only open while it is read or written."""

    # ---------------------------------------------------------------- aliases

    async def add_alias(
        self, alias: str, registration_id: str, *, actor: str = SERVER_ACTOR
    ) -> None:
        """Bind a hostname to a registration; RegistryError says why not."""
        alias = alias.lower()
        check_alias(alias)
        async with self._changing:
            registration = self._registrations.get(registration_id)
            if registration is None:
                raise RegistryError(f"No such registeredId {registration_id}.")
            if alias in self._alias_owner:
                raise RegistryError(f"Alias {alias} already exists.")
            async with self._change([registration_id]):
                registration.aliases.append(alias)
        audit_alias("alias.added", alias, registration_id, actor=actor)

    async def set_policy(
        self, registration_id: str, changes: Mapping[str, object], *, actor: str = SERVER_ACTOR
    ) -> Policy:
        """Change a registration's own policy (PolicyError for a bad key or value)."""
        async with self._changing:
            registration = self._registrations.get(registration_id)
            if registration is None:
                raise RegistryError(f"No such registeredId {registration_id}.")
            policy = registration.policy.changed(changes)
            async with self._change([registration_id]):
                registration.policy = policy
        audit_policy(registration_id, policy, actor=actor)
        return policy

    async def remove_alias(
        self, alias: str, registration_id: str | None = None, *, actor: str = SERVER_ACTOR
    ) -> None:
        """Unbind a hostname (from ``registration_id`` only, when given)."""
        alias = alias.lower()
        async with self._changing:
            owner = self._alias_owner.get(alias)
            if owner is None:
                raise RegistryError(f"{alias} is not an alias.")
            if registration_id is not None and owner != registration_id:
                raise RegistryError(f"{alias} is not an alias of {registration_id}.")
            async with self._change([owner]):
                self._registrations[owner].aliases.remove(alias)
        audit_alias("alias.removed", alias, owner, actor=actor)

    # ---------------------------------------------------------------- enrollment tokens

    async def create_token(
        self, note: str, *, for_id: str | None = None, actor: str = SERVER_ACTOR
    ) -> tuple[EnrollmentToken, str]:
        """A new token and its secret (the only time the secret exists outside the client)."""
        async with self._changing:
            if for_id is not None:
                check_claimable(self._registrations.get(for_id), for_id)
            token, secret = new_token(
                str(max((int(t) for t in self._tokens), default=0) + 1), note, for_id
            )
            async with self._change(tokens=[token.token_id]):
                self._tokens[token.token_id] = token
        audit_token_created(token, actor=actor)
        return token, secret

    async def revoke_token(self, token_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Make an unused token worthless."""
        async with self._changing:
            token = self._tokens.get(token_id)
            if token is None:
                raise RegistryError(f"No such token {token_id}.")
            if token.state != "unused":
                raise RegistryError(f"Token {token_id} is already {token.state}.")
            async with self._change(tokens=[token_id]):
                self._tokens[token_id].revoked_at = time.time()
        audit_token_revoked(token_id, actor=actor)

    def _unused_token(self, secret: str) -> EnrollmentToken:
        digest = token_digest(secret)
        for token in self._tokens.values():
            if hmac.compare_digest(token.digest, digest) and token.state == "unused":
                return token
        raise AuthError(CLAIM_REFUSED if secret.startswith(CLAIM_PREFIX) else ENROLLMENT_REFUSED)


_T = TypeVar("_T")


def _restore(entries: dict[str, _T], before: dict[str, _T | None]) -> None:
    """Put back the entries a failed change touched (None: it did not exist)."""
    for key, value in before.items():
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = value


class _Entry(Protocol):
    def to_json(self) -> dict[str, object]: ...


class _RegistryText:
    """The registry file's JSON, each entry kept rendered, so that a change re-renders only
    the entries it touched and the document is joined from text. The result is exactly
    ``json.dumps(document, indent=2, sort_keys=True)`` with a final newline, as before (a
    test compares the two)."""

    def __init__(self) -> None:
        self._registrations: dict[str, str] = {}
        self._tokens: dict[str, str] = {}

    def render(
        self,
        registrations: Mapping[str, _Entry],
        tokens: Mapping[str, _Entry],
        registration_ids: Iterable[str],
        token_ids: Iterable[str],
    ) -> None:
        """Re-render these entries from their current state (gone: dropped)."""
        _render_into(self._registrations, registrations, registration_ids)
        _render_into(self._tokens, tokens, token_ids)

    def document(self, next_id: int) -> bytes:
        """The whole file."""
        return (
            f'{{\n  "next_id": {next_id},\n'
            f'  "registrations": {_object(self._registrations)},\n'
            f'  "tokens": {_object(self._tokens)},\n'
            f'  "version": {FORMAT_VERSION}\n}}\n'
        ).encode()


def _render_into(texts: dict[str, str], entries: Mapping[str, _Entry], keys: Iterable[str]) -> None:
    for key in keys:
        entry = entries.get(key)
        if entry is None:
            texts.pop(key, None)
        else:  # nested two levels deep in the document: four more spaces of indent
            body = json.dumps(entry.to_json(), indent=2, sort_keys=True).replace("\n", "\n    ")
            texts[key] = f"{json.dumps(key)}: {body}"


def _object(texts: dict[str, str]) -> str:
    if not texts:
        return "{}"
    return "{\n    " + ",\n    ".join(texts[key] for key in sorted(texts)) + "\n  }"

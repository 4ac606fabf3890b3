"""The Redis registry: registrations, aliases and tokens shared by every server node.

# Theory of operation

- trio has no Redis client, and the Redis wire protocol is not ours to hand-write, so this
  uses redis-py's synchronous client (thread-safe, connection pool) and runs every call in a
  worker thread (``trio.to_thread.run_sync``) with socket timeouts: a slow or dead Redis can
  delay a registration or an alias change, never the trio loop, and never a request.
- Requests and handshakes read an in-memory mirror (``route``, ``public_key_of``, ``get``
  stay synchronous and cost a dict lookup). Only the trio thread changes the mirror; worker
  threads fetch and return data.
- Every change is one Lua script, so it is atomic across nodes: IDs come from ``INCR``,
  ports are taken with ``SETNX port:<n>``, an alias with ``SETNX alias:<name>``, a token is
  checked and marked used in the same script that registers with it. Each script also
  appends ``(kind, id)`` to the ``changes`` stream.
- ``run`` loads everything once, then polls the stream every ``POLL_INTERVAL`` and re-reads
  just the entities that changed, so another node's change is seen within a fraction of a
  second. Re-reading is idempotent, so a change seen twice is harmless; a node that fell
  behind the stream's trimming (or lost Redis for a while) reloads everything.
- Usage is shared too: each node adds what it recorded since its last flush to
  ``usage:<id>`` every ``USAGE_FLUSH_INTERVAL`` and once more when it stops (``share_usage``),
  one script per ID that adds to the hash's counters and keeps the latest ``lastSeen``. What
  a flush could not add stays in the node's delta for the next one. The script adds nothing
  to an unregistered ID, and ``unregister`` deletes the hash, so no total outlives its ID. A
  flush is shielded from cancellation (abandoned, it could land yet be retried), and one
  whose reply is lost to a timeout may be added twice: the one way a count can be off.
- Redis unreachable: requests keep routing from the mirror, changes fail with
  ``RegistryUnavailableError``, and the poll loop retries until Redis answers again, then
  reloads. A change that failed stays undone: a Redis that hangs holds the script it was sent
  and would run it when it resumes, after we told the user it failed. So a change first reads
  Redis's own clock (``TIME``) and sends its script a deadline ``CHANGE_DEADLINE`` later; the
  script runs only before it (``_LATE_GUARD``), which is well inside the reply's timeout. One
  clock, so no skew between hosts matters. Redis must persist its data (AOF or RDB); a Redis
  that comes back empty is an empty registry.

Keys (``prefix`` default ``petit:``): ``next_id`` (last ID handed out), ``ids`` (set),
``registration:<id>`` (JSON as in ``registry.json``, without aliases), ``aliases:<id>``
(set), ``alias:<name>`` → ID, ``port:<n>`` → ID, ``next_token_id``, ``tokens`` (set),
``token:<id>`` (JSON), ``token_digest:<sha256>`` → token ID, ``usage:<id>`` (hash: the
counters of ``RegistrationUsage.counters`` and ``lastSeen``), ``changes`` (stream).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from petit.errors import AuthError, ConfigError
from petit_server.config import DEFAULT_REGISTRY_PREFIX
from petit_server.policy import Policy
from petit_server.registry.base import (
    CLAIM_PREFIX,
    CLAIM_REFUSED,
    ENROLLMENT_REFUSED,
    FIRST_ID,
    SERVER_ACTOR,
    EnrollmentToken,
    MergePlan,
    Progress,
    Registration,
    RegistryError,
    RegistryUnavailableError,
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
    new_token,
    redacted_url,
    registration_from_json,
    token_digest,
    token_from_json,
)
from petit_server.usage import RegistrationUsage, UsageStore

log = logging.getLogger("petit.registry")

POLL_INTERVAL = 0.2  # seconds between looks at the change stream
RETRY_INTERVAL = 0.5  # seconds between attempts while Redis is unreachable
SOCKET_TIMEOUT = 2.0  # seconds for one Redis round trip (or connect)
CHANGES_KEPT = 100_000  # stream entries; a node further behind reloads everything
BATCH = 500  # entities per pipeline
USAGE_FLUSH_INTERVAL = 2.0  # seconds between additions of a node's usage to the shared totals
CHANGE_DEADLINE = SOCKET_TIMEOUT / 2  # a change script runs within this of Redis's TIME, or never

T = TypeVar("T")
_Fetched = Registration | EnrollmentToken | None | str  # str: why the stored value is corrupt

# Every script gets the key prefix as ARGV[1] and appends (kind, id) to the change stream.
_LUA_HEAD = f"""
local p = ARGV[1]
local function changed(kind, id)
  redis.call('XADD', p .. 'changes', 'MAXLEN', '~', {CHANGES_KEPT}, '*', 'kind', kind, 'id', id)
end
"""

# A change script's last ARGV is its deadline in Redis's clock (µs): past it, the script
# does nothing, since its caller has given up on the reply and said the change failed.
_LATE_GUARD = """
local clock = redis.call('TIME')
if tonumber(clock[1]) * 1000000 + tonumber(clock[2]) > tonumber(ARGV[#ARGV]) then
  return redis.error_reply('petit: too late')
end
"""

# ARGV: prefix, public key hex, vitae JSON, now, first port, token digest or "", first ID - 1
_REGISTER = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
local token, tid = nil, nil
if ARGV[6] ~= '' then
  tid = redis.call('GET', p .. 'token_digest:' .. ARGV[6])
  if not tid then return {'refused'} end
  local raw = redis.call('GET', p .. 'token:' .. tid)
  if not raw then return {'refused'} end
  token = cjson.decode(raw)
  if token.used_by ~= cjson.null or token.revoked_at ~= cjson.null then return {'refused'} end
end
local id, port
if token and token.for_id ~= nil and token.for_id ~= cjson.null then
  id = token.for_id
  local key = p .. 'registration:' .. id
  local raw = redis.call('GET', key)
  if not raw then return {'refused'} end
  local registration = cjson.decode(raw)
  if registration.public_key ~= '' then return {'refused'} end  -- never replace a key
  registration.public_key = ARGV[2]
  for name, value in pairs(cjson.decode(ARGV[3])) do registration.vitae[name] = value end
  redis.call('SET', key, cjson.encode(registration))
  port = registration.port
else
  redis.call('SETNX', p .. 'next_id', ARGV[7])
  repeat
    id = tostring(redis.call('INCR', p .. 'next_id'))
  until redis.call('EXISTS', p .. 'registration:' .. id) == 0
  port = tonumber(ARGV[5])
  while redis.call('SETNX', p .. 'port:' .. port, id) == 0 do
    port = port + 1
    if port > 65535 then return redis.error_reply('no free port left') end
  end
  redis.call('SET', p .. 'registration:' .. id, cjson.encode({
    public_key = ARGV[2], port = port, created = tonumber(ARGV[4]),
    vitae = cjson.decode(ARGV[3])}))
  redis.call('SADD', p .. 'ids', id)
end
if token then
  token.used_by = id
  token.used_at = tonumber(ARGV[4])
  redis.call('SET', p .. 'token:' .. tid, cjson.encode(token))
  changed('token', tid)
end
changed('registration', id)
return {'ok', id, port, tid or ''}
"""
)

# ARGV: prefix, ID
_UNREGISTER = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
local id = ARGV[2]
local key = p .. 'registration:' .. id
local raw = redis.call('GET', key)
if not raw then return {'missing'} end
local port = cjson.decode(raw).port
if redis.call('GET', p .. 'port:' .. port) == id then redis.call('DEL', p .. 'port:' .. port) end
local aliases = redis.call('SMEMBERS', p .. 'aliases:' .. id)
for _, alias in ipairs(aliases) do
  local alias_key = p .. 'alias:' .. alias
  if redis.call('GET', alias_key) == id then redis.call('DEL', alias_key) end
end
redis.call('DEL', key, p .. 'aliases:' .. id, p .. 'usage:' .. id)
redis.call('SREM', p .. 'ids', id)
changed('registration', id)
return {'ok', unpack(aliases)}
"""
)

# ARGV: prefix, ID, policy JSON ("" for none); the policy lives in the registration's JSON
_SET_POLICY = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
local key = p .. 'registration:' .. ARGV[2]
local raw = redis.call('GET', key)
if not raw then return 'no such id' end
local entry = cjson.decode(raw)
if ARGV[3] == '' then entry.policy = nil else entry.policy = cjson.decode(ARGV[3]) end
redis.call('SET', key, cjson.encode(entry))
changed('registration', ARGV[2])
return 'ok'
"""
)

# ARGV: prefix, alias, ID
_ADD_ALIAS = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
if redis.call('EXISTS', p .. 'registration:' .. ARGV[3]) == 0 then return 'no such id' end
if redis.call('SETNX', p .. 'alias:' .. ARGV[2], ARGV[3]) == 0 then return 'exists' end
redis.call('SADD', p .. 'aliases:' .. ARGV[3], ARGV[2])
changed('registration', ARGV[3])
return 'ok'
"""
)

# ARGV: prefix, alias, ID or ""
_REMOVE_ALIAS = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
local owner = redis.call('GET', p .. 'alias:' .. ARGV[2])
if not owner then return {'not an alias'} end
if ARGV[3] ~= '' and owner ~= ARGV[3] then return {'not yours'} end
redis.call('DEL', p .. 'alias:' .. ARGV[2])
redis.call('SREM', p .. 'aliases:' .. owner, ARGV[2])
changed('registration', owner)
return {'ok', owner}
"""
)

# ARGV: prefix, token JSON, digest, ID it claims or ""
_CREATE_TOKEN = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
if ARGV[4] ~= '' then
  local raw = redis.call('GET', p .. 'registration:' .. ARGV[4])
  if not raw then return {'no such id'} end
  if cjson.decode(raw).public_key ~= '' then return {'has a key'} end
end
local tid = tostring(redis.call('INCR', p .. 'next_token_id'))
redis.call('SET', p .. 'token:' .. tid, ARGV[2])
redis.call('SET', p .. 'token_digest:' .. ARGV[3], tid)
redis.call('SADD', p .. 'tokens', tid)
changed('token', tid)
return {'ok', tid}
"""
)

# ARGV: prefix, token ID, now
_REVOKE_TOKEN = (
    _LUA_HEAD
    + _LATE_GUARD
    + """
local key = p .. 'token:' .. ARGV[2]
local raw = redis.call('GET', key)
if not raw then return 'missing' end
local token = cjson.decode(raw)
if token.revoked_at ~= cjson.null then return 'revoked' end
if token.used_by ~= cjson.null then return 'used' end
token.revoked_at = tonumber(ARGV[3])
redis.call('SET', key, cjson.encode(token))
changed('token', ARGV[2])
return 'ok'
"""
)

# ARGV: prefix, ID, registration JSON (no aliases), port, aliases... ; all or nothing
_PUT_REGISTRATION = (
    _LUA_HEAD
    + """
local id = ARGV[2]
if redis.call('EXISTS', p .. 'registration:' .. id) == 1 then return 'ID ' .. id .. ' exists' end
local owner = redis.call('GET', p .. 'port:' .. ARGV[4])
if owner then return 'port ' .. ARGV[4] .. ' belongs to ID ' .. owner end
for i = 5, #ARGV do
  owner = redis.call('GET', p .. 'alias:' .. ARGV[i])
  if owner then return 'alias ' .. ARGV[i] .. ' belongs to ID ' .. owner end
end
redis.call('SET', p .. 'port:' .. ARGV[4], id)
for i = 5, #ARGV do
  redis.call('SET', p .. 'alias:' .. ARGV[i], id)
  redis.call('SADD', p .. 'aliases:' .. id, ARGV[i])
end
redis.call('SET', p .. 'registration:' .. id, ARGV[3])
redis.call('SADD', p .. 'ids', id)
changed('registration', id)
return 'ok'
"""
)

# ARGV: prefix, token ID, digest, token JSON; a taken token ID gets the next free one, which
# the script returns (or 'exists': that secret is already there)
_PUT_TOKEN = (
    _LUA_HEAD
    + """
if redis.call('EXISTS', p .. 'token_digest:' .. ARGV[3]) == 1 then return 'exists' end
local tid = ARGV[2]
local last = tonumber(redis.call('GET', p .. 'next_token_id') or '0')
if last < tonumber(tid) then redis.call('SET', p .. 'next_token_id', tid) end
while redis.call('EXISTS', p .. 'token:' .. tid) == 1 do
  tid = tostring(redis.call('INCR', p .. 'next_token_id'))
end
redis.call('SET', p .. 'token:' .. tid, ARGV[4])
redis.call('SET', p .. 'token_digest:' .. ARGV[3], tid)
redis.call('SADD', p .. 'tokens', tid)
changed('token', tid)
return tid
"""
)

# ARGV: prefix, ID, last seen or "", then (counter, increment) pairs; no change stream entry
_ADD_USAGE = """
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'registration:' .. id) == 0 then return 'gone' end
local key = p .. 'usage:' .. id
for i = 4, #ARGV, 2 do
  if ARGV[i] == 'latencySum' then
    redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 1])
  else
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  end
end
if ARGV[3] ~= '' and tonumber(ARGV[3]) > tonumber(redis.call('HGET', key, 'lastSeen') or '0') then
  redis.call('HSET', key, 'lastSeen', ARGV[3])
end
return 'ok'
"""

# ARGV: prefix, last ID handed out; never lowers the counter
_RAISE_NEXT_ID = """
local last = tonumber(redis.call('GET', ARGV[1] .. 'next_id') or '0')
if last < tonumber(ARGV[2]) then redis.call('SET', ARGV[1] .. 'next_id', ARGV[2]) end
return 'ok'
"""


class RedisRegistry(RegistryView):
    """The registry in a Redis shared by several server nodes, mirrored in memory."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_REGISTRY_PREFIX,
        first_port: int,
        on_removed: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self._first_port = first_port
        self._on_removed = on_removed
        # Any: redis-py types every reply as "value or Awaitable" (one API for sync and async).
        self._redis: Any
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0),  # a script must not run twice; we retry ourselves
                decode_responses=True,
            )
        except ValueError as exc:
            raise ConfigError(f"[server.registry] url {redacted_url(url)!r}: {exc}") from None
        scripts = {
            "register": _REGISTER,
            "unregister": _UNREGISTER,
            "add_alias": _ADD_ALIAS,
            "set_policy": _SET_POLICY,
            "remove_alias": _REMOVE_ALIAS,
            "create_token": _CREATE_TOKEN,
            "revoke_token": _REVOKE_TOKEN,
            "put_registration": _PUT_REGISTRATION,
            "put_token": _PUT_TOKEN,
            "raise_next_id": _RAISE_NEXT_ID,
            "add_usage": _ADD_USAGE,
        }
        self._scripts = {name: self._redis.register_script(text) for name, text in scripts.items()}
        self._last_change = "0-0"
        self._reachable = True
        self._usage_problems: set[str] = set()  # logged once each

    @property
    def where(self) -> str:
        """The Redis URL (password hidden) and prefix, for messages."""
        return f"Redis registry {redacted_url(self.url)} (prefix {self.prefix!r})"

    def close(self) -> None:
        """Close the connections."""
        self._redis.close()

    # ---------------------------------------------------------------- loading and freshness

    def load(self) -> None:
        """Read everything now, blocking (for the CLI, before any event loop runs).

        RegistryUnavailableError if Redis cannot be reached; ConfigError naming the key if
        what is stored is not a petit registry.
        """
        try:
            fetched = self._fetch_all()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise self._unreachable(error, starting=True) from None
        self._apply_full(fetched, strict=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load everything, report started, then follow other nodes' changes until cancelled."""
        self._apply_full(await self._in_thread(self._fetch_all, starting=True), strict=True)
        task_status.started()
        full_reload = False
        problem = ""
        while True:
            await trio.sleep(POLL_INTERVAL if self._reachable else RETRY_INTERVAL)
            try:
                if full_reload:
                    self._apply_full(await self._in_thread(self._fetch_all), strict=False)
                    full_reload = False
                else:
                    full_reload = not self._apply_changes(
                        await self._in_thread(self._fetch_changes, self._last_change)
                    )
                problem = ""
            except RegistryUnavailableError:
                full_reload = True  # what changed meanwhile is unknown
            except (ConfigError, redis.RedisError) as exc:
                full_reload = True
                if str(exc) != problem:  # once, not every poll
                    problem = str(exc)
                    log.error("%s: cannot refresh: %s", self.where, problem)

    async def catch_up(self, registration_ids: Sequence[str]) -> None:
        """Re-read the claimed registrations before a hello is checked: one registered on
        another node a moment ago (its client reconnects to every node at once) is not in the
        mirror until the next poll. Every hello pays the same round trip, whether its IDs are
        known here or not, so its timing tells a stranger nothing. While Redis is unreachable
        the mirror answers alone."""
        if not self._reachable:
            return
        try:
            fetched = await self._in_thread(self._fetch_registrations, list(registration_ids))
        except RegistryUnavailableError:
            return
        self._apply(fetched, {})

    async def _in_thread(self, function: Callable[..., T], *args: Any, starting: bool = False) -> T:
        """Run blocking Redis I/O in a worker thread; unreachable Redis becomes one error.
        The worker only runs ``function``: its outcome is applied to our state here."""
        try:
            result = await trio.to_thread.run_sync(partial(function, *args), abandon_on_cancel=True)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise self._unreachable(error, starting=starting) from None
        if not self._reachable:
            self._reachable = True
            log.warning("the Redis registry at %s is reachable again", redacted_url(self.url))
        return result

    def _unreachable(self, error: Exception, *, starting: bool) -> RegistryUnavailableError:
        """The error to raise for an unreachable Redis; the first of an outage is logged."""
        url = redacted_url(self.url)
        reason = str(error).rstrip(".")  # redis-py ends its messages with one
        if starting:
            return RegistryUnavailableError(
                f"cannot reach the Redis registry at {url}: {reason}; "
                "start redis-server or fix [server.registry] url"
            )
        if self._reachable:
            self._reachable = False
            log.error(
                "the Redis registry at %s is unreachable (%s): known registrations keep "
                "routing, registry changes fail until it is back",
                url,
                reason,
            )
        return RegistryUnavailableError(
            f"the registry is unavailable (Redis at {url}: {reason}); try again later"
        )

    def _fetch_all(self) -> tuple[str, int, dict[str, _Fetched], dict[str, _Fetched]]:
        """Everything, read after the stream position (so later changes are replayed)."""
        newest = self._redis.xrevrange(self._key("changes"), count=1)
        position = newest[0][0] if newest else "0-0"
        last_id = self._redis.get(self._key("next_id"))
        ids = self._members("ids")
        token_ids = self._members("tokens")
        try:
            next_id = max(int(last_id or FIRST_ID - 1) + 1, FIRST_ID)
        except ValueError:
            key = self._key("next_id")
            raise ConfigError(f"{self.where}: key {key} is corrupt (not a number)") from None
        return (
            position,
            next_id,
            self._fetch_registrations(ids),
            self._fetch_tokens(token_ids),
        )

    def _members(self, name: str) -> list[str]:
        key = self._key(name)
        try:
            return sorted(self._redis.smembers(key))
        except redis.ResponseError as exc:
            raise ConfigError(f"{self.where}: key {key} is corrupt ({exc})") from None

    def _batched(
        self, ids: Sequence[str], queue: Callable[[Any, str], None]
    ) -> Iterator[tuple[str, list[Any]]]:
        """(ID, its replies) for every ID: ``queue(pipeline, id)`` adds the same commands for
        each, sent BATCH IDs per round trip; a command that failed replies its exception."""
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            pipe = self._redis.pipeline(transaction=False)
            for one in chunk:
                queue(pipe, one)
            replies = pipe.execute(raise_on_error=False)
            per_id = len(replies) // len(chunk)
            for index, one in enumerate(chunk):
                yield one, replies[index * per_id : (index + 1) * per_id]

    def _fetch_registrations(self, ids: Sequence[str]) -> dict[str, _Fetched]:
        def queue(pipe: Any, rid: str) -> None:
            pipe.get(self._key(f"registration:{rid}"))
            pipe.smembers(self._key(f"aliases:{rid}"))

        return {
            rid: self._parse_registration(rid, raw, aliases)
            for rid, (raw, aliases) in self._batched(ids, queue)
        }

    def _parse_registration(self, rid: str, raw: object, aliases: Any) -> _Fetched:
        key = self._key(f"registration:{rid}")
        if isinstance(raw, Exception):
            return f"key {key} is corrupt ({raw})"
        if isinstance(aliases, Exception):
            return f"key {self._key(f'aliases:{rid}')} is corrupt ({aliases})"
        if raw is None:
            return None
        try:
            entry = json.loads(str(raw))
            registration = registration_from_json(rid, {**entry, "aliases": []})
        except (KeyError, TypeError, ValueError) as exc:
            return f"key {key} is corrupt ({exc})"
        registration.aliases = sorted(str(a) for a in aliases)
        return registration

    def _fetch_tokens(self, token_ids: Sequence[str]) -> dict[str, _Fetched]:
        fetched: dict[str, _Fetched] = {}
        tokens = self._batched(token_ids, lambda pipe, tid: pipe.get(self._key(f"token:{tid}")))
        for tid, (raw,) in tokens:
            key = self._key(f"token:{tid}")
            if isinstance(raw, Exception):
                fetched[tid] = f"key {key} is corrupt ({raw})"
            elif raw is None:
                fetched[tid] = None
            else:
                try:
                    fetched[tid] = token_from_json(tid, json.loads(raw))
                except (KeyError, TypeError, ValueError) as exc:
                    fetched[tid] = f"key {key} is corrupt ({exc})"
        return fetched

    def _fetch_changes(
        self, position: str
    ) -> tuple[bool, str, dict[str, _Fetched], dict[str, _Fetched]]:
        """What changed after ``position``: (in sync?, new position, registrations, tokens)."""
        stream = self._key("changes")
        oldest = self._redis.xrange(stream, count=1)
        if oldest and position != "0-0" and _stream_id(oldest[0][0]) > _stream_id(position):
            return False, position, {}, {}  # trimmed past us: reload everything
        entries = self._redis.xread({stream: position}, count=10_000)
        if not entries:
            return True, position, {}, {}
        changes = entries[0][1]
        kinds: dict[str, set[str]] = {"registration": set(), "token": set()}
        for _, fields in changes:
            kinds.get(fields.get("kind", ""), set()).add(fields.get("id", ""))
        return (
            True,
            changes[-1][0],
            self._fetch_registrations(sorted(kinds["registration"])),
            self._fetch_tokens(sorted(kinds["token"])),
        )

    def _apply_full(
        self, fetched: tuple[str, int, dict[str, _Fetched], dict[str, _Fetched]], *, strict: bool
    ) -> None:
        position, next_id, registrations, tokens = fetched
        if strict:
            for problem in (*registrations.values(), *tokens.values()):
                if isinstance(problem, str):
                    raise ConfigError(f"{self.where}: {problem}")
        gone = set(self._registrations) - set(registrations)
        self._apply(registrations, tokens)
        for rid in gone:
            self._apply({rid: None}, {})
        self._tokens = {k: v for k, v in self._tokens.items() if k in tokens}
        self._next_id = next_id
        self._last_change = position

    def _apply_changes(
        self, fetched: tuple[bool, str, dict[str, _Fetched], dict[str, _Fetched]]
    ) -> bool:
        in_sync, position, registrations, tokens = fetched
        if in_sync:
            self._apply(registrations, tokens)
            self._last_change = position
        return in_sync

    def _apply(self, registrations: dict[str, _Fetched], tokens: dict[str, _Fetched]) -> None:
        """Put fetched entities into the mirror (trio thread only); a corrupt one is logged
        and the last good value kept."""
        for rid, value in registrations.items():
            if isinstance(value, str):
                log.error("%s: %s; keeping the last good value", self.where, value)
                continue
            assert not isinstance(value, EnrollmentToken)
            previous = self._registrations.pop(rid, None)
            if previous is not None:
                for alias in previous.aliases:
                    if self._alias_owner.get(alias) == rid:
                        del self._alias_owner[alias]
            if value is None:
                if previous is not None and self._on_removed is not None:
                    self._on_removed(rid)
                continue
            self._registrations[rid] = value
            self._alias_owner.update(dict.fromkeys(value.aliases, rid))
            self._next_id = max(self._next_id, int(rid) + 1)
        for tid, token in tokens.items():
            if isinstance(token, str):
                log.error("%s: %s; keeping the last good value", self.where, token)
            elif token is None:
                self._tokens.pop(tid, None)
            else:
                assert isinstance(token, EnrollmentToken)
                self._tokens[tid] = token

    def _key(self, name: str) -> str:
        return self.prefix + name

    # ---------------------------------------------------------------- reads (mirror)

    def snapshot(self) -> Snapshot:
        """Everything the mirror holds."""
        return Snapshot(self.all(), self.tokens(), self._next_id)

    # ---------------------------------------------------------------- usage

    async def share_usage(self, usage: UsageStore) -> None:
        """Add this node's usage to the shared totals every ``USAGE_FLUSH_INTERVAL``, and once
        more when cancelled (the server cancels it after draining, so the last requests count)."""
        try:
            while True:
                await trio.sleep(USAGE_FLUSH_INTERVAL)
                await self.flush_usage(usage)
        finally:
            await self.flush_usage(usage)

    async def flush_usage(self, usage: UsageStore) -> None:
        """Add what ``usage`` recorded since its last flush to the shared totals; what cannot
        be added now (Redis unreachable, a corrupt key) stays for the next flush."""
        deltas = usage.unflushed()
        if not deltas:
            return
        with trio.CancelScope(shield=True):  # bounded by the socket timeouts
            try:
                problems = await self._in_thread(self._add_usage, deltas)
            except RegistryUnavailableError:
                return  # logged once by _in_thread; all of it stays for the next flush
            except redis.RedisError as exc:
                problems = dict.fromkeys(deltas, str(exc))
        for rid, problem in problems.items():
            if problem not in self._usage_problems:
                self._usage_problems.add(problem)
                log.error(
                    "%s: cannot add the usage of %s, will retry: %s", self.where, rid, problem
                )
        usage.flushed({rid: delta for rid, delta in deltas.items() if rid not in problems})

    def _add_usage(self, deltas: dict[str, RegistrationUsage]) -> dict[str, str]:
        """Add each delta to its hash; returns why some could not be (by ID)."""
        problems: dict[str, str] = {}
        ids = sorted(deltas)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            pipe = self._redis.pipeline(transaction=False)
            for rid in chunk:
                delta = deltas[rid]
                increments = [(n, v) for n, v in delta.counters().items() if v]
                self._scripts["add_usage"](
                    args=[
                        self.prefix,
                        rid,
                        "" if delta.last_seen is None else repr(delta.last_seen),
                        *(str(part) for pair in increments for part in pair),
                    ],
                    client=pipe,
                )
            for rid, reply in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, Exception):
                    problems[rid] = f"key {self._key(f'usage:{rid}')}: {reply}"
        return problems

    async def usage_totals(self, registration_ids: Sequence[str]) -> dict[str, RegistrationUsage]:
        """Every node's usage of these registrations, as flushed so far; RegistryError if a
        hash is corrupt, RegistryUnavailableError if Redis cannot be reached."""
        return await self._in_thread(self._fetch_usage, list(registration_ids))

    def _fetch_usage(self, ids: Sequence[str]) -> dict[str, RegistrationUsage]:
        totals: dict[str, RegistrationUsage] = {}
        hashes = self._batched(ids, lambda pipe, rid: pipe.hgetall(self._key(f"usage:{rid}")))
        for rid, (fields,) in hashes:
            try:
                if isinstance(fields, Exception):
                    raise fields
                totals[rid] = RegistrationUsage.from_counters(fields)
            except (redis.ResponseError, ValueError) as exc:
                key = self._key(f"usage:{rid}")
                raise RegistryError(f"{self.where}: key {key} is corrupt ({exc})") from None
        return totals

    # ---------------------------------------------------------------- changes (scripts)

    async def _change(
        self, script: str, args: list[Any], refresh: Callable[[Any], tuple[list[str], list[str]]]
    ) -> Any:
        """Run one script, then re-read what it changed into the mirror, so this node sees its
        own change at once. ``refresh(reply)`` names the registrations and tokens to re-read.
        The script gets a deadline in Redis's clock (see ``_LATE_GUARD``)."""

        def work() -> tuple[Any, dict[str, _Fetched], dict[str, _Fetched]]:
            seconds, microseconds = self._redis.time()
            deadline = seconds * 1_000_000 + microseconds + int(CHANGE_DEADLINE * 1_000_000)
            reply = self._scripts[script](args=[self.prefix, *args, deadline])
            registrations, tokens = refresh(reply)
            return reply, self._fetch_registrations(registrations), self._fetch_tokens(tokens)

        try:
            reply, registrations, tokens = await self._in_thread(work)
        except redis.ResponseError as exc:
            if "petit: too late" in str(exc):
                raise RegistryUnavailableError(
                    f"the registry is unavailable (Redis at {redacted_url(self.url)} ran the "
                    f"change more than {CHANGE_DEADLINE:g} s after it was sent, so it was not "
                    "made); try again later"
                ) from None
            raise RegistryError(f"{self.where} refused the change: {exc}") from None
        self._apply(registrations, tokens)
        return reply

    async def register(
        self,
        public_key: bytes,
        vitae: dict[str, str],
        *,
        token: str | None = None,
        actor: str = SERVER_ACTOR,
    ) -> Registration:
        """A fresh ID and port (or, with a claim token, the key of the ID it is bound to)."""
        digest = "" if token is None else token_digest(token)
        reply = await self._change(
            "register",
            [
                public_key.hex(),
                json.dumps(vitae),
                _now(),
                self._first_port,
                digest,
                FIRST_ID - 1,
            ],
            lambda r: ([r[1]], [r[3]] if r[3] else []) if r[0] == "ok" else ([], []),
        )
        if reply[0] != "ok":
            assert token is not None
            raise AuthError(CLAIM_REFUSED if token.startswith(CLAIM_PREFIX) else ENROLLMENT_REFUSED)
        registration = self._registrations.get(reply[1])
        if registration is None:
            raise RegistryError(f"{self.where}: registration {reply[1]} vanished at once")
        token_id = reply[3] or None
        used = None if token_id is None else self._tokens.get(token_id)
        claimed = used is not None and used.for_id is not None
        audit_registered(registration, token_id, claimed=claimed, actor=actor)
        return registration

    async def unregister(self, registration_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Remove a registration, its port and its aliases."""
        reply = await self._change(
            "unregister", [registration_id], lambda _: ([registration_id], [])
        )
        if reply[0] == "ok":
            audit_unregistered(registration_id, sorted(reply[1:]), actor=actor)

    async def add_alias(
        self, alias: str, registration_id: str, *, actor: str = SERVER_ACTOR
    ) -> None:
        """Bind a hostname to a registration; RegistryError says why not."""
        alias = alias.lower()
        check_alias(alias)
        reply = await self._change(
            "add_alias", [alias, registration_id], lambda _: ([registration_id], [])
        )
        if reply == "no such id":
            raise RegistryError(f"No such registeredId {registration_id}.")
        if reply == "exists":
            raise RegistryError(f"Alias {alias} already exists.")
        audit_alias("alias.added", alias, registration_id, actor=actor)

    async def set_policy(
        self, registration_id: str, changes: Mapping[str, object], *, actor: str = SERVER_ACTOR
    ) -> Policy:
        """Change a registration's own policy (PolicyError for a bad key or value). The
        changes apply to the policy this node knows; two nodes changing one registration's
        policy in the same instant: the last write wins, whole."""
        registration = self.get(registration_id)
        if registration is None:
            raise RegistryError(f"No such registeredId {registration_id}.")
        policy = registration.policy.changed(changes)
        shown = policy.to_json()
        reply = await self._change(
            "set_policy",
            [registration_id, json.dumps(shown) if shown else ""],
            lambda _: ([registration_id], []),
        )
        if reply == "no such id":
            raise RegistryError(f"No such registeredId {registration_id}.")
        audit_policy(registration_id, policy, actor=actor)
        return policy

    async def remove_alias(
        self, alias: str, registration_id: str | None = None, *, actor: str = SERVER_ACTOR
    ) -> None:
        """Unbind a hostname (from ``registration_id`` only, when given)."""
        alias = alias.lower()
        reply = await self._change(
            "remove_alias",
            [alias, registration_id or ""],
            lambda r: (r[1:], []),
        )
        if reply[0] == "not an alias":
            raise RegistryError(f"{alias} is not an alias.")
        if reply[0] == "not yours":
            raise RegistryError(f"{alias} is not an alias of {registration_id}.")
        audit_alias("alias.removed", alias, reply[1], actor=actor)

    async def create_token(
        self, note: str, *, for_id: str | None = None, actor: str = SERVER_ACTOR
    ) -> tuple[EnrollmentToken, str]:
        """A new token and its secret (the only time the secret exists outside the client)."""
        token, secret = new_token("0", note, for_id)
        stored = json.dumps(token.to_json())
        reply = await self._change(
            "create_token",
            [stored, token.digest, for_id or ""],
            lambda r: ([], [r[1]] if r[0] == "ok" else []),
        )
        if reply[0] == "no such id":
            raise RegistryError(f"No such registeredId {for_id}.")
        if reply[0] == "has a key":
            raise RegistryError(
                f"Registration {for_id} already has a key: only a registration imported "
                "without a usable key can be claimed."
            )
        token.token_id = reply[1]
        audit_token_created(token, actor=actor)
        return token, secret

    async def revoke_token(self, token_id: str, *, actor: str = SERVER_ACTOR) -> None:
        """Make an unused token worthless."""
        reply = await self._change("revoke_token", [token_id, _now()], lambda _: ([], [token_id]))
        if reply == "missing":
            raise RegistryError(f"No such token {token_id}.")
        if reply != "ok":
            raise RegistryError(f"Token {token_id} is already {reply}.")
        audit_token_revoked(token_id, actor=actor)

    async def merge(
        self, plan: MergePlan, progress: Progress | None = None, *, actor: str = SERVER_ACTOR
    ) -> list[str]:
        """Add a planned import, each registration atomically, auditing what was added; what
        another writer took meanwhile comes back as conflicts."""
        conflicts: list[str] = []
        total = len(plan.registrations) + len(plan.tokens)
        done = 0
        for start in range(0, len(plan.registrations), BATCH):
            chunk = plan.registrations[start : start + BATCH]
            replies = await self._in_thread(self._put_registrations, chunk)
            for registration, reply in zip(chunk, replies, strict=True):
                if reply == "ok":
                    audit_imported(registration, actor=actor)
                else:
                    conflicts.append(f"ID {registration.registration_id}: {reply}")
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if plan.tokens:
            replies = await self._in_thread(self._put_tokens, plan.tokens)
            for token, reply in zip(plan.tokens, replies, strict=True):
                if reply != "exists":  # else another writer put the same secret meanwhile
                    stored = dataclasses.replace(token, token_id=reply)
                    audit_token_created(stored, actor=actor, imported=True)
            if progress is not None:
                progress(total, total)
        await self._in_thread(
            lambda: self._scripts["raise_next_id"](args=[self.prefix, plan.next_id - 1])
        )
        self._apply_full(await self._in_thread(self._fetch_all), strict=False)
        return conflicts

    def _put_registrations(self, registrations: Sequence[Registration]) -> list[str]:
        pipe = self._redis.pipeline(transaction=False)
        for registration in registrations:
            stored = registration.to_json()
            del stored["aliases"]
            self._scripts["put_registration"](
                args=[
                    self.prefix,
                    registration.registration_id,
                    json.dumps(stored),
                    registration.port,
                    *registration.aliases,
                ],
                client=pipe,
            )
        return [str(reply) for reply in pipe.execute()]

    def _put_tokens(self, tokens: Sequence[EnrollmentToken]) -> list[str]:
        """The ID each token got (or ``exists``)."""
        pipe = self._redis.pipeline(transaction=False)
        for token in tokens:
            self._scripts["put_token"](
                args=[self.prefix, token.token_id, token.digest, json.dumps(token.to_json())],
                client=pipe,
            )
        return [str(reply) for reply in pipe.execute()]


def _stream_id(value: str) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition("-")
    return int(milliseconds), int(sequence or 0)


def _now() -> float:
    return time.time()

"""The embedded registry: registrations in one JSON file beside the config.

Plain data with synchronous methods: trio switches tasks only at ``await``, so no lock is
needed inside the process; the server's process lock keeps other processes out. Every
change is written atomically (temp file, fsync, rename), so a kill -9 at any moment leaves
either the old or the new file, never a torn one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from petit.auth import is_valid_id
from petit.errors import ConfigError
from petit.statefile import read_json, write_json_atomic

FIRST_ID = 1001
FORMAT_VERSION = 1


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


class FileRegistry:
    """Registrations persisted in a JSON file."""

    def __init__(self, path: Path, *, first_port: int) -> None:
        self.path = path
        self._first_port = first_port
        self._registrations: dict[str, Registration] = {}
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
        if not isinstance(entries, dict) or not isinstance(next_id, int):
            raise ConfigError(f"{where}: 'registrations' and 'next_id' are required")
        for rid, entry in entries.items():
            try:
                self._registrations[rid] = _registration_from_json(rid, entry)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: registration {rid} is malformed ({exc})") from None
        self._next_id = max([next_id, *(int(r) + 1 for r in self._registrations)])

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
            },
        )

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

    def register(self, public_key: bytes, vitae: dict[str, str]) -> Registration:
        """Create a registration with a fresh ID and port; saved before it is returned."""
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
        self._next_id += 1
        self._registrations[registration.registration_id] = registration
        try:
            self.save()
        except BaseException:
            del self._registrations[registration.registration_id]
            self._next_id -= 1
            raise
        return registration

    def unregister(self, registration_id: str) -> None:
        """Remove a registration (the caller has checked the proof)."""
        registration = self._registrations.pop(registration_id, None)
        if registration is None:
            return
        try:
            self.save()
        except BaseException:
            self._registrations[registration_id] = registration
            raise


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

"""A registration's own policy: what its visitors may do, overriding the server's defaults.

One slow tenant must not force a global ``responseTimeout``; one customer's visitor
allow-list must not bind another's. So each registration may carry its own values, stored
in the registry beside it (both backends), set with ``petit-server policy`` (or the control
port's ``POLICY``, or the admin API) and audited. A key left unset means the server's
setting (``[server]``), or no limit where the server has none.

Defaults for every registration come from ``[server.policy]`` (``maxRequestBody``,
``allow``, ``deny``, ``rateLimit``, ``rateBurst``, ``bandwidth``; the timeouts and
``maxStreams`` have ``[server]`` keys of their own). A registration's key replaces the
default whole (its ``allow`` list is not added to the server's).

The keys, as the CLI, the API and the registry spell them:

- ``responseTimeout``, ``openTimeout``, ``idleTimeout``: seconds, as the ``[server]`` keys.
- ``maxRequestBody``: bytes a request body may hold (413 past it).
- ``allow``, ``deny``: visitor address ranges (CIDR). With ``allow``, only those; ``deny``
  wins over ``allow``. Anyone else gets 403 before the private service is asked anything.
- ``rateLimit``: requests per second per visitor address, with bursts of ``rateBurst``
  (429 with Retry-After past it).
- ``maxStreams``: connections open at once to the private service, as the server's
  ``maxStreamsPerRegistration``.
- ``bandwidth``: bytes per second each way, over all its connections (``edge/bandwidth.py``).

Pure data and checks: no I/O, so the registry, the edge and the CLI share one reading.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NETWORKS: Final = 256  # per list: a policy is checked on every request
MAX_SECONDS: Final = 86_400.0
MAX_RATE: Final = 1_000_000.0
MIN_BANDWIDTH: Final = 1024  # bytes per second


class PolicyError(ValueError):
    """A policy value the caller gave is not valid; the message says which and why."""


def _seconds(key: str, value: object) -> float:
    number = _number(key, value)
    if not 0 < number <= MAX_SECONDS:
        raise PolicyError(f"{key} is seconds, more than 0 and at most {MAX_SECONDS:g}")
    return number


def _count(key: str, value: object, low: int) -> int:
    number = _number(key, value)
    if number != int(number) or number < low or number > 2**53:
        raise PolicyError(f"{key} is a whole number of at least {low}")
    return int(number)


def _rate(key: str, value: object) -> float:
    number = _number(key, value)
    if not 0 < number <= MAX_RATE:
        raise PolicyError(f"{key} is requests per second, more than 0 and at most {MAX_RATE:g}")
    return number


def _number(key: str, value: object) -> float:
    if isinstance(value, bool):
        raise PolicyError(f"{key} is a number, not {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PolicyError(f"{key} is a number, not {value!r}") from None
    if not math.isfinite(number):
        raise PolicyError(f"{key} is a finite number")
    return number


def _networks(key: str, value: object) -> tuple[Network, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise PolicyError(f"{key} is a list of address ranges (CIDR), not {value!r}")
    networks = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise PolicyError(f"{key}: {text!r} is no address range (CIDR)") from None
    if len(networks) > MAX_NETWORKS:
        raise PolicyError(f"{key} holds at most {MAX_NETWORKS} ranges")
    return tuple(networks)


# key -> (field, parse); the order is the order shown
_KEYS: Final = {
    "responseTimeout": ("response_timeout", _seconds),
    "openTimeout": ("open_timeout", _seconds),
    "idleTimeout": ("idle_timeout", _seconds),
    "maxRequestBody": ("max_request_body", lambda k, v: _count(k, v, 0)),
    "allow": ("allow", _networks),
    "deny": ("deny", _networks),
    "rateLimit": ("rate_limit", _rate),
    "rateBurst": ("rate_burst", lambda k, v: _count(k, v, 1)),
    "maxStreams": ("max_streams", lambda k, v: _count(k, v, 1)),
    "bandwidth": ("bandwidth", lambda k, v: _count(k, v, MIN_BANDWIDTH)),
}
KEYS: Final = tuple(_KEYS)


@dataclass(frozen=True, slots=True)
class Policy:
    """A registration's own values; None (or an empty list) means the server's."""

    response_timeout: float | None = None
    open_timeout: float | None = None
    idle_timeout: float | None = None
    max_request_body: int | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    rate_limit: float | None = None
    rate_burst: int | None = None
    max_streams: int | None = None
    bandwidth: int | None = None  # bytes per second, each way

    def __bool__(self) -> bool:
        return self != Policy()

    def admits(self, address: str) -> bool:
        """Whether a visitor from ``address`` may reach the private service."""
        if not self.allow and not self.deny:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # no address to judge: refused only when a list applies
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)

    @property
    def burst(self) -> int:
        """Requests a visitor may make at once before the rate applies."""
        if self.rate_burst is not None:
            return self.rate_burst
        return max(1, math.ceil(self.rate_limit or 1))

    def over(self, defaults: Policy) -> Policy:
        """This policy where it sets a key, ``defaults`` elsewhere (a registration's own
        over the server's ``[server.policy]``)."""
        own = {
            spec.name: value
            for spec in dataclasses.fields(self)
            if (value := getattr(self, spec.name)) not in (None, ())
        }
        return dataclasses.replace(defaults, **own)

    def changed(self, changes: Mapping[str, object]) -> Policy:
        """This policy with ``changes`` applied (key -> value; None or "" resets the key).

        Raises:
            PolicyError: an unknown key or a value out of range.
        """
        values: dict[str, object] = {}
        for key, value in changes.items():
            if key not in _KEYS:
                raise PolicyError(f"unknown policy key {key!r}; the keys: {', '.join(KEYS)}")
            name, parse = _KEYS[key]
            if value is None or value == "":
                values[name] = () if name in ("allow", "deny") else None
            else:
                values[name] = parse(key, value)
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        """The keys that are set, as the registry stores and the API shows them."""
        shown: dict[str, object] = {}
        for key, (name, _) in _KEYS.items():
            value = getattr(self, name)
            if isinstance(value, tuple):
                if value:
                    shown[key] = [str(network) for network in value]
            elif value is not None:
                shown[key] = value
        return shown


# Keys whose server-wide default is already a [server] key of its own.
_SERVER_KEYS: Final = {
    "responseTimeout": "responseTimeout",
    "openTimeout": "openTimeout",
    "idleTimeout": "idleTimeout",
    "maxStreams": "maxStreamsPerRegistration",
}


def default_policy(table: Mapping[str, object]) -> Policy:
    """``[server.policy]``: what every registration gets for the keys it does not set.

    Raises:
        PolicyError: a bad key or value, or a key whose default is a ``[server]`` key.
    """
    for key in table:
        if key in _SERVER_KEYS:
            raise PolicyError(f"{key}'s default is [server] {_SERVER_KEYS[key]}, not set here")
    return Policy().changed(table)


def policy_from_json(document: object) -> Policy:
    """A stored policy; PolicyError (a ValueError) if it is malformed."""
    if not isinstance(document, dict):
        raise PolicyError("a policy is an object")
    return Policy().changed(document)


def parse_assignments(words: list[str]) -> dict[str, str]:
    """``key=value`` words from a command line; PolicyError for any other shape."""
    changes = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or not key:
            raise PolicyError(f"{word!r} is not KEY=VALUE (an empty VALUE resets the key)")
        changes[key] = value
    return changes

"""What limits apply: the node's ``[ratelimit]`` table and a permission set's ``rate_limits``.

Both are validated here into frozen values; errors are :class:`InvalidRateLimit` naming
the key (``per_address_rate``) or the dotted field (``rate_limits.per_client.rate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from hoodyproxy.limits._rates import (InvalidRateLimit, Limit, dotted_field, parse_burst, parse_limit,
                                      parse_rate)

#: Program keys of ``per_program``: a program name, or a program and its index.
_PROGRAM_KEY = re.compile(r"([a-z][a-z0-9]{0,11})(?:-(0|[1-9][0-9]{0,4}))?\Z")
#: Bound on ``per_program`` entries, so a set stays cheap to hold and to check.
MAX_PROGRAM_LIMITS = 64
MAX_TABLE_SIZE = 4_194_304
#: Bounds of ``shared_sync_ms``: below 5 ms the exchange costs more than it gains; above
#: 5 s the node-wide count lags too far behind to be called shared.
MIN_SYNC_MS, MAX_SYNC_MS = 5, 5000
_SCOPES = ("per_client", "per_principal", "per_container", "per_project")


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """The node's rate limiting, from the config's ``[ratelimit]`` table.

    ``per_address`` limits every request per client address before any credential is
    looked at; ``failed_auth`` limits failed authentications per client address, and
    ``failed_auth_user`` per username; each table holds at most ``table_size`` keys; IPv6 clients are grouped by
    their first ``ipv6_prefix`` bits.  ``dry_run`` lets every request through (the
    verdict still says which would have been refused), on every limit of the node.
    ``shared``: with several worker processes, whether they share one budget (each
    worker enforces the full budget and applies the others' charges, exchanged every
    ``shared_sync_ms`` milliseconds: :mod:`hoodyproxy.limits.shared`) or each enforces the
    full budget alone (a client spread over N workers' connections can then get up to N
    times it).  ``enabled = false`` turns every limit off.
    """

    enabled: bool = True
    per_address: Limit = Limit(parse_rate("1000/s"), 2000)
    failed_auth: Limit = Limit(parse_rate("10/min"), 20)
    table_size: int = 65_536
    ipv6_prefix: int = 64
    dry_run: bool = False
    shared: bool = False
    #: Failed authentications per username, from any address: larger than one address's
    #: budget, so that one guessing address is stopped long before it could lock the user
    #: out (the user then still signs in from elsewhere); guessers spread over many
    #: addresses are stopped here.
    failed_auth_user: Limit = Limit(parse_rate("30/min"), 100)
    #: With ``shared``: milliseconds between two exchanges of charges among the workers
    #: (the lag of the node-wide count, which bounds the overshoot).
    shared_sync_ms: int = 50

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> RateLimitSettings:
        """Validate a ``[ratelimit]`` TOML table; missing keys take the defaults.

        Raises :class:`InvalidRateLimit` whose ``field`` is the key at fault (the config
        reports it as ``[ratelimit] KEY: problem``).
        """
        if not isinstance(table, Mapping):
            raise InvalidRateLimit("", "must be a table")
        for key in table:
            if key not in _SETTINGS_KEYS:
                raise InvalidRateLimit(str(key), "unknown key")
        d = cls()
        get = table.get

        def limit(prefix: str, default: Limit) -> Limit:
            rate = (parse_rate(table[f"{prefix}_rate"], f"{prefix}_rate")
                    if f"{prefix}_rate" in table else default.rate)
            return Limit(rate, parse_burst(get(f"{prefix}_burst", default.burst), f"{prefix}_burst"))

        return cls(
            enabled=_bool(get("enabled", d.enabled), "enabled"),
            per_address=limit("per_address", d.per_address),
            failed_auth=limit("failed_auth", d.failed_auth),
            table_size=_integer(get("table_size", d.table_size), "table_size", 1, MAX_TABLE_SIZE),
            ipv6_prefix=_integer(get("ipv6_prefix", d.ipv6_prefix), "ipv6_prefix", 1, 128),
            dry_run=_bool(get("dry_run", d.dry_run), "dry_run"),
            shared=_bool(get("shared", d.shared), "shared"),
            failed_auth_user=limit("failed_auth_user", d.failed_auth_user),
            shared_sync_ms=_integer(get("shared_sync_ms", d.shared_sync_ms), "shared_sync_ms",
                                    MIN_SYNC_MS, MAX_SYNC_MS),
        )

    def to_mapping(self) -> dict[str, Any]:
        """The ``[ratelimit]`` table that :meth:`from_mapping` reads back to an equal value."""
        return {
            "enabled": self.enabled,
            "per_address_rate": str(self.per_address.rate),
            "per_address_burst": self.per_address.burst,
            "failed_auth_rate": str(self.failed_auth.rate),
            "failed_auth_burst": self.failed_auth.burst,
            "failed_auth_user_rate": str(self.failed_auth_user.rate),
            "failed_auth_user_burst": self.failed_auth_user.burst,
            "table_size": self.table_size,
            "ipv6_prefix": self.ipv6_prefix,
            "dry_run": self.dry_run,
            "shared": self.shared,
            "shared_sync_ms": self.shared_sync_ms,
        }


_SETTINGS_KEYS = frozenset(RateLimitSettings().to_mapping())
DEFAULT_SETTINGS = RateLimitSettings()


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The limits a permission set puts on requests it lets through (after the decision).

    ``per_client``: per client address on one container; ``per_principal``: per matched
    credential; ``per_container`` and ``per_project``: all requests to it;
    ``per_program``: per container and program, keyed ``"terminal"`` (every index) or
    ``"http-3000"`` (one index, preferred when both match).  ``None`` is no limit.
    ``dry_run``: over-limit requests pass and are only reported.
    """

    per_client: Limit | None = None
    per_principal: Limit | None = None
    per_container: Limit | None = None
    per_project: Limit | None = None
    per_program: Mapping[str, Limit] = field(default_factory=lambda: MappingProxyType({}))
    dry_run: bool = False
    #: ``name`` and ``(name, index)`` -> (the key as written, its limit), for the hot path.
    programs: Mapping[Any, tuple[str, Limit]] = field(init=False, repr=False, compare=False)
    #: No limit at all: the check returns at once.
    empty: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        programs: dict[Any, tuple[str, Limit]] = {}
        for key, limit in self.per_program.items():
            match = _PROGRAM_KEY.match(key)
            if match is None:
                raise ValueError("a per_program key is a program name, or program-index")
            name, index = match.groups()
            programs[name if index is None else (name, int(index))] = (key, limit)
        object.__setattr__(self, "per_program", MappingProxyType(dict(self.per_program)))
        object.__setattr__(self, "programs", MappingProxyType(programs))
        object.__setattr__(self, "empty", not programs and all(
            getattr(self, scope) is None for scope in _SCOPES))

    def program_limit(self, program: str | None, index: int | None) -> tuple[str, Limit] | None:
        """The per_program entry for a request to ``program``-``index``, if any."""
        programs = self.programs
        if not programs or program is None:
            return None
        if index is not None:
            entry = programs.get((program, index))
            if entry is not None:
                return entry
        return programs.get(program)

    def to_json(self) -> dict[str, Any]:
        """The stored form, which :func:`parse_rate_limits` reads back to an equal value."""
        out: dict[str, Any] = {}
        for scope in _SCOPES:
            limit = getattr(self, scope)
            if limit is not None:
                out[scope] = limit.to_json()
        if self.per_program:
            out["per_program"] = {name: limit.to_json() for name, limit in self.per_program.items()}
        out["dry_run"] = self.dry_run
        return out


NO_RATE_LIMITS = RateLimits()


def parse_rate_limits(value: Any, field: str = "rate_limits") -> RateLimits:
    """Validate the admin API's ``rate_limits`` object (None or absent: no limits).

    ``{"per_client": LIMIT, "per_principal": LIMIT, "per_container": LIMIT,
    "per_project": LIMIT, "per_program": {PROGRAM: LIMIT, ...}, "dry_run": false}``
    where LIMIT is ``{"rate": "100/s", "burst": 200}`` or null; every key is optional,
    unknown keys are refused.  Errors name the dotted field (``rate_limits.per_client.rate``).
    """
    if value is None:
        return NO_RATE_LIMITS
    if not isinstance(value, dict):
        raise InvalidRateLimit(field, "must be an object")
    for key in value:
        if key not in _SCOPES and key not in ("per_program", "dry_run"):
            raise InvalidRateLimit(dotted_field(field, key), "unknown key")
    limits: dict[str, Any] = {}
    for scope in _SCOPES:
        spec = value.get(scope)
        limits[scope] = None if spec is None else parse_limit(spec, f"{field}.{scope}")
    programs = value.get("per_program")
    per_program: dict[str, Limit] = {}
    if programs is not None:
        where = f"{field}.per_program"
        if not isinstance(programs, dict):
            raise InvalidRateLimit(where, "must be an object of program names to limits")
        if len(programs) > MAX_PROGRAM_LIMITS:
            raise InvalidRateLimit(where, f"at most {MAX_PROGRAM_LIMITS} programs")
        for key, spec in programs.items():
            if not isinstance(key, str) or not _PROGRAM_KEY.match(key):
                raise InvalidRateLimit(where, "keys are program names ('terminal') "
                                              "or program-index ('http-3000')")
            per_program[key] = parse_limit(spec, f"{where}.{key}")
    dry_run = value.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidRateLimit(f"{field}.dry_run", "must be true or false")
    return RateLimits(per_program=MappingProxyType(per_program), dry_run=dry_run, **limits)


def merge_rate_limits(previous: RateLimits | None, patch: Any, field: str = "rate_limits") -> RateLimits:
    """The admin API's PATCH: ``patch`` merged into ``previous`` (None: into no limits).

    Each top-level key given replaces that key and ``null`` removes it (``dry_run``
    then returns to false); ``per_program`` merges by program key, ``null`` removing
    one.  Keys not given are kept.  The result is validated as a whole by
    :func:`parse_rate_limits`, so errors name the same dotted fields.
    """
    if not isinstance(patch, dict):
        raise InvalidRateLimit(field, "must be an object")
    # Checked here as well: a null value is never parsed, yet an unknown name is an error.
    for key in patch:
        if key not in _SCOPES and key not in ("per_program", "dry_run"):
            raise InvalidRateLimit(dotted_field(field, key), "unknown key")
    merged: dict[str, Any] = previous.to_json() if previous is not None else {}
    for key, value in patch.items():
        if key == "per_program" and isinstance(value, dict):
            programs = dict(merged.get("per_program", {}))
            for name, spec in value.items():
                if not isinstance(name, str) or not _PROGRAM_KEY.match(name):
                    raise InvalidRateLimit(f"{field}.per_program", "keys are program names ('terminal') "
                                                                   "or program-index ('http-3000')")
                if spec is None:
                    programs.pop(name, None)
                else:
                    programs[name] = spec
            merged["per_program"] = programs
        elif value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return parse_rate_limits(merged, field)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRateLimit(key, "must be true or false")
    return value


def _integer(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRateLimit(key, "must be an integer")
    if not low <= value <= high:
        raise InvalidRateLimit(key, f"must be {low} to {high}")
    return value

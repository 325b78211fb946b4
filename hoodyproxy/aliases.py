"""Aliases (``my-api.<node>.<zone>``) and the custom domains attached to them.

An alias is one DNS label under the node that names a container, a program and an
index; a custom domain (``api.yourcompany.com``, a CNAME to the alias's hostname) is
attached to one alias and routes where the alias does.

Two halves: pure validation (:func:`check_alias`, :func:`check_domain`,
:func:`check_target`; no I/O, exhaustively tested) and :class:`AliasStore`, the tables
``aliases`` and ``domains`` of the node's SQLite database mirrored in memory with the
same pattern as :class:`hoodyproxy.directory.SQLiteDirectory`: writes commit first and
then update the dicts; another process's writes are noticed through ``PRAGMA
data_version``, checked at most every :attr:`AliasStore.recheck_interval` seconds.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from twisted.logger import Logger

from hoodyproxy.config import DEFAULT_PROGRAMS, Program
from hoodyproxy.directory._db import MirroredTables

if TYPE_CHECKING:
    from hoodyproxy.directory import Container

log = Logger()

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
#: Anything starting like ``<24 alnum>-<24 alnum>-`` is (or looks like) a route label.
_ROUTE_SHAPED = re.compile(r"[0-9a-z]{24}-[0-9a-z]{24}(-|\Z)")
_CONTAINER_ID = re.compile(r"[0-9a-f]{24}\Z")

#: Labels under ``<node>.<zone>`` the node keeps for itself (now or later).
RESERVED_ALIASES = frozenset({
    "acme", "admin", "api", "health", "healthz", "localhost", "metrics", "node", "status", "www",
})
MAX_DOMAIN = 253


class InvalidAlias(ValueError):
    """A value that cannot be stored; ``field`` names it (``alias``, ``domain``, ``index``...)."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"{field_name}: {problem}")


class AliasExists(Exception):
    """The alias is already taken on this node."""


class DomainExists(Exception):
    """The domain is already attached (to this alias or another)."""

    def __init__(self, domain: str, alias: str | None) -> None:
        super().__init__(domain)
        self.domain, self.alias = domain, alias


class NoSuchAlias(KeyError):
    """No alias of that name."""


# -- pure validation ------------------------------------------------------------------------

def check_alias(value: Any, reserved: frozenset[str] = RESERVED_ALIASES) -> str:
    """The alias if it is one lowercase DNS label that is not route-shaped nor reserved."""
    if not isinstance(value, str):
        raise InvalidAlias("alias", "must be a string")
    if not 1 <= len(value) <= 63:
        raise InvalidAlias("alias", "must be 1 to 63 characters")
    if not _LABEL.match(value):
        raise InvalidAlias("alias", "must be one lowercase DNS label: a-z, 0-9 and '-', "
                                    "not starting or ending with '-'")
    if value[2:4] == "--" and not value.startswith("xn--"):
        raise InvalidAlias("alias", "must not have '--' in the third and fourth characters "
                                    "(reserved for xn-- names)")
    if _ROUTE_SHAPED.match(value):
        raise InvalidAlias("alias", "must not be shaped like a route label (<24 hex>-<24 hex>-...)")
    if value in reserved:
        raise InvalidAlias("alias", "is reserved by the node")
    return value


def check_domain(value: Any, zone: str, node: str | None = None) -> str:
    """The domain, lowercased and without a trailing dot, if it can be a custom domain.

    At least two labels, each an LDH label of 1 to 63 characters, at most 253 characters,
    no wildcard, not an IP address, not the zone nor under it (so never under the node).
    """
    if not isinstance(value, str):
        raise InvalidAlias("domain", "must be a string")
    if not value.isascii():
        raise InvalidAlias("domain", "must be ASCII (an internationalized name in its xn-- form)")
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_DOMAIN:
        raise InvalidAlias("domain", f"must be 1 to {MAX_DOMAIN} characters")
    if "*" in name:
        raise InvalidAlias("domain", "must not be a wildcard")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise InvalidAlias("domain", "must be a DNS name, not an IP address")
    labels = name.split(".")
    if len(labels) < 2:
        raise InvalidAlias("domain", "must have at least two labels (api.example.com)")
    if not all(_LABEL.match(label) for label in labels):
        raise InvalidAlias("domain", "each label must be 1 to 63 of a-z, 0-9 and '-', "
                                     "not starting or ending with '-'")
    if labels[-1].isdigit():
        raise InvalidAlias("domain", "must be a DNS name, not an IP address")
    zone = zone.lower().strip(".")
    for under in filter(None, (zone, f"{node}.{zone}" if node else None)):
        if name == under or name.endswith("." + under):
            raise InvalidAlias("domain", f"must not be under the node's zone ({under})")
    return name


def check_target(container_id: Any, program: Any, index: Any,
                 programs: Mapping[str, Program]) -> tuple[str, str, int]:
    """(container_id, program, index) if they name a service as a route label could."""
    if not isinstance(container_id, str) or not _CONTAINER_ID.match(container_id):
        raise InvalidAlias("container_id", "must be 24 lowercase hexadecimal digits")
    if not isinstance(program, str) or program not in programs:
        raise InvalidAlias("program", f"must be one of {', '.join(sorted(programs))}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidAlias("index", "must be an integer")
    spec = programs[program]
    if spec.index == "port":
        if not 1 <= index <= 65535:
            raise InvalidAlias("index", "must be a port from 1 to 65535")
    elif not 1 <= index <= spec.max_instance:
        raise InvalidAlias("index", f"must be an instance from 1 to {spec.max_instance}")
    return container_id, program, index


def target_advice(container: Container | None, program: Program, index: int) -> list[tuple[str, str]]:
    """Why an alias's target may not be the service meant, and how to map it: ``[(field, message)]``.

    Only port-indexed programs (``http``) can go wrong this way: there the index *is* the
    port, so the platform's ``"program": "http", "index": 1`` (meaning "the first HTTP
    service") routes to port 1 unless the container's ``ports`` map ``http-1`` (or
    ``http``) to the real port.  Advice when the index is below 1024 and not mapped, or
    when ``container`` is None (not in the live map, so its ports cannot be checked).
    Advice never refuses: the alias is stored as asked.
    """
    if program.index != "port":
        return []
    key = f"{program.name}-{index}"
    how = f'register the container with "ports": {{"{key}": <port>}}'
    if container is None:
        return [("container_id", f"the container is not in the live map, so where {key} goes cannot be "
                                 f"checked: {key} means port {index} unless you {how}")]
    if container.port_override(program.name, index) is not None or index >= 1024:
        return []
    return [("index", f"{key} means port {index}: {how} if its service listens on another port")]


# -- the store ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Alias:
    """One alias: its name and where it routes."""

    alias: str
    container_id: str
    program: str
    index: int
    created: float = 0.0

    @property
    def target(self) -> tuple[str, str, int]:
        return self.container_id, self.program, self.index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Alias):
            return NotImplemented
        return (self.alias, *self.target) == (other.alias, *other.target)

    def __hash__(self) -> int:
        return hash((self.alias, *self.target))


class AliasStore(MirroredTables):
    """Aliases and domains of one node, answered from memory.

    ``node`` and ``zone`` are the node's (domains under the zone are refused);
    ``programs`` is the program table (``Settings.programs``) aliases are checked
    against.  ``version`` grows on every change (own writes and other processes'), so a
    route cache can be keyed on it.  Subscribers are called as ``callback(kind, name)``
    with ``kind`` ``"alias"`` or ``"domain"`` after that alias or domain was created,
    changed or removed (a deleted alias also reports each domain it took with it).
    """

    def __init__(self, conn: sqlite3.Connection, *, node: str, zone: str,
                 programs: Mapping[str, Program] = DEFAULT_PROGRAMS,
                 reserved: frozenset[str] = RESERVED_ALIASES,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self.node = node.lower()
        self.zone = zone.lower()
        self.suffix = f"{self.node}.{self.zone}"
        self._dot_suffix = "." + self.suffix
        self.programs = programs
        self.reserved = reserved
        self._clock = clock
        self._monotonic = monotonic
        self._aliases: dict[str, Alias] = {}
        self._domains: dict[str, str] = {}
        self._subscribers: list[Callable[[str, str], None]] = []
        self.version = 0
        self._reload_if_changed()

    # -- reads ------------------------------------------------------------------------

    def _reload(self) -> None:
        aliases = {row[0]: Alias(*row) for row in self._conn.execute(
            'SELECT alias, container_id, program, "index", created FROM aliases')}
        domains = dict(self._conn.execute("SELECT domain, alias FROM domains"))
        changed = [("alias", a) for a in sorted(aliases.keys() | self._aliases.keys())
                   if aliases.get(a) != self._aliases.get(a)]
        changed += [("domain", d) for d in sorted(domains.keys() | self._domains.keys())
                    if domains.get(d) != self._domains.get(d)]
        self._aliases, self._domains = aliases, domains
        if changed:
            self.version += 1
            for kind, name in changed:
                self._notify(kind, name)

    def resolve_alias(self, label: str) -> tuple[str, str, int] | None:
        """(container_id, program, index) for an alias label (lowercase), or None.  Hot path."""
        self._reload_if_changed()
        alias = self._aliases.get(label)
        return alias.target if alias is not None else None

    def resolve_domain(self, domain: str) -> str | None:
        """The alias a custom domain (lowercase, no trailing dot) is attached to, or None.  Hot path."""
        self._reload_if_changed()
        return self._domains.get(domain)

    def resolve_host(self, host: str) -> tuple[str, str, int] | None:
        """(container_id, program, index) for a Host that is an alias or a custom domain.

        ``host`` is lowercase, without port or trailing dot (``routing.split_host``):
        ``<alias>.<node>.<zone>`` resolves the alias; any other name resolves as a custom
        domain through its alias.  None if neither.  Hot path: memory only.
        """
        self._reload_if_changed()
        if host.endswith(self._dot_suffix):
            label = host[: -len(self._dot_suffix)]
            alias = self._aliases.get(label) if "." not in label else None
        else:
            name = self._domains.get(host)
            alias = self._aliases.get(name) if name is not None else None
        return alias.target if alias is not None else None

    def is_attached(self, domain: str) -> bool:
        """Whether ``domain`` is attached to an alias now (reads the database's latest state)."""
        self.refresh()
        return domain in self._domains

    def get(self, alias: str) -> Alias | None:
        self.refresh()
        return self._aliases.get(alias)

    def list(self, container_id: str | None = None) -> list[Alias]:
        """Every alias (of one container), ordered by name; always fresh."""
        self.refresh()
        return [a for name, a in sorted(self._aliases.items())
                if container_id is None or a.container_id == container_id]

    def domains(self, alias: str | None = None) -> list[str]:
        """The domains attached to ``alias`` (or to any alias), sorted; always fresh."""
        self.refresh()
        return sorted(d for d, a in self._domains.items() if alias is None or a == alias)

    def hostname(self, alias: str) -> str:
        """The alias's hostname under the node (what a custom domain is a CNAME to)."""
        return f"{alias}.{self.suffix}"

    # -- writes -----------------------------------------------------------------------

    def _transaction(self, work: Callable[[], Any]) -> Any:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return result

    def _committed(self, changes: list[tuple[str, str]]) -> None:
        # The dicts were updated by the caller; the reload our commit triggers finds them
        # equal to the disk and reports nothing twice.
        self.version += 1
        for kind, name in changes:
            self._notify(kind, name)

    def create(self, alias: str, container_id: str, program: str, index: int) -> Alias:
        """Store a new alias; durable when it returns.  Raises InvalidAlias or AliasExists."""
        alias = check_alias(alias, self.reserved)
        container_id, program, index = check_target(container_id, program, index, self.programs)
        entry = Alias(alias, container_id, program, index, self._clock())

        def insert() -> None:
            try:
                self._conn.execute('INSERT INTO aliases (alias, container_id, program, "index", created) '
                                   "VALUES (?, ?, ?, ?, ?)", (alias, container_id, program, index, entry.created))
            except sqlite3.IntegrityError:
                raise AliasExists(alias) from None
        self.refresh()
        self._transaction(insert)
        self._aliases[alias] = entry
        self._committed([("alias", alias)])
        return entry

    def delete(self, alias: str) -> bool:
        """Remove an alias and every domain attached to it; True if it existed."""
        def remove() -> list[str]:
            gone = [row[0] for row in self._conn.execute("SELECT domain FROM domains WHERE alias = ?", (alias,))]
            cursor = self._conn.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
            return gone if cursor.rowcount > 0 else None
        self.refresh()
        gone = self._transaction(remove)
        if gone is None:
            return False
        self._aliases.pop(alias, None)
        for domain in gone:
            self._domains.pop(domain, None)
        self._committed([("alias", alias)] + [("domain", d) for d in gone])
        return True

    def attach(self, alias: str, domain: str) -> str:
        """Attach ``domain`` to ``alias``; returns the normalized domain.

        Raises InvalidAlias (bad domain), NoSuchAlias or DomainExists.
        """
        domain = check_domain(domain, self.zone, self.node)

        def insert() -> None:
            if self._conn.execute("SELECT 1 FROM aliases WHERE alias = ?", (alias,)).fetchone() is None:
                raise NoSuchAlias(alias)
            row = self._conn.execute("SELECT alias FROM domains WHERE domain = ?", (domain,)).fetchone()
            if row is not None:
                raise DomainExists(domain, row[0])
            self._conn.execute("INSERT INTO domains (domain, alias, created) VALUES (?, ?, ?)",
                               (domain, alias, self._clock()))
        self.refresh()
        self._transaction(insert)
        self._domains[domain] = alias
        self._committed([("domain", domain)])
        return domain

    def detach(self, domain: str, alias: str | None = None) -> bool:
        """Detach ``domain`` (only from ``alias`` if given); True if it was attached."""
        domain = domain.lower().rstrip(".")

        def remove() -> bool:
            if alias is None:
                cursor = self._conn.execute("DELETE FROM domains WHERE domain = ?", (domain,))
            else:
                cursor = self._conn.execute("DELETE FROM domains WHERE domain = ? AND alias = ?", (domain, alias))
            return cursor.rowcount > 0
        self.refresh()
        if not self._transaction(remove):
            return False
        self._domains.pop(domain, None)
        self._committed([("domain", domain)])
        return True

    def mirror(self, name: str, entry: Alias | None, domains: list[str] | tuple[str, ...] = ()) -> None:
        """Make alias ``name`` exactly ``entry`` with ``domains`` (``entry`` None: no such
        alias), unchecked here: how a copy of a shared store's alias is kept (the
        mirror, hoodyproxy.store.mirror, checks what it read from etcd first).  A domain held by another alias moves to this one.
        """
        def write() -> None:
            self._conn.execute("DELETE FROM aliases WHERE alias = ?", (name,))  # and its domains
            if entry is None:
                return
            self._conn.execute('INSERT INTO aliases (alias, container_id, program, "index", created) '
                               "VALUES (?, ?, ?, ?, ?)",
                               (name, entry.container_id, entry.program, entry.index, entry.created))
            for domain in domains:
                self._conn.execute("DELETE FROM domains WHERE domain = ?", (domain,))
                self._conn.execute("INSERT INTO domains (domain, alias, created) VALUES (?, ?, ?)",
                                   (domain, name, self._clock()))
        self._transaction(write)
        # Our own commit does not move PRAGMA data_version: reload (and notify what changed).
        self._data_version = -1
        self.refresh()

    # -- change notification ----------------------------------------------------------

    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(kind, name)`` (kind ``"alias"`` or ``"domain"``) after a change."""
        self._subscribers.append(callback)

    def _notify(self, kind: str, name: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(kind, name)
            except Exception:
                log.failure("alias store subscriber failed")


def alias_url(alias: str, suffix: str, https_port: int = 443) -> str:
    """``https://<alias>.<suffix>[:port]/``, the port left out when it is 443."""
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{alias}.{suffix}{port}/"

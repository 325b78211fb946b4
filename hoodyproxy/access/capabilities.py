"""Which capability, at which level, a request to a program needs (pure: no reactor, no I/O).

Each program has a service kind (``Program.kind`` in the config).  The kind classifies a
request into a capability and, for capabilities that have them, a level::

    terminal   the interactive session: ("terminal", None); a non-GET under /exec or the
               platform's execute API /api/v1/terminal/execute: ("exec", None)
    files      GET, HEAD, OPTIONS, PROPFIND and WebSockets: ("files", "read"); else "write"
    display    GET, HEAD, OPTIONS and WebSockets: ("display", "view"); else "control"
    sqlite     GET, HEAD, OPTIONS and POST /query: ("sqlite", "query"); else "modify"
    http       ("http", None)         generic   ("http", None)

Levels are ordered; a grant of a level allows that level and every level below it.
The built-in kinds are small frozen dataclasses whose method and path sets can be
changed (``FilesKind(read_methods=...)``, per program in the config: see
:func:`configured_kind`); third parties add kinds as plugins (see :func:`service_kinds`).

A kind that decides by method or path also says what the gateway needs to refuse
requests it cannot classify safely (see :mod:`hoodyproxy.access.ambiguity`):
``strictest``, the classification of a request whose real meaning the gateway cannot
see; ``low_methods``, the methods it classifies low by method alone; ``decisive_paths``,
the paths whose classification differs from the rest.  A plugin kind without
``strictest`` is taken to decide by neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Iterable, Mapping, Protocol, cast, runtime_checkable
from urllib.parse import unquote_to_bytes

#: The ordered levels of each leveled capability, lowest first.  A capability not listed
#: here has no levels: a grant for it is ``true`` or ``false``.
LEVELS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "files": ("read", "write"),
    "display": ("view", "control"),
    "sqlite": ("query", "modify"),
})

#: The capabilities the built-in kinds classify requests into.
KNOWN_CAPABILITIES: tuple[str, ...] = ("terminal", "exec", "files", "display", "sqlite", "http")

#: What a request needs when its kind fails to classify it: not a valid capability name,
#: so no permission set can grant it (only a default of "allow" lets it through).
UNCLASSIFIED = "!unclassified"

Classification = tuple[str, "str | None"]


@runtime_checkable
class ServiceKind(Protocol):
    """What the access layer needs of a service kind.

    ``name`` is the kind's name (``Program.kind``); ``levels`` the ordered levels of the
    leveled capabilities it classifies into (``{}`` if none); ``classify`` is pure and
    must not raise for any method, path or flag.
    """

    @property
    def name(self) -> str:
        """The kind's name, as ``Program.kind`` says it."""

    @property
    def levels(self) -> Mapping[str, tuple[str, ...]]:
        """The ordered levels (lowest first) of each leveled capability this kind uses."""

    def classify(self, method: bytes, path: bytes, websocket: bool) -> Classification:
        """The (capability, level or None) this request needs."""


def normalize_path(path: bytes) -> bytes:
    """The request path as an upstream server will most likely resolve it.

    Drops the query and fragment, percent-decodes, resolves ``.`` and ``..`` segments and
    collapses repeated slashes, so ``//%65xec/./run`` and ``/a/../exec`` are both seen as
    under ``/exec``: classification must not be fooled by spellings the upstream undoes.
    """
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]
    path = unquote_to_bytes(path)
    segments: list[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = b"/" if path.endswith((b"/", b"/.", b"/..")) and segments else b""
    return b"/" + b"/".join(segments) + trailing


def _under(path: bytes, prefixes: Iterable[bytes]) -> bool:
    return any(path == p or path.startswith(p.rstrip(b"/") + b"/") for p in prefixes)


#: The platform's terminal paths that run commands (``POST /api/v1/terminal/execute``).
EXEC_PREFIXES: tuple[bytes, ...] = (b"/exec", b"/api/v1/terminal/execute")


@dataclass(frozen=True)
class TerminalKind:
    """``terminal``: the interactive session, and command execution: any method but GET
    under ``/exec`` or the platform's ``/api/v1/terminal/execute``."""

    name: str = "terminal"
    exec_prefixes: tuple[bytes, ...] = EXEC_PREFIXES
    levels: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})
    strictest: ClassVar[Classification] = ("exec", None)
    low_methods: ClassVar[frozenset[bytes]] = frozenset((b"GET",))

    @property
    def decisive_paths(self) -> tuple[bytes, ...]:
        return self.exec_prefixes

    def classify(self, method: bytes, path: bytes, websocket: bool) -> Classification:
        if method != b"GET" and _under(normalize_path(path), self.exec_prefixes):
            return ("exec", None)
        return ("terminal", None)


@dataclass(frozen=True)
class FilesKind:
    """``files``: reads (and WebSockets, which may then be forwarded read-only) and writes."""

    name: str = "files"
    read_methods: frozenset[bytes] = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PROPFIND"))
    levels: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({"files": LEVELS["files"]})
    strictest: ClassVar[Classification] = ("files", "write")
    decisive_paths: ClassVar[tuple[bytes, ...]] = ()

    @property
    def low_methods(self) -> frozenset[bytes]:
        return self.read_methods

    def classify(self, method: bytes, path: bytes, websocket: bool) -> Classification:
        if websocket or method in self.read_methods:
            return ("files", "read")
        return ("files", "write")


@dataclass(frozen=True)
class DisplayKind:
    """``display``: viewing (and WebSockets, forwarded read-only at ``view``) and control."""

    name: str = "display"
    view_methods: frozenset[bytes] = frozenset((b"GET", b"HEAD", b"OPTIONS"))
    levels: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({"display": LEVELS["display"]})
    strictest: ClassVar[Classification] = ("display", "control")
    decisive_paths: ClassVar[tuple[bytes, ...]] = ()

    @property
    def low_methods(self) -> frozenset[bytes]:
        return self.view_methods

    def classify(self, method: bytes, path: bytes, websocket: bool) -> Classification:
        if websocket or method in self.view_methods:
            return ("display", "view")
        return ("display", "control")


@dataclass(frozen=True)
class SQLiteKind:
    """``sqlite``: reads and ``POST /query`` are queries; everything else may modify."""

    name: str = "sqlite"
    query_methods: frozenset[bytes] = frozenset((b"GET", b"HEAD", b"OPTIONS"))
    query_paths: tuple[bytes, ...] = (b"/query",)
    levels: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({"sqlite": LEVELS["sqlite"]})
    strictest: ClassVar[Classification] = ("sqlite", "modify")

    @property
    def low_methods(self) -> frozenset[bytes]:
        return self.query_methods

    @property
    def decisive_paths(self) -> tuple[bytes, ...]:
        return self.query_paths

    def classify(self, method: bytes, path: bytes, websocket: bool) -> Classification:
        if method in self.query_methods:
            return ("sqlite", "query")
        if method == b"POST" and normalize_path(path).rstrip(b"/") in self.query_paths:
            return ("sqlite", "query")
        return ("sqlite", "modify")


@dataclass(frozen=True)
class HTTPKind:
    """``http`` and ``generic``: every request needs the level-less ``http`` capability."""

    name: str = "http"
    levels: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})

    def classify(self, method: bytes, path: bytes, websocket: bool) -> Classification:
        return ("http", None)


#: The kinds that ship with hoodyproxy, by name.
BUILTIN_KINDS: Mapping[str, ServiceKind] = MappingProxyType({
    kind.name: kind
    for kind in (TerminalKind(), FilesKind(), DisplayKind(), SQLiteKind(), HTTPKind(), HTTPKind("generic"))
})


def classify(kind: "str | ServiceKind", method: bytes, path: bytes, websocket: bool,
             kinds: Mapping[str, ServiceKind] = BUILTIN_KINDS) -> Classification:
    """The (capability, level or None) a request to a program of ``kind`` needs.

    ``kind`` is a kind's name or a provider (one :func:`configured_kind` made).  An
    unknown kind is classified as ``generic``.  A kind whose ``classify`` raises, or
    answers something that is not a (str, str or None) pair, needs :data:`UNCLASSIFIED`
    capability, which no permission set can grant (fail closed).
    """
    provider = kind if not isinstance(kind, str) else (
        kinds.get(kind) or kinds.get("generic") or BUILTIN_KINDS["generic"])
    try:
        capability, level = provider.classify(method, path, websocket)
    except Exception:
        return (UNCLASSIFIED, None)
    if not isinstance(capability, str) or not (level is None or isinstance(level, str)):
        return (UNCLASSIFIED, None)
    return (capability, level)


#: Which dataclass field each config option of a program sets (see hoodyproxy.config.KIND_OPTIONS).
_OPTION_FIELDS = {"exec_paths": "exec_prefixes", "read_methods": "read_methods",
                  "view_methods": "view_methods", "query_methods": "query_methods",
                  "query_paths": "query_paths"}


def configured_kind(kind: str, options: Iterable[tuple[str, Iterable[str]]],
                    kinds: Mapping[str, ServiceKind] = BUILTIN_KINDS) -> ServiceKind:
    """The provider of ``kind`` with a program's method and path sets applied.

    ``options`` are ``(option, values)`` pairs as ``Program.kind_options`` holds them
    (validated by the config): paths become a tuple, methods a frozenset.  An option the
    provider has no field for is ignored (the config refuses those for built-in kinds).
    """
    provider = kinds.get(kind) or kinds.get("generic") or BUILTIN_KINDS["generic"]
    changes: dict[str, object] = {}
    for option, values in options:
        field_name = _OPTION_FIELDS.get(option)
        if field_name is None or field_name not in getattr(provider, "__dataclass_fields__", {}):
            continue
        encoded = [v.encode("ascii") for v in values]
        changes[field_name] = tuple(encoded) if option.endswith("_paths") else frozenset(encoded)
    return dataclasses.replace(provider, **changes) if changes else provider  # type: ignore[type-var]


def level_orders(kinds: Mapping[str, ServiceKind] = BUILTIN_KINDS) -> Mapping[str, tuple[str, ...]]:
    """Every leveled capability the ``kinds`` use, with its levels (built-in orders win)."""
    orders: dict[str, tuple[str, ...]] = {}
    for kind in kinds.values():
        for capability, levels in getattr(kind, "levels", {}).items():
            orders.setdefault(capability, tuple(levels))
    orders.update(LEVELS)
    return MappingProxyType(orders)


def service_kinds(plugin_package=None) -> Mapping[str, ServiceKind]:
    """The built-in kinds plus every third-party kind found as a Twisted plugin.

    Plugins are :class:`hoodyproxy.interfaces.IServiceKind` providers found with
    :func:`twisted.plugin.getPlugins` (in ``plugin_package``, by default
    ``hoodyproxy.plugins`` if it exists, else ``twisted.plugins``).  A provider is used
    only if it also has ``classify`` (and optionally ``levels``); a provider named like a
    built-in replaces it.  Not pure (it scans ``sys.path``): call it once at start-up.
    """
    from twisted.logger import Logger
    from twisted.plugin import getPlugins

    from hoodyproxy.interfaces import IServiceKind

    log = Logger()
    if plugin_package is None:
        try:
            import hoodyproxy.plugins as plugin_package  # type: ignore[no-redef]
        except ImportError:
            plugin_package = None
    kinds: dict[str, ServiceKind] = dict(BUILTIN_KINDS)
    found = getPlugins(IServiceKind, plugin_package) if plugin_package is not None else getPlugins(IServiceKind)
    for provider in found:
        name = getattr(provider, "name", None)
        if not isinstance(name, str) or not callable(getattr(provider, "classify", None)):
            log.warn("service kind plugin {provider!r} has no name or classify(); ignored", provider=provider)
            continue
        kinds[name] = cast(ServiceKind, provider)
    return MappingProxyType(kinds)

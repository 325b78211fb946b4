"""Permission group types: how a request's credentials are checked against a group.

Five ship built in (``ip``, ``token``, ``password``, ``jwt``, ``ldap``), each an
:class:`~hoodyproxy.interfaces.IGroupType` provider.  A third party adds one by dropping
a module into a ``hoodyproxy/plugins/`` directory on ``sys.path`` (no ``__init__.py``
there) whose module-level object provides both :class:`twisted.plugin.IPlugin` and
``IGroupType``; :func:`group_types` finds it.  Callers check through :func:`safe_check`,
which turns a plugin that raises, hangs or answers nonsense into "no match".
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping
from urllib.parse import SplitResult, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hoodyproxy.interfaces import IGroupType

try:
    from hoodyproxy.access.model import InvalidPermissions
except ModuleNotFoundError as missing:
    # Only while access/model.py does not exist yet.  Narrower than ImportError on
    # purpose: a circular import of a model.py that does exist must fail loudly, not
    # give this package a second InvalidPermissions class the API would not catch.
    if missing.name != "hoodyproxy.access.model":
        raise

    class InvalidPermissions(ValueError):  # type: ignore[no-redef]
        """A permission set or group is invalid; ``field`` names where, ``problem`` what."""

        def __init__(self, field: str, problem: str):
            super().__init__(f"{field}: {problem}")
            self.field = field
            self.problem = problem

__all__ = ["InvalidPermissions", "group_types", "safe_check"]

log = Logger()

REDACTED = "***"
_PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_CHALLENGES = (None, "basic", "bearer")


# -- validation helpers for parse() -----------------------------------------------------

def check_fields(spec: Any, field: str, name: str, required: Iterable[str] = (),
                 optional: Iterable[str] = ()) -> Mapping[str, Any]:
    """``spec`` as a mapping of type ``name`` with no unknown and no missing keys."""
    if not isinstance(spec, Mapping):
        raise InvalidPermissions(field, "must be an object")
    if spec.get("type") != name:
        raise InvalidPermissions(f"{field}.type", f"must be {name!r}")
    required = tuple(required)
    known = {"type", *required, *optional}
    for key in sorted(spec, key=str):
        if key not in known:
            raise InvalidPermissions(f"{field}.{key}", "unknown key")
    for key in required:
        if key not in spec:
            raise InvalidPermissions(f"{field}.{key}", "is required")
    return spec


def check_string(value: Any, field: str, *, max_length: int = 1024) -> str:
    """A non-empty string of at most ``max_length`` characters, without NUL."""
    if not isinstance(value, str):
        raise InvalidPermissions(field, "must be a string")
    if not value:
        raise InvalidPermissions(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidPermissions(field, f"must be at most {max_length} characters")
    if "\x00" in value:
        raise InvalidPermissions(field, "must not contain NUL")
    return value


def check_number(value: Any, field: str, *, minimum: float, maximum: float,
                 exclusive_minimum: bool = False) -> int | float:
    """An int or float (never a bool) within bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidPermissions(field, "must be a number")
    if value < minimum or (exclusive_minimum and value == minimum) or value > maximum:
        low = f"more than {minimum}" if exclusive_minimum else f"at least {minimum}"
        raise InvalidPermissions(field, f"must be {low} and at most {maximum}")
    return value


def check_url(value: Any, field: str, *, max_length: int = 2048) -> SplitResult:
    """A URL with a host and, if any, a valid port, split; its scheme is the caller's to check."""
    url = check_string(value, field, max_length=max_length)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise InvalidPermissions(field, "is not a URL") from None
    if not parts.hostname:
        raise InvalidPermissions(field, "must name a host")
    return parts


def one_of(spec: Mapping[str, Any], field: str, keys: tuple[str, ...]) -> str:
    """The one key of ``keys`` present in ``spec``; an error if none or several are."""
    present = [key for key in keys if key in spec]
    if not present:
        raise InvalidPermissions(field, "needs one of " + ", ".join(keys))
    if len(present) > 1:
        raise InvalidPermissions(f"{field}.{present[1]}",
                                 f"give only one of {', '.join(keys)}")
    return present[0]


def default_reactor(given: Any) -> Any:
    """``given``, or the global reactor (imported late: importing us installs no reactor)."""
    if given is not None:
        return given
    from twisted.internet import reactor
    return reactor


# -- the registry ------------------------------------------------------------------------

_builtins: dict[str, Any] | None = None
_registry: dict[str, Any] | None = None


def _builtin_types() -> dict[str, Any]:
    global _builtins
    if _builtins is None:
        # Imported here, not at the top: the modules import the helpers above.
        from hoodyproxy.access.groups.ip import IPGroup
        from hoodyproxy.access.groups.jwt import JWTGroup
        from hoodyproxy.access.groups.ldap import LDAPGroup
        from hoodyproxy.access.groups.password import PasswordGroup
        from hoodyproxy.access.groups.token import TokenGroup
        _builtins = {t.name: t for t in (IPGroup(), TokenGroup(), PasswordGroup(),
                                         JWTGroup(), LDAPGroup())}
    return _builtins


def _plugin_types() -> Iterable[Any]:
    from twisted.plugin import getPlugins

    import hoodyproxy.plugins
    return getPlugins(IGroupType, hoodyproxy.plugins)


def group_types(refresh: bool = False) -> dict[str, Any]:
    """Every group type by name: the five built-ins plus third-party plugins.

    Plugins are looked up once per process (``refresh=True`` looks again).  A plugin whose
    name is taken (by a built-in or an earlier plugin) or malformed is ignored, with a
    log line.  The built-in instances, and their caches, live as long as the process.
    """
    global _registry
    if _registry is None or refresh:
        found = dict(_builtin_types())
        for provider in _plugin_types():
            name = getattr(provider, "name", None)
            if not isinstance(name, str) or not _PLUGIN_NAME.match(name):
                log.warn("group type plugin {provider!r} ignored: bad name {name!r}",
                         provider=provider, name=name)
            elif name in found:
                log.warn("group type plugin {provider!r} ignored: the name {name!r} is taken",
                         provider=provider, name=name)
            elif getattr(provider, "challenge", None) not in _CHALLENGES:
                log.warn("group type plugin {provider!r} ignored: challenge must be "
                         "'basic', 'bearer' or None", provider=provider)
            else:
                found[name] = provider
        _registry = found
    return dict(_registry)


# -- checking ----------------------------------------------------------------------------

def safe_check(group_type: Any, stored: Mapping[str, Any], credentials: Any, *,
               timeout: float = 30.0, reactor: IReactorTime | None = None) -> defer.Deferred[bool]:
    """``group_type.check`` as a Deferred that always fires with a bool, never an error.

    A check that raises (at once or later) is logged and counts as no match, and so does
    one that answers anything but ``True``/``False`` or takes longer than ``timeout``
    seconds.  Only ``True`` lets a request through.
    """
    name = getattr(group_type, "name", repr(group_type))
    d = defer.maybeDeferred(group_type.check, stored, credentials)
    if not d.called:
        d.addTimeout(timeout, default_reactor(reactor))

    def answered(result: object) -> bool:
        if isinstance(result, bool):
            return result
        log.error("group type {name!r} check answered a {kind}, not a bool; "
                  "counted as no match", name=name, kind=type(result).__name__)
        return False

    def failed(failure: Failure) -> bool:
        if failure.check(defer.CancelledError):
            log.info("group type {name!r} check cancelled", name=name)
        else:
            log.failure("group type {name!r} check failed; counted as no match",
                        failure, name=name)
        return False

    return d.addCallbacks(answered, failed)

"""Permission sets: the model, its validation from the admin API, and its JSON forms (pure).

A permission set is stored for a project or for one container::

    {"project": P, "container": C,            (container only at container level)
     "groups": {NAME: GROUP, ...},             GROUP = {"type": "ip" | "token" | ..., ...}
     "permissions": {NAME: {CAPABILITY: true | false | LEVEL, ...}, ...},
     "default": "allow" | "deny"}

Group specs are validated (and their secrets hashed) by the group type named in
``type``, looked up in a registry (``{type name: IGroupType provider}``) that every
function here takes as an argument.  Every error names the field at fault as a dotted
path (``groups.office.range``, ``permissions.office.files``, ``default``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Union

from twisted.logger import Logger

from hoodyproxy.access.capabilities import LEVELS

log = Logger()

ID = re.compile(r"[0-9a-f]{24}\Z")
GROUP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
CAPABILITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
SCOPES = ("project", "container")
DEFAULTS = ("allow", "deny")
#: Bounds on one set, so a set stays cheap to hold in memory and to decide on.
MAX_GROUPS = 256
MAX_CAPABILITIES = 64

Grant = Union[bool, str]


class InvalidPermissions(ValueError):
    """A permission set (or a group spec) that cannot be stored; ``field`` names the bad field."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def _frozen_json(value: Any) -> Any:
    """A deep, read-only copy of a JSON value (objects become mapping proxies, arrays tuples)."""
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen_json(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen_json(v) for v in value)
    return value


def _thawed_json(value: Any) -> Any:
    """A plain, mutable, JSON-serialisable copy of a value made by :func:`_frozen_json`."""
    if isinstance(value, Mapping):
        return {k: _thawed_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thawed_json(v) for v in value]
    return value


@dataclass(frozen=True)
class PermissionSet:
    """One stored permission set.

    ``groups`` maps a group name to its stored form (always with ``"type"``), a plain
    JSON dict as the group type's ``parse`` returned it, to be read, never mutated;
    ``permissions`` maps a group name to ``{capability: True | False | level}``.
    """

    scope: str
    project: str
    container: str | None
    groups: Mapping[str, Mapping[str, Any]]
    permissions: Mapping[str, Mapping[str, Grant]]
    default: str = "deny"

    def __post_init__(self) -> None:
        # Stored groups stay plain JSON dicts (copies): they go to group types' check() and
        # redact(), which expect what parse() returned.  Nothing may mutate them.
        groups = {name: _thawed_json(stored) for name, stored in self.groups.items()}
        object.__setattr__(self, "groups", MappingProxyType(groups))
        object.__setattr__(self, "permissions", _frozen_json(_thawed_json(self.permissions)))

    __hash__ = None  # type: ignore[assignment]

    @property
    def id(self) -> str:
        """The id the set is stored under: the container's at container level, else the project's."""
        return self.container if self.scope == "container" and self.container else self.project


def challenge_kinds(pset: PermissionSet, registry: Mapping[str, Any]) -> frozenset[str]:
    """The ``challenge`` of every credential-based group in ``pset`` (e.g. {"basic", "bearer"})."""
    kinds = set()
    for stored in pset.groups.values():
        provider = registry.get(str(stored.get("type")))
        challenge = getattr(provider, "challenge", None)
        if isinstance(challenge, str):
            kinds.add(challenge)
    return frozenset(kinds)


# -- validation ---------------------------------------------------------------------------


def _check_id(field: str, value: Any) -> str:
    if not isinstance(value, str) or not ID.match(value):
        raise InvalidPermissions(field, "must be 24 lowercase hexadecimal digits")
    return value


def _group(name: Any, spec: Any, registry: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one group spec through its type; return its stored form (with ``type``)."""
    field = f"groups.{name}"
    if not isinstance(spec, dict):
        raise InvalidPermissions(field, "must be an object with a 'type'")
    kind = spec.get("type")
    if kind is None:
        raise InvalidPermissions(f"{field}.type", "is required")
    if not isinstance(kind, str) or kind not in registry:
        known = ", ".join(sorted(registry)) or "none configured"
        raise InvalidPermissions(f"{field}.type", f"unknown group type (known: {known})")
    stored = registry[kind].parse(spec, field)
    if not isinstance(stored, Mapping):
        raise TypeError(f"group type {kind!r} parse() returned {type(stored).__name__}, not a dict")
    stored = dict(stored)
    stored["type"] = kind
    json.dumps(stored)  # a group type must store JSON; fail here, not at commit
    return stored


def _group_name(section: str, name: Any) -> str:
    if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise InvalidPermissions(section, f"{shown} is not a group name (1 to 63 of a-z, 0-9, '_' "
                                          f"and '-', starting with a letter or digit)")
    return name


def _grants(name: str, grants: Any, levels: Mapping[str, tuple[str, ...]]) -> dict[str, Grant]:
    field = f"permissions.{name}"
    if not isinstance(grants, dict):
        raise InvalidPermissions(field, "must be an object of capability to true, false or a level")
    if len(grants) > MAX_CAPABILITIES:
        raise InvalidPermissions(field, f"at most {MAX_CAPABILITIES} capabilities")
    for capability, grant in grants.items():
        if not isinstance(capability, str) or not CAPABILITY_NAME.fullmatch(capability):
            raise InvalidPermissions(field, f"{repr(capability)[:80]} is not a capability name "
                                            f"(a-z, then up to 31 of a-z, 0-9 and '_')")
        order = levels.get(capability)
        if isinstance(grant, bool):
            continue
        if order is None:
            raise InvalidPermissions(f"{field}.{capability}", "must be true or false")
        if grant not in order:
            choices = ", ".join(repr(level) for level in order)
            raise InvalidPermissions(f"{field}.{capability}", f"must be true, false or one of {choices}")
    return dict(grants)


def _validate_whole(groups: Mapping[str, Any], permissions: Mapping[str, Any],
                    levels: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, Grant]]:
    if len(groups) > MAX_GROUPS:
        raise InvalidPermissions("groups", f"at most {MAX_GROUPS} groups")
    checked = {}
    for name in sorted(permissions):
        if name not in groups:
            raise InvalidPermissions(f"permissions.{name}", "no such group (define it under 'groups')")
        checked[name] = _grants(name, permissions[name], levels)
    return checked


def _object(field: str, body: Mapping[str, Any], default: Any) -> Any:
    value = body.get(field, default)
    if not isinstance(value, dict):
        raise InvalidPermissions(field, "must be an object")
    return value


def _merged(section: str, body: Mapping[str, Any], stored: Mapping[str, Any] | None, patch: bool,
            convert: Callable[[str, Any], Any]) -> dict[str, Any]:
    """``body[section]`` by name, each value through ``convert``; with ``patch``, merged into
    ``stored`` (None: nothing stored yet), where ``null`` deletes a name and names not given
    are kept as stored."""
    given = _object(section, body, {})
    if len(given) > MAX_GROUPS:
        raise InvalidPermissions(section, f"at most {MAX_GROUPS} groups")
    merged: dict[str, Any] = _thawed_json(stored) if stored is not None else {}
    for name in sorted(given, key=str):
        _group_name(section, name)
        if patch and given[name] is None:
            merged.pop(name, None)
        else:
            merged[name] = convert(name, given[name])
    return merged


def parse_permission_set(body: Any, scope: str, url_id: str, registry: Mapping[str, Any],
                         previous: PermissionSet | None = None, patch: bool = False, *,
                         container_project: str | None = None,
                         levels: Mapping[str, tuple[str, ...]] = LEVELS) -> PermissionSet:
    """Validate an admin API body into a :class:`PermissionSet`, or raise InvalidPermissions.

    ``url_id`` is the project id (``scope == "project"``) or the container id from the
    URL.  ``registry`` maps group type names to IGroupType providers.  With ``patch``,
    ``body`` is merged into ``previous``: ``groups`` and ``permissions`` by name (a
    ``null`` value deletes that name; stored groups not named are kept exactly as stored,
    never parsed or hashed again), ``project`` and ``default`` replaced if given; the
    result is validated as a whole.  A patch with no ``previous`` merges into an empty
    set: the platform sends a whole set as a PATCH whether or not one is stored, so the
    body then reads like a PUT's (with ``null`` names ignored).  ``container_project``,
    when the container is in the live map, is the project the set's ``project`` must
    name.  ``levels`` gives the ordered levels of every leveled capability.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    base = previous if patch else None
    _check_id("id", url_id)
    if not isinstance(body, dict):
        raise InvalidPermissions("body", "must be a JSON object")
    unknown = set(body) - {"project", "container", "groups", "permissions", "default"}
    if unknown:
        raise InvalidPermissions(str(sorted(map(str, unknown))[0])[:80], "unknown field")

    # project and container
    if scope == "project":
        if "container" in body:
            raise InvalidPermissions("container", "only a container-level set names a container")
        if "project" in body and body["project"] != url_id:
            raise InvalidPermissions("project", "does not match the URL")
        project, container = url_id, None
    else:
        if "container" in body and body["container"] != url_id:
            raise InvalidPermissions("container", "does not match the URL")
        if "project" in body or base is None:
            if "project" not in body:
                raise InvalidPermissions("project", "is required at container level "
                                                    "(24 lowercase hexadecimal digits)")
            project = _check_id("project", body["project"])
        else:
            project = base.project
        container = url_id
        if container_project is not None and project != container_project:
            raise InvalidPermissions("project", "is not the container's project")

    groups = _merged("groups", body, base.groups if base is not None else None, patch,
                     lambda name, spec: _group(name, spec, registry))
    permissions = _merged("permissions", body, base.permissions if base is not None else None, patch,
                          lambda name, grants: grants)
    permissions = _validate_whole(groups, permissions, levels)

    # default
    default = base.default if base is not None else "deny"
    if "default" in body:
        default = body["default"]
        if default not in DEFAULTS:
            raise InvalidPermissions("default", "must be 'allow' or 'deny'")

    return PermissionSet(scope, project, container, groups, permissions, default)


# -- advice ------------------------------------------------------------------------------


class Advice(NamedTuple):
    """Something stored as asked but probably not as meant (a guessable token...).

    ``field`` is the dotted path, as in :class:`InvalidPermissions`; ``message`` says what
    and how to do better, and never repeats a secret.
    """

    field: str
    message: str


def advise(body: Any, registry: Mapping[str, Any]) -> list[Advice]:
    """Advice on the groups ``body`` gives (a body :func:`parse_permission_set` accepted).

    Each group type may have an ``advise(spec, field)`` answering ``(field, message)``
    pairs; only groups the body names with a value are looked at (stored groups a PATCH
    keeps were advised on when they were written).  Advice never refuses a set: a type
    whose ``advise`` raises or answers nonsense is logged and gives none.
    """
    groups = body.get("groups") if isinstance(body, dict) else None
    if not isinstance(groups, dict):
        return []
    found: list[Advice] = []
    for name in sorted(groups, key=str):
        spec = groups[name]
        provider = registry.get(spec.get("type")) if isinstance(spec, dict) else None
        method = getattr(provider, "advise", None)
        if not callable(method):
            continue
        try:
            pairs = list(method(spec, f"groups.{name}"))
            found.extend(Advice(field, message) for field, message in pairs
                         if isinstance(field, str) and isinstance(message, str))
        except Exception:
            log.failure("group type {type!r} advise() failed; no advice", type=spec.get("type"))
    return found


# -- JSON forms ---------------------------------------------------------------------------


def to_json(pset: PermissionSet, registry: Mapping[str, Any], redact: bool = True) -> dict[str, Any]:
    """The set as the admin API shows it; with ``redact``, each group through its type's ``redact``.

    A group whose type is no longer in the registry shows only its ``type``.
    """
    groups = {}
    for name, stored in pset.groups.items():
        plain = _thawed_json(stored)
        if redact:
            provider = registry.get(plain.get("type"))
            shown = dict(provider.redact(plain)) if provider is not None else {}
            shown["type"] = plain.get("type")
            plain = shown
        groups[name] = plain
    body: dict[str, Any] = {"project": pset.project}
    if pset.scope == "container":
        body["container"] = pset.container
    body.update(groups=groups, permissions=_thawed_json(pset.permissions), default=pset.default)
    return body


def to_stored_json(pset: PermissionSet) -> str:
    """The set as the database stores it (its scope and id are columns of their own)."""
    body = to_json(pset, {}, redact=False)
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def from_stored_json(scope: str, set_id: str, text: str) -> PermissionSet:
    """The set stored as ``text`` by :func:`to_stored_json`.

    Stored groups are trusted as they are (they were validated when written; parsing them
    again would re-hash secrets).  Raise ValueError if ``text`` is not a stored set.
    """
    body = json.loads(text)
    if not isinstance(body, dict) or scope not in SCOPES:
        raise ValueError("not a stored permission set")
    groups, permissions = body.get("groups"), body.get("permissions")
    default = body.get("default")
    if not isinstance(groups, dict) or not isinstance(permissions, dict) or default not in DEFAULTS:
        raise ValueError("not a stored permission set")
    if not all(isinstance(g, dict) and isinstance(g.get("type"), str) for g in groups.values()):
        raise ValueError("a stored group has no type")
    if not all(isinstance(p, dict) for p in permissions.values()):
        raise ValueError("stored permissions are not objects")
    container = set_id if scope == "container" else None
    project = body.get("project") if scope == "container" else set_id
    if not isinstance(project, str):
        raise ValueError("a stored container-level set has no project")
    return PermissionSet(scope, project, container, groups, permissions, default)

"""Reading the config again (``SIGHUP``, ``POST /api/v1/reload``): which keys change live.

A reload reads the ``--config`` file again, with the command-line options on top as at
start (:class:`ConfigSource`), and validates it whole: a file that does not validate
changes nothing.  :func:`plan_reload` then compares the new settings with those in force,
key by key (``[section] name``, and ``[programs.NAME] field``; a program added or
removed is ``[programs.NAME]``), and splits the keys that differ in two:

- those that take effect live: every key but the ones below;
- those that need a restart (:data:`RESTART_KEYS`) and stay as they were: the listen
  addresses, the node's name, zone, data directory and worker count, whether HTTP/3
  listens, whether rate limits are shared among workers (and how often), the demo, the
  netfilter mark and table, the Docker provider's settings, the store; and a client IP mode (the node's or a program's) that
  would need transparent-mode rules the node did not install at start.

Pure: no reactor, no I/O but reading the file.  What takes each live key is
:meth:`hoodyproxy.service.NodeService.reload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from hoodyproxy.config import Settings, load_settings, settings_from_mapping, settings_to_mapping

#: Keys a running node cannot take: a reload reports them and leaves them as they were.
RESTART_KEYS = frozenset({
    "[node] name", "[node] zone", "[node] data_dir", "[node] workers",
    "[listen] https", "[listen] http", "[listen] admin",
    "[http3] enabled",
    "[ratelimit] shared", "[ratelimit] shared_sync_ms",
    "[demo] enabled",
    "[client_ip] mark", "[client_ip] table",
    # The Docker provider is started (or not) with the node, on its socket and labels.
    "[docker] enabled", "[docker] socket", "[docker] network", "[docker] label_prefix",
    # The store (SQLite or etcd, its endpoints and credentials) is opened with the node.
    "[store] backend", "[store] etcd",
    # The request metrics' label set is fixed for the process (counters never go back).
    "[metrics] container_labels",
})


class NoConfigFile(Exception):
    """The node was started without ``--config``: there is no file to read again."""

    def __init__(self) -> None:
        super().__init__("the node was started without --config: there is no config file to read again")


@dataclass(frozen=True)
class ConfigSource:
    """Where a node's settings come from: the ``--config`` file and the command-line
    options that override it (``"section.key": value``, None for an option not given)."""

    path: str
    overrides: Mapping[str, Any] | None = None

    def load(self) -> Settings:
        """The settings as a start would read them now (raises ConfigError)."""
        return load_settings(self.path, self.overrides)


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: ``settings`` to put in force (as configured: the client IP mode
    ``auto`` not yet resolved), the keys that change (``changed``), and the keys that
    differ but need a restart (``not_applied``, left as they were).  Keys are sorted."""

    settings: Settings
    changed: tuple[str, ...]
    not_applied: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {"changed": list(self.changed), "not_applied": list(self.not_applied)}


def _flatten(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``{"[section] name": value}`` of a settings mapping; a program's fields as
    ``[programs.NAME] field``, and the program itself as ``[programs.NAME]``."""
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section == "programs":
            for name, fields in table.items():
                flat[f"[programs.{name}]"] = True
                for field, value in fields.items():
                    flat[f"[programs.{name}] {field}"] = value
        else:
            for name, value in table.items():
                flat[f"[{section}] {name}"] = value
    return flat


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """The keys whose values differ, sorted; a program added or removed is named once,
    as ``[programs.NAME]``."""
    a, b = _flatten(settings_to_mapping(old)), _flatten(settings_to_mapping(new))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    whole = {k for k in keys if k.startswith("[programs.") and k.endswith("]")}
    return [k for k in keys if k in whole or k.split(" ", 1)[0] not in whole]


def _needs_rules(key: str, new_doc: Mapping[str, Any], can_be_transparent: bool) -> bool:
    """Whether ``key``'s new value is a client IP mode that needs transparent-mode rules."""
    if key == "[client_ip] mode":
        mode = new_doc["client_ip"]["mode"]
    elif key.startswith("[programs.") and key.endswith("] client_ip"):
        name = key[len("[programs."):-len("] client_ip")]
        mode = new_doc["programs"].get(name, {}).get("client_ip")
    else:
        return False
    return mode == "transparent" or (mode == "auto" and can_be_transparent)


def _revert(new_doc: dict[str, Any], old_doc: Mapping[str, Any], key: str) -> None:
    """Put ``key`` of ``new_doc`` back as ``old_doc`` has it (absent if it is absent)."""
    head, _, field = key.partition(" ")
    section = head[1:-1]
    if section.startswith("programs."):
        program = section.split(".", 1)[1]
        table = new_doc["programs"].setdefault(program, {})
        old = old_doc["programs"].get(program, {})
    else:
        table = new_doc.setdefault(section, {})
        old = old_doc.get(section, {})
    if field in old:
        table[field] = old[field]
    else:
        table.pop(field, None)


def plan_reload(current: Settings, new: Settings, *, transparent_rules: bool,
                can_be_transparent: bool) -> ReloadPlan:
    """What a reload from ``current`` (as configured) to ``new`` puts in force.

    ``transparent_rules``: the node runs with its transparent-mode netfilter rules
    installed; ``can_be_transparent``: it has CAP_NET_ADMIN (so ``auto`` would mean
    transparent at a start).  A client IP mode that needs the rules while none are
    installed needs a restart.  Raises ConfigError only if the settings it builds do not
    validate (they are ``new`` with some keys put back as ``current`` has them).
    """
    keys = changed_keys(current, new)
    new_doc = settings_to_mapping(new)
    restart = [k for k in keys if k in RESTART_KEYS]
    if not transparent_rules:
        # (a program added whole is checked by its client_ip field)
        fields = [k + " client_ip" if k.startswith("[programs.") and k.endswith("]") else k for k in keys]
        restart += [k for k in fields if _needs_rules(k, new_doc, can_be_transparent)]
    if not restart:
        return ReloadPlan(new, tuple(keys), ())
    old_doc = settings_to_mapping(current)
    for key in restart:
        _revert(new_doc, old_doc, key)
    settings = settings_from_mapping(new_doc)
    return ReloadPlan(settings, tuple(k for k in keys if k not in restart), tuple(sorted(restart)))

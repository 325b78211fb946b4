"""The key layout of the shared store, and the values' JSON (pure: no I/O).

Under the prefix (``/hoody/v1`` by default)::

    permissions/project/<project>             a project's permission set (stored JSON)
    permissions/container/<container>         a container's permission set
    nodes/<node>/aliases/<alias>              an alias of that node and its custom domains:
                                              {"container_id", "program", "index", "created",
                                               "domains": [...]}
    domains/<domain>                          the claim on a custom domain, so that no two
                                              aliases (of any node) hold it: {"node", "alias"}
    nodes/<node>/containers/<container>       a node's published live map (leased):
                                              Container.to_json()

Permission sets are shared by every node; aliases are per node (they route to that node's
containers under ``<alias>.<node>.<zone>``); the claims are global.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hoodyproxy.aliases import Alias

PERMISSIONS, ALIASES, DOMAINS, CONTAINERS = "permissions", "aliases", "domains", "containers"


@dataclass(frozen=True)
class Parsed:
    """What a key names: ``kind`` (one of the constants above), the node (for per-node
    kinds), and the name within (``scope/id`` for permissions)."""

    kind: str
    node: str | None
    name: str


class Keys:
    """Key names for one prefix, as seen from one node."""

    def __init__(self, prefix: str, node: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.root = self.prefix + "/"
        self.node = node

    def permission(self, scope: str, set_id: str) -> str:
        return f"{self.root}{PERMISSIONS}/{scope}/{set_id}"

    def alias(self, alias: str, node: str | None = None) -> str:
        return f"{self.root}nodes/{node or self.node}/{ALIASES}/{alias}"

    def domain(self, domain: str) -> str:
        return f"{self.root}{DOMAINS}/{domain}"

    def container(self, container_id: str, node: str | None = None) -> str:
        return f"{self.root}nodes/{node or self.node}/{CONTAINERS}/{container_id}"

    def containers(self, node: str | None = None) -> str:
        """The prefix of a node's published containers."""
        return f"{self.root}nodes/{node or self.node}/{CONTAINERS}/"

    def parse(self, key: str) -> Parsed | None:
        """What ``key`` names, or None for a key this version does not know."""
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root):].split("/")
        if len(parts) == 3 and parts[0] == PERMISSIONS and parts[1] in ("project", "container") and parts[2]:
            return Parsed(PERMISSIONS, None, f"{parts[1]}/{parts[2]}")
        if len(parts) == 2 and parts[0] == DOMAINS and parts[1]:
            return Parsed(DOMAINS, None, parts[1])
        if len(parts) == 4 and parts[0] == "nodes" and parts[2] in (ALIASES, CONTAINERS) and parts[1] and parts[3]:
            return Parsed(parts[2], parts[1], parts[3])
        return None


def alias_value(alias: Alias, domains: list[str]) -> bytes:
    return json.dumps({"container_id": alias.container_id, "program": alias.program, "index": alias.index,
                       "created": alias.created, "domains": sorted(set(domains))},
                      sort_keys=True, separators=(",", ":")).encode()


def alias_from_value(name: str, value: bytes) -> tuple[Alias, list[str]]:
    """(the alias, its domains) from an alias key's value; ValueError if it is not one."""
    body: Any = json.loads(value)
    if not isinstance(body, dict):
        raise ValueError("not an alias")
    domains = body.get("domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise ValueError("not an alias")
    index = body.get("index")
    if not isinstance(body.get("container_id"), str) or not isinstance(body.get("program"), str) \
            or isinstance(index, bool) or not isinstance(index, int):
        raise ValueError("not an alias")
    return Alias(name, body["container_id"], body["program"], index, float(body.get("created", 0.0))), domains


def claim_value(node: str, alias: str) -> bytes:
    return json.dumps({"node": node, "alias": alias}, sort_keys=True, separators=(",", ":")).encode()


def claim_from_value(value: bytes) -> tuple[str, str]:
    """(node, alias) of a domain claim; ValueError if it is not one."""
    body = json.loads(value)
    if not isinstance(body, dict) or not isinstance(body.get("node"), str) or not isinstance(body.get("alias"), str):
        raise ValueError("not a domain claim")
    return body["node"], body["alias"]

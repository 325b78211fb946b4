"""What the gateway knows about a container: its project, address, state, port overrides and source."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

CONTAINER_ID = re.compile(r"[0-9a-f]{24}\Z")
PORT_KEY = re.compile(r"[a-z][a-z0-9]{0,11}(-(0|[1-9][0-9]{0,4}))?\Z")
STATES = ("running", "stopped")
#: Who wrote a container into the live map: the admin API (by hand, or the platform through
#: it) or the Docker provider (:mod:`hoodyproxy.directory.docker`).  Neither overwrites the other's.
SOURCES = ("admin", "docker")


class InvalidContainer(ValueError):
    """A container description that cannot be stored; ``field`` names the bad field."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"{field_name}: {problem}")


@dataclass(frozen=True)
class Container:
    """One container of the live map."""

    id: str
    project: str
    address: str
    state: str = "running"
    ports: Mapping[str, int] = field(default_factory=dict)
    #: One of :data:`SOURCES`: who owns this entry.
    source: str = "admin"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Container):
            return NotImplemented
        return (self.id, self.project, self.address, self.state, dict(self.ports), self.source) == (
            other.id, other.project, other.address, other.state, dict(other.ports), other.source)

    __hash__ = None  # type: ignore[assignment]

    @property
    def running(self) -> bool:
        return self.state == "running"

    def port_override(self, program: str, index: int) -> int | None:
        """The operator's port for ``program-index`` or ``program``, if one is set."""
        ports = self.ports
        if not ports:
            return None
        return ports.get(f"{program}-{index}") or ports.get(program)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "project": self.project, "address": self.address,
                "state": self.state, "ports": dict(self.ports), "source": self.source}


def container_from_json(container_id: str, body: Any) -> Container:
    """Validate an admin API body into a Container, or raise InvalidContainer naming the field."""
    if not CONTAINER_ID.match(container_id or ""):
        raise InvalidContainer("id", "must be 24 lowercase hexadecimal digits")
    if not isinstance(body, dict):
        raise InvalidContainer("body", "must be a JSON object")
    unknown = set(body) - {"project", "address", "state", "ports", "id", "source"}
    if unknown:
        raise InvalidContainer(sorted(unknown)[0], "unknown field")
    if "id" in body and body["id"] != container_id:
        raise InvalidContainer("id", "does not match the URL")
    # ``source`` may be sent back as a read showed it; a write through the API is the
    # admin's whatever it says (the node sets it, never the body).
    if "source" in body and body["source"] not in SOURCES:
        raise InvalidContainer("source", f"must be one of {', '.join(SOURCES)} (and is set by the node)")
    project = body.get("project")
    if not isinstance(project, str) or not CONTAINER_ID.match(project):
        raise InvalidContainer("project", "must be 24 lowercase hexadecimal digits")
    address = body.get("address")
    if not isinstance(address, str):
        raise InvalidContainer("address", "must be an IPv4 or IPv6 address")
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise InvalidContainer("address", "must be an IPv4 or IPv6 address") from None
    state = body.get("state", "running")
    if state not in STATES:
        raise InvalidContainer("state", "must be 'running' or 'stopped'")
    ports = body.get("ports", {})
    if ports is None:
        ports = {}
    check_ports(ports)
    return Container(container_id, project, address, state, ports)


def check_ports(ports: Any, field_name: str = "ports") -> None:
    """Raise InvalidContainer unless ``ports`` is a dict of ``program`` or ``program-index``
    to a port number (the port overrides of the admin API and of the ``hoody.ports`` label)."""
    if not isinstance(ports, dict):
        raise InvalidContainer(field_name, "must be an object of program (or program-index) to port")
    for key, value in ports.items():
        if not isinstance(key, str) or not PORT_KEY.match(key):
            raise InvalidContainer(field_name, "keys are 'program' or 'program-index'")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise InvalidContainer(f"{field_name}.{key}", "must be a port from 1 to 65535")

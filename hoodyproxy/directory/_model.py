"""What the gateway knows about a container: its project, address, state and port overrides."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

CONTAINER_ID = re.compile(r"[0-9a-f]{24}\Z")
PORT_KEY = re.compile(r"[a-z][a-z0-9]{0,11}(-(0|[1-9][0-9]{0,4}))?\Z")
STATES = ("running", "stopped")


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Container):
            return NotImplemented
        return (self.id, self.project, self.address, self.state, dict(self.ports)) == (
            other.id, other.project, other.address, other.state, dict(other.ports))

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
                "state": self.state, "ports": dict(self.ports)}


def container_from_json(container_id: str, body: Any) -> Container:
    """Validate an admin API body into a Container, or raise InvalidContainer naming the field."""
    if not CONTAINER_ID.match(container_id or ""):
        raise InvalidContainer("id", "must be 24 lowercase hexadecimal digits")
    if not isinstance(body, dict):
        raise InvalidContainer("body", "must be a JSON object")
    unknown = set(body) - {"project", "address", "state", "ports", "id"}
    if unknown:
        raise InvalidContainer(sorted(unknown)[0], "unknown field")
    if "id" in body and body["id"] != container_id:
        raise InvalidContainer("id", "does not match the URL")
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
    if not isinstance(ports, dict):
        raise InvalidContainer("ports", "must be an object of program (or program-index) to port")
    for key, value in ports.items():
        if not isinstance(key, str) or not PORT_KEY.match(key):
            raise InvalidContainer("ports", "keys are 'program' or 'program-index'")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise InvalidContainer(f"ports.{key}", "must be a port from 1 to 65535")
    return Container(container_id, project, address, state, ports)

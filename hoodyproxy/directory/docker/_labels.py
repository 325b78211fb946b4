"""What a Docker container's inspect document asks of the live map (pure: no reactor, no I/O).

A container takes part when it carries ``<prefix>project``; its labels (prefix ``hoody.``
by default) say the rest::

    hoody.project    24 lowercase hex digits: the project (required)
    hoody.container  24 lowercase hex digits: the container id in routes (default: the
                     first 24 hex digits of the Docker id)
    hoody.ports      port overrides, "terminal=7681,http-1=3000" (as the admin API's "ports")
    hoody.network    the Docker network whose address the gateway uses

State: Docker's ``running`` is running, every other status (created, paused, restarting,
exited, dead...) stopped; a container whose health check says ``unhealthy`` is stopped
until it is healthy again.  The address is the chosen network's (see
:func:`choose_address`); a stopped container has none in Docker, so it keeps the last
one seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from hoodyproxy.directory._model import CONTAINER_ID, Container, InvalidContainer, check_ports

DOCKER_ID = re.compile(r"[0-9a-f]{24,64}\Z")
_PORT_NUMBER = re.compile(r"[0-9]{1,5}\Z")
#: Where a container on Docker's host network is reached.
HOST_NETWORK_ADDRESS = "127.0.0.1"


class InvalidLabel(ValueError):
    """A label the provider cannot use; ``label`` names it (with its prefix)."""

    def __init__(self, label: str, problem: str) -> None:
        self.label = label
        self.problem = problem
        super().__init__(f"label {label}: {problem}")


@dataclass(frozen=True, slots=True)
class Labels:
    """A container's hoody labels, validated."""

    project: str
    container: str
    ports: Mapping[str, int]
    network: str | None


def parse_ports(text: str, label: str = "hoody.ports") -> dict[str, int]:
    """``"terminal=7681, http-1=3000"`` -> ``{"terminal": 7681, "http-1": 3000}``; raises
    InvalidLabel naming ``label``.  Spaces around items are ignored, and so are empty items."""
    ports: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _PORT_NUMBER.match(value):
            raise InvalidLabel(label, "must be program=port pairs separated by commas, "
                                      "like terminal=7681,http-1=3000")
        if key in ports:
            raise InvalidLabel(label, "names a program twice")
        ports[key] = int(value)
    try:
        check_ports(ports, label)
    except InvalidContainer as e:
        raise InvalidLabel(label, e.problem) from None
    return ports


def parse_labels(labels: Mapping[str, str], docker_id: str, prefix: str = "hoody.") -> Labels | None:
    """The hoody labels of a container, or None when it has no ``<prefix>project`` (it is
    not one of ours); raises InvalidLabel for a label that is present but unusable."""
    project_label = prefix + "project"
    if project_label not in labels:
        return None
    project = labels[project_label]
    if not CONTAINER_ID.match(project):
        raise InvalidLabel(project_label, "must be 24 lowercase hexadecimal digits")
    container_label = prefix + "container"
    container = labels.get(container_label)
    if container is None:
        if not DOCKER_ID.match(docker_id):
            raise InvalidLabel(container_label, "is needed: the Docker id is not hexadecimal")
        container = docker_id[:24]
    elif not CONTAINER_ID.match(container):
        raise InvalidLabel(container_label, "must be 24 lowercase hexadecimal digits")
    ports_label = prefix + "ports"
    ports = parse_ports(labels[ports_label], ports_label) if ports_label in labels else {}
    network = labels.get(prefix + "network") or None
    return Labels(project, container, ports, network)


def choose_address(networks: Mapping[str, Any], network_mode: str, wanted: str | None,
                   is_local: Callable[[str], bool], label: str = "hoody.network") -> tuple[str | None, str | None]:
    """The address the gateway reaches a running container at: ``(address, None)``, or
    ``(None, why not)``.

    ``networks`` is the inspect document's ``NetworkSettings.Networks``.  ``wanted`` (the
    label, else the node's ``[docker] network``) names the network to use.  Without one,
    it is the network the gateway can reach: among the container's networks with an
    address, the one whose gateway address is an address of this host (``is_local``), as
    on a bridge network; a macvlan, ipvlan or overlay network's gateway is elsewhere.  A
    container on Docker's host network is reached on 127.0.0.1.  ``label`` is the network
    label's name, for the advice in the answer.
    """
    if network_mode == "host" and wanted in (None, "host"):
        return HOST_NETWORK_ADDRESS, None
    addressed = {name: _address_of(settings) for name, settings in sorted(networks.items())
                 if isinstance(settings, dict) and _address_of(settings)[0]}
    if wanted is not None:
        if wanted in addressed:
            return addressed[wanted][0], None
        if wanted in networks:
            return None, f"it has no address on network {wanted}"
        attached = ", ".join(sorted(networks)) or "none"
        return None, f"it is not on network {wanted} (its networks: {attached})"
    if not addressed:
        return None, f"it has no network address (network mode {network_mode or 'default'})"
    reachable = [name for name, (_, gateway) in addressed.items() if gateway and is_local(gateway)]
    if len(reachable) == 1:
        return addressed[reachable[0]][0], None
    names = ", ".join(addressed)
    if not reachable:
        why = (f"none of its networks ({names}) has its gateway on this host"
               if len(addressed) > 1 else f"its network {names} does not have its gateway on this host")
    else:
        why = f"the gateway can reach several of its networks ({', '.join(reachable)})"
    return None, f"{why}: name the network with the {label} label or [docker] network"


def _address_of(settings: Mapping[str, Any]) -> tuple[str, str]:
    """(address, its network's gateway): IPv4 if the container has one, else global IPv6."""
    if settings.get("IPAddress"):
        return settings["IPAddress"], settings.get("Gateway") or ""
    if settings.get("GlobalIPv6Address"):
        return settings["GlobalIPv6Address"], settings.get("IPv6Gateway") or ""
    return "", ""


@dataclass(frozen=True, slots=True)
class Reading:
    """What one inspected Docker container asks of the live map."""

    docker_id: str
    name: str
    #: The live-map entry it asks for, or None (no usable labels, or no address yet).
    entry: Container | None
    #: Docker's State.StartedAt (RFC 3339, UTC): which of two containers claiming one
    #: entry started last.
    started_at: str
    #: Why a labelled container is not routed (a bad label, no network chosen), else None.
    problem: str | None = None

    @property
    def entry_id(self) -> str | None:
        return self.entry.id if self.entry is not None else None


def read_container(doc: Mapping[str, Any], prefix: str, default_network: str | None,
                   is_local: Callable[[str], bool],
                   previous_address: Callable[[str], str | None] | None = None) -> Reading | None:
    """Translate one ``GET /containers/{id}/json`` document; None when the container is not
    labelled ``<prefix>project``.  ``previous_address(entry_id)``: the address last seen
    for it, asked only for a stopped container (Docker forgets the address at the stop)."""
    docker_id = str(doc.get("Id") or "")
    name = str(doc.get("Name") or docker_id[:12]).lstrip("/")
    labels = (doc.get("Config") or {}).get("Labels") or {}
    state = doc.get("State") or {}
    started_at = str(state.get("StartedAt") or "")
    try:
        parsed = parse_labels(labels, docker_id, prefix)
    except InvalidLabel as e:
        return Reading(docker_id, name, None, started_at, f"{e}; it is not routed")
    if parsed is None:
        return None
    status = state.get("Status")
    running = status == "running" and (state.get("Health") or {}).get("Status") != "unhealthy"
    settings = doc.get("NetworkSettings") or {}
    network_mode = str((doc.get("HostConfig") or {}).get("NetworkMode") or "")
    address, problem = choose_address(settings.get("Networks") or {}, network_mode,
                                      parsed.network or default_network, is_local, prefix + "network")
    if address is None:
        if status == "running":
            return Reading(docker_id, name, None, started_at, f"{problem}; it is not routed")
        address = previous_address(parsed.container) if previous_address is not None else None
        if address is None:
            return Reading(docker_id, name, None, started_at)
    entry = Container(parsed.container, parsed.project, address, "running" if running else "stopped",
                      parsed.ports, source="docker")
    return Reading(docker_id, name, entry, started_at)


def preferred(readings: list[Reading]) -> Reading | None:
    """Of the Docker containers claiming one entry (a replacement started before the old
    one is removed), the one the map shows: a running one first, then the last started."""
    candidates = [r for r in readings if r.entry is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.entry.running, r.started_at, r.docker_id))

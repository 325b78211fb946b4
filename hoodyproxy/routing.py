"""Hostname grammar -> Target: which project, container, program and index a Host names.

Pure code: no reactor, no I/O.  The label grammar is::

    <project: 24 hex>-<container: 24 hex>-<program>-<index>.<node>.<zone>

case-insensitive, a trailing dot allowed, a port in the Host ignored, the label at most
63 characters.  Anything else raises a :class:`hoodyproxy.errors.NotFound` subclass
(or :class:`~hoodyproxy.errors.MissingHost`) saying what was wrong, never echoing input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from hoodyproxy import errors
from hoodyproxy.config import Program

_LABEL = re.compile(r"([0-9a-f]{24})-([0-9a-f]{24})-([a-z][a-z0-9]*)-(0|[1-9][0-9]{0,4})")
_HEXISH = re.compile(r"[0-9a-z]{24}-[0-9a-z]{24}-")
_HEX_IDS = re.compile(r"[0-9a-f]{24}-[0-9a-f]{24}-")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes, as named by its Host."""

    project: str
    container: str
    program: str
    index: int
    host: str

    @property
    def service(self) -> str:
        """``program-index``, the key used for per-container port overrides."""
        return f"{self.program}-{self.index}"


def split_host(raw: bytes | str | None) -> str:
    """Return the lowercase hostname of a Host header value, without port or trailing dot."""
    if raw is None:
        raise errors.MissingHost()
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise errors.UnknownHost(reason="non-ascii host") from None
    if not raw.isascii():
        raise errors.UnknownHost(reason="non-ascii host")
    host = raw.strip().lower()
    if not host:
        raise errors.MissingHost()
    if host.startswith("["):
        # An IPv6 literal is never a route.
        raise errors.UnknownHost(reason="ip literal host")
    name, sep, port = host.rpartition(":")
    if sep:
        if port and not port.isdigit():
            raise errors.UnknownHost(reason="bad port in host")
        host = name
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise errors.MissingHost()
    return host


class Router:
    """Resolves hostnames of one node into Targets.  Immutable once built."""

    def __init__(self, node: str, zone: str, programs: Mapping[str, Program]) -> None:
        self.node = node.lower()
        self.zone = zone.lower()
        self.suffix = "." + self.node + "." + self.zone
        self.zone_suffix = "." + self.zone
        self.programs = dict(programs)

    def resolve_target(self, raw_host: bytes | str | None) -> Target:
        """Parse a Host header into a Target, or raise the documented routing error."""
        host = split_host(raw_host)
        if not host.endswith(self.suffix):
            if host.endswith(self.zone_suffix) and host.count(".") > self.zone.count(".") + 1:
                raise errors.WrongNode(reason="host under another node")
            raise errors.UnknownHost(reason="host outside this node")
        label = host[: -len(self.suffix)]
        if not label or "." in label:
            raise errors.UnknownHost(reason="not a single label under the node")
        return self.parse_label(label, host)

    def parse_label(self, label: str, host: str) -> Target:
        """Parse one route label (already lowercased) into a Target."""
        if len(label) > 63:
            raise errors.BadLabel("the host label is longer than 63 characters", reason="label too long")
        m = _LABEL.fullmatch(label)
        if m is None:
            if _HEXISH.match(label) and not _HEX_IDS.match(label):
                raise errors.BadLabel("project and container ids are 24 hexadecimal digits",
                                      reason="bad hex id")
            raise errors.BadLabel(reason="label does not match the grammar")
        project, container, program_name, index_text = m.groups()
        program = self.programs.get(program_name)
        if program is None:
            raise errors.UnknownProgram(reason="unknown program")
        index = int(index_text)
        if program.index == "port":
            if not 1 <= index <= 65535:
                raise errors.IndexOutOfRange("the port must be 1 to 65535", reason="port out of range")
        elif not 1 <= index <= program.max_instance:
            raise errors.IndexOutOfRange(f"the instance must be 1 to {program.max_instance}",
                                         reason="instance out of range")
        return Target(project, container, program_name, index, host)

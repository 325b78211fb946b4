"""The ``ip`` group: the client's real address (the TCP peer, never a header) is in a range.

``{"type": "ip", "range": "203.0.113.0/24"}`` or ``"ranges": [...]``, IPv4 and IPv6.
Stored as ``{"type": "ip", "ranges": [...]}`` with each range normalised
(``203.0.113.7/24`` becomes ``203.0.113.0/24``).  An IPv4-mapped IPv6 client address
(``::ffff:203.0.113.7``, what a dual-stack socket reports) matches IPv4 ranges.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any, Mapping

from zope.interface import implementer

from hoodyproxy.access.groups import InvalidPermissions, check_fields, check_string
from hoodyproxy.interfaces import IGroupType

MAX_RANGES = 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(value: Any, field: str) -> str:
    text = check_string(value, field, max_length=64)
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise InvalidPermissions(field, "must be an IPv4 or IPv6 address or CIDR range") from None


@lru_cache(maxsize=256)
def _networks(ranges: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(r) for r in ranges)


@lru_cache(maxsize=4096)
def _addresses(client_ip: str) -> tuple[IPAddress, ...]:
    """The client's address in every form a range may be written for."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return ()
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return (address,) if mapped is None else (address, mapped)
    return (address, ipaddress.IPv6Address(f"::ffff:{address}"))


@implementer(IGroupType)
class IPGroup:
    """Matches when the TCP peer's address lies in one of the group's ranges."""

    name = "ip"
    challenge = None

    def parse(self, spec: Any, field: str) -> dict[str, Any]:
        spec = check_fields(spec, field, self.name, optional=("range", "ranges"))
        if "range" in spec and "ranges" in spec:
            raise InvalidPermissions(f"{field}.ranges", "give range or ranges, not both")
        if "range" in spec:
            return {"type": self.name, "ranges": [_network(spec["range"], f"{field}.range")]}
        if "ranges" not in spec:
            raise InvalidPermissions(f"{field}.range", "is required")
        ranges = spec["ranges"]
        if not isinstance(ranges, list) or not ranges:
            raise InvalidPermissions(f"{field}.ranges", "must be a non-empty list")
        if len(ranges) > MAX_RANGES:
            raise InvalidPermissions(f"{field}.ranges", f"at most {MAX_RANGES} ranges")
        return {"type": self.name,
                "ranges": [_network(r, f"{field}.ranges[{i}]") for i, r in enumerate(ranges)]}

    def redact(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        return {"type": self.name, "ranges": list(stored["ranges"])}

    def check(self, stored: Mapping[str, Any], credentials: Any) -> bool:
        addresses = _addresses(credentials.client_ip)
        return any(address in network
                   for network in _networks(tuple(stored["ranges"]))
                   for address in addresses if address.version == network.version)

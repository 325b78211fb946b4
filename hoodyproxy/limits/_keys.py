"""Limiter keys from trusted data: a client's address grouped by network, a username bounded.

The address is the TCP (or QUIC) peer as the operating system reports it, never a header.
An IPv4 address is its own key, the string as given (the OS writes it canonically, so no
parsing is needed on the hot path); an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``,
what a dual-stack socket reports for an IPv4 client) is that IPv4 address; any other IPv6
address is its first ``prefix`` bits, as bytes, because one subscriber usually holds a
whole /64 (or more) and could otherwise rotate through 2**64 keys.  A zone (``%eth0``)
is dropped.  Keys of the two families are of different types, so they never collide.
"""

from __future__ import annotations

import socket
from hashlib import blake2b
from typing import Hashable

_V4_MAPPED = bytes(10) + b"\xff\xff"
_AF_INET, _AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
_pton, _ntop = socket.inet_pton, socket.inet_ntop
#: Usernames longer than this are kept as a 16-byte digest, so a table entry stays small
#: whatever a client sends.
MAX_USERNAME_KEY = 64


def address_key(ip: str, prefix: int = 64) -> Hashable:
    """The key of the client at ``ip``: IPv4 as is, IPv6 as its first ``prefix`` bits."""
    if ":" not in ip:
        return ip
    if "%" in ip:
        ip = ip.partition("%")[0]
    try:
        packed = _pton(_AF_INET6, ip)
    except (OSError, ValueError):
        # Not an address the OS would report; keyed as written (still one key per value).
        return ip
    if packed.startswith(_V4_MAPPED):
        return _ntop(_AF_INET, packed[12:])
    whole, bits = divmod(prefix, 8)
    if not bits:
        return packed[:whole]
    return packed[:whole] + bytes((packed[whole] & (0xFF00 >> bits) & 0xFF,))


def username_key(username: str | bytes) -> Hashable:
    """The key of a username: case-folded and stripped, a digest when long.

    Folding over-groups (``Alice`` and ``alice`` share a budget), which is the safe
    direction: a directory that ignores case must not give a guesser one budget per
    spelling.
    """
    if isinstance(username, bytes):
        username = username.decode("utf-8", "surrogateescape")
    name = username.strip().casefold()
    if len(name) > MAX_USERNAME_KEY:
        return blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    return name

"""PROXY protocol version 2: the binary header that tells a container who the client is.

In ``proxy-protocol`` mode the gateway writes this header on each new connection to the
container, before the first request (HAProxy's specification, section 2.2: "PROXY"
command, TCP over IPv4 or IPv6, the client's address and port, then the address and
port the client connected to on the gateway).  A connection carries one client's
address for its whole life, so these connections are pooled per client address
(:class:`ProxySource` compares by client address only).

Building and reading headers is pure (no I/O); :class:`ProxySource` opens the connection.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from hoodyproxy import eagertcp

#: The 12-byte signature every v2 header starts with.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Version 2, command PROXY (0x1); LOCAL (0x0) is for connections the proxy makes itself.
PROXY_COMMAND = 0x21
LOCAL_COMMAND = 0x20
#: Address family and transport: TCP over IPv4, TCP over IPv6.
TCP4 = 0x11
TCP6 = 0x21


class ProxyHeaderError(ValueError):
    """Bytes that are not a PROXY protocol v2 header."""


def v2_header(client_ip: str, client_port: int, dest_ip: str, dest_port: int) -> bytes:
    """The PROXY v2 header for a TCP connection from ``client`` to ``dest``.

    Both addresses must be of one family (an IPv4 client reached the gateway on an IPv4
    address; IPv4-mapped IPv6 addresses are unwrapped first).
    """
    client = _unmapped(client_ip)
    dest = _unmapped(dest_ip)
    if client.version != dest.version:
        raise ValueError(f"{client} and {dest} are not of one address family")
    family = TCP4 if client.version == 4 else TCP6
    body = client.packed + dest.packed + struct.pack("!HH", client_port, dest_port)
    return SIGNATURE + struct.pack("!BBH", PROXY_COMMAND, family, len(body)) + body


def parse_v2(data: bytes) -> tuple[tuple[str, int, str, int] | None, int] | None:
    """Read a v2 header at the start of ``data``.

    Returns None when more bytes are needed, else ``(addresses, length)``:
    ``addresses`` is ``(client_ip, client_port, dest_ip, dest_port)`` (None for a LOCAL
    header or an address family other than TCP over IPv4/IPv6) and ``length`` is the
    size of the header.  Raises :class:`ProxyHeaderError` on anything else.
    """
    if len(data) < 16:
        if not SIGNATURE.startswith(data[:12]):
            raise ProxyHeaderError("no PROXY v2 signature")
        return None
    if data[:12] != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    command, family, length = struct.unpack("!BBH", data[12:16])
    if command not in (PROXY_COMMAND, LOCAL_COMMAND):
        raise ProxyHeaderError(f"unknown version/command 0x{command:02x}")
    if len(data) < 16 + length:
        return None
    body = data[16:16 + length]
    if command == LOCAL_COMMAND or family not in (TCP4, TCP6):
        return None, 16 + length
    size = 4 if family == TCP4 else 16
    if length < 2 * size + 4:
        raise ProxyHeaderError("address block too short")
    client = ipaddress.ip_address(body[:size])
    dest = ipaddress.ip_address(body[size:2 * size])
    client_port, dest_port = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return (str(client), client_port, str(dest), dest_port), 16 + length


def _unmapped(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class ProxySource:
    """Where an upstream connection in ``proxy-protocol`` mode comes from.

    Equal (and pooled together) by client address alone: a connection opened for one
    client's first request carries that client's address for the requests that reuse
    it; the port and destination of the first connection are what its header says.
    """

    client_ip: str
    client_port: int = field(default=0, compare=False)
    dest_ip: str = field(default="", compare=False)
    dest_port: int = field(default=0, compare=False)

    @property
    def preamble(self) -> bytes:
        """The bytes to send before the first request."""
        client = _unmapped(self.client_ip)
        try:
            dest = _unmapped(self.dest_ip)
        except ValueError:
            dest = None
        port = self.dest_port
        if dest is None or dest.version != client.version:
            # The destination is unknown, or is the wildcard of a dual-stack UDP listener
            # ("::" for an IPv4 client over HTTP/3): "any address" of the client's family,
            # and the port it reached when that is known.
            if dest is None or not dest.is_unspecified:
                port = 0
            dest = ipaddress.ip_address("::" if client.version == 6 else "0.0.0.0")
        return v2_header(str(client), self.client_port, str(dest), port)

    def connect(self, reactor, address: str, port: int, factory, timeout: float):
        """Open the TCP connection (an ordinary one: only the header is special)."""
        from twisted.internet.posixbase import PosixReactorBase
        if isinstance(reactor, PosixReactorBase):
            return eagertcp.connect_tcp(reactor, address, port, factory, timeout=timeout)
        return reactor.connectTCP(address, port, factory, timeout=timeout)

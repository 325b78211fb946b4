"""Listening sockets on ``[::]`` that take IPv4 too, and the plain form of the addresses they report.

The default HTTPS and HTTP listeners are ``[::]`` (TCP, and UDP for HTTP/3).  An
``AF_INET6`` socket bound to ``::`` accepts IPv4 clients as well -- they appear as
IPv4-mapped addresses, ``::ffff:a.b.c.d`` -- unless ``IPV6_V6ONLY`` is set.  Linux takes
that option's default from ``net.ipv6.bindv6only`` (0 almost everywhere, 1 on some
hardened hosts) and Twisted leaves it alone, so the ports here set it themselves before
binding:

- off, so one socket serves both families, whatever the sysctl says;
- on only for the wildcard ``::`` when the same listener list also names an IPv4 address
  on that port (``["0.0.0.0:443", "[::]:443"]``): each family then has its own socket, as
  written, instead of the second bind failing with "address in use".

A host whose kernel has no IPv6 at all (booted with ``ipv6.disable=1``) cannot create
the socket: :func:`without_ipv6` turns ``::`` into ``0.0.0.0`` there and says so in one
line.  (IPv6 merely switched off by sysctl, as in many containers, still binds ``::``
and serves IPv4 through it.)

Every consumer of a client address -- the audit line, IP groups, forwarding headers,
transparent and PROXY-protocol sources -- wants the plain IPv4 form:
:func:`unmapped_ip`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from twisted.internet import udp

from hoodyproxy.config import ListenAddress
from hoodyproxy.eagertcp import EagerPort

__all__ = ["ANY_V4", "ANY_V6", "ipv6_available", "without_ipv6", "v6only_for", "listen_tcp", "listen_udp",
           "unmapped_ip", "display"]

ANY_V4 = "0.0.0.0"
ANY_V6 = "::"
IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)
IPPROTO_IPV6 = getattr(socket, "IPPROTO_IPV6", 41)


def unmapped_ip(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) given as plain IPv4;
    anything else (IPv6, IPv4, a non-address) unchanged."""
    if host[:7].lower() != "::ffff:":
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host


def display(host: str, port: int) -> str:
    """``host:port`` as a person writes it: ``[::]:8443`` for IPv6 (or ``0.0.0.0`` for
    Twisted's empty interface)."""
    host = host or ANY_V4
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ipv6_available() -> bool:
    """Whether this host can listen on ``::`` at all (False: a kernel without IPv6)."""
    if not socket.has_ipv6:
        return False
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        probe.bind((ANY_V6, 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def without_ipv6(addresses: Sequence[ListenAddress]) -> tuple[ListenAddress, ...]:
    """``addresses`` for a host without IPv6: ``::`` becomes ``0.0.0.0`` (once per port)."""
    out: list[ListenAddress] = []
    for address in addresses:
        if address.interface == ANY_V6:
            address = ListenAddress(ANY_V4, address.port)
        if address not in out or address.port == 0:
            out.append(address)
    return tuple(out)


def v6only_for(address: ListenAddress, siblings: Sequence[ListenAddress]) -> bool:
    """Whether ``address``'s socket leaves IPv4 alone: only the wildcard ``::`` beside an
    IPv4 address on the same (fixed) port in ``siblings``, which takes IPv4 itself."""
    if address.interface != ANY_V6 or address.port == 0:
        return False
    return any(other.port == address.port and ":" not in other.interface for other in siblings)


def _set_v6only(sock: socket.socket, v6only: bool) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 1 if v6only else 0)


class DualStackTCPPort(EagerPort):
    """An eager-sending TCP port whose IPv6 socket has ``IPV6_V6ONLY`` set as asked
    (off unless told).  (The node's own listeners are bound by :mod:`hoodyproxy.sockets`
    with the same options, and shared by its processes.)"""

    def __init__(self, port: int, factory, backlog: int, interface: str, reactor, *,
                 v6only: bool = False) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self.v6only = v6only

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        try:
            _set_v6only(sock, self.v6only)
        except OSError:
            sock.close()
            raise
        return sock


class DualStackUDPPort(udp.Port):
    """A UDP port whose IPv6 socket has ``IPV6_V6ONLY`` set as asked (off unless told).

    Datagrams from IPv4 clients arrive from ``("::ffff:a.b.c.d", port)`` and answers go
    back to that same form: Twisted refuses a plain IPv4 destination on an IPv6 socket.
    """

    def __init__(self, port: int, protocol, interface: str, reactor, *, v6only: bool = False,
                 max_packet_size: int = 8192) -> None:
        super().__init__(port, protocol, interface, max_packet_size, reactor)
        self.v6only = v6only

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        try:
            _set_v6only(sock, self.v6only)
        except OSError:
            sock.close()
            raise
        return sock


def listen_tcp(reactor, address: ListenAddress, factory, *, backlog: int = 1024,
               v6only: bool = False) -> DualStackTCPPort:
    """Listen on TCP ``address``; ``::`` takes IPv4 too unless ``v6only``."""
    port = DualStackTCPPort(address.port, factory, backlog, address.interface, reactor, v6only=v6only)
    port.startListening()
    return port


def listen_udp(reactor, address: ListenAddress, protocol, *, v6only: bool = False,
               max_packet_size: int = 8192) -> udp.Port:
    """Listen on UDP ``address``; ``::`` takes IPv4 too unless ``v6only``.

    A reactor that is not a real POSIX one (a test's) gets ``listenUDP``.
    """
    from twisted.internet.posixbase import PosixReactorBase
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(address.port, protocol, interface=address.interface,
                                 maxPacketSize=max_packet_size)
    port = DualStackUDPPort(address.port, protocol, address.interface, reactor, v6only=v6only,
                            max_packet_size=max_packet_size)
    port.startListening()
    return port

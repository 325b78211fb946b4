"""Transparent upstream connections: the container sees the client's address as the TCP peer.

The socket gets ``IP_TRANSPARENT`` (``IPV6_TRANSPARENT``), which lets it bind an address
that is not the gateway's own, is bound to ``(client address, 0)`` and connects to the
container.  The container's replies are addressed to the client; they come back to this
socket only because the gateway sits on the route between them and its netfilter rules
(:mod:`hoodyproxy.netfilter`) deliver packets of transparent sockets locally.  Setting
the option needs CAP_NET_ADMIN (or CAP_NET_RAW).

A transparent connection belongs to one client, so these connections are pooled per
client address (:class:`TransparentSource` is part of the pool key).

The source is always a plain address: an IPv4 client of a dual-stack listener
(``::ffff:a.b.c.d``) binds an IPv4 socket to ``a.b.c.d``, so the container sees the
IPv4 address it would have seen on an IPv4 listener (an IPv6 socket cannot reach an IPv4
container from a mapped address at all).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from hoodyproxy.eagertcp import EagerClient, EagerConnector
from hoodyproxy.listening import unmapped_ip

# Linux values; the socket module has them only on some Python versions.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
#: Choose the port at connect() rather than bind(): the same client address can then hold
#: any number of connections to different containers (bind with port 0 would reserve a
#: port per socket and run out after ~28 000).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def make_transparent(sock: socket.socket) -> None:
    """Let ``sock`` bind an address that is not local (before it is bound)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    try:
        sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    except OSError:  # pragma: no cover - kernels before 4.2
        pass


class TransparentClient(EagerClient):
    """An eager-sending TCP client whose socket may bind a foreign address.

    Twisted creates the socket, then binds ``bindAddress``: the option is set in
    between, in :meth:`createInternetSocket`.
    """

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        try:
            make_transparent(sock)
        except OSError:
            sock.close()
            raise
        return sock


class TransparentConnector(EagerConnector):
    def _makeTransport(self):
        return TransparentClient(self.host, self.port, self.bindAddress, self, self.reactor)


def connect_transparent(reactor, host: str, port: int, factory, source_ip: str, timeout: float = 30):
    """Connect to ``host:port`` from ``source_ip`` (any port), whether or not it is local."""
    from twisted.internet.posixbase import PosixReactorBase
    source_ip = unmapped_ip(source_ip)
    if not isinstance(reactor, PosixReactorBase):
        # A test reactor: record the attempt as connectTCP with the binding.
        return reactor.connectTCP(host, port, factory, timeout=timeout, bindAddress=(source_ip, 0))
    connector = TransparentConnector(host, port, factory, timeout, (source_ip, 0), reactor)
    connector.connect()
    return connector


@dataclass(frozen=True)
class TransparentSource:
    """Where a transparent upstream connection comes from: the client's address (plain
    IPv4 for an IPv4-mapped one, so one client is one pool key whichever listener it used)."""

    client_ip: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_ip", unmapped_ip(self.client_ip))

    #: Nothing is sent before the first request.
    preamble = b""

    def connect(self, reactor, address: str, port: int, factory, timeout: float):
        return connect_transparent(reactor, address, port, factory, self.client_ip, timeout=timeout)

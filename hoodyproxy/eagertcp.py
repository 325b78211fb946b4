"""TCP transports that send at once when nothing is queued.

Twisted's TCP transport never writes from ``write()``: it queues the bytes, registers
for writability (an ``epoll_ctl``), sends on the next reactor iteration and
unregisters (another ``epoll_ctl``).  A proxy writes on every hop of every request, so
that costs four system calls and two reactor iterations per request for nothing when
the socket buffer has room -- which is almost always.  These transports try ``send()``
first and fall back to Twisted's queue for whatever did not fit (or on any error, which
Twisted's own write path then reports as usual).  Backpressure is unchanged: data that
does not fit is queued and the producer paused exactly as before.
"""

from __future__ import annotations

from twisted.internet import tcp


import os
import socket

ENABLED = os.environ.get("HOODYPROXY_EAGER_WRITES", "1") != "0"


class _EagerWrite:
    def write(self, data: bytes) -> None:
        if (ENABLED and data and self.connected and not self.disconnecting and not self._writeDisconnected
                and not self.dataBuffer and not self._tempDataLen):
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # let the queued path meet the error and close the connection properly
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec) -> None:
        self.write(b"".join(iovec))


class EagerServer(_EagerWrite, tcp.Server):
    """A server-side TCP connection that sends eagerly, with Nagle's algorithm off.

    A response is written whole in one ``send`` (one TLS record, or a few); Nagle would
    hold the last small segment of one back until the client acknowledges the previous,
    which a client's delayed ACK can make 40 ms.  nginx (``tcp_nodelay on``), HAProxy
    and Caddy all turn it off on client connections.
    """

    def __init__(self, sock, protocol, client, server, sessionno, reactor) -> None:
        super().__init__(sock, protocol, client, server, sessionno, reactor)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # (not a TCP socket after all: a UNIX one, in a test)
            pass


class EagerClient(_EagerWrite, tcp.Client):
    """A client-side TCP connection that sends eagerly."""


class EagerPort(tcp.Port):
    """A listening port whose connections send eagerly."""

    transport = EagerServer


class EagerConnector(tcp.Connector):
    def _makeTransport(self):
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


def listen_tcp(reactor, port: int, factory, backlog: int = 1024, interface: str = "") -> EagerPort:
    """``reactor.listenTCP`` with eager-sending connections."""
    p = EagerPort(port, factory, backlog, interface, reactor)
    p.startListening()
    return p


def adopt_port(reactor, fd: int, family: int, factory) -> EagerPort:
    """``reactor.adoptStreamPort`` with eager-sending connections (the fd is duplicated)."""
    p = EagerPort._fromListeningDescriptor(reactor, fd, family, factory)
    p.startListening()
    return p


def connect_tcp(reactor, host: str, port: int, factory, timeout: float = 30, bind_address=None):
    """``reactor.connectTCP`` with an eager-sending connection."""
    connector = EagerConnector(host, port, factory, timeout, bind_address, reactor)
    connector.connect()
    return connector


__all__ = ["listen_tcp", "adopt_port", "connect_tcp", "EagerPort", "EagerServer", "EagerClient"]

"""TCP transports that send at once when nothing is queued.

Twisted's TCP transport never writes from ``write()``: it queues the bytes, registers
for writability (an ``epoll_ctl``), sends on the next reactor iteration and
unregisters (another ``epoll_ctl``).  A proxy writes on every hop of every request, so
that costs four system calls and two reactor iterations per request for nothing when
the socket buffer has room -- which is almost always.  These transports try ``send()``
first and fall back to Twisted's queue for whatever did not fit (or on any error, which
Twisted's own write path then reports as usual).  Backpressure is unchanged: data that
does not fit is queued and the producer paused exactly as before.

Under the gateway's reactor (:class:`hoodyproxy.reactor.GatewayReactor`) writes are
also *held while the reactor dispatches one poll's events* and sent when it has (or
after every :data:`BATCH` events): a :class:`Cork` per reactor.  Each ``send`` to a
peer that sleeps in ``epoll_wait`` wakes it, and on this kind of machine (virtual CPUs)
a wake-up of an idle CPU is an inter-processor interrupt, the dearest part of a send:
under load about a fifth of the gateway's CPU per request went there (perf: ``send`` ->
``sock_def_readable``).  Sent together, the requests of one batch reach the container,
and the answers reach the clients, while the peer is still awake from the first; two
writes to one connection in one batch go in one ``send``.  This is Netty's
``FlushConsolidationHandler`` (writes flushed at the end of the read loop) or libuv's
and nginx's posted events, for a reactor: nothing waits longer than the batch it was
written in, and a poll with one ready event (one client, a quiet node) is no batch: its
writes go at once.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import tcp
from twisted.logger import Logger

_log = Logger(namespace="hoodyproxy.eagertcp")
ENABLED = os.environ.get("HOODYPROXY_EAGER_WRITES", "1") != "0"


#: The most ready events dispatched before held writes are sent (a bound on how long a
#: write waits under load; Netty's FlushConsolidationHandler flushes every 256 writes).
BATCH = 64


class Cork:
    """Writes held while a reactor dispatches a batch of events, then sent in order.

    ``active`` is set while a batch runs; an eager transport written then keeps the bytes
    (joined later into one ``send``) and enlists itself; :meth:`release` sends what every
    enlisted transport holds.  A transport sends what it holds before it is closed, half
    closed or lost, so nothing written is dropped or overtaken.
    """

    __slots__ = ("active", "held")

    def __init__(self) -> None:
        self.active = False
        self.held: list = []

    def release(self) -> None:
        """Send everything held, transport by transport (each in the order written)."""
        while self.held:
            held, self.held = self.held, []
            for transport in held:
                try:
                    transport._release()
                except Exception:
                    # (a producer's pauseProducing raising, say: the other transports
                    # are still sent what they hold)
                    _log.failure("sending the writes held for a batch")


class _EagerWrite:
    #: Bytes written during a reactor batch, not sent yet (None: nothing held).
    _held = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if type(data) is bytes and self.connected and not self.disconnecting:
                held.append(data)
                return
            self._release()  # (anything else: after what is held, by the path below)
        elif type(data) is bytes and data and ENABLED:
            cork = getattr(self.reactor, "cork", None)
            if (cork is not None and cork.active and self.connected and not self.disconnecting
                    and not self._writeDisconnected and not self.dataBuffer and not self._tempDataLen):
                self._held = [data]
                cork.held.append(self)
                return
        self._send(data)

    def _release(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._send(held[0] if len(held) == 1 else b"".join(held))

    def _send(self, data: bytes) -> None:
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

    def loseConnection(self, *args) -> None:
        self._release()
        super().loseConnection(*args)

    def loseWriteConnection(self) -> None:
        self._release()
        super().loseWriteConnection()

    def abortConnection(self) -> None:
        self._held = None  # (an abort drops what is buffered)
        super().abortConnection()

    def connectionLost(self, reason) -> None:
        held = self._held
        if held is not None:
            # Lost in the batch that wrote to it (the peer closed, or a read failed): send
            # what it was given as the unheld write would have, if the socket still takes it.
            self._held = None
            try:
                self.socket.send(b"".join(held))
            except (OSError, AttributeError):
                pass
        super().connectionLost(reason)


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


__all__ = ["listen_tcp", "adopt_port", "connect_tcp", "EagerPort", "EagerServer", "EagerClient", "Cork", "BATCH"]

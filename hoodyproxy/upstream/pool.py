"""Keep-alive connections to containers, pooled per (address, port) and source.

``acquire`` hands out an idle connection (most recently used first) or opens a new one;
a connection that finished an exchange cleanly comes back by itself.  Idle connections
are closed after ``idle_timeout`` by one periodic sweep, not a timer each.

A *source* says whose connection it is.  None (the usual case) is a connection any
request may share, keyed ``(address, port)``.  A connection that carries one client's
address -- transparent (:class:`~hoodyproxy.upstream.transparent.TransparentSource`) or
announced by a PROXY protocol header
(:class:`~hoodyproxy.upstream.proxy_protocol.ProxySource`) -- is keyed
``(address, port, source)`` and only ever reused for that client.  A source opens its
own connection (``source.connect(...)``) and may have bytes to send first
(``source.preamble``).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hoodyproxy import eagertcp
from hoodyproxy.upstream.http11 import UpstreamConnection

log = Logger()


class _ConnectFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: "ConnectionPool", key: tuple, deferred: defer.Deferred,
                 preamble: bytes = b"") -> None:
        self.pool = pool
        self.key = key
        self.deferred = deferred
        self.preamble = preamble

    def buildProtocol(self, addr):
        conn = self.pool._new_connection(self.key)
        conn.on_connected = self._connected
        return conn

    def _connected(self, conn: UpstreamConnection) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            if self.preamble:
                conn.transport.write(self.preamble)
            d.callback(conn)
        else:
            conn.abort()  # the request went away while connecting

    def clientConnectionFailed(self, connector, reason) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(reason)


def _key(address: str, port: int, source) -> tuple:
    return (address, port) if source is None else (address, port, source)


class ConnectionPool:
    """Idle HTTP/1.1 connections per (address, port) and source, and the means to open new ones.

    ``connect`` is ``(address, port, factory, timeout[, source]) -> IConnector`` (the
    source is passed only when there is one); the default opens an eager-sending TCP
    connection, or lets the source open its own.
    """

    #: Idle connections kept per client-owned key (one client seldom needs more at once).
    max_idle_per_source = 8
    #: Idle connections kept in all: client-owned keys are as many as the clients.
    max_idle_total = 4096

    def __init__(self, reactor, *, connect_timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_idle: int = 32, connect: Callable | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._connect = connect or self._connect_tcp
        self._idle: dict[tuple, list[UpstreamConnection]] = {}
        self._idle_total = 0
        self._sweeper: LoopingCall | None = None
        self.opened = 0
        self.closed = False

    def _connect_tcp(self, address: str, port: int, factory, timeout: float, source=None):
        if source is not None:
            return source.connect(self.reactor, address, port, factory, timeout)
        if isinstance(self.reactor, PosixReactorBase):  # a real reactor: eager-sending TCP
            return eagertcp.connect_tcp(self.reactor, address, port, factory, timeout=timeout)
        return self.reactor.connectTCP(address, port, factory, timeout=timeout)

    def acquire_idle(self, address: str, port: int, source=None) -> UpstreamConnection | None:
        """An idle pooled connection to (address, port) for ``source``, or None: the hot path, no Deferred."""
        idle = self._idle.get((address, port) if source is None else (address, port, source))
        while idle:
            conn = idle.pop()
            self._idle_total -= 1
            transport = conn.transport
            if transport is not None and transport.connected and not transport.disconnecting:
                conn.on_reusable = self._release
                return conn
        return None

    def acquire(self, address: str, port: int, source=None) -> defer.Deferred:
        """A Deferred firing with an idle or new UpstreamConnection (``.requests`` > 0 if reused)."""
        conn = self.acquire_idle(address, port, source)
        if conn is not None:
            return defer.succeed(conn)
        key = _key(address, port, source)
        d: defer.Deferred = defer.Deferred()
        if source is None:
            factory = _ConnectFactory(self, key, d)
            connector = self._connect(address, port, factory, self.connect_timeout)
        else:
            factory = _ConnectFactory(self, key, d, source.preamble)
            connector = self._connect(address, port, factory, self.connect_timeout, source)

        def cancel(_d):
            factory.deferred = None
            connector.disconnect()
        d._canceller = cancel  # cancellation closes a connect in progress
        return d

    def _new_connection(self, key: tuple) -> UpstreamConnection:
        conn = UpstreamConnection(key, self.reactor)
        conn.on_reusable = self._release
        conn.on_closed = self._forget
        self.opened += 1
        return conn

    def _release(self, conn: UpstreamConnection) -> None:
        key = conn.key
        idle = self._idle.setdefault(key, [])
        limit = self.max_idle if len(key) == 2 else min(self.max_idle, self.max_idle_per_source)
        if len(idle) >= limit or self._idle_total >= self.max_idle_total or self.closed:
            if not idle:
                del self._idle[key]
            conn.transport.loseConnection()
            return
        conn.on_reusable = None
        idle.append(conn)
        self._idle_total += 1
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(max(self.idle_timeout / 2, 0.5), now=False)

    def _forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            self._idle_total -= 1
            if not idle:
                del self._idle[conn.key]

    def _sweep(self) -> None:
        deadline = self.reactor.seconds() - self.idle_timeout
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if c.last_used <= deadline]:
                idle.remove(conn)
                self._idle_total -= 1
                if conn.transport is not None:
                    conn.transport.loseConnection()
            if not idle:
                self._idle.pop(key, None)
        if not self._idle and self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def idle_count(self, address: str | None = None, port: int | None = None, source=None) -> int:
        """How many idle connections are pooled (for one address, port and source, or in all)."""
        if address is not None:
            return len(self._idle.get(_key(address, port, source), []))
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Close every idle connection (at shutdown); connections finishing later are closed too."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        for idle in list(self._idle.values()):
            for conn in list(idle):
                if conn.transport is not None:
                    conn.transport.loseConnection()
        self._idle.clear()
        self._idle_total = 0

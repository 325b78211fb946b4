"""Keep-alive connections to containers, pooled per (address, port).

``acquire`` hands out an idle connection (most recently used first) or opens a new one;
a connection that finished an exchange cleanly comes back by itself.  Idle connections
are closed after ``idle_timeout`` by one periodic sweep, not a timer each.
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

    def __init__(self, pool: "ConnectionPool", key: tuple[str, int], deferred: defer.Deferred) -> None:
        self.pool = pool
        self.key = key
        self.deferred = deferred

    def buildProtocol(self, addr):
        conn = self.pool._new_connection(self.key)
        conn.on_connected = self._connected
        return conn

    def _connected(self, conn: UpstreamConnection) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(conn)
        else:
            conn.abort()  # the request went away while connecting

    def clientConnectionFailed(self, connector, reason) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(reason)


class ConnectionPool:
    """Idle HTTP/1.1 connections per (address, port), and the means to open new ones.

    ``connect`` is ``(address, port, factory, timeout) -> IConnector``; the default is
    ``reactor.connectTCP``.  Transparent mode (the real client IP) passes its own.
    """

    def __init__(self, reactor, *, connect_timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_idle: int = 32, connect: Callable | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._connect = connect or self._connect_tcp
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._sweeper: LoopingCall | None = None
        self.opened = 0
        self.closed = False

    def _connect_tcp(self, address: str, port: int, factory, timeout: float):
        if isinstance(self.reactor, PosixReactorBase):  # a real reactor: eager-sending TCP
            return eagertcp.connect_tcp(self.reactor, address, port, factory, timeout=timeout)
        return self.reactor.connectTCP(address, port, factory, timeout=timeout)

    def acquire_idle(self, address: str, port: int) -> UpstreamConnection | None:
        """An idle pooled connection to (address, port), or None: the hot path, no Deferred."""
        idle = self._idle.get((address, port))
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and transport.connected and not transport.disconnecting:
                conn.on_reusable = self._release
                return conn
        return None

    def acquire(self, address: str, port: int) -> defer.Deferred:
        """A Deferred firing with an idle or new UpstreamConnection (``.requests`` > 0 if reused)."""
        conn = self.acquire_idle(address, port)
        if conn is not None:
            return defer.succeed(conn)
        key = (address, port)
        d: defer.Deferred = defer.Deferred()
        factory = _ConnectFactory(self, key, d)
        connector = self._connect(address, port, factory, self.connect_timeout)

        def cancel(_d):
            factory.deferred = None
            connector.disconnect()
        d._canceller = cancel  # cancellation closes a connect in progress
        return d

    def _new_connection(self, key: tuple[str, int]) -> UpstreamConnection:
        conn = UpstreamConnection(key, self.reactor)
        conn.on_reusable = self._release
        conn.on_closed = self._forget
        self.opened += 1
        return conn

    def _release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle or self.closed:
            conn.transport.loseConnection()
            return
        conn.on_reusable = None
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(max(self.idle_timeout / 2, 0.5), now=False)

    def _forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def _sweep(self) -> None:
        deadline = self.reactor.seconds() - self.idle_timeout
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if c.last_used <= deadline]:
                idle.remove(conn)
                if conn.transport is not None:
                    conn.transport.loseConnection()
            if not idle:
                self._idle.pop(key, None)
        if not self._idle and self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def idle_count(self, address: str | None = None, port: int | None = None) -> int:
        """How many idle connections are pooled (for one address and port, or in all)."""
        if address is not None:
            return len(self._idle.get((address, port), []))
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

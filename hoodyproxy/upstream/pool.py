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

A shared key keeps at most ``max_idle`` idle connections.  A client-owned key keeps as
many as that client recently had in use at once (at least ``min_idle_per_source``, at
most ``max_idle``): one address may carry fifty keep-alive clients (a load generator, an
office behind NAT, a browser's HTTP/2 streams), and refusing their connections back would
open and close one per request, burning that address's ephemeral ports.  "Recently" is
the peak of the last one or two sweep periods (half ``idle_timeout`` each); each sweep
closes a client's idle connections beyond its decayed peak, least recently used first.
In all, at most ``max_idle_total`` connections are idle; past that a release evicts the
least recently used idle connection of any key.  Every per-request step is O(1).
"""

from __future__ import annotations

from collections import OrderedDict, deque
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
        #: A client-owned connect counts as in use from the start (see ConnectionPool._want).
        self.wanted = len(key) == 3
        if self.wanted:
            pool._want(key)

    def settle(self) -> None:
        """The connect ended without handing out a connection: it no longer counts as in use."""
        if self.wanted:
            self.wanted = False
            self.pool._unwant(self.key)

    def buildProtocol(self, addr):
        conn = self.pool._new_connection(self.key)
        conn.on_connected = self._connected
        return conn

    def _connected(self, conn: UpstreamConnection) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            if self.preamble:
                conn.transport.write(self.preamble)
            if self.wanted:  # already counted in use since the connect began
                self.wanted = False
                self.pool._in_use.add(conn)
            d.callback(conn)
        else:
            self.settle()
            conn.abort()  # the request went away while connecting

    def clientConnectionFailed(self, connector, reason) -> None:
        self.settle()
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

    #: Idle connections a client-owned key may always keep, whatever its recent peak.
    min_idle_per_source = 8
    #: A hard bound on one client-owned key's idle connections (None: ``max_idle``).
    max_idle_per_source: int | None = None
    #: Idle connections kept in all (client-owned keys are as many as the clients); past
    #: it the least recently used idle connection of any key makes room.
    max_idle_total = 4096

    def __init__(self, reactor, *, connect_timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_idle: int = 32, connect: Callable | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._connect = connect or self._connect_tcp
        #: Idle connections per key, least recently used first (acquire takes the last).
        self._idle: dict[tuple, deque[UpstreamConnection]] = {}
        #: Every idle connection, least recently used first (the global eviction order).
        self._lru: OrderedDict[UpstreamConnection, None] = OrderedDict()
        #: Per client-owned key: [in use now, peak this period, peak last period].
        self._load: dict[tuple, list[int]] = {}
        #: Connections of client-owned keys handed out and not yet back or closed.
        self._in_use: set[UpstreamConnection] = set()
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
            del self._lru[conn]
            transport = conn.transport
            if transport is not None and transport.connected and not transport.disconnecting:
                conn.on_reusable = self._release
                if source is not None:
                    self._busy(conn)
                return conn
        return None

    def _busy(self, conn: UpstreamConnection) -> None:
        """Count a client-owned connection as in use (handed out for an exchange)."""
        if conn in self._in_use:
            return
        self._in_use.add(conn)
        self._want(conn.key)

    def _want(self, key: tuple) -> None:
        """One more of ``key``'s connections in use, or being opened for a request.

        A connect counts from the moment it begins: while fifty clients arrive at once,
        most of their connections are still opening, and a peak of only the established
        ones would let the first releases close connections the rest are about to need.
        """
        load = self._load.get(key)
        if load is None:
            self._load[key] = [1, 1, 0]
            self._start_sweep()  # the sweep decays the peak, even if nothing goes idle
            return
        load[0] += 1
        if load[0] > load[1]:
            load[1] = load[0]

    def _unwant(self, key: tuple) -> None:
        load = self._load.get(key)
        if load is not None:  # (gone only after close())
            load[0] -= 1

    def _unbusy(self, conn: UpstreamConnection) -> None:
        if conn in self._in_use:
            self._in_use.discard(conn)
            self._unwant(conn.key)

    def _limit(self, key: tuple) -> int:
        """How many idle connections ``key`` may keep now."""
        if len(key) == 2:
            return self.max_idle
        cap = self.max_idle if self.max_idle_per_source is None else min(self.max_idle, self.max_idle_per_source)
        load = self._load.get(key)
        recent = self.min_idle_per_source if load is None else max(self.min_idle_per_source, load[1], load[2])
        return min(cap, recent)

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
            factory.settle()
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
        if len(key) == 3:
            self._unbusy(conn)
        idle = self._idle.get(key)
        limit = self.max_idle if len(key) == 2 else self._limit(key)  # (_limit's answer for a shared key)
        if self.closed or len(idle or ()) >= limit or self.max_idle_total <= 0:
            conn.close()
            return
        if len(self._lru) >= self.max_idle_total:
            self._evict_oldest()
            idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        conn.on_reusable = None
        idle.append(conn)
        self._lru[conn] = None
        if self._sweeper is None:
            self._start_sweep()

    def _evict_oldest(self) -> None:
        """Close the least recently used idle connection of any key."""
        oldest, _ = self._lru.popitem(last=False)
        idle = self._idle[oldest.key]
        idle.popleft()  # the key's own least recently used: released in the same order
        if not idle:
            del self._idle[oldest.key]
        oldest.close()

    def configure(self, *, connect_timeout: float, idle_timeout: float, max_idle: int) -> None:
        """Take new limits (a config reload): connects begun from now on use
        ``connect_timeout``; the next sweep closes what ``idle_timeout`` and ``max_idle``
        no longer allow."""
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        if idle_timeout != self.idle_timeout:
            self.idle_timeout = idle_timeout
            if self._sweeper is not None:  # its period is half the idle timeout
                self._sweeper.stop()
                self._sweeper = None
                self._start_sweep()

    def _start_sweep(self) -> None:
        if self._sweeper is None and not self.closed:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(max(self.idle_timeout / 2, 0.5), now=False)

    def _forget(self, conn: UpstreamConnection) -> None:
        if len(conn.key) == 3:
            self._unbusy(conn)
        if conn in self._lru:
            del self._lru[conn]
            idle = self._idle[conn.key]
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def _sweep(self) -> None:
        # A new period for the peaks: the last one is remembered, this one starts from now.
        for key, load in list(self._load.items()):
            if load[0] == 0 and load[1] == 0:  # nothing in use for a whole period
                del self._load[key]
            else:
                load[2], load[1] = load[1], load[0]
        deadline = self.reactor.seconds() - self.idle_timeout
        for key, idle in list(self._idle.items()):
            excess = len(idle) - self._limit(key) if len(key) == 3 else 0
            while idle and (excess > 0 or idle[0].last_used <= deadline):
                conn = idle.popleft()  # least recently used first
                del self._lru[conn]
                excess -= 1
                conn.close()
            if not idle:
                del self._idle[key]
        if not self._idle and not self._load and self._sweeper is not None:
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
                conn.close()
        self._idle.clear()
        self._lru.clear()
        self._load.clear()

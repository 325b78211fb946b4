"""Tests for :mod:`hoodyproxy.upstream.pool`, the keep-alive connection pool.

No sockets and no real time: the pool runs on a ``MemoryReactorClock``, whose
``connectTCP`` only records the attempt in ``reactor.tcpClients``.  A test "completes"
a connection by building the protocol from the recorded factory and attaching it to a
``StringTransport``; it "closes" one by calling ``connectionLost`` itself.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from hoodyproxy import deadlines
from hoodyproxy.upstream.http11 import UpstreamConnection
from hoodyproxy.upstream.pool import ConnectionPool
from hoodyproxy.upstream.transparent import TransparentSource

ADDRESS = "10.1.2.3"
PORT = 8080
IDLE_TIMEOUT = 30.0

REQUEST = b"GET / HTTP/1.1\r\nHost: container\r\n\r\n"
KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


class Listener:
    """Enough of a ResponseListener to run an exchange; remembers how it ended."""

    def __init__(self) -> None:
        self.outcome = None

    def upstream_head(self, status, reason, headers):
        pass

    def upstream_data(self, data):
        pass

    def upstream_end(self):
        self.outcome = "end"

    def upstream_failed(self, why, got_response):
        self.outcome = ("failed", why)

    def upstream_upgraded(self, leftover):
        self.outcome = "upgraded"


class PoolTestCase(unittest.SynchronousTestCase):

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = self.make_pool()

    def make_pool(self, **kwargs) -> ConnectionPool:
        options = dict(connect_timeout=5.0, idle_timeout=IDLE_TIMEOUT, max_idle=2)
        options.update(kwargs)
        return ConnectionPool(self.reactor, **options)

    def establish(self, index: int = -1) -> tuple[UpstreamConnection, StringTransport]:
        """Finish the connection attempt ``reactor.tcpClients[index]``."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        conn = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def open(self, address: str = ADDRESS, port: int = PORT) -> UpstreamConnection:
        """acquire() a brand-new connection and complete it."""
        before = len(self.reactor.tcpClients)
        d = self.pool.acquire(address, port)
        self.assertEqual(len(self.reactor.tcpClients), before + 1, "expected a new connection")
        conn, _ = self.establish()
        self.assertIs(self.successResultOf(d), conn)
        return conn

    def exchange(self, conn: UpstreamConnection, response: bytes = KEEP_ALIVE) -> Listener:
        """Run one complete request/response on ``conn``."""
        listener = Listener()
        conn.send_head(REQUEST, listener, chunked_body=False, has_body=False,
                       head_request=False, upgrade=False, timeout=10.0)
        conn.dataReceived(response)
        self.assertEqual(listener.outcome, "end")
        return listener

    def idle_connection(self, address: str = ADDRESS, port: int = PORT) -> UpstreamConnection:
        conn = self.open(address, port)
        self.exchange(conn)
        return conn


class AcquireTests(PoolTestCase):

    def test_acquireOpensConnection(self):
        """With nothing pooled, acquire starts a TCP connection to the address and port."""
        d = self.pool.acquire(ADDRESS, PORT)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        host, port, _factory, timeout, _bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), (ADDRESS, PORT, 5.0))
        self.assertNoResult(d)

    def test_acquireWaitsForConnectionMade(self):
        """The Deferred fires only once the connection is made, with that connection."""
        d = self.pool.acquire(ADDRESS, PORT)
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[0]
        conn = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.assertNoResult(d)
        conn.makeConnection(StringTransport())
        self.assertIs(self.successResultOf(d), conn)
        self.assertIsInstance(conn, UpstreamConnection)
        self.assertEqual(conn.key, (ADDRESS, PORT))
        self.assertEqual(conn.requests, 0)

    def test_connectFailureErrbacks(self):
        """A failed connection attempt errbacks the Deferred with the failure."""
        d = self.pool.acquire(ADDRESS, PORT)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_customConnectUsed(self):
        """A ``connect`` callable replaces connectTCP and gets address, port, factory, timeout."""
        calls = []

        def connect(address, port, factory, timeout):
            calls.append((address, port, timeout))
            return self.reactor.connectTCP(address, port, factory, timeout=timeout)

        pool = self.make_pool(connect=connect, connect_timeout=7.0)
        pool.acquire(ADDRESS, PORT)
        self.assertEqual(calls, [(ADDRESS, PORT, 7.0)])


class ReuseTests(PoolTestCase):

    def test_keepAliveConnectionPooledAfterExchange(self):
        """A complete keep-alive exchange puts the connection in the pool."""
        conn = self.open()
        self.assertEqual(self.pool.idle_count(), 0)
        self.exchange(conn)
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT), 1)

    def test_pooledConnectionReusedByNextAcquire(self):
        """The next acquire for the same address and port gets the pooled connection at once."""
        conn = self.idle_connection()
        d = self.pool.acquire(ADDRESS, PORT)
        self.assertIs(self.successResultOf(d), conn)
        self.assertEqual(len(self.reactor.tcpClients), 1, "a new connection was opened")
        self.assertEqual(conn.requests, 1)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_reusedConnectionReturnsAfterNextExchange(self):
        """A reused connection comes back to the pool after its next exchange too."""
        conn = self.idle_connection()
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), conn)
        self.exchange(conn)
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), conn)
        self.assertEqual(conn.requests, 2)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_connectionInUseNotHandedOut(self):
        """A connection checked out and not yet finished is not given to a second acquire."""
        self.open()
        self.pool.acquire(ADDRESS, PORT)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_otherPortGetsOwnConnection(self):
        """Pooled connections are per (address, port)."""
        self.idle_connection(ADDRESS, PORT)
        self.pool.acquire(ADDRESS, PORT + 1)
        self.pool.acquire("10.9.9.9", PORT)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT), 1)

    def test_mostRecentlyUsedHandedOutFirst(self):
        """Of several pooled connections, the one released last is handed out first."""
        first = self.open()
        second = self.open()
        self.exchange(first)
        self.exchange(second)
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), second)
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), first)

    def test_connectionCloseNotPooled(self):
        """A response with ``Connection: close`` does not return the connection."""
        conn = self.open()
        self.exchange(conn, CLOSE)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(conn.transport.disconnecting)

    def test_failedExchangeNotPooled(self):
        """A connection whose exchange failed is not pooled."""
        conn = self.open()
        listener = Listener()
        conn.send_head(REQUEST, listener, chunked_body=False, has_body=False,
                       head_request=False, upgrade=False, timeout=10.0)
        conn.dataReceived(b"garbage\r\n\r\n")
        self.assertEqual(listener.outcome[0], "failed")
        self.assertEqual(self.pool.idle_count(), 0)


class MaxIdleTests(PoolTestCase):

    def test_maxIdleBoundRespected(self):
        """No more than max_idle connections are kept; the extra one is closed."""
        conns = [self.open() for _ in range(3)]
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(), 2)
        self.assertEqual([c.transport.disconnecting for c in conns], [False, False, True])

    def test_maxIdleIsPerAddressAndPort(self):
        """The max_idle bound applies per (address, port)."""
        for port in (PORT, PORT + 1):
            conns = [self.open(ADDRESS, port) for _ in range(2)]
            for conn in conns:
                self.exchange(conn)
        self.assertEqual(self.pool.idle_count(), 4)

    def test_zeroMaxIdleKeepsNothing(self):
        """With max_idle=0 every released connection is closed."""
        self.pool = self.make_pool(max_idle=0)
        conn = self.open()
        self.exchange(conn)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(conn.transport.disconnecting)


class SourceLoadTests(PoolTestCase):
    """Client-owned (transparent) keys keep as many idle connections as the client recently
    had in use at once (at least ``min_idle_per_source``, at most ``max_idle``)."""

    CLIENT = TransparentSource("203.0.113.50")

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = self.make_pool(max_idle=256)

    def open_many(self, n: int, source=CLIENT, port: int = PORT) -> list[UpstreamConnection]:
        """``n`` concurrent acquires for ``source``, reused or new (completed), in order."""
        conns = []
        for _ in range(n):
            before = len(self.reactor.tcpClients)
            d = self.pool.acquire(ADDRESS, port, source)
            if len(self.reactor.tcpClients) > before:
                self.establish()
            conns.append(self.successResultOf(d))
        return conns

    def test_concurrentExchangesFromOneSourceAllPooled(self):
        """Fifty concurrent exchanges from one client leave fifty idle connections, not eight."""
        conns = self.open_many(50)
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 50)
        self.assertFalse(any(c.transport.disconnecting for c in conns))
        # ...and the next fifty concurrent requests reuse them all.
        again = self.open_many(50)
        self.assertEqual(len(self.reactor.tcpClients), 50)
        self.assertEqual(set(map(id, again)), set(map(id, conns)))

    def test_fewConcurrentKeepAtLeastTheMinimum(self):
        """A client's idle connections are never bounded below ``min_idle_per_source``."""
        conns = self.open_many(3)
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 3)

    def test_sourceIdleBoundedByMaxIdle(self):
        """However many a client had in use, it keeps at most ``max_idle`` idle."""
        self.pool = self.make_pool(max_idle=10)
        conns = self.open_many(50)
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 10)
        self.assertEqual(sum(c.transport.disconnecting for c in conns), 40)

    def test_idleTrimmedAfterConcurrencyDrops(self):
        """Once a client's concurrency has dropped for a whole sweep period, the sweep closes
        its idle connections beyond the new peak (least recently used first), before they
        would time out."""
        conns = self.open_many(50)
        self.reactor.advance(5)
        for conn in conns:
            self.exchange(conn)
        self.reactor.advance(IDLE_TIMEOUT / 2 - 5)  # first sweep: the peak of 50 is still recent
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 50)
        self.reactor.advance(5)
        recent = self.open_many(5)  # the client now runs five at a time
        for conn in recent:
            self.exchange(conn)
        self.reactor.advance(IDLE_TIMEOUT / 2 - 5)  # second sweep: the peak is down to 5
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 8)
        kept = [c for c in conns if not c.transport.disconnecting]
        self.assertEqual(len(kept), 8)
        for conn in recent:
            self.assertIn(conn, kept)
        # None of them had been idle for idle_timeout: only the decayed peak closed them.
        self.assertTrue(all(self.reactor.seconds() - c.last_used < IDLE_TIMEOUT for c in conns))

    def test_peakRisesAgainAfterDecay(self):
        """After the decay, a new burst is pooled in full again."""
        conns = self.open_many(50)
        for conn in conns:
            self.exchange(conn)
        for _ in range(4):
            self.reactor.advance(IDLE_TIMEOUT / 2)
        self.assertEqual(self.pool.idle_count(), 0)
        conns = self.open_many(20)
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 20)

    def test_closedInUseConnectionsLeaveNoLoad(self):
        """Connections closed while in use stop counting; a quiet client leaves no periodic call."""
        conns = self.open_many(20)
        for conn in conns:
            conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle_count(), 0)
        for _ in range(3):
            self.reactor.advance(IDLE_TIMEOUT / 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_sharedKeysIgnoreConcurrency(self):
        """Shared keys stay bounded by ``max_idle`` alone, however many were in use."""
        self.pool = self.make_pool(max_idle=2)
        conns = [self.open() for _ in range(10)]
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT), 2)
        self.assertEqual([c.transport.disconnecting for c in conns], [False] * 2 + [True] * 8)


class TotalIdleTests(PoolTestCase):
    """Past ``max_idle_total`` a release evicts the least recently used idle connection of any key."""

    def test_totalCapEvictsLeastRecentlyUsed(self):
        """The newcomer is kept; the connection idle longest, whatever its key, is closed."""
        self.pool.max_idle_total = 3
        client = TransparentSource("203.0.113.50")
        first = self.open(ADDRESS, PORT)
        d = self.pool.acquire(ADDRESS, PORT, client)
        self.establish()
        second = self.successResultOf(d)
        third = self.open(ADDRESS, PORT + 1)
        fourth = self.open("10.9.9.9", PORT)
        for conn in (first, second, third):
            self.exchange(conn)
            self.reactor.advance(1)
        self.exchange(fourth)
        self.assertEqual(self.pool.idle_count(), 3)
        self.assertTrue(first.transport.disconnecting)
        self.assertEqual([c.transport.disconnecting for c in (second, third, fourth)], [False] * 3)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT), 0)
        self.assertIs(self.successResultOf(self.pool.acquire("10.9.9.9", PORT)), fourth)
        # The next eviction takes the client's connection, the oldest left.
        fifth = self.open(ADDRESS, PORT)
        self.exchange(fifth)
        self.exchange(fourth)
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, client), 0)
        self.assertEqual(self.pool.idle_count(), 3)

    def test_evictedConnectionClosingLaterIsHarmless(self):
        """An evicted connection's eventual connectionLost does not disturb the pool."""
        self.pool.max_idle_total = 1
        old, new = self.open(), self.open()
        self.exchange(old)
        self.exchange(new)
        self.assertTrue(old.transport.disconnecting)
        old.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), new)


class IdleTimeoutTests(PoolTestCase):

    def test_idleConnectionKeptBeforeIdleTimeout(self):
        """A pooled connection survives sweeps until idle_timeout has passed."""
        conn = self.idle_connection()
        self.reactor.advance(IDLE_TIMEOUT * 0.99)
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertFalse(conn.transport.disconnecting)

    def test_idleConnectionClosedAfterIdleTimeout(self):
        """A connection idle for longer than idle_timeout is closed by the sweep."""
        conn = self.idle_connection()
        # The sweep is periodic, so allow it up to one more half-period to notice.
        for _ in range(4):
            self.reactor.advance(IDLE_TIMEOUT / 2)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(conn.transport.disconnecting)

    def test_recentlyUsedConnectionSurvivesSweep(self):
        """The sweep closes only the connections that have been idle long enough."""
        old, new = self.open(), self.open()
        self.exchange(old)
        self.reactor.advance(IDLE_TIMEOUT * 0.75)
        self.exchange(new)
        self.reactor.advance(IDLE_TIMEOUT * 0.75)
        self.assertTrue(old.transport.disconnecting)
        self.assertFalse(new.transport.disconnecting)
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), new)

    def test_reuseRefreshesIdleTime(self):
        """Idle time counts from the end of the last exchange, not from when it opened."""
        conn = self.idle_connection()
        self.reactor.advance(IDLE_TIMEOUT * 0.75)
        self.assertIs(self.successResultOf(self.pool.acquire(ADDRESS, PORT)), conn)
        self.exchange(conn)
        self.reactor.advance(IDLE_TIMEOUT * 0.75)
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertFalse(conn.transport.disconnecting)

    def test_sweepStopsWhenPoolEmpty(self):
        """Once nothing is pooled, no periodic call is left on the reactor."""
        self.idle_connection()
        self.assertNotEqual(self.reactor.getDelayedCalls(), [])
        for _ in range(4):
            self.reactor.advance(IDLE_TIMEOUT / 2)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ClosedConnectionTests(PoolTestCase):

    def test_closedPooledConnectionForgotten(self):
        """A pooled connection that the container closes leaves the pool."""
        conn = self.idle_connection()
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle_count(), 0)
        self.pool.acquire(ADDRESS, PORT)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_closingPooledConnectionNotHandedOut(self):
        """A pooled connection already closing is skipped by acquire."""
        conn = self.idle_connection()
        conn.transport.loseConnection()  # closing, connectionLost not delivered yet
        self.pool.acquire(ADDRESS, PORT)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_unsolicitedDataEvictsPooledConnection(self):
        """A pooled connection that receives bytes nobody asked for is not handed out again."""
        conn = self.idle_connection()
        conn.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.pool.acquire(ADDRESS, PORT)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_closedCheckedOutConnectionNotPooled(self):
        """A connection lost while in use never enters the pool."""
        conn = self.open()
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.idle_count(), 0)


class CancelTests(PoolTestCase):

    def test_cancelWhileConnectingDisconnectsConnector(self):
        """Cancelling the acquire Deferred while connecting disconnects the connector."""
        d = self.pool.acquire(ADDRESS, PORT)
        connector = self.reactor.connectors[0]
        self.assertFalse(connector._disconnected)
        d.cancel()
        self.assertTrue(connector._disconnected)
        self.failureResultOf(d, CancelledError)

    def test_connectionMadeAfterCancelIsAborted(self):
        """A connection that completes after its acquire was cancelled is aborted, not pooled."""
        d = self.pool.acquire(ADDRESS, PORT)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        conn, transport = self.establish()
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_connectFailureAfterCancelIgnored(self):
        """A connection failure reported after cancel does not errback twice."""
        d = self.pool.acquire(ADDRESS, PORT)
        d.cancel()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.failureResultOf(d, CancelledError)


class CloseTests(PoolTestCase):

    def test_closeClosesIdleConnections(self):
        """close() closes every pooled connection and empties the pool."""
        conns = [self.open(ADDRESS, PORT), self.open(ADDRESS, PORT + 1)]
        for conn in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(), 2)
        self.pool.close()
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertEqual([c.transport.disconnecting for c in conns], [True, True])

    def test_closeStopsSweep(self):
        """close() leaves no periodic call on the reactor."""
        self.idle_connection()
        self.pool.close()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closeStopsSweepWithClientsInUse(self):
        """After close(), client connections in use or opened later start no periodic call."""
        client = TransparentSource("203.0.113.50")
        d = self.pool.acquire(ADDRESS, PORT, client)
        conn, _ = self.establish()
        self.assertIs(self.successResultOf(d), conn)
        self.pool.close()
        # (the connection in use stays under the response-deadline sweep until it is closed)
        sweep = deadlines.shared(self.reactor)
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is not sweep],
                         [])
        d = self.pool.acquire(ADDRESS, PORT + 1, client)
        later, _ = self.establish()
        self.exchange(conn)
        self.exchange(later)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(conn.transport.disconnecting and later.transport.disconnecting)

    def test_closeLeavesConnectionsInUseAlone(self):
        """close() does not touch a connection that is carrying a request."""
        conn = self.open()
        self.pool.close()
        self.assertFalse(conn.transport.disconnecting)


class ArrivingTogetherTests(PoolTestCase):
    """Many keep-alive clients behind one address arriving at once (a load generator, an
    office behind NAT): their connections are kept however the connects and the exchanges
    interleave, and the pool's total bound still holds across clients."""

    CLIENT = TransparentSource("203.0.113.50")

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = self.make_pool(max_idle=256)

    def test_connectsInProgressCountTowardsThePeak(self):
        """Ten connections in use and forty still opening: the ten finish, then five of the
        forty open and finish before the rest: fifteen idle, none closed, and once all have
        finished, fifty."""
        first = []
        for _ in range(10):
            d = self.pool.acquire(ADDRESS, PORT, self.CLIENT)
            self.establish()
            first.append(self.successResultOf(d))
        pending = [self.pool.acquire(ADDRESS, PORT, self.CLIENT) for _ in range(40)]
        for conn in first:
            self.exchange(conn)
        later = []
        for index, d in enumerate(pending[:5]):
            self.establish(10 + index)
            later.append(self.successResultOf(d))
            self.exchange(later[-1])
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 15)
        for index, d in enumerate(pending[5:]):
            self.establish(15 + index)
            later.append(self.successResultOf(d))
        for conn in later[5:]:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 50)
        self.assertFalse(any(c.transport.disconnecting for c in first + later))

    def test_releasesWhileOthersConnectKeepEveryConnection(self):
        """Exchanges finishing while the rest of a burst is still connecting are never
        refused back: fifty clients, each connection's exchange done as soon as it opens."""
        pending = [self.pool.acquire(ADDRESS, PORT, self.CLIENT) for _ in range(50)]
        conns = []
        for index, d in enumerate(pending):
            self.establish(index)
            conn = self.successResultOf(d)
            self.exchange(conn)
            conns.append(conn)
        self.assertEqual(self.pool.idle_count(ADDRESS, PORT, self.CLIENT), 50)
        self.assertFalse(any(c.transport.disconnecting for c in conns))

    def test_failedAndCancelledConnectsLeaveNoLoad(self):
        """A connect that fails, one cancelled, and one completing after its cancel stop
        counting: once the client is quiet the pool leaves no periodic call."""
        failed = self.pool.acquire(ADDRESS, PORT, self.CLIENT)
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            self.reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.failureResultOf(failed, ConnectionRefusedError)
        cancelled = self.pool.acquire(ADDRESS, PORT, self.CLIENT)
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.reactor.tcpClients[1][2].clientConnectionFailed(
            self.reactor.connectors[1], Failure(ConnectionRefusedError()))
        late = self.pool.acquire(ADDRESS, PORT, self.CLIENT)
        late.cancel()
        self.failureResultOf(late, CancelledError)
        _, transport = self.establish(2)
        self.assertTrue(transport.disconnected)
        for _ in range(3):
            self.reactor.advance(IDLE_TIMEOUT / 2)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_manyClientsBoundedByTotalCap(self):
        """Three clients of fifty connections each, 100 idle in all: the client idle longest
        loses its connections first, least recently used first, and the newcomers are kept."""
        self.pool.max_idle_total = 100
        clients = [TransparentSource(f"203.0.113.{n}") for n in (50, 51, 52)]
        bursts = []
        for client in clients:
            pending = [self.pool.acquire(ADDRESS, PORT, client) for _ in range(50)]
            start = len(self.reactor.tcpClients) - 50
            for index in range(50):
                self.establish(start + index)
            bursts.append([self.successResultOf(d) for d in pending])
        for burst in bursts:
            for conn in burst:
                self.exchange(conn)
                self.reactor.advance(0.01)
        self.assertEqual(self.pool.idle_count(), 100)
        self.assertEqual([self.pool.idle_count(ADDRESS, PORT, c) for c in clients], [0, 50, 50])
        self.assertTrue(all(c.transport.disconnecting for c in bursts[0]))
        self.assertFalse(any(c.transport.disconnecting for c in bursts[1] + bursts[2]))
        # The first client back: each of its releases evicts the oldest of the second client's.
        back = [self.pool.acquire(ADDRESS, PORT, clients[0]) for _ in range(10)]
        start = len(self.reactor.tcpClients) - 10
        for index in range(10):
            self.establish(start + index)
        for d in back:
            self.exchange(self.successResultOf(d))
        self.assertEqual([self.pool.idle_count(ADDRESS, PORT, c) for c in clients], [10, 40, 50])
        self.assertEqual([c.transport.disconnecting for c in bursts[1]], [True] * 10 + [False] * 40)

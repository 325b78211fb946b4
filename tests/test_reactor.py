"""The gateway's reactor (hoodyproxy/reactor.py): epoll dispatch without a log context.

A GatewayReactor is built here but never installed or run: each test drives one poll by
hand on a socket pair.  (That twistd runs on it is in test_process.)
"""

from __future__ import annotations

import errno
import socket

from twisted.internet import error, tcp
from twisted.python import log
from twisted.trial import unittest

from hoodyproxy import reactor as gateway_reactor
from hoodyproxy.reactor import GatewayReactor


class Reader:
    """The least a selectable is: a descriptor, doRead, connectionLost."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.read: list[bytes] = []
        self.lost = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self):
        if self.fail:
            raise ValueError("a protocol bug")
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class GatewayReactorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = GatewayReactor()
        self.addCleanup(self.reactor._poller.close)
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)

    def poll_once(self, reader: Reader) -> None:
        self.reactor.addReader(reader)
        self.b.send(b"ping")
        self.reactor.doIteration(1.0)
        self.reactor.removeAll()

    def test_ready_descriptor_is_read(self):
        """A descriptor with data is read on the next poll."""
        reader = Reader(self.a)
        self.poll_once(reader)
        self.assertEqual(reader.read, [b"ping"])
        self.assertEqual(reader.lost, [])

    def test_exception_in_a_protocol_is_logged_and_disconnects_it(self):
        """What a protocol raises is logged and disconnects that descriptor, as in
        Twisted's own epoll reactor; the reactor goes on."""
        reader = Reader(self.a, fail=True)
        self.poll_once(reader)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(reader.lost), 1)
        self.assertTrue(reader.lost[0].check(ValueError))
        other = Reader(self.b)
        self.reactor.addReader(other)
        self.a.send(b"pong")
        self.reactor.doIteration(1.0)
        self.reactor.removeAll()
        self.assertEqual(other.read, [b"pong"])

    def test_no_log_context_pushed_per_event(self):
        """Dispatching does not go through log.callWithLogger."""
        calls = []
        self.patch(log, "callWithLogger", lambda *a, **k: calls.append(a))
        self.poll_once(Reader(self.a))
        self.assertEqual(calls, [])

    def test_a_reactor_already_installed_is_kept(self):
        """Under a test runner (or twistd --reactor) a reactor is installed already:
        install_unless_chosen leaves it."""
        from twisted.internet import reactor
        self.assertFalse(gateway_reactor.install_unless_chosen())
        from twisted.internet import reactor as after
        self.assertIs(reactor, after)


class Recorder:
    """A protocol keeping what it was given (optionally failing on data)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.data: list[bytes] = []
        self.lost: list = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self.fail:
            raise ValueError("a protocol bug")
        self.data.append(data)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)

    others = 0

    def other(self) -> None:
        self.others += 1


class PlainReadTests(unittest.TestCase):
    """A TCP connection's read done by doPoll itself (as _doReadOrWrite, doRead and
    _dataReceived do it): what the protocol sees and how the connection ends are
    Twisted's; anything with a read of its own goes Twisted's way."""

    def setUp(self) -> None:
        self.reactor = GatewayReactor()
        self.addCleanup(self.reactor._poller.close)
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.a.setblocking(False)
        self.dispatched = []
        original = self.reactor._doReadOrWrite

        def dispatch(selectable, fd, event):
            self.dispatched.append(selectable)
            original(selectable, fd, event)

        self.reactor._doReadOrWrite = dispatch

    def connection(self, kind=tcp.Connection, fail: bool = False):
        protocol = Recorder(fail)
        conn = kind(self.a, protocol, self.reactor)
        protocol.makeConnection(conn)
        self.reactor.addReader(conn)
        self.addCleanup(self.reactor.removeAll)
        return conn, protocol

    def test_read_without_twisteds_dispatch(self):
        conn, protocol = self.connection()
        self.b.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual(protocol.data, [b"ping"])
        self.assertEqual((self.dispatched, protocol.lost), ([], []))
        self.b.send(b"again")
        self.reactor.doIteration(1.0)
        self.assertEqual(protocol.data, [b"ping", b"again"])

    def test_end_of_stream_is_connection_done(self):
        conn, protocol = self.connection()
        self.b.send(b"last")
        self.b.shutdown(socket.SHUT_WR)
        for _ in range(2):
            self.reactor.doIteration(1.0)
        self.assertEqual(protocol.data, [b"last"])
        self.assertEqual(len(protocol.lost), 1)
        self.assertTrue(protocol.lost[0].check(error.ConnectionDone))
        self.assertNotIn(conn, self.reactor.getReaders())

    def test_a_failed_read_is_connection_lost_and_a_spurious_one_nothing(self):
        """recv raising EWOULDBLOCK (readable, then not) changes nothing; any other error
        (a reset met by the read) loses the connection, as doRead says."""
        conn, protocol = self.connection()
        failures = [BlockingIOError(errno.EWOULDBLOCK, "spurious"),
                    ConnectionResetError(errno.ECONNRESET, "reset")]

        class Failing:
            def recv(self, size):
                raise failures.pop(0)

            def __getattr__(self, name):
                return getattr(self_a, name)

        self_a = self.a
        conn.socket = Failing()
        self.b.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual((protocol.data, protocol.lost, len(failures)), ([], [], 1))
        self.assertIn(conn, self.reactor.getReaders())
        self.reactor.doIteration(1.0)
        self.assertEqual((failures, protocol.data, len(protocol.lost)), ([], [], 1))
        self.assertTrue(protocol.lost[0].check(error.ConnectionLost))
        self.assertNotIn(conn, self.reactor.getReaders())

    def test_exception_in_the_protocol_is_logged_and_disconnects_it(self):
        conn, protocol = self.connection(fail=True)
        self.b.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(protocol.lost), 1)
        self.assertTrue(protocol.lost[0].check(ValueError))
        self.assertNotIn(conn, self.reactor.getReaders())

    def test_a_read_of_its_own_goes_twisteds_way(self):
        """An instance whose doRead was replaced (a client still connecting, an aborted
        connection) and a class with another doRead are dispatched by Twisted."""
        conn, protocol = self.connection()
        own = []
        conn.doRead = lambda: own.append(True)
        self.b.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual((own, self.dispatched, protocol.data), ([True], [conn], []))
        conn.doRead = protocol.other  # (a bound method, as a connecting client's doConnect)
        self.reactor.doIteration(1.0)
        self.assertEqual((self.dispatched, protocol.data, protocol.others), ([conn, conn], [], 1))

        class Counting(tcp.Connection):
            reads = 0

            def doRead(self):
                Counting.reads += 1
                return tcp.Connection.doRead(self)

        self.reactor.removeAll()
        del self.dispatched[:]
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.a.setblocking(False)
        self.b.send(b"ping")
        conn, protocol = self.connection(Counting)
        self.reactor.doIteration(1.0)
        self.assertEqual((Counting.reads, self.dispatched, protocol.data), (1, [conn], [b"ping"]))

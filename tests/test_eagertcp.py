"""Eager TCP transports under the gateway's reactor: writes held for a batch of events.

A GatewayReactor is built here but never installed or run: each test accepts real
loopback connections on an eager port bound to it and drives its polls by hand, the
peers being plain blocking sockets.  What a peer reads is what a client or a container
would read.
"""

from __future__ import annotations

import socket

from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.python import failure
from twisted.trial import unittest

from hoodyproxy import eagertcp
from hoodyproxy.reactor import GatewayReactor


class Server(Protocol):
    nudger = False

    def connectionMade(self) -> None:
        self.factory.made.append(self)
        self.lost = []

    def dataReceived(self, data: bytes) -> None:
        if not self.nudger:
            self.factory.on_data(self, data)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


#: What the tests' extra connection sends so that a poll has more than one ready event
#: (a batch: one event alone is dispatched with its writes sent at once).
NUDGE = b"\0"


def readable(sock: socket.socket) -> bytes | None:
    """What ``sock`` can read without waiting (None: nothing yet)."""
    sock.setblocking(False)
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return None
    finally:
        sock.setblocking(True)


class CorkedWritesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = GatewayReactor()
        self.factory = Factory.forProtocol(Server)
        self.factory.made = []
        self.extra = []
        self.factory.on_data = lambda proto, data: None
        self.port = eagertcp.listen_tcp(self.reactor, 0, self.factory, interface="127.0.0.1")
        self.addCleanup(self._close)
        self.peers: list[socket.socket] = []
        (self.nudger,) = self.connect()
        self.extra.append(self.factory.made.pop(0))  # (its protocol: not one the tests look at)
        self.extra[0].nudger = True

    def send(self, peer: socket.socket, data: bytes) -> None:
        """``peer`` sends ``data``, and another connection a byte: one poll, two events."""
        self.nudger.sendall(NUDGE)
        peer.sendall(data)

    def _close(self) -> None:
        for proto in self.factory.made + self.extra:
            if getattr(proto.transport, "socket", None) is not None:
                proto.transport.socket.close()
        for peer in self.peers:
            peer.close()
        self.port.socket.close()
        self.reactor._poller.close()

    def spin(self, done, polls: int = 200) -> None:
        for _ in range(polls):
            if done():
                return
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.05)
        self.fail("the condition was never met")

    def connect(self, n: int = 1) -> list[socket.socket]:
        start = len(self.factory.made)
        peers = []
        for _ in range(n):
            peer = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
            peers.append(peer)
            self.peers.append(peer)
        self.spin(lambda: len(self.factory.made) == start + n)
        return peers

    def write_then(self, peer: socket.socket, data: bytes, then: str) -> None:
        """``peer`` sends a byte (in a batch, see :meth:`send`); the server writes ``data``
        and calls its transport's ``then`` (loseConnection ...) in the same event."""
        def on_data(proto, _):
            proto.transport.write(data)
            getattr(proto.transport, then)()
        self.factory.on_data = on_data
        self.send(peer, b"x")

    def read_all(self, peer: socket.socket, size: int) -> bytes:
        out = b""
        while len(out) < size:
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            out += chunk
        return out

    def test_writes_in_a_batch_arrive_whole_and_in_order_when_it_ends(self):
        """Two writes made while an event is dispatched reach the peer, in order, once the
        batch is done -- not before (both in one send)."""
        (peer,) = self.connect()
        seen_during = []

        def on_data(proto, data):
            proto.transport.write(b"first ")
            proto.transport.write(b"second")
            seen_during.append(readable(peer))
        self.factory.on_data = on_data
        self.send(peer, b"go")
        self.spin(lambda: seen_during)
        self.assertEqual(seen_during, [None])
        self.assertEqual(self.read_all(peer, 12), b"first second")

    def test_one_ready_event_writes_at_once(self):
        """A poll with one ready event (one client, a quiet node) has nothing to send its
        writes with: they go at once, before whatever its handler does next."""
        (peer,) = self.connect()
        seen_during = []

        def on_data(proto, data):
            proto.transport.write(b"answer")
            seen_during.append(readable(peer))
        self.factory.on_data = on_data
        peer.sendall(b"go")
        self.spin(lambda: seen_during)
        self.assertEqual(seen_during, [b"answer"])

    def test_a_write_outside_a_batch_goes_at_once(self):
        """A timer's or another thread's write (no batch running) is sent by write()."""
        (peer,) = self.connect()
        self.factory.made[0].transport.write(b"now")
        self.assertEqual(readable(peer), b"now")

    def test_write_then_close_in_one_batch_delivers_then_closes(self):
        """An answer written and the connection closed in the same event: the peer reads
        the answer, then end of file."""
        (peer,) = self.connect()
        self.write_then(peer, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n", "loseConnection")
        self.spin(lambda: self.factory.made[0].lost)
        self.assertEqual(self.read_all(peer, 1 << 20), b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    def test_write_then_half_close_delivers_then_shuts_down(self):
        """Written, then the write side shut: the peer reads it, then end of file."""
        (peer,) = self.connect()
        self.write_then(peer, b"bye", "loseWriteConnection")
        self.spin(lambda: self.factory.made[0].transport._writeDisconnected)
        self.assertEqual(self.read_all(peer, 1 << 20), b"bye")

    def test_lost_in_the_batch_that_wrote_to_it(self):
        """A connection lost (its peer gone, a read failed) after it was written to in the
        same batch: what was written is still sent if the socket takes it, and nothing
        raises."""
        first, second = self.connect(2)
        a, b = self.factory.made

        def on_data(proto, data):
            b.transport.write(b"for the second")
            b.transport.connectionLost(failure.Failure(error.ConnectionLost()))
        self.factory.on_data = on_data
        self.send(first, b"x")
        self.spin(lambda: b.lost)
        self.assertEqual(self.read_all(second, 1 << 20), b"for the second")
        self.spin(lambda: True)  # the batch's end finds nothing of b's left to send

    def test_abort_drops_what_is_held(self):
        """An abort in the batch that wrote: the bytes held are dropped with the connection,
        as Twisted drops what it has queued (a container connection aborted mid-request
        sends nothing more)."""
        (peer,) = self.connect()
        self.write_then(peer, b"never", "abortConnection")
        self.spin(lambda: self.factory.made[0].lost)
        try:
            got = self.read_all(peer, 1 << 20)
        except ConnectionResetError:
            got = b""
        self.assertEqual(got, b"")

    def test_more_ready_connections_than_a_batch_all_answered(self):
        """More ready events than BATCH in one poll: every connection gets its answer."""
        n = eagertcp.BATCH + 10
        peers = self.connect(n)
        self.factory.on_data = lambda proto, data: proto.transport.write(data.upper())
        for i, peer in enumerate(peers):
            peer.sendall(b"req%d" % i)
        for i, peer in enumerate(peers):
            self.spin(lambda: readable_peek(peer))
            self.assertEqual(peer.recv(100), b"REQ%d" % i)

    def test_a_long_batch_sends_every_batch_events(self):
        """A poll with more ready events than BATCH does not hold the first answers until
        the last event: what the first BATCH wrote is sent before the rest are handled."""
        n = eagertcp.BATCH + 10
        peers = self.connect(n)
        peer_of = {id(proto): peer for proto, peer in zip(self.factory.made, peers)}
        handled, first_answered = [], []

        def on_data(proto, data):
            proto.transport.write(b"answer")
            handled.append(proto)
            if len(handled) == n:
                first_answered.append(readable_peek(peer_of[id(handled[0])]))
        self.factory.on_data = on_data
        for peer in peers:
            peer.sendall(b"x")
        self.spin(lambda: first_answered)
        self.assertEqual(first_answered, [True])

    def test_order_kept_behind_data_the_socket_did_not_take(self):
        """A write held while earlier bytes wait in Twisted's queue (the peer reads slowly)
        arrives after them: the stream is never reordered."""
        (peer,) = self.connect()
        proto = self.factory.made[0]
        big = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than the socket buffers take
        proto.transport.write(big)
        self.assertTrue(proto.transport.dataBuffer or proto.transport._tempDataLen)
        self.factory.on_data = lambda p, data: p.transport.write(b"TAIL")
        self.send(peer, b"x")
        received = bytearray()
        while len(received) < len(big) + 4:
            self.reactor.doIteration(0.01)
            chunk = readable(peer)
            if chunk:
                received += chunk
        self.assertEqual(bytes(received), big + b"TAIL")

    def test_a_held_write_that_does_not_fit_pauses_the_producer(self):
        """Backpressure: a streaming producer is paused when what a batch held does not
        fit in the socket, as it would be for an unheld write."""
        (peer,) = self.connect()
        proto = self.factory.made[0]

        class Producer:
            paused = 0

            def pauseProducing(self):
                self.paused += 1

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass
        producer = Producer()
        proto.transport.registerProducer(producer, True)
        self.factory.on_data = lambda p, data: p.transport.write(b"z" * (8 << 20))
        self.send(peer, b"x")
        self.spin(lambda: producer.paused)
        self.assertEqual(producer.paused, 1)

    def test_a_failure_sending_one_connection_s_writes_spares_the_others(self):
        """What one transport's sending raises (a producer that fails when paused) is
        logged; every other connection written in the batch still gets its bytes."""
        first, second = self.connect(2)
        a, b = self.factory.made

        class Failing:
            def pauseProducing(self):
                raise RuntimeError("a producer bug")

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass
        a.transport.registerProducer(Failing(), True)

        def on_data(proto, data):
            a.transport.write(b"a" * (8 << 20))  # (does not fit: the producer is paused)
            b.transport.write(b"for b")
        self.factory.on_data = on_data
        self.send(first, b"x")
        self.spin(lambda: readable_peek(second))
        self.assertEqual(second.recv(100), b"for b")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def readable_peek(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)

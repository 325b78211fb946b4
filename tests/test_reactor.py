"""The gateway's reactor (hoodyproxy/reactor.py): epoll dispatch without a log context.

A GatewayReactor is built here but never installed or run: each test drives one poll by
hand on a socket pair.  (That twistd runs on it is in test_process.)
"""

from __future__ import annotations

import socket

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

"""Tests for hoodyproxy.upstream.tunnel and the memory an idle tunnel keeps: the relay on
fake transports and a fake clock, and the TLS memory BIOs an idle connection gives back
(:func:`hoodyproxy.tls.context.release_idle_buffers`) on real pyOpenSSL connections."""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hoodyproxy.tls import CertificateStore, ensure_dev_certificates
from hoodyproxy.tls.context import release_idle_buffers
from hoodyproxy.upstream.tunnel import BURST, COUPLE_AFTER, RELEASE_AFTER_BURST, Tunnel
from tests.support import until
from tests.test_gateway import GatewayTestCase, ws_connect

HOST = "svc.node-local.containers.localhost"
_certs: list = []


def server_context() -> SSL.Context:
    """The gateway's own server context (one set of development certificates per run)."""
    if not _certs:
        directory = tempfile.mkdtemp(prefix="hoodyproxy-test-tunnel-")
        atexit.register(shutil.rmtree, directory, True)  # (kept for the whole run, then gone)
        _certs.append(ensure_dev_certificates(directory, "node-local", "containers.localhost"))
    certs = _certs[0]
    return CertificateStore(certs.cert_path, certs.key_path).default_context


def _move(source: SSL.Connection, target: SSL.Connection) -> bool:
    try:
        data = source.bio_read(65536)
    except SSL.WantReadError:
        return False
    target.bio_write(data)
    return True


def handshaken_pair(max_version: int | None = None) -> tuple[SSL.Connection, SSL.Connection]:
    """(server, client) pyOpenSSL connections on memory BIOs, past their handshake."""
    server = SSL.Connection(server_context(), None)
    server.set_accept_state()
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        client_context.set_max_proto_version(max_version)
    client = SSL.Connection(client_context, None)
    client.set_tlsext_host_name(HOST.encode())
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        if not (_move(client, server) | _move(server, client)):
            break
    _talk(client, server, b"ping")  # the client takes the session tickets in
    return server, client


def _talk(sender: SSL.Connection, receiver: SSL.Connection, data: bytes) -> bytes:
    sender.sendall(data)
    while _move(sender, receiver):
        pass
    got = b""
    while len(got) < len(data):
        got += receiver.recv(65536)
    while _move(receiver, sender):  # anything the receiver answers on its own (tickets)
        try:
            sender.recv(65536)
        except SSL.WantReadError:
            pass
    return got


class ReleaseIdleBuffersTests(unittest.TestCase):

    def test_idle_connection_gets_a_new_pair_of_bios(self) -> None:
        """With nothing in flight, both memory BIOs are replaced (the old pair, grown by the
        handshake, is freed by OpenSSL)."""
        server, _ = handshaken_pair()
        into, out = server._into_ssl, server._from_ssl
        self.assertTrue(release_idle_buffers(server))
        self.assertNotEqual(server._into_ssl, into)
        self.assertNotEqual(server._from_ssl, out)

    def test_traffic_flows_both_ways_after_release(self) -> None:
        """The connection carries data in both directions after its BIOs are replaced, and
        after a second replacement."""
        server, client = handshaken_pair()
        self.assertTrue(release_idle_buffers(server))
        self.assertEqual(_talk(client, server, b"from the client"), b"from the client")
        self.assertEqual(_talk(server, client, b"from the server"), b"from the server")
        self.assertTrue(release_idle_buffers(server))
        self.assertEqual(_talk(client, server, b"x" * 40000), b"x" * 40000)
        self.assertEqual(_talk(server, client, b"y" * 40000), b"y" * 40000)

    def test_traffic_flows_after_release_on_tls12(self) -> None:
        """The same on a TLS 1.2 connection (another record layer state)."""
        server, client = handshaken_pair(SSL.TLS1_2_VERSION)
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")
        self.assertTrue(release_idle_buffers(server))
        self.assertEqual(_talk(client, server, b"up" * 10000), b"up" * 10000)
        self.assertEqual(_talk(server, client, b"down" * 10000), b"down" * 10000)

    def test_half_a_record_read_before_the_release_completes_after_it(self) -> None:
        """A record cut in two by the network: OpenSSL holds its first half (the BIO is
        empty, so the release goes ahead) and the second half, in the new BIO, completes it."""
        server, client = handshaken_pair()
        client.sendall(b"split record")
        record = client.bio_read(65536)
        server.bio_write(record[:10])
        with self.assertRaises(SSL.WantReadError):
            server.recv(100)
        self.assertTrue(release_idle_buffers(server))
        server.bio_write(record[10:])
        self.assertEqual(server.recv(100), b"split record")

    def test_bytes_waiting_to_be_read_are_never_dropped(self) -> None:
        """Ciphertext received and not yet decrypted keeps the BIOs in place."""
        server, client = handshaken_pair()
        client.send(b"in flight")
        _move(client, server)
        into = server._into_ssl
        self.assertFalse(release_idle_buffers(server))
        self.assertEqual(server._into_ssl, into)
        self.assertEqual(server.recv(100), b"in flight")

    def test_bytes_waiting_to_be_sent_are_never_dropped(self) -> None:
        """Ciphertext produced and not yet sent keeps the BIOs in place."""
        server, client = handshaken_pair()
        server.send(b"not yet sent")
        out = server._from_ssl
        self.assertFalse(release_idle_buffers(server))
        self.assertEqual(server._from_ssl, out)
        _move(server, client)
        self.assertEqual(client.recv(100), b"not yet sent")

    def test_connection_on_a_socket_is_left_alone(self) -> None:
        """A connection without memory BIOs has nothing to release."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertFalse(release_idle_buffers(SSL.Connection(server_context(), a)))


class FakeTLSTransport(StringTransport):
    """A client transport with a TLS handle, as Twisted's TLS protocol has."""

    def __init__(self, connection: SSL.Connection | None = None) -> None:
        super().__init__()
        self.connection = connection

    def getHandle(self) -> SSL.Connection | None:
        return self.connection


class FakeUpstream:
    """The part of an UpstreamConnection a tunnel uses."""

    listener = None

    def __init__(self) -> None:
        self.transport = StringTransport()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class TunnelTests(unittest.TestCase):

    def make(self, client=None, idle_timeout: float = 60.0):
        self.closes: list = []
        self.clock = Clock()
        self.client = client if client is not None else FakeTLSTransport()
        self.upstream = FakeUpstream()
        tunnel = Tunnel(self.client, self.upstream, self.clock, idle_timeout,
                        lambda up, down, reason: self.closes.append((up, down, reason)))
        return tunnel

    def test_bytes_flow_both_ways_and_are_counted(self) -> None:
        """What each side sent reaches the other, leftovers first; the counts reach on_close."""
        tunnel = self.make()
        tunnel.start(b"early client", b"early container")
        tunnel.client_data(b" more")
        tunnel.upstream_data(b" more")
        self.assertEqual(self.upstream.transport.value(), b"early client more")
        self.assertEqual(self.client.value(), b"early container more")
        tunnel.client_lost()
        self.assertEqual(self.closes, [(17, 20, None)])
        self.assertEqual(tunnel.closed_by, "client")

    def test_idle_tunnel_is_closed(self) -> None:
        """No bytes for the idle timeout: both sides are closed, with the reason."""
        tunnel = self.make(idle_timeout=10)
        tunnel.start(b"", b"")
        self.clock.advance(5)
        tunnel.upstream_data(b"tick")
        self.clock.advance(9)
        self.assertEqual(self.closes, [])
        self.clock.advance(1)
        self.assertEqual(self.closes, [(0, 4, "idle timeout")])
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.upstream.transport.disconnecting)

    def test_quiet_tunnel_registers_no_producers(self) -> None:
        """A tunnel that has relayed little (far below any transport's write buffer) has
        registered neither side as the other's producer: an idle WebSocket keeps no
        producer wrappers."""
        tunnel = self.make()
        tunnel.start(b"hello", b"world")
        tunnel.client_data(b"x" * 100)
        tunnel.upstream_data(b"y" * 100)
        self.assertIsNone(self.client.producer)
        self.assertIsNone(self.upstream.transport.producer)

    def test_busy_tunnel_couples_both_sides_before_the_write(self) -> None:
        """Past COUPLE_AFTER bytes, each side becomes the other's (streaming) producer,
        before the write that crossed the line reaches its transport."""
        tunnel = self.make()
        tunnel.start(b"", b"")
        seen = []
        self.client.write = lambda data: seen.append(self.client.producer)
        tunnel.upstream_data(b"y" * (COUPLE_AFTER + 1))
        self.assertEqual(seen, [self.upstream])
        self.assertIs(self.upstream.transport.producer, self.client)
        self.assertTrue(self.client.streaming and self.upstream.transport.streaming)

    def test_many_small_writes_count_towards_coupling(self) -> None:
        """Small writes count with their record overhead, so a flood of tiny messages
        couples the producers too."""
        tunnel = self.make()
        tunnel.start(b"", b"")
        for _ in range(COUPLE_AFTER // 64 + 1):
            tunnel.client_data(b"z")
        self.assertIs(self.upstream.transport.producer, self.client)

    def test_closed_tunnel_registers_nothing(self) -> None:
        """Bytes still arriving after the tunnel closed never register a producer."""
        tunnel = self.make()
        tunnel.start(b"", b"")
        tunnel.client_lost()
        tunnel.upstream_data(b"y" * (COUPLE_AFTER + 1))
        self.assertIsNone(self.client.producer)

    def test_tunnel_has_no_room_for_other_references(self) -> None:
        """A tunnel is slotted: it keeps what it relays with and nothing else (one per idle
        WebSocket)."""
        tunnel = self.make()
        self.assertFalse(hasattr(tunnel, "__dict__"))
        with self.assertRaises(AttributeError):
            tunnel.request = object()

    def test_start_releases_the_client_tls_buffers(self) -> None:
        """Once the tunnel is up, the client connection's handshake-grown memory BIOs are
        replaced by empty ones."""
        server, _ = handshaken_pair()
        into = server._into_ssl
        self.make(FakeTLSTransport(server)).start(b"", b"")
        self.assertNotEqual(server._into_ssl, into)

    def test_idle_check_releases_the_client_tls_buffers(self) -> None:
        """A tunnel that moved bytes since its last check gives its buffers back when the
        check finds it quiet."""
        server, _ = handshaken_pair()
        tunnel = self.make(FakeTLSTransport(server), idle_timeout=10)
        tunnel.start(b"", b"")
        self.clock.advance(5)
        tunnel.upstream_data(b"tick")
        into = server._into_ssl
        self.clock.advance(5)
        self.assertEqual(self.closes, [])
        self.assertNotEqual(server._into_ssl, into)

    def test_large_write_releases_the_client_tls_buffers_soon_after(self) -> None:
        """A piece of BURST bytes or more grows the TLS buffers: they are given back
        RELEASE_AFTER_BURST seconds later, not an idle timeout later."""
        server, _ = handshaken_pair()
        tunnel = self.make(FakeTLSTransport(server), idle_timeout=3600)
        tunnel.start(b"", b"")
        tunnel.upstream_data(b"y" * BURST)
        into = server._into_ssl
        self.clock.advance(RELEASE_AFTER_BURST)
        self.assertNotEqual(server._into_ssl, into)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the idle check only

    def test_small_writes_schedule_nothing(self) -> None:
        """Small messages (most of a WebSocket's life) add no timer."""
        tunnel = self.make()
        tunnel.start(b"", b"")
        tunnel.client_data(b"z" * (BURST - 1))
        tunnel.upstream_data(b"z" * (BURST - 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_closing_leaves_no_timer(self) -> None:
        """A tunnel that ends cancels its pending idle check and buffer release."""
        tunnel = self.make()
        tunnel.start(b"", b"")
        tunnel.upstream_data(b"y" * BURST)
        tunnel.upstream_end()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disconnecting_client_keeps_its_buffers(self) -> None:
        """A client transport already closing is left as it is."""
        server, _ = handshaken_pair()
        client = FakeTLSTransport(server)
        client.disconnecting = True
        into = server._into_ssl
        self.make(client).start(b"", b"")
        self.assertEqual(server._into_ssl, into)

    def test_client_without_tls_handle(self) -> None:
        """A client transport without a TLS handle (an HTTP/2 stream) relays as before."""
        tunnel = self.make(StringTransport())
        tunnel.start(b"", b"hello")
        self.assertEqual(self.client.value(), b"hello")


class LargeMessagesThroughTheGatewayTests(GatewayTestCase):
    """The producers are coupled mid-flow on real transports (TLS to the client, TCP to the
    container): large messages cross COUPLE_AFTER in both directions."""

    async def test_large_messages_echo_intact(self) -> None:
        """Messages far larger than COUPLE_AFTER go up and come back intact, and the
        tunnel keeps working with small ones after."""
        proto, factory = await ws_connect(self, self.node, self.backend.number)
        big = bytes(range(256)) * (4 * COUPLE_AFTER // 256 * 16)  # 1 MiB
        proto.sendMessage(big, isBinary=True)
        proto.sendMessage(b"after", isBinary=True)
        await until(lambda: len(factory.messages) == 2)
        self.assertEqual(factory.messages[0], big)
        self.assertEqual(factory.messages[1], b"after")

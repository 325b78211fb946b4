"""The HTTPS port's TLS transport (hoodyproxy/tls/transport.py), in memory.

A server GatewayTLSTransport and a client with Twisted's stock TLS transport exchange
real TLS records over StringTransports, pumped by hand, on a fake clock: what the
application receives is exact, a large write leaves in one piece, a record is read with
one ``recv`` (no WantReadError per read), and ``write_now`` sends in the same turn,
after what was aggregated before it.
"""

from __future__ import annotations

import os

from twisted.internet import protocol
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from OpenSSL.SSL import Error as TLSError, WantReadError
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from hoodyproxy.tls import CertificateStore, SNIContextFactory, ensure_dev_certificates
from hoodyproxy.tls import transport as gateway_transport
from hoodyproxy.tls.transport import GatewayTLSFactory, GatewayTLSTransport, tls_factory

NODE, ZONE = "node-us", "containers.example.com"


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


class CountingTransport(StringTransport):
    """A StringTransport that counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class MemoryTLSPair(unittest.TestCase):
    """A server GatewayTLSTransport and a client with Twisted's stock TLS transport, joined
    in memory (:meth:`pump`), handshaken in setUp."""

    #: The protocols the client offers by ALPN (None: no ALPN), and the server.
    client_alpn: list[bytes] | None = None
    server_alpn = (b"http/1.1",)

    def setUp(self, **client_options) -> None:
        directory = self.mktemp()
        certs = ensure_dev_certificates(directory, NODE, ZONE)
        with open(certs.ca_path, "rb") as f:
            ca = Certificate.loadPEM(f.read())
        self.clock = Clock()
        self.server_app, self.client_app = Recorder(), Recorder()
        self.contexts = SNIContextFactory(CertificateStore(certs.cert_path, certs.key_path, self.server_alpn))
        server_factory = GatewayTLSFactory(self.contexts, False, protocol.Factory.forProtocol(lambda: self.server_app),
                                           clock=self.clock)
        options = optionsForClientTLS(f"a.{NODE}.{ZONE}", trustRoot=ca, extraCertificateOptions=client_options,
                                      acceptableProtocols=self.client_alpn)
        client_factory = TLSMemoryBIOFactory(options, True, protocol.Factory.forProtocol(lambda: self.client_app),
                                             clock=self.clock)
        self.server = server_factory.buildProtocol(None)
        self.client = client_factory.buildProtocol(None)
        self.server_wire, self.client_wire = CountingTransport(), CountingTransport()
        self.server.makeConnection(self.server_wire)
        self.client.makeConnection(self.client_wire)
        self.pump()
        self.assertIsInstance(self.server, GatewayTLSTransport)

    def pump(self) -> None:
        """Carry bytes both ways until neither side has anything to send."""
        for _ in range(50):
            self.clock.advance(0)
            to_server, to_client = self.client_wire.value(), self.server_wire.value()
            if not to_server and not to_client:
                return
            self.client_wire.clear()
            self.server_wire.clear()
            if to_server:
                self.server.dataReceived(to_server)
            if to_client:
                self.client.dataReceived(to_client)

    def assert_ended(self, delivered: bytes, reason: type) -> None:
        """The application got ``delivered`` and no more, the server is closing its socket,
        and once the socket is gone the application is told ``reason``."""
        self.assertEqual(bytes(self.server_app.data), delivered)
        self.assertTrue(self.server_wire.disconnecting)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.server_app.lost)
        self.assertTrue(self.server_app.lost.check(reason), self.server_app.lost)


class GatewayTLSTransportTests(MemoryTLSPair):
    def test_bytes_arrive_exactly_both_ways(self):
        """Small and large writes each way arrive whole and in order."""
        request = os.urandom(100) + b"GET / HTTP/1.1\r\n\r\n"
        self.client.write(request)
        self.pump()
        self.assertEqual(bytes(self.server_app.data), request)
        answer = os.urandom(3 * 1024 * 1024 + 17)
        self.server.write(b"head")
        self.server.write(answer)
        self.pump()
        self.assertEqual(bytes(self.client_app.data), b"head" + answer)

    def test_a_large_write_leaves_in_one_piece(self):
        """1 MiB written at once reaches the socket in one write, not one per 16 KiB record."""
        self.pump()
        self.server_wire.writes = 0
        self.server.write(os.urandom(1024 * 1024))
        self.clock.advance(0)
        self.assertEqual(self.server_wire.writes, 1)
        self.pump()
        self.assertEqual(len(self.client_app.data), 1024 * 1024)

    def test_a_record_is_read_with_one_recv(self):
        """Reading one record asks OpenSSL once: no read that can only raise WantReadError."""
        calls = []
        read = gateway_transport._SSL_read

        def counting(ssl, buffer, size):
            calls.append(size)
            return read(ssl, buffer, size)

        self.patch(gateway_transport, "_SSL_read", counting)
        self.client.write(b"one request")
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"one request")
        self.assertEqual(len(calls), 1)

    def test_records_cut_anywhere_arrive_whole(self):
        """Records delivered a few bytes at a time (each piece ending mid-record, where
        OpenSSL wants more) arrive whole and in order; so do several records at once."""
        sent = b""
        for size in (1, 700, 16384, 40000):
            piece = os.urandom(size)
            sent += piece
            self.client.write(piece)
            self.clock.advance(0)
        wire = self.client_wire.value()
        self.client_wire.clear()
        for start in range(0, len(wire), 997):
            self.server.dataReceived(wire[start:start + 997])
        self.assertEqual(bytes(self.server_app.data), sent)
        self.assertIsNone(self.server_app.lost)

    def test_close_notify_ends_the_connection_cleanly(self):
        """The client's TLS close ends the application's connection as done, after its bytes."""
        self.client.write(b"last words")
        self.client.loseConnection()
        self.clock.advance(0)
        self.server.dataReceived(self.client_wire.value())
        self.assert_ended(b"last words", ConnectionDone)

    def test_a_corrupt_record_loses_the_connection_with_the_tls_error(self):
        """A record whose bytes were changed on the way delivers nothing: the connection
        is lost with OpenSSL's error, and the application sees that error."""
        self.client.write(b"secret request")
        self.clock.advance(0)
        wire = bytearray(self.client_wire.value())
        self.client_wire.clear()
        wire[-3] ^= 0x01  # (in the record's authentication tag)
        self.server.dataReceived(bytes(wire))
        self.assert_ended(b"", TLSError)

    def test_a_client_renegotiation_is_refused(self):
        """A TLS 1.2 client that asks to renegotiate after a request (a way to make the
        server do a full handshake's work again and again) gets no new handshake: the
        connection ends, and nothing it sends afterwards reaches the application."""
        self.setUp(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        connection = self.client._tlsConnection
        self.assertEqual(connection.get_protocol_version_name(), "TLSv1.2")
        self.client.write(b"first")
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"first")
        self.assertTrue(connection.renegotiate())
        with self.assertRaises(WantReadError):
            connection.do_handshake()
        self.client._flushSendBIO()
        self.pump()
        self.client.write(b"after")
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"first")
        self.assertEqual(self.server._tlsConnection.total_renegotiations(), 0)
        self.assertTrue(self.server_wire.disconnecting)

    def test_write_now_sends_in_the_same_turn_after_what_was_aggregated(self):
        """write_now sends at once, after the bytes the small-write aggregation held."""
        self.server.write(b"first;")
        self.assertEqual(self.server_wire.value(), b"")  # (held for the next turn)
        self.server.write_now(b"second")
        self.assertNotEqual(self.server_wire.value(), b"")
        to_client = self.server_wire.value()
        self.server_wire.clear()
        self.client.dataReceived(to_client)
        self.assertEqual(bytes(self.client_app.data), b"first;second")

    def test_factory_is_the_gateway_transport_here(self):
        """With this Twisted and pyOpenSSL, tls_factory gives the gateway's transport."""
        factory = tls_factory(self.contexts, False, protocol.Factory.forProtocol(Recorder))
        self.assertIs(factory.protocol, GatewayTLSTransport)

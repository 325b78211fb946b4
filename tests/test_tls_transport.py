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
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from hoodyproxy.tls import CertificateStore, SNIContextFactory, ensure_dev_certificates
from hoodyproxy.tls.transport import GatewayTLSFactory, GatewayTLSTransport, tls_factory

NODE, ZONE = "node-us", "containers.example.com"


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class CountingTransport(StringTransport):
    """A StringTransport that counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class GatewayTLSTransportTests(unittest.TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        certs = ensure_dev_certificates(directory, NODE, ZONE)
        with open(certs.ca_path, "rb") as f:
            ca = Certificate.loadPEM(f.read())
        self.clock = Clock()
        self.server_app, self.client_app = Recorder(), Recorder()
        self.contexts = SNIContextFactory(CertificateStore(certs.cert_path, certs.key_path))
        server_factory = GatewayTLSFactory(self.contexts, False, protocol.Factory.forProtocol(lambda: self.server_app),
                                           clock=self.clock)
        client_factory = TLSMemoryBIOFactory(optionsForClientTLS(f"a.{NODE}.{ZONE}", trustRoot=ca), True,
                                             protocol.Factory.forProtocol(lambda: self.client_app), clock=self.clock)
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
        """Reading one record asks OpenSSL once: no recv that can only raise WantReadError."""
        connection = self.server._tlsConnection
        calls = []
        recv = connection.recv

        def counting(size):
            calls.append(size)
            return recv(size)

        connection.recv = counting
        self.client.write(b"one request")
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"one request")
        self.assertEqual(len(calls), 1)

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

"""A TLS 1.3 connection that gives its OpenSSL object up (hoodyproxy/tls/records.py), in memory.

The server is the gateway's GatewayTLSTransport; the client is Twisted's stock TLS
transport on pyOpenSSL, or, where a test needs records no library would send (padding, a
KeyUpdate, a tampered tag, an unprotected record), a hand-driven :class:`RecordLayer13`
with the connection's own secrets and sequence numbers, the directions swapped: it seals
what the client would and opens what the server sent.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import shutil
import socket
import weakref

from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from OpenSSL.SSL import Error as TLSError, WantReadError
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import TLSVersion, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from hoodyproxy.tls.records import (ALERT, APPLICATION_DATA, HANDSHAKE, KEY_UPDATE, SUITES, RecordLayer13,
                                    expand_label, note_secret, plain_records, record_count, secrets_of)
from hoodyproxy.tls import CertificateStore, SNIContextFactory, ensure_dev_certificates
from hoodyproxy.tls.transport import GatewayTLSFactory, GatewayTLSTransport, ShedTLSTransport
from tests.support import host_for, raw_backend, register, until
from tests.test_gateway import GatewayTestCase, ws_connect
from tests.test_tls_transport import NODE, ZONE, MemoryTLSPair, Recorder


class _Client(RecordLayer13):
    """The client's side of the records, by hand: its write direction is the client's
    traffic secret, its read direction the server's."""

    def seal(self, content_type: int, data: bytes, padding: int = 0) -> bytes:
        """One record of ``data`` (``padding`` zero bytes after its content type)."""
        direction = self._write
        inner = data + bytes((content_type,)) + b"\x00" * padding
        header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
        return header + direction.aead.encrypt(direction.nonce(), inner, header)

    def opened(self, wire: bytes) -> bytes:
        """What the server sent, opened (application data; KeyUpdates taken)."""
        self.bio_write(wire)
        data = b""
        while True:
            try:
                data += self.recv(1 << 20)
            except WantReadError:
                return data

    def key_update(self, requested: bool) -> bytes:
        """A KeyUpdate record; the client's sending key changes after it."""
        record = self.seal(HANDSHAKE, bytes((KEY_UPDATE, 0, 0, 1, 1 if requested else 0)))
        hash_type = self._suite[0]
        self._write.rekey(self._suite, expand_label(hash_type, self._write.secret, b"traffic upd",
                                                    hash_type.digest_size))
        return record


class ShedTests(MemoryTLSPair):
    """A TLS 1.3 connection carries on after shed_openssl as it did before."""

    def shed(self) -> None:
        """Shed the server's OpenSSL object (asserting it goes), and build the hand-driven
        client's side from what the connection had agreed."""
        handle = self.server.getHandle()
        suite = handle.get_cipher_name()
        client_secret, server_secret = secrets_of(handle)
        gone = weakref.ref(handle)
        del handle
        self.assertTrue(self.server.shed_openssl())
        self.assertIsInstance(self.server, ShedTLSTransport)
        layer = self.server.getHandle()
        self.assertIsInstance(layer, RecordLayer13)
        gc.collect()
        self.assertIsNone(gone(), "the OpenSSL connection is still referenced")
        self.hand = _Client(suite, server_secret, client_secret, read_seq=layer._write.seq,
                            write_seq=layer._read.seq)

    def to_server(self, wire: bytes) -> None:
        self.server.dataReceived(wire)
        self.clock.advance(0)

    def from_server(self) -> bytes:
        self.clock.advance(0)
        wire = self.server_wire.value()
        self.server_wire.clear()
        return wire

    def test_the_suite_is_tls13(self):
        """The pair negotiates TLS 1.3 with a suite the record layer knows."""
        self.assertIn(self.server.getHandle().get_cipher_name(), SUITES)

    def test_a_shed_connection_carries_on_both_ways(self):
        """Before and after: what the client sends arrives exactly, large writes included,
        and what the server sends reaches the stock client, which never notices."""
        self.client.write(b"GET /socket HTTP/1.1\r\n\r\n")
        self.pump()
        self.server.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.pump()
        self.shed()
        up, down = os.urandom(100_000), os.urandom(3 * 1024 * 1024 + 17)
        self.client.write(b"frame")
        self.client.write(up)
        self.server.write(b"answer")
        self.server.write(down)
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"GET /socket HTTP/1.1\r\n\r\n" + b"frame" + up)
        self.assertEqual(bytes(self.client_app.data), b"HTTP/1.1 101 Switching Protocols\r\n\r\nanswer" + down)

    def test_a_close_notify_each_way_ends_it_cleanly(self):
        """The client's close_notify: the server answers with its own and closes; the
        application's connection ends as done, after the client's last bytes."""
        self.shed()
        self.client.write(b"last words")
        self.client.loseConnection()
        self.pump()
        self.assertTrue(self.client_wire.disconnecting)  # (it had the server's close_notify)
        self.assert_ended(b"last words", ConnectionDone)

    def test_the_server_closing_sends_close_notify(self):
        self.shed()
        self.server.write(b"bye")
        self.server.loseConnection()
        self.pump()
        self.assertTrue(self.client_wire.disconnecting)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(bytes(self.client_app.data), b"bye")
        self.assertTrue(self.client_app.lost.check(ConnectionDone), self.client_app.lost)

    def test_the_stream_ending_without_close_notify_is_a_lost_connection(self):
        """A truncation (the socket closed with no close_notify) is not a clean end."""
        self.shed()
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.server_app.lost.check(ConnectionLost), self.server_app.lost)

    def test_padding_and_empty_records_are_taken(self):
        """Records with padding, and empty application data records, as RFC 8446 5.4 allows."""
        self.shed()
        self.to_server(self.hand.seal(APPLICATION_DATA, b"one", padding=200)
                       + self.hand.seal(APPLICATION_DATA, b"")
                       + self.hand.seal(APPLICATION_DATA, b"two", padding=1))
        self.assertEqual(bytes(self.server_app.data), b"onetwo")

    def test_a_requested_key_update_is_answered_and_both_keys_change(self):
        self.shed()
        self.to_server(self.hand.key_update(requested=True) + self.hand.seal(APPLICATION_DATA, b"after"))
        self.assertEqual(bytes(self.server_app.data), b"after")
        self.server.write(b"reply")
        # The server's KeyUpdate, then "reply" under its next key: the hand opens both.
        self.assertEqual(self.hand.opened(self.from_server()), b"reply")
        self.assertIsNone(self.server_app.lost)

    def test_an_unrequested_key_update_changes_only_the_read_key(self):
        self.shed()
        self.to_server(self.hand.key_update(requested=False) + self.hand.seal(APPLICATION_DATA, b"x"))
        self.server.write(b"y")
        self.assertEqual(self.hand.opened(self.from_server()), b"y")
        self.assertEqual(bytes(self.server_app.data), b"x")

    def assert_refused(self, wire: bytes, alert: int) -> None:
        """``wire`` ends the connection: nothing of it reaches the application, which is
        told of a failure, and the client gets a fatal ``alert``."""
        self.server_app.data.clear()
        self.to_server(wire)
        with self.assertRaises(TLSError) as raised:
            self.hand.opened(self.from_server())
        self.assertIn("alert %d" % alert, str(raised.exception))
        self.assert_ended(b"", TLSError)

    def test_a_tampered_record_is_refused(self):
        self.shed()
        record = bytearray(self.hand.seal(APPLICATION_DATA, b"GET /admin"))
        record[-1] ^= 1
        self.assert_refused(bytes(record), 20)

    def test_a_record_at_the_wrong_sequence_number_is_refused(self):
        """A record replayed (its sequence number is past) does not authenticate."""
        self.shed()
        first = self.hand.seal(APPLICATION_DATA, b"once")
        self.to_server(first)
        self.assertEqual(bytes(self.server_app.data), b"once")
        self.assert_refused(first, 20)

    def test_an_unprotected_record_is_refused(self):
        """After the handshake every record is protected: a plaintext change_cipher_spec,
        alert or application data is the end."""
        for wire in (b"\x14\x03\x03\x00\x01\x01", b"\x15\x03\x03\x00\x02\x01\x00",
                     b"\x16\x03\x03\x00\x05\x18\x00\x00\x01\x00"):
            with self.subTest(wire=wire):
                self.setUp()
                self.shed()
                self.assert_refused(wire, 10)

    def test_a_record_too_long_is_refused(self):
        self.shed()
        self.assert_refused(b"\x17\x03\x03" + (16384 + 257).to_bytes(2, "big") + b"\x00" * 100, 22)

    def test_plaintext_over_two_to_the_fourteen_is_refused(self):
        self.shed()
        self.assert_refused(self.hand.seal(APPLICATION_DATA, b"a" * 16385), 22)

    def test_other_post_handshake_messages_are_refused(self):
        """A client's NewSessionTicket, a KeyUpdate cut across records or followed by more
        in its record, a protected change_cipher_spec, a record of no content type."""
        cases = {
            "ticket": self_seal(HANDSHAKE, bytes((4, 0, 0, 4)) + b"abcd"),
            "cut key update": lambda hand: hand.seal(HANDSHAKE, bytes((KEY_UPDATE, 0, 0))),
            "two key updates": self_seal(HANDSHAKE, bytes((KEY_UPDATE, 0, 0, 1, 0)) * 2),
            "bad request flag": self_seal(HANDSHAKE, bytes((KEY_UPDATE, 0, 0, 1, 2))),
            "protected ccs": self_seal(20, b"\x01"),
            "all padding": lambda hand: hand.seal(0, b"", padding=3),
        }
        expected = {"bad request flag": 47}
        for name, make in cases.items():
            with self.subTest(case=name):
                self.setUp()
                self.shed()
                self.assert_refused(make(self.hand), expected.get(name, 10))

    def test_a_fatal_alert_from_the_client_ends_it(self):
        self.shed()
        self.to_server(self.hand.seal(ALERT, b"\x02\x28"))
        self.assertEqual(self.from_server(), b"")  # (no alert is sent back)
        self.assert_ended(b"", TLSError)

    def test_records_cut_anywhere_arrive_whole(self):
        self.shed()
        sent = b"".join(os.urandom(n) for n in (1, 700, 16384))
        wire = b"".join(self.hand.seal(APPLICATION_DATA, sent[i:i + 5000]) for i in range(0, len(sent), 5000))
        for start in range(0, len(wire), 7):
            self.server.dataReceived(wire[start:start + 7])
        self.assertEqual(bytes(self.server_app.data), sent)


def self_seal(content_type: int, data: bytes):
    return lambda hand: hand.seal(content_type, data)


class WhenNotShedTests(MemoryTLSPair):
    """What keeps its OpenSSL object: shed_openssl says False and changes nothing."""

    def test_a_record_in_part_waits_for_its_end(self):
        self.client.write(b"x" * 5000)
        self.clock.advance(0)
        wire = self.client_wire.value()
        self.client_wire.clear()
        self.server.dataReceived(wire[:100])
        self.assertFalse(self.server.shed_openssl())
        self.server.dataReceived(wire[100:])
        self.assertTrue(self.server.shed_openssl())
        self.assertEqual(bytes(self.server_app.data), b"x" * 5000)
        self.client.write(b"more")
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"x" * 5000 + b"more")

    def test_after_a_record_it_cannot_account_for(self):
        """A padded record (or a KeyUpdate) read by OpenSSL: the plaintext is not what the
        records' sizes say, so the connection keeps OpenSSL, and works on."""
        handle = self.server.getHandle()
        suite, (client_secret, server_secret) = handle.get_cipher_name(), secrets_of(handle)
        hand = _Client(suite, server_secret, client_secret, read_seq=0, write_seq=0)
        self.server.dataReceived(hand.seal(APPLICATION_DATA, b"padded", padding=10))
        self.assertEqual(bytes(self.server_app.data), b"padded")
        self.assertFalse(self.server.shed_openssl())
        self.assertIs(type(self.server), GatewayTLSTransport)
        self.server.dataReceived(hand.seal(APPLICATION_DATA, b" and on"))
        self.assertEqual(bytes(self.server_app.data), b"padded and on")


def _with_extension(hello: bytes, kind: int, body: bytes) -> bytes:
    """``hello`` (a ClientHello record) with one more extension, every length mended."""
    position = 9 + 2 + 32
    position += 1 + hello[position]
    position += 2 + (hello[position] << 8 | hello[position + 1])
    position += 1 + hello[position]
    extensions = hello[position + 2:] + kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    message = hello[9:position] + len(extensions).to_bytes(2, "big") + extensions
    record = b"\x01" + len(message).to_bytes(3, "big") + message
    return hello[:3] + len(record).to_bytes(2, "big") + record


class ClientHelloTests(MemoryTLSPair):
    """What a client asks for in its ClientHello decides whether its records can be shed."""

    def hello(self) -> bytes:
        """A real ClientHello record (a fresh stock client's first flight)."""
        client = TLSMemoryBIOFactory(optionsForClientTLS(f"a.{NODE}.{ZONE}"), True,
                                     protocol.Factory.forProtocol(protocol.Protocol)).buildProtocol(None)
        wire = StringTransport()
        client.makeConnection(wire)
        return wire.value()

    def test_a_usual_client_hello_leaves_records_plain(self):
        self.assertTrue(plain_records(self.hello()))
        self.assertTrue(plain_records(_with_extension(self.hello(), 0xfe0d, b"x" * 200)))

    def test_max_fragment_length_is_seen(self):
        """A client that asks for 512-byte records (OpenSSL honours it, the record layer
        would not know): never shed."""
        self.assertFalse(plain_records(_with_extension(self.hello(), 1, b"\x01")))

    def test_a_client_hello_cut_or_malformed_is_not_read(self):
        hello = self.hello()
        across = hello[:3] + (len(hello) - 5 - 10).to_bytes(2, "big") + hello[5:]  # (continued in a next record)
        for cut in (hello[:4], hello[:60], hello[:-1], b"", None, b"\x17" + hello[1:], across):
            with self.subTest(size=len(cut or b"")):
                self.assertFalse(plain_records(cut))


class ResumedSessionTests(unittest.TestCase):
    """A session resumed from a ticket (as a browser's second connection is): one
    ticket's fewer records as the handshake ends, and the counts still hold."""

    def setUp(self) -> None:
        certs = ensure_dev_certificates(self.mktemp(), NODE, ZONE)
        self.contexts = SNIContextFactory(CertificateStore(certs.cert_path, certs.key_path))
        self.client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.client_context.set_min_proto_version(SSL.TLS1_3_VERSION)
        self.client_context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)

    def connect(self, session=None):
        """A pyOpenSSL client and a server GatewayTLSTransport, handshaken in memory, one
        request each way: (client, server, the server's application, pump)."""
        clock, app = Clock(), Recorder()
        server = GatewayTLSFactory(self.contexts, False, protocol.Factory.forProtocol(lambda: app),
                                   clock=clock).buildProtocol(None)
        wire = StringTransport()
        server.makeConnection(wire)
        client = SSL.Connection(self.client_context, None)
        client.set_connect_state()
        client.set_tlsext_host_name(f"a.{NODE}.{ZONE}".encode())
        if session is not None:
            client.set_session(session)

        def pump() -> bytes:
            """Carry bytes both ways until both are quiet: what the client read."""
            received = b""
            for _ in range(20):
                try:
                    client.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    out = client.bio_read(1 << 20)
                except SSL.WantReadError:
                    out = b""
                if out:
                    server.dataReceived(out)
                clock.advance(0)
                back = wire.value()
                wire.clear()
                if back:
                    client.bio_write(back)
                while True:
                    try:
                        received += client.recv(65536)
                    except SSL.WantReadError:
                        break
                if not out and not back:
                    break
            return received

        pump()
        client.send(b"GET /ws")
        pump()
        server.write(b"101")
        self.assertEqual(pump(), b"101")
        self.assertEqual(bytes(app.data), b"GET /ws")
        return client, server, app, pump

    def test_a_resumed_session_is_shed_and_carries_on(self):
        first = self.connect()[0]
        client, server, app, pump = self.connect(first.get_session())
        self.assertTrue(_lib.SSL_session_reused(client._ssl))
        self.assertTrue(server.shed_openssl())
        self.assertIsInstance(server, ShedTLSTransport)
        client.send(b" frame")
        server.write(b"answer")
        self.assertEqual(pump(), b"answer")
        self.assertEqual(bytes(app.data), b"GET /ws frame")


class TLS12Tests(MemoryTLSPair):
    def setUp(self) -> None:
        super().setUp(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)

    def test_tls12_keeps_openssl(self):
        self.assertEqual(self.server.getHandle().get_protocol_version_name(), "TLSv1.2")
        self.assertFalse(self.server.shed_openssl())
        self.client.write(b"still")
        self.pump()
        self.assertEqual(bytes(self.server_app.data), b"still")


class HTTP2Tests(MemoryTLSPair):
    client_alpn = server_alpn = [b"h2", b"http/1.1"]

    def test_http2_keeps_openssl(self):
        """An HTTP/2 connection never becomes a tunnel: its records are not even counted."""
        self.assertEqual(self.server.negotiatedProtocol, b"h2")
        self.assertFalse(self.server.shed_openssl())
        self.assertIsNone(secrets_of(self.server.getHandle()))  # (nor its keys kept)



# -- live, through a gateway ---------------------------------------------------------------


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _naive_upgrade_echo(connection, data: bytes) -> None:
    """A container stand-in as small servers are: answer the first upgrade with 101, then
    echo every byte back as it comes."""
    if getattr(connection, "upgraded", False):
        connection.transport.write(data)
        return
    if b"\r\n\r\n" not in connection.received:
        return
    head, _, rest = connection.received.partition(b"\r\n\r\n")
    key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
           if line.lower().startswith(b"sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    connection.upgraded = True
    connection.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + rest)


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


class ThroughTheGatewayTests(GatewayTestCase):
    """A WebSocket over TLS 1.3 through a live gateway gives its OpenSSL object up when its
    tunnel starts, and real clients carry on over it."""

    def client_transports(self) -> list:
        return [tunnel.client for tunnel in self.node.gateway.tunnels]

    async def test_an_autobahn_websocket_is_shed_and_echoes(self):
        """Twisted's own TLS client under autobahn: the tunnel's client side is shed, small
        and 1 MiB messages echo intact both ways, and the close handshake completes."""
        proto, factory = await ws_connect(self, self.node, self.backend.number)
        await until(lambda: len(self.client_transports()) == 1)
        transport = self.client_transports()[0]
        self.assertIsInstance(transport, ShedTLSTransport)
        self.assertIsInstance(transport.getHandle(), RecordLayer13)
        big = os.urandom(1024 * 1024)
        proto.sendMessage(b"hello")
        proto.sendMessage(big, isBinary=True)
        proto.sendMessage(b"after", isBinary=True)
        await until(lambda: len(factory.messages) == 3)
        self.assertEqual(factory.messages, [b"hello", big, b"after"])
        proto.sendClose(1000)
        self.assertEqual((await factory.closed)[1], 1000)

    async def s_client(self, *options: str):
        """``openssl s_client`` through the gateway to a naive upgrade-and-echo container,
        upgraded: (process, what it printed so far, the container's side)."""
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("the openssl command is not installed")
        port, backend = raw_backend(self, _naive_upgrade_echo)
        register(self.node, port)
        host = host_for(index=port)
        client = _Collect()
        process = reactor.spawnProcess(
            client, shutil.which("openssl"),
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.node.https_port}", "-servername", host,
             "-CAfile", self.node.ca_path, "-alpn", "http/1.1", "-tls1_3", "-crlf", *options], env={})
        self.addCleanup(lambda: None if client.ended.called else process.signalProcess("KILL"))
        process.write(("GET /ws HTTP/1.1\nHost: %s\nConnection: Upgrade\nUpgrade: websocket\n"
                       "Sec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n\n" % host).encode())
        await until(lambda: b"101 Switching Protocols" in client.out)
        await until(lambda: len(self.client_transports()) == 1)
        return process, client, backend

    async def test_openssl_s_client_key_updates_over_a_shed_connection(self):
        """OpenSSL's own client (s_client) upgrades, then asks for a KeyUpdate (``K``): the
        gateway answers with its own and both sides change keys; what is sent after comes
        back through the container, and ``Q`` (close_notify) ends it cleanly."""
        process, client, backend = await self.s_client()
        self.assertIsInstance(self.client_transports()[0], ShedTLSTransport)
        process.write(b"before the update\n")
        await until(lambda: client.out.count(b"before the update") == 1)
        process.write(b"K\n")
        await until(lambda: b"KEYUPDATE" in client.out)
        process.write(b"after the update\n")
        await until(lambda: b"after the update" in client.out)
        self.assertEqual(backend.connections[0].received.count(b"after the update\r\n"), 1)
        process.write(b"Q\n")
        self.assertEqual(await client.ended, 0)
        await until(lambda: not self.node.gateway.tunnels)

    async def test_a_client_asking_for_small_records_keeps_openssl(self):
        """s_client asking for 512-byte records (max_fragment_length): the connection keeps
        OpenSSL, which honours it, so a long line comes back in records the client takes."""
        process, client, backend = await self.s_client("-maxfraglen", "512")
        transport = self.client_transports()[0]
        self.assertIs(type(transport), GatewayTLSTransport)
        self.assertFalse(transport.shed_openssl())
        self.assertIsNone(secrets_of(transport.getHandle()))  # (nor its keys kept)
        line = b"y" * 3000
        process.write(line + b"\n")
        await until(lambda: client.out.count(line) == 1)
        process.write(b"Q\n")
        self.assertEqual(await client.ended, 0)


class _RawTLS13Client:
    """A blocking TLS 1.3 client on a real socket (pyOpenSSL over memory BIOs) that keeps
    its traffic secrets and counts the records each way after its handshake, so that it
    can go on with a hand-driven record layer: sending what no library would."""

    def __init__(self, port: int, host: str, ca_path: str) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.load_verify_locations(ca_path)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        context.set_alpn_protos([b"http/1.1"])
        context.set_keylog_callback(note_secret)
        self.tls = SSL.Connection(context, None)
        self.tls.set_connect_state()
        self.tls.set_tlsext_host_name(host.encode())
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.records_in = self.records_out = 0
        while True:
            try:
                self.tls.do_handshake()
                break
            except SSL.WantReadError:
                self._flush()
                self.tls.bio_write(self.sock.recv(65536))
        self._flush()
        self.hand: _Client | None = None

    def _flush(self, count: bool = False) -> None:
        try:
            data = self.tls.bio_read(1 << 20)
        except SSL.WantReadError:
            return
        if count:
            self.records_out += record_count(data)
        self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        """Through OpenSSL (before going by hand)."""
        self.tls.send(data)
        self._flush(count=True)

    def read_until(self, marker: bytes) -> bytes:
        """Through OpenSSL: what arrives until ``marker`` (whole records, counted)."""
        got, wire = b"", b""
        while marker not in got:
            wire += self.sock.recv(65536)
            whole = 0
            while whole + 5 <= len(wire) and whole + 5 + (wire[whole + 3] << 8 | wire[whole + 4]) <= len(wire):
                whole += 5 + (wire[whole + 3] << 8 | wire[whole + 4])
            if not whole:
                continue
            self.records_in += record_count(wire[:whole])
            self.tls.bio_write(wire[:whole])
            wire = wire[whole:]
            while True:
                try:
                    got += self.tls.recv(65536)
                except SSL.WantReadError:
                    break
        assert not wire
        return got

    def by_hand(self) -> None:
        """Go on with a hand-driven record layer from the counts so far."""
        client_secret, server_secret = secrets_of(self.tls)
        self.hand = _Client(self.tls.get_cipher_name(), server_secret, client_secret,
                            read_seq=self.records_in, write_seq=self.records_out)

    def read_by_hand(self) -> bytes:
        """What arrives next (by hand); b"" once the gateway closes."""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return b""
            got = self.hand.opened(data)
            if got:
                return got

    def close(self) -> None:
        self.sock.close()


class LiveAttackTests(GatewayTestCase):
    """Attacks on a shed connection over a real socket, a naive container behind it."""

    async def test_a_tampered_record_after_the_shed_reaches_no_container(self):
        """After the upgrade (the connection shed), one good record, then one whose tag
        has a bit flipped: the gateway ends the connection with bad_record_mac, and the
        container (which echoes whatever comes) saw exactly the good one."""
        port, backend = raw_backend(self, _naive_upgrade_echo)
        register(self.node, port)
        host = host_for(index=port)

        def attack() -> tuple[bytes, bytes]:
            client = _RawTLS13Client(self.node.https_port, host, self.node.ca_path)
            try:
                client.send(b"GET /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                            % host.encode())
                client.read_until(b"\r\n\r\n")
                client.by_hand()
                client.sock.sendall(client.hand.seal(APPLICATION_DATA, b"first;"))
                echoed = client.read_by_hand()
                kinds = blockingCallFromThread(
                    reactor, lambda: [type(tunnel.client) for tunnel in self.node.gateway.tunnels])
                record = bytearray(client.hand.seal(APPLICATION_DATA, b"second;"))
                record[-2] ^= 0x10
                client.sock.sendall(bytes(record))
                try:
                    client.read_by_hand()
                    ended = b"no alert"
                except TLSError as error:
                    ended = str(error).encode()
                return echoed, kinds, ended
            finally:
                client.close()

        echoed, kinds, ended = await deferToThread(attack)
        self.assertEqual(kinds, [ShedTLSTransport])
        self.assertEqual(echoed, b"first;")
        self.assertIn(b"alert 20", ended)
        await until(lambda: len(backend.lost) == 1)
        self.assertEqual(backend.connections[0].received.partition(b"\r\n\r\n")[2], b"first;")

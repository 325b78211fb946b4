"""Tests for hoodyproxy.tls: development certificates, SNI selection, ALPN and reload."""

from __future__ import annotations

import os
import socket
import ssl
import stat
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.trial import unittest
from zope.interface import implementer

from hoodyproxy.tls import (
    CertificateStore,
    SNIContextFactory,
    ensure_dev_certificates,
    listen_tls,
    write_atomic,
)
from hoodyproxy.tls import devca
from hoodyproxy.tls.context import CIPHERS

NODE, ZONE = "node-local", "containers.localhost"
DOMAIN = f"{NODE}.{ZONE}"
SPECIAL = f"special.{DOMAIN}"


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_chain(path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(read(path))


def self_signed(directory: str, hostname: str, stem: str) -> tuple[str, str]:
    """Write a self-signed certificate for ``hostname``; return (cert_path, key_path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, f"{stem}.pem")
    key_path = os.path.join(directory, f"{stem}-key.pem")
    write_atomic(key_path, devca._key_pem(key), 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class DevCATests(unittest.TestCase):
    """ensure_dev_certificates and write_atomic."""

    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "certs")

    def test_generation_creates_files_with_modes(self) -> None:
        """A first call creates a 0700 directory, 0600 keys and 0644 certificates."""
        result = ensure_dev_certificates(self.dir, NODE, ZONE)
        self.assertTrue(result.generated)

        def mode(name: str) -> int:
            return stat.S_IMODE(os.stat(os.path.join(self.dir, name)).st_mode)

        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        self.assertEqual(mode("ca-key.pem"), 0o600)
        self.assertEqual(mode("wildcard-key.pem"), 0o600)
        self.assertEqual(mode("ca.pem"), 0o644)
        self.assertEqual(mode("wildcard.pem"), 0o644)
        self.assertEqual(result.ca_path, os.path.join(self.dir, "ca.pem"))
        self.assertEqual(result.cert_path, os.path.join(self.dir, "wildcard.pem"))
        self.assertEqual(result.key_path, os.path.join(self.dir, "wildcard-key.pem"))
        self.assertEqual(
            sorted(os.listdir(self.dir)),
            ["ca-key.pem", "ca.pem", "wildcard-key.pem", "wildcard.pem"],
        )

    def test_second_call_reuses_files(self) -> None:
        """A second call with the same arguments writes nothing and reports generated=False."""
        ensure_dev_certificates(self.dir, NODE, ZONE)
        before = {n: read(os.path.join(self.dir, n)) for n in os.listdir(self.dir)}
        result = ensure_dev_certificates(self.dir, NODE, ZONE)
        after = {n: read(os.path.join(self.dir, n)) for n in os.listdir(self.dir)}
        self.assertFalse(result.generated)
        self.assertEqual(before, after)

    def test_ca_properties(self) -> None:
        """The CA is a critical CA:TRUE EC P-256 certificate for signing certificates."""
        ensure_dev_certificates(self.dir, NODE, ZONE)
        ca = load_chain(os.path.join(self.dir, "ca.pem"))[0]
        cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, f"hoodyproxy local CA ({DOMAIN})")
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign and ku.crl_sign)
        self.assertIsInstance(ca.public_key().curve, ec.SECP256R1)
        self.assertGreaterEqual(ca.not_valid_after_utc - ca.not_valid_before_utc, timedelta(3650))

    def test_leaf_verifies_and_has_sans(self) -> None:
        """The leaf is signed by the CA, names the wildcard and base domain, and is server-only."""
        result = ensure_dev_certificates(self.dir, NODE, ZONE)
        leaf, chain_ca = load_chain(result.cert_path)
        ca = load_chain(result.ca_path)[0]
        self.assertEqual(der(chain_ca), der(ca))
        leaf.verify_directly_issued_by(ca)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), [f"*.{DOMAIN}", DOMAIN])
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(leaf.not_valid_after_utc - leaf.not_valid_before_utc, timedelta(397))
        self.assertLess(leaf.not_valid_before_utc, datetime.now(timezone.utc) - timedelta(minutes=30))
        key = serialization.load_pem_private_key(read(result.key_path), None)
        self.assertEqual(key.public_key(), leaf.public_key())

    def test_new_domain_regenerates_leaf_keeps_ca(self) -> None:
        """Changing node or zone issues a new leaf from the existing CA."""
        first = ensure_dev_certificates(self.dir, NODE, ZONE)
        ca_before, leaf_before = read(first.ca_path), read(first.cert_path)
        second = ensure_dev_certificates(self.dir, "other-node", ZONE)
        self.assertTrue(second.generated)
        self.assertEqual(read(second.ca_path), ca_before)
        self.assertNotEqual(read(second.cert_path), leaf_before)
        leaf = load_chain(second.cert_path)[0]
        leaf.verify_directly_issued_by(load_chain(second.ca_path)[0])
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(f"*.other-node.{ZONE}", sans.get_values_for_type(x509.DNSName))

    def test_expiring_leaf_is_renewed(self) -> None:
        """A leaf expiring within 30 days is replaced by a fresh one; the CA is kept."""
        first = ensure_dev_certificates(self.dir, NODE, ZONE)
        ca_cert = load_chain(first.ca_path)[0]
        ca_key = serialization.load_pem_private_key(read(os.path.join(self.dir, "ca-key.pem")), None)
        old_now = datetime.now(timezone.utc) - timedelta(days=380)
        old_leaf, old_key = devca._make_leaf(ca_cert, ca_key, DOMAIN, old_now)
        write_atomic(first.key_path, devca._key_pem(old_key), 0o600)
        write_atomic(
            first.cert_path,
            old_leaf.public_bytes(serialization.Encoding.PEM) + read(first.ca_path),
        )
        ca_bytes = read(first.ca_path)
        result = ensure_dev_certificates(self.dir, NODE, ZONE)
        self.assertTrue(result.generated)
        self.assertEqual(read(result.ca_path), ca_bytes)
        leaf = load_chain(result.cert_path)[0]
        self.assertGreater(leaf.not_valid_after_utc, datetime.now(timezone.utc) + timedelta(390))

    def test_write_atomic_replaces_with_mode(self) -> None:
        """write_atomic replaces content, applies the mode and leaves no temporary file."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "file")
        write_atomic(path, b"one")
        write_atomic(path, b"two", mode=0o600)
        self.assertEqual(read(path), b"two")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.dir), ["file"])


class CertificateStoreTests(unittest.TestCase):
    """CertificateStore name matching and reload, without the network."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.certs = ensure_dev_certificates(self.dir, NODE, ZONE)
        self.store = CertificateStore(self.certs.cert_path, self.certs.key_path)
        cert, key = self_signed(self.dir, SPECIAL, "special")
        self.store.add([SPECIAL], cert, key)
        self.special = self.store.select(SPECIAL.encode())

    def test_exact_name_beats_wildcard(self) -> None:
        """An exact-name certificate is chosen over a wildcard covering the same name."""
        cert, key = self_signed(self.dir, f"*.{DOMAIN}", "wild")
        self.store.add([f"*.{DOMAIN}"], cert, key)
        wild = self.store.select(f"foo.{DOMAIN}".encode())
        self.assertIsNot(wild, self.store.default_context)
        self.assertIs(self.store.select(SPECIAL.encode()), self.special)
        self.assertIsNot(self.special, wild)

    def test_wildcard_matches_exactly_one_label(self) -> None:
        """``*.example.com`` matches ``a.example.com`` but not deeper names or the apex."""
        cert, key = self_signed(self.dir, "*.example.com", "example")
        self.store.add(["*.example.com"], cert, key)
        wild = self.store.select(b"a.example.com")
        self.assertIsNot(wild, self.store.default_context)
        self.assertIs(self.store.select(b"a.b.example.com"), self.store.default_context)
        self.assertIs(self.store.select(b"example.com"), self.store.default_context)

    def test_case_and_trailing_dot_ignored(self) -> None:
        """Names match case-insensitively and regardless of a trailing dot."""
        self.assertIs(self.store.select(SPECIAL.upper().encode() + b"."), self.special)
        self.assertIs(self.store.select(SPECIAL.upper() + "."), self.special)

    def test_unknown_or_missing_name_gets_default(self) -> None:
        """Unknown names and a missing SNI name both select the default context."""
        self.assertIs(self.store.select(b"nowhere.example"), self.store.default_context)
        self.assertIs(self.store.select(None), self.store.default_context)
        self.assertIsNot(self.special, self.store.default_context)

    def test_remove(self) -> None:
        """After remove(), the name falls back to the default; removing again returns False."""
        self.assertTrue(self.store.remove(SPECIAL))
        self.assertIs(self.store.select(SPECIAL.encode()), self.store.default_context)
        self.assertFalse(self.store.remove(SPECIAL))

    def test_invalid_patterns_rejected(self) -> None:
        """Partial or misplaced wildcards and empty labels are refused."""
        cert, key = self.certs.cert_path, self.certs.key_path
        for bad in ["f*.example.com", "a.*.example.com", "*.com", "*", "a..b", ""]:
            self.assertRaises(ValueError, self.store.add, [bad], cert, key)

    def test_add_with_mismatched_key_fails(self) -> None:
        """add() raises when the key does not belong to the certificate."""
        cert, _ = self_signed(self.dir, "x.example", "x")
        self.assertRaises(SSL.Error, self.store.add, ["x.example"], cert, self.certs.key_path)

    def test_reload_unchanged_does_nothing(self) -> None:
        """reload_if_changed() returns False and keeps contexts when no file changed."""
        default = self.store.default_context
        self.assertFalse(self.store.reload_if_changed())
        self.assertIs(self.store.default_context, default)

    def test_reload_picks_up_replaced_certificate(self) -> None:
        """A replaced certificate file is loaded into a new context."""
        self_signed(self.dir, SPECIAL, "special")  # same paths, new content
        self.assertTrue(self.store.reload_if_changed())
        self.assertIsNot(self.store.select(SPECIAL.encode()), self.special)
        self.assertFalse(self.store.reload_if_changed())

    def test_reload_keeps_old_context_on_garbage(self) -> None:
        """A garbage replacement is logged as an error and the previous context stays."""
        write_atomic(os.path.join(self.dir, "special.pem"), b"garbage")
        with capturedLogs() as events:
            self.assertFalse(self.store.reload_if_changed())
        self.assertIs(self.store.select(SPECIAL.encode()), self.special)
        self.assertEqual(len(self.flushLoggedErrors(SSL.Error)), 1)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["cert_path"], os.path.join(self.dir, "special.pem"))


class _Hello(protocol.Protocol):
    """Server side: say hello and hang up; report when the connection is gone."""

    def connectionMade(self) -> None:
        self.transport.write(b"hello")
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback(None)


@implementer(IHandshakeListener)
class _Client(protocol.Protocol):
    """Client side: record the handshake outcome and everything received."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()
        self.peer: bytes | None = None
        self.alpn: bytes | None = None

    def handshakeCompleted(self) -> None:
        self.alpn = self.transport.negotiatedProtocol
        self.peer = self.transport.getPeerCertificate().to_cryptography()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        if reason.check(SSL.Error, VerificationError):
            self.done.errback(reason)
        else:
            self.done.callback(self)


class LoopbackTLSTests(unittest.TestCase):
    """Real TLS handshakes against SNIContextFactory on 127.0.0.1."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.certs = ensure_dev_certificates(self.dir, NODE, ZONE)
        self.ca = Certificate.loadPEM(read(self.certs.ca_path))
        self.store = CertificateStore(self.certs.cert_path, self.certs.key_path)
        self.server = protocol.Factory.forProtocol(_Hello)
        self.server.closed = defer.Deferred()
        port = listen_tls(reactor, 0, self.server, SNIContextFactory(self.store), "127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    async def connect(self, hostname: str, trust: Certificate | None = None, alpn=None) -> _Client:
        """Connect with Twisted's verifying client; wait for the server side to close too."""
        options = optionsForClientTLS(hostname, trustRoot=trust or self.ca, acceptableProtocols=alpn)
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        client = _Client()
        await endpoints.wrapClientTLS(options, tcp).connect(
            protocol.Factory.forProtocol(lambda: client)
        )
        try:
            return await client.done
        finally:
            await self.server.closed

    def leaf_der(self) -> bytes:
        return der(load_chain(self.certs.cert_path)[0])

    async def test_wildcard_name_verifies(self) -> None:
        """A name under the wildcard completes a verified handshake and gets the data."""
        client = await self.connect(f"foo.{DOMAIN}")
        self.assertEqual(client.data, b"hello")
        self.assertEqual(der(client.peer), self.leaf_der())

    async def test_uncovered_name_fails_verification(self) -> None:
        """A name the wildcard does not cover fails hostname verification."""
        with self.assertRaises(VerificationError):
            await self.connect(f"a.b.{DOMAIN}")

    async def test_exact_name_certificate_served(self) -> None:
        """SNI for an added exact name gets that certificate rather than the wildcard."""
        cert, key = self_signed(self.dir, SPECIAL, "special")
        self.store.add([SPECIAL], cert, key)
        client = await self.connect(SPECIAL, trust=Certificate.loadPEM(read(cert)))
        self.assertEqual(client.data, b"hello")
        self.assertEqual(der(client.peer), der(load_chain(cert)[0]))

    async def fetch_stdlib(self, max_version: ssl.TLSVersion | None = None):
        """Connect with Python's ssl module (no SNI, no verification) in a thread.

        Returns (peer certificate DER, TLS version, cipher name, data received)."""

        def fetch() -> tuple[bytes, str, str, bytes]:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if max_version is not None:
                ctx.maximum_version = max_version
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                with ctx.wrap_socket(sock, server_hostname=None) as tls:
                    peer, data = tls.getpeercert(binary_form=True), b""
                    version, cipher = tls.version(), tls.cipher()[0]
                    while chunk := tls.recv(1024):
                        data += chunk
            return peer, version, cipher, data

        try:
            return await deferToThread(fetch)
        finally:
            await self.server.closed

    async def test_client_without_sni_gets_default(self) -> None:
        """A client that sends no SNI is served the default certificate."""
        cert, key = self_signed(self.dir, SPECIAL, "special")
        self.store.add([SPECIAL], cert, key)
        peer, _, _, data = await self.fetch_stdlib()
        self.assertEqual(data, b"hello")
        self.assertEqual(peer, self.leaf_der())

    async def test_tls12_client_gets_ecdhe_aead_suite(self) -> None:
        """A TLS 1.2-only client negotiates an ECDHE AEAD suite from the server's list."""
        _, version, cipher, data = await self.fetch_stdlib(ssl.TLSVersion.TLSv1_2)
        self.assertEqual(version, "TLSv1.2")
        self.assertIn(cipher.encode(), CIPHERS.split(b":"))
        self.assertTrue(cipher.startswith("ECDHE-ECDSA-"))
        self.assertEqual(data, b"hello")

    async def test_alpn_selects_http11(self) -> None:
        """ALPN negotiates http/1.1 when the client offers it among others."""
        client = await self.connect(f"foo.{DOMAIN}", alpn=[b"h2", b"http/1.1"])
        self.assertEqual(client.alpn, b"http/1.1")

    async def test_alpn_no_overlap_still_connects(self) -> None:
        """Without a common ALPN protocol the handshake succeeds with none selected."""
        client = await self.connect(f"foo.{DOMAIN}", alpn=[b"h2"])
        self.assertIsNone(client.alpn)
        self.assertEqual(client.data, b"hello")

    async def test_reloaded_certificate_is_served(self) -> None:
        """After a reload, new connections get the replaced default certificate."""
        other = ensure_dev_certificates(os.path.join(self.dir, "new"), NODE, ZONE)
        write_atomic(self.certs.key_path, read(other.key_path), 0o600)
        write_atomic(self.certs.cert_path, read(other.cert_path))
        self.assertTrue(self.store.reload_if_changed())
        client = await self.connect(f"foo.{DOMAIN}", trust=Certificate.loadPEM(read(other.ca_path)))
        self.assertEqual(der(client.peer), der(load_chain(other.cert_path)[0]))

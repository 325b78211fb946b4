"""Specification of custom-domain certificates: ACME issuance, SNI serving, renewal, outages.

The integration tests run the real pieces against a real ACME server (Debian's pebble,
:mod:`tests.pebble`): a TLS listener with the SNI :class:`CertificateStore`, the
plain-HTTP listener with its HTTP-01 responder, an :class:`AliasStore`, an
:class:`AcmeIssuer` and a :class:`CertificateManager`.  What is served is checked with
a real TLS client that trusts pebble's root only.  Unit tests drive the challenge
responders, the TLS-ALPN-01 certificate and the manager's timing on fakes and a clock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hoodyproxy.aliases import AliasStore
from hoodyproxy.directory import open_database
from hoodyproxy.frontend.redirect import RedirectToHTTPS
from hoodyproxy.tls import CertificateStore, SNIContextFactory, ensure_dev_certificates, listen_tls
from hoodyproxy.tls.acme import AcmeIssuer, ICertificateIssuer, IssuanceError, NotAllowed, certificate_paths
from hoodyproxy.tls.challenges import (ACME_IDENTIFIER_OID, HTTP01Responder, TLSALPN01Responder,
                                       challenge_certificate)
from hoodyproxy.tls.manager import CertificateManager, CnameVerifier
from tests.pebble import Pebble, require_pebble
from tests.support import until, wait

NODE, ZONE = "node-local", "containers.localhost"
CID = "890abcdef12345678901cdef"
DOMAIN = "api.yourcompany.com"


def temp_dir(case, prefix="hoodyproxy-acme-") -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    case.addCleanup(shutil.rmtree, path, True)
    return path


def handshake(port: int, server_name: str | None, alpn: list[str] | None = None,
              root_pem: bytes | None = None, tls_version=None) -> tuple[x509.Certificate, str | None]:
    """Connect to 127.0.0.1:``port`` with SNI ``server_name``: (leaf served, ALPN chosen).

    With ``root_pem`` the chain and the hostname are verified against that root only.
    """
    if root_pem is not None:
        context = ssl.create_default_context(cadata=root_pem.decode())
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls_version is not None:
        context.minimum_version = context.maximum_version = tls_version
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            return x509.load_der_x509_certificate(der), tls.selected_alpn_protocol()


def dns_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


class Node:
    """The node's TLS and plain-HTTP listeners, stores and certificate machinery."""

    def __init__(self, case, data_dir: str | None = None) -> None:
        self.case = case
        self.data_dir = data_dir or temp_dir(case)
        dev = ensure_dev_certificates(os.path.join(self.data_dir, "tls"), NODE, ZONE)
        self.http01 = HTTP01Responder()
        self.tlsalpn01 = TLSALPN01Responder()
        self.store = CertificateStore(dev.cert_path, dev.key_path, challenges=self.tlsalpn01)
        site = Site(_Hello())
        site.log = lambda request: None
        self.tls = listen_tls(reactor, 0, site, SNIContextFactory(self.store), interface="127.0.0.1")
        case.addCleanup(self.tls.stopListening)
        self.tls_port = self.tls.getHost().port
        plain = Site(RedirectToHTTPS(self.tls_port, http01=self.http01))
        plain.log = lambda request: None
        self.http = reactor.listenTCP(0, plain, interface="127.0.0.1")
        case.addCleanup(self.http.stopListening)
        self.http_port = self.http.getHost().port
        self.aliases = AliasStore(open_database(os.path.join(self.data_dir, "hoodyproxy.db")), node=NODE, zone=ZONE)
        self.manager = None

    def issuer(self, pebble: Pebble, challenge: str = "http-01") -> AcmeIssuer:
        return AcmeIssuer(pebble.directory_url, self.data_dir, is_allowed=self.aliases.is_attached,
                          challenge=challenge, email="ops@yourcompany.com", ca_bundle=pebble.ca_bundle,
                          http01=self.http01, tlsalpn01=self.tlsalpn01)

    def start_manager(self, issuer, **kw) -> CertificateManager:
        manager = CertificateManager(self.store, self.aliases, issuer, self.data_dir, **kw)
        for name, value in kw.pop("attributes", {}).items():
            setattr(manager, name, value)
        manager.startService()
        self.case.addCleanup(lambda: manager.stopService() if manager.running else None)
        self.manager = manager
        return manager

    def attach(self, domain: str = DOMAIN, alias: str = "my-api") -> None:
        if self.aliases.get(alias) is None:
            self.aliases.create(alias, CID, "http", 3000)
        self.aliases.attach(alias, domain)

    def served(self, domain: str | None, **kw) -> defer.Deferred:
        return deferToThread(handshake, self.tls_port, domain, **kw)


class PebbleTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        require_pebble()
        self.node = Node(self)

    async def pebble(self, **kw) -> Pebble:
        return await Pebble(self, self.node.http_port, self.node.tls_port, **kw).start()

    async def issued(self, domain: str = DOMAIN, timeout: float = 30.0) -> x509.Certificate:
        """Wait until the manager has a certificate for ``domain``; the stored leaf."""
        try:
            await until(lambda: (self.node.manager.status(domain) or {}).get("status") == "valid",
                        timeout=timeout)
        except AssertionError:
            self.fail(f"no certificate for {domain}: {self.node.manager.status(domain)}")
        cert_path, _ = certificate_paths(self.node.data_dir, domain)
        with open(cert_path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())[0]


class IssuanceTests(PebbleTestCase):
    async def test_http01_issued_and_served_by_sni(self):
        """Attach a domain: a certificate is issued by HTTP-01 and served for it by SNI.

        The served chain verifies against pebble's root for the domain's name; a client
        without SNI and another name still get the node's wildcard.
        """
        pebble = await self.pebble()
        self.node.start_manager(self.node.issuer(pebble, "http-01"))
        started = reactor.seconds()
        self.node.attach()
        stored = await self.issued()
        self.assertLess(reactor.seconds() - started, 15, "issued within seconds")
        served, _ = await self.node.served(DOMAIN, root_pem=pebble.root_pem())
        self.assertEqual(served, stored)
        self.assertEqual(dns_names(served), [DOMAIN])
        wildcard, _ = await self.node.served(None)
        self.assertIn(f"*.{NODE}.{ZONE}", dns_names(wildcard))
        other, _ = await self.node.served(f"x.{NODE}.{ZONE}")
        self.assertEqual(other, wildcard)
        self.assertEqual(len(self.node.http01), 0, "challenges are removed after issuance")

    async def test_tls_alpn01_issued_and_served_by_sni(self):
        """With challenge = tls-alpn-01 the certificate is issued through the TLS port."""
        pebble = await self.pebble()
        answered = []
        for responder in (self.node.tlsalpn01, self.node.http01):
            def add(*args, _add=responder.add, _kind=type(responder).__name__):
                answered.append(_kind)
                return _add(*args)
            responder.add = add
        self.node.start_manager(self.node.issuer(pebble, "tls-alpn-01"))
        self.node.attach()
        stored = await self.issued()
        served, alpn = await self.node.served(DOMAIN, root_pem=pebble.root_pem(), alpn=["h2", "http/1.1"])
        self.assertEqual((served, alpn), (stored, "http/1.1"))
        self.assertEqual(answered, ["TLSALPN01Responder"])
        self.assertFalse(self.node.tlsalpn01.pending(DOMAIN))

    async def test_files_and_modes(self):
        """Account key and certificate key are 0600; the account is recorded; chain + key match."""
        pebble = await self.pebble()
        self.node.start_manager(self.node.issuer(pebble))
        self.node.attach()
        stored = await self.issued()
        cert_path, key_path = certificate_paths(self.node.data_dir, DOMAIN)
        account_key = os.path.join(self.node.data_dir, "acme", "account.key")
        for path in (key_path, account_key, os.path.join(self.node.data_dir, "acme", "account.json")):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        self.assertEqual(key.public_key(), stored.public_key())
        with open(cert_path, "rb") as f:
            self.assertGreaterEqual(len(x509.load_pem_x509_certificates(f.read())), 2, "leaf and intermediate")

    async def test_not_attached_no_acme_request(self):
        """issue() for a domain attached to no alias fails at once: no connection to the ACME
        server, nothing stored (not even the account key)."""
        pebble = await self.pebble()
        issuer = self.node.issuer(pebble)
        with self.assertRaises(NotAllowed):
            await issuer.issue("evil.example.com")
        self.node.attach("good.example.com")
        self.node.aliases.detach("good.example.com")
        with self.assertRaises(NotAllowed):
            await issuer.issue("good.example.com")
        self.assertEqual((pebble.connections, issuer.requests), (0, 0))
        self.assertFalse(os.path.exists(os.path.join(self.node.data_dir, "acme")))
        self.assertFalse(os.path.exists(os.path.join(self.node.data_dir, "certs")))

    async def test_sni_for_unattached_domain_requests_nothing(self):
        """A handshake naming a domain nobody attached gets the wildcard and causes no ACME
        traffic (there is no on-demand issuance)."""
        pebble = await self.pebble()
        self.node.start_manager(self.node.issuer(pebble))
        served, _ = await self.node.served("evil.example.com")
        self.assertIn(f"*.{NODE}.{ZONE}", dns_names(served))
        await wait(0.3)
        self.assertEqual(pebble.connections, 0)
        self.assertEqual(self.node.manager.managed(), [])

    async def test_detach_stops_serving(self):
        """Detaching a domain stops serving its certificate (the files stay on disk)."""
        pebble = await self.pebble()
        self.node.start_manager(self.node.issuer(pebble))
        self.node.attach()
        stored = await self.issued()
        self.node.aliases.detach(DOMAIN)
        served, _ = await self.node.served(DOMAIN)
        self.assertNotEqual(served, stored)
        self.assertIsNone(self.node.manager.status(DOMAIN))
        self.assertTrue(os.path.exists(certificate_paths(self.node.data_dir, DOMAIN)[0]))

    async def test_cname_verified_first(self):
        """With a CNAME verifier, a domain that is not a CNAME to its alias is not requested;
        once it is, the certificate is issued."""
        pebble = await self.pebble()
        from twisted.names import client
        resolver = client.Resolver(servers=[("127.0.0.1", pebble.dns_port)])
        manager = self.node.start_manager(self.node.issuer(pebble), cname=CnameVerifier(resolver))
        manager.backoff_base, manager.backoff_max = 0.2, 0.5
        self.node.attach()
        await until(lambda: (manager.status(DOMAIN) or {}).get("failures", 0) >= 1, timeout=20)
        self.assertIn("CNAME", manager.status(DOMAIN)["last_error"])
        self.assertEqual(pebble.connections, 0)
        await deferToThread(pebble.set_cname, DOMAIN, f"my-api.{NODE}.{ZONE}")
        await self.issued()


class RenewalTests(PebbleTestCase):
    async def test_short_lived_certificate_is_renewed(self):
        """A certificate valid 9 s is renewed at two-thirds of its life and the new one served."""
        pebble = await self.pebble(validity=9)
        self.node.start_manager(self.node.issuer(pebble))
        self.node.attach()
        first = await self.issued()
        life = (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds()
        self.assertLess(life, 15)
        root = pebble.root_pem()

        await until(lambda: self._serial() != first.serial_number, timeout=30)
        await until(lambda: self.node.manager.status(DOMAIN)["status"] == "valid", timeout=10)
        second, _ = await self.node.served(DOMAIN, root_pem=root)
        self.assertNotEqual(second.serial_number, first.serial_number)
        self.assertGreater(second.not_valid_after_utc, first.not_valid_after_utc)

    def _serial(self) -> int:
        with open(certificate_paths(self.node.data_dir, DOMAIN)[0], "rb") as f:
            return x509.load_pem_x509_certificates(f.read())[0].serial_number


class OutageTests(PebbleTestCase):
    async def test_pebble_stopped_certificates_still_served(self):
        """With the ACME server down, a restarted manager serves every stored certificate,
        and a domain it cannot issue for is retried with backoff."""
        pebble = await self.pebble()
        self.node.start_manager(self.node.issuer(pebble))
        self.node.attach()
        stored = await self.issued()
        root = pebble.root_pem()
        pebble.stop_pebble()
        await self.node.manager.stopService()

        # A restart: fresh TLS listener and store, same data directory.
        restarted = Node(self, data_dir=self.node.data_dir)
        self.node = restarted
        manager = restarted.start_manager(restarted.issuer(pebble))
        manager.backoff_base, manager.backoff_max = 0.2, 1.0
        served, _ = await restarted.served(DOMAIN, root_pem=root)
        self.assertEqual(served, stored)
        restarted.attach("new.yourcompany.com")
        await until(lambda: (manager.status("new.yourcompany.com") or {}).get("failures", 0) >= 2, timeout=30)
        status = manager.status("new.yourcompany.com")
        self.assertEqual(status["status"], "failed")
        self.assertTrue(status["last_error"])
        served, _ = await restarted.served(DOMAIN, root_pem=root)
        self.assertEqual(served, stored)

    async def test_renewal_failure_keeps_serving(self):
        """A renewal that fails (server down) keeps the certificate held in service."""
        pebble = await self.pebble(validity=6)
        manager = self.node.start_manager(self.node.issuer(pebble))
        manager.backoff_base, manager.backoff_max = 0.2, 0.5
        self.node.attach()
        stored = await self.issued()
        pebble.stop_pebble()
        await until(lambda: (manager.status(DOMAIN) or {}).get("failures", 0) >= 1, timeout=20)
        self.assertEqual(manager.status(DOMAIN)["status"], "valid")
        served, _ = await self.node.served(DOMAIN)
        self.assertEqual(served, stored)


# -- unit tests: no ACME server --------------------------------------------------------------

class HTTP01Tests(unittest.TestCase):
    """The plain-HTTP listener answers challenges and redirects everything else."""

    def render(self, resource, path: bytes, host: bytes = DOMAIN.encode(), method: bytes = b"GET"):
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        request.path = request.uri = path
        request.method = method
        request.requestHeaders.setRawHeaders(b"host", [host])
        body = resource.render(request)
        return request.responseCode or 200, body, request

    def test_token_answered_in_clear(self):
        responder = HTTP01Responder()
        responder.add(DOMAIN, "tok_EN-1", "tok_EN-1.thumb")
        resource = RedirectToHTTPS(8443, http01=responder)
        code, body, request = self.render(resource, b"/.well-known/acme-challenge/tok_EN-1")
        self.assertEqual((code, body), (200, b"tok_EN-1.thumb"))

    def test_unknown_token_is_404(self):
        resource = RedirectToHTTPS(8443, http01=HTTP01Responder())
        code, _, _ = self.render(resource, b"/.well-known/acme-challenge/nope")
        self.assertEqual(code, 404)

    def test_token_for_another_host_is_404(self):
        responder = HTTP01Responder()
        responder.add(DOMAIN, "tok", "tok.thumb")
        code, _, _ = self.render(RedirectToHTTPS(8443, http01=responder), b"/.well-known/acme-challenge/tok",
                                 host=b"other.example.com")
        self.assertEqual(code, 404)

    def test_everything_else_redirects(self):
        responder = HTTP01Responder()
        responder.add(DOMAIN, "tok", "tok.thumb")
        resource = RedirectToHTTPS(8443, http01=responder)
        for path, method in ((b"/", b"GET"), (b"/.well-known/acme-challenge/tok", b"POST"),
                             (b"/.well-known/other", b"GET")):
            code, _, request = self.render(resource, path, method=method)
            self.assertEqual(code, 308, path)
            self.assertEqual(request.responseHeaders.getRawHeaders(b"location"),
                             [b"https://" + DOMAIN.encode() + b":8443" + path])

    def test_removed_token_is_404(self):
        responder = HTTP01Responder()
        responder.add(DOMAIN, "tok", "tok.thumb")
        responder.remove("tok")
        code, _, _ = self.render(RedirectToHTTPS(8443, http01=responder), b"/.well-known/acme-challenge/tok")
        self.assertEqual(code, 404)

    def test_bad_token_refused(self):
        self.assertRaises(ValueError, HTTP01Responder().add, DOMAIN, "../x", "y")


class TLSALPN01Tests(unittest.TestCase):
    """The acme-tls/1 certificate and its selection at ALPN time."""

    def test_certificate_shape(self):
        """One dNSName SAN, and the critical acmeIdentifier: DER OCTET STRING of SHA-256(keyAuth)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = challenge_certificate("API.example.com", "token.thumb", key)
        self.assertEqual(dns_names(cert), ["api.example.com"])
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        self.assertTrue(ext.critical)
        self.assertEqual(ext.value.value, b"\x04\x20" + hashlib.sha256(b"token.thumb").digest())
        self.assertEqual(cert.public_key(), key.public_key())

    async def test_served_only_to_acme_tls_clients(self):
        """With a challenge pending, acme-tls/1 clients get the challenge certificate and the
        protocol; ordinary clients (TLS 1.2 and 1.3) get the ordinary certificate."""
        node = Node(self)
        node.tlsalpn01.add("pending.example.com", "tok.thumb")
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            cert, alpn = await node.served("pending.example.com", alpn=["acme-tls/1"], tls_version=version)
            self.assertEqual(alpn, "acme-tls/1")
            self.assertEqual(dns_names(cert), ["pending.example.com"])
            self.assertTrue(cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical)
            cert, alpn = await node.served("pending.example.com", alpn=["h2", "http/1.1"], tls_version=version)
            self.assertEqual(alpn, "http/1.1")
            self.assertIn(f"*.{NODE}.{ZONE}", dns_names(cert))

    async def test_no_pending_challenge_no_acme_tls(self):
        """acme-tls/1 is never selected for a name without a pending challenge."""
        node = Node(self)
        node.tlsalpn01.add("pending.example.com", "tok.thumb")
        node.tlsalpn01.remove("pending.example.com")
        cert, alpn = await node.served("pending.example.com", alpn=["acme-tls/1"])
        self.assertIsNone(alpn)
        self.assertIn(f"*.{NODE}.{ZONE}", dns_names(cert))


@implementer(ICertificateIssuer)
class FakeIssuer:
    """Records issue() calls; a test fires them."""

    def __init__(self):
        self.calls: list[tuple[str, defer.Deferred]] = []

    def issue(self, domain):
        d = defer.Deferred()
        self.calls.append((domain, d))
        return d


class ManagerTimingTests(unittest.TestCase):
    """The manager's decisions on a fake clock and a fake issuer."""

    def setUp(self):
        self.data_dir = temp_dir(self)
        dev = ensure_dev_certificates(os.path.join(self.data_dir, "tls"), NODE, ZONE)
        self.dev = dev
        self.store = CertificateStore(dev.cert_path, dev.key_path)
        self.aliases = AliasStore(open_database(os.path.join(self.data_dir, "db")), node=NODE, zone=ZONE)
        self.clock = Clock()
        self.issuer = FakeIssuer()
        self.manager = CertificateManager(self.store, self.aliases, self.issuer, self.data_dir,
                                          reactor=self.clock, jitter=lambda: 1.0)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def write_certificate(self, domain: str, not_before: float, not_after: float) -> tuple[str, str]:
        """A self-signed certificate for ``domain`` stored where the issuer would put it."""
        from datetime import datetime, timezone

        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        from hoodyproxy.tls.devca import write_atomic
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(datetime.fromtimestamp(not_before, timezone.utc))
                .not_valid_after(datetime.fromtimestamp(not_after, timezone.utc))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
                .sign(key, hashes.SHA256()))
        cert_path, key_path = certificate_paths(self.data_dir, domain)
        os.makedirs(os.path.dirname(cert_path), exist_ok=True)
        write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), 0o600)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def attach(self, domain=DOMAIN):
        if self.aliases.get("my-api") is None:
            self.aliases.create("my-api", CID, "http", 3000)
        self.aliases.attach("my-api", domain)

    def test_interface(self):
        self.assertTrue(verifyObject(ICertificateIssuer, FakeIssuer()))
        issuer = AcmeIssuer("https://acme.invalid/dir", self.data_dir, is_allowed=lambda d: False,
                            http01=HTTP01Responder())
        self.assertTrue(verifyObject(ICertificateIssuer, issuer))

    def test_attach_issues_at_once(self):
        self.attach()
        self.clock.advance(0)
        self.assertEqual([c[0] for c in self.issuer.calls], [DOMAIN])
        self.assertEqual(self.manager.status(DOMAIN)["status"], "issuing")

    def test_renewal_at_two_thirds(self):
        """A stored certificate is loaded and renewed at two-thirds of its lifetime."""
        now = self.clock.seconds()
        self.clock.advance(1_000_000)
        now = self.clock.seconds()
        cert_path, key_path = self.write_certificate(DOMAIN, now - 100, now + 200)
        self.attach()
        self.assertEqual(self.store.paths(DOMAIN), (cert_path, key_path))
        self.assertEqual(self.manager.status(DOMAIN)["status"], "valid")
        self.clock.advance(99)
        self.assertEqual(self.issuer.calls, [])
        self.clock.advance(2)
        self.assertEqual([c[0] for c in self.issuer.calls], [DOMAIN])

    def test_backoff_doubles_to_the_cap(self):
        """Failures are retried after 1 min, 2, 4... capped at 1 h (jitter at its top here)."""
        self.attach()
        self.clock.advance(0)
        delays = []
        for _ in range(9):
            domain, d = self.issuer.calls[-1]
            started = self.clock.seconds()
            d.errback(IssuanceError("server down"))
            count = len(self.issuer.calls)
            while len(self.issuer.calls) == count:
                self.clock.advance(1)
            delays.append(round(self.clock.seconds() - started))
        self.assertEqual(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600])
        self.assertEqual(self.manager.status(DOMAIN)["failures"], 9)

    def test_jitter_is_in_the_upper_half(self):
        self.manager.jitter = lambda: 0.0
        self.assertEqual(self.manager.backoff(1), 30.0)
        self.assertEqual(self.manager.backoff(20), 1800.0)

    def test_detach_cancels_and_stops_serving(self):
        now = self.clock.seconds()
        self.write_certificate(DOMAIN, now - 10, now + 1000)
        self.attach()
        self.assertIsNotNone(self.store.paths(DOMAIN))
        self.aliases.detach(DOMAIN)
        self.assertIsNone(self.store.paths(DOMAIN))
        self.assertIsNone(self.manager.status(DOMAIN))
        self.clock.advance(10_000)
        self.assertEqual(self.issuer.calls, [])

    def test_result_after_detach_is_dropped(self):
        """An issuance that finishes after its domain was detached is not served."""
        self.attach()
        self.clock.advance(0)
        _, d = self.issuer.calls[0]
        self.aliases.detach(DOMAIN)
        now = self.clock.seconds()
        d.callback(self.write_certificate(DOMAIN, now - 10, now + 1000))
        self.assertIsNone(self.store.paths(DOMAIN))

    def test_expired_stored_certificate_is_reissued(self):
        now = self.clock.seconds() + 10_000
        self.clock.advance(10_000)
        self.write_certificate(DOMAIN, now - 1000, now - 1)
        self.attach()
        self.clock.advance(0)
        self.assertIsNone(self.store.paths(DOMAIN))
        self.assertEqual([c[0] for c in self.issuer.calls], [DOMAIN])

    def test_stored_certificates_load_at_start_without_issuer(self):
        """Without an issuer (ACME off), stored certificates of attached domains are served."""
        self.manager.stopService()
        now = self.clock.seconds()
        self.write_certificate(DOMAIN, now - 10, now + 1000)
        self.attach()
        store = CertificateStore(self.dev.cert_path, self.dev.key_path)
        manager = CertificateManager(store, self.aliases, None, self.data_dir, reactor=self.clock)
        manager.startService()
        self.addCleanup(manager.stopService)
        self.assertIsNotNone(store.paths(DOMAIN))
        self.clock.advance(10_000)
        self.assertEqual(len(self.issuer.calls), 0)

    def test_serve_only_manager_picks_up_another_process_issuance(self):
        """A manager without issuer (a worker) serves a certificate written later by another
        process at its next reconcile; the issuing manager calls on_issued."""
        issued = []
        self.manager.on_issued = issued.append
        store = CertificateStore(self.dev.cert_path, self.dev.key_path)
        worker = CertificateManager(store, self.aliases, None, self.data_dir, reactor=self.clock)
        worker.startService()
        self.addCleanup(worker.stopService)
        self.attach()
        self.clock.advance(0)
        self.assertIsNone(store.paths(DOMAIN))
        now = self.clock.seconds()
        _, d = self.issuer.calls[0]
        d.callback(self.write_certificate(DOMAIN, now - 10, now + 1000))
        self.assertEqual(issued, [DOMAIN])
        worker.reconcile()
        self.assertIsNotNone(store.paths(DOMAIN))


class SharedChallengeTests(unittest.TestCase):
    """With a shared directory, a challenge added in one process is answered by another
    (workers share the ports; only worker 0 issues)."""

    def test_http01_across_processes(self):
        shared = temp_dir(self)
        issuing, other = HTTP01Responder(shared), HTTP01Responder(shared)
        issuing.add(DOMAIN, "tok_1", "tok_1.thumb")
        self.assertEqual(other.response("tok_1", DOMAIN), b"tok_1.thumb")
        self.assertIsNone(other.response("tok_1", "other.example.com"))
        for hostile in ("../tok_1", "..", "a/b", ""):
            self.assertIsNone(other.response(hostile, DOMAIN))
        issuing.remove("tok_1")
        self.assertIsNone(other.response("tok_1", DOMAIN))
        self.assertEqual(os.listdir(shared), [])

    async def test_tls_alpn01_across_processes(self):
        """A worker's TLS store answers acme-tls/1 for a challenge worker 0 added."""
        shared = temp_dir(self)
        issuing = TLSALPN01Responder(shared)
        node = Node(self)
        worker = TLSALPN01Responder(shared)
        node.store.set_challenge_responder(worker)
        issuing.add("pending.example.com", "tok.one")
        cert, alpn = await node.served("pending.example.com", alpn=["acme-tls/1"])
        self.assertEqual(alpn, "acme-tls/1")
        digest = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value.value
        self.assertEqual(digest[2:], hashlib.sha256(b"tok.one").digest())
        issuing.add("pending.example.com", "tok.two")  # a later challenge: never a stale answer
        cert, _ = await node.served("pending.example.com", alpn=["acme-tls/1"])
        digest = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value.value
        self.assertEqual(digest[2:], hashlib.sha256(b"tok.two").digest())
        issuing.remove("pending.example.com")
        cert, alpn = await node.served("pending.example.com", alpn=["acme-tls/1"])
        self.assertIsNone(alpn)
        with open(os.path.join(shared, "passwd"), "w") as f:
            f.write("not.this\n")
        key = ec.generate_private_key(ec.SECP256R1())
        for hostile in (f"../{os.path.basename(shared)}/passwd", "a/passwd", "..", "PASSWD/"):
            self.assertIsNone(worker.certificate_for(hostile, key), hostile)

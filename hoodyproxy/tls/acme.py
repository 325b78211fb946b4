"""ACME (RFC 8555) issuance of custom domains' certificates, over the ``acme`` package.

:class:`AcmeIssuer` provides :class:`ICertificateIssuer`: ``issue(domain)`` orders a
certificate for one domain from any RFC 8555 directory (Let's Encrypt, pebble...),
answers the HTTP-01 or TLS-ALPN-01 challenge through the node's own listeners (the
responders of :mod:`hoodyproxy.tls.challenges`) and stores the result under the data
directory::

    <data_dir>/acme/account.key        the account key (EC P-256), 0600, created once
    <data_dir>/acme/account.json       the account's URL at its directory, 0600
    <data_dir>/certs/<domain>/cert.pem the full chain
    <data_dir>/certs/<domain>/key.pem  its key, 0600

Files are written with :func:`hoodyproxy.tls.devca.write_atomic` (temporary name,
fsync, rename).  The ``acme`` client is blocking (``requests``): every call runs in the
reactor's thread pool, and challenge responders are touched on the reactor thread only.

Nothing is done for a domain that ``is_allowed`` (the alias store's ``is_attached``)
refuses: the check comes before any storage or network work, and again before the
result is stored.  :class:`hoodyproxy.tls.manager.CertificateManager` decides when to
issue; this module only knows how.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Interface, implementer

from hoodyproxy.tls.devca import write_atomic

log = Logger()

CHALLENGES = ("http-01", "tls-alpn-01")
USER_AGENT = "hoodyproxy"


class ICertificateIssuer(Interface):
    """Obtains a certificate for one custom domain (ACME, or a plugin's own source)."""

    def issue(domain):
        """Obtain and store a certificate for ``domain`` (lowercase, no trailing dot).

        Returns a Deferred firing with ``(cert_path, key_path)`` (a PEM full chain and its
        key) once both files are durably written, or failing with :class:`IssuanceError`
        (or :class:`NotAllowed` when the domain may not be issued for: nothing was
        stored or requested).
        """


class IssuanceError(Exception):
    """An issuance that did not produce a certificate; the message says why (one line)."""


class NotAllowed(IssuanceError):
    """The domain is not attached to an alias: nothing was requested or stored."""


# -- storage layout --------------------------------------------------------------------------

def certs_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "certs")


def certificate_paths(data_dir: str, domain: str) -> tuple[str, str]:
    """(cert.pem, key.pem) of ``domain`` under ``data_dir``."""
    if not domain or "/" in domain or domain.startswith(".") or "\0" in domain:
        raise ValueError(f"not a domain: {domain!r}")
    base = os.path.join(certs_dir(data_dir), domain)
    return os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")


def _mkdir_private(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_or_create_account_key(path: str):
    """The account key at ``path`` (EC or RSA, PEM), created (EC P-256, 0600) if missing."""
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        _mkdir_private(os.path.dirname(path))
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(path, _pem_key(key), 0o600)
        log.info("ACME account key created: {path}", path=path)
        return key
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise IssuanceError(f"the ACME account key {path} is neither EC nor RSA")
    return key


def _jwk_and_alg(key):
    import josepy as jose
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    curve = key.curve.name
    alg = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}.get(curve)
    if alg is None:
        raise IssuanceError(f"the ACME account key's curve {curve} is not usable (P-256, P-384, P-521)")
    return jose.JWKEC(key=key), alg


def _key_authorization(token: str, jwk) -> str:
    """RFC 8555 section 8.1: ``token || '.' || base64url(Thumbprint(accountKey))``."""
    import josepy as jose
    from cryptography.hazmat.primitives import hashes
    return token + "." + jose.b64encode(jwk.thumbprint(hash_function=hashes.SHA256)).decode()


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


@implementer(ICertificateIssuer)
class AcmeIssuer:
    """Certificates from an ACME directory, one domain per certificate.

    ``directory_url``: the RFC 8555 directory (``https://acme-v02.api.letsencrypt.org/
    directory`` in production).  ``challenge``: ``"http-01"`` (answered by ``http01``,
    the plain-HTTP listener's responder) or ``"tls-alpn-01"`` (answered by ``tlsalpn01``,
    the TLS store's responder).  ``ca_bundle``: a PEM file trusted for the HTTPS
    connection to the directory (for a private server such as pebble; None: the system's
    trust).  ``is_allowed(domain)``: whether the domain may be issued for (the alias
    store's ``is_attached``) -- required.  ``max_concurrent`` issuances run at once.
    """

    #: Seconds an issuance may take, challenges and finalization included.
    timeout = 90.0

    def __init__(self, directory_url: str, data_dir: str, *, is_allowed: Callable[[str], bool],
                 challenge: str = "http-01", email: str | None = None, ca_bundle: str | None = None,
                 http01=None, tlsalpn01=None, reactor=None, max_concurrent: int = 2) -> None:
        if challenge not in CHALLENGES:
            raise ValueError(f"challenge must be one of {', '.join(CHALLENGES)}")
        if challenge == "http-01" and http01 is None:
            raise ValueError("http-01 needs the plain-HTTP listener's HTTP01Responder")
        if challenge == "tls-alpn-01" and tlsalpn01 is None:
            raise ValueError("tls-alpn-01 needs the TLS store's TLSALPN01Responder")
        if reactor is None:
            from twisted.internet import reactor
        self.directory_url = directory_url
        self.data_dir = data_dir
        self.is_allowed = is_allowed
        self.challenge = challenge
        self.email = email
        self.ca_bundle = ca_bundle
        self.http01 = http01
        self.tlsalpn01 = tlsalpn01
        self.reactor = reactor
        self.account_dir = os.path.join(data_dir, "acme")
        self._semaphore = defer.DeferredSemaphore(max_concurrent)
        self._lock = threading.Lock()  # guards the account, used from pool threads
        self._account = None  # (jwk, alg, messages.Directory, RegistrationResource)
        #: Requests this issuer sent to the ACME server (for tests and metrics).
        self.requests = 0

    # -- the interface -----------------------------------------------------------------

    def issue(self, domain: str) -> defer.Deferred:
        domain = domain.lower().rstrip(".")
        # The gate: before anything touches the network or the disk.
        if not self.is_allowed(domain):
            return defer.fail(NotAllowed(f"{domain} is not attached to an alias"))
        return self._semaphore.run(lambda: defer.ensureDeferred(self._issue(domain)))

    # -- the work ----------------------------------------------------------------------

    def _in_thread(self, f, *args) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def _issue(self, domain: str) -> tuple[str, str]:
        if not self.is_allowed(domain):
            raise NotAllowed(f"{domain} is not attached to an alias")
        try:
            return await self._attempt(domain)
        except IssuanceError:
            raise
        except Exception as e:
            from acme import messages
            if isinstance(e, messages.Error) and e.code in ("accountDoesNotExist", "unauthorized"):
                # The server forgot our account (a test server restarted, an account
                # deactivated): register again and try once more.
                with self._lock:
                    self._account = None
                try:
                    return await self._attempt(domain)
                except IssuanceError:
                    raise
                except Exception as again:
                    raise IssuanceError(_short(again)) from again
            raise IssuanceError(_short(e)) from e

    async def _attempt(self, domain: str) -> tuple[str, str]:
        client = await self._in_thread(self._client)
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            from acme import crypto_util, messages
            csr = crypto_util.make_csr(_pem_key(key), [domain])
            order = await self._in_thread(self._count, client.new_order, csr)
            undo: list[Callable[[], None]] = []
            try:
                for authzr in order.authorizations:
                    if authzr.body.status == messages.STATUS_VALID:
                        continue
                    await self._answer(client, domain, authzr, undo)
                deadline = datetime.now() + timedelta(seconds=self.timeout)
                order = await self._in_thread(self._finish, client, order, deadline)
            finally:
                for step in undo:
                    step()
        finally:
            client.net.session.close()
        if not order.fullchain_pem:
            raise IssuanceError("the ACME server returned no certificate")
        # Detached meanwhile: keep nothing.
        if not self.is_allowed(domain):
            raise NotAllowed(f"{domain} was detached during issuance; the certificate is discarded")
        return await self._in_thread(self._store, domain, _pem_key(key), order.fullchain_pem.encode())

    async def _answer(self, client, domain: str, authzr, undo: list) -> None:
        from acme import challenges
        wanted = [c for c in authzr.body.challenges if c.chall.to_partial_json().get("type") == self.challenge]
        if not wanted:
            offered = ", ".join(sorted(str(c.chall.to_partial_json().get("type")) for c in authzr.body.challenges))
            raise IssuanceError(f"the ACME server offers no {self.challenge} challenge for {domain} "
                                f"(offered: {offered})")
        challb = wanted[0]
        token = challb.chall.to_partial_json()["token"]
        jwk = client.net.key
        key_authorization = _key_authorization(token, jwk)
        if self.challenge == "http-01":
            self.http01.add(domain, token, key_authorization)
            undo.append(lambda: self.http01.remove(token))
            response = challenges.HTTP01Response(key_authorization=key_authorization)
        else:
            self.tlsalpn01.add(domain, key_authorization)
            undo.append(lambda: self.tlsalpn01.remove(domain))
            response = _tls_alpn_response(key_authorization)
        await self._in_thread(self._count, client.answer_challenge, challb, response)

    # -- blocking calls (pool threads) --------------------------------------------------

    def _count(self, f, *args):
        self.requests += 1
        return f(*args)

    def _client(self):
        """A fresh ClientV2 (its own HTTP session) on the registered account."""
        from acme import client as acme_client
        from acme import errors, messages
        verify: Any = self.ca_bundle if self.ca_bundle else True
        with self._lock:
            if self._account is None:
                key = load_or_create_account_key(os.path.join(self.account_dir, "account.key"))
                jwk, alg = _jwk_and_alg(key)
                net = acme_client.ClientNetwork(jwk, alg=alg, verify_ssl=verify, user_agent=USER_AGENT)
                try:
                    self.requests += 1
                    directory = acme_client.ClientV2.get_directory(self.directory_url, net)
                    acme = acme_client.ClientV2(directory, net)
                    registration = messages.NewRegistration.from_data(
                        email=self.email or None, terms_of_service_agreed=True)
                    self.requests += 1
                    try:
                        regr = acme.new_account(registration)
                    except errors.ConflictError as e:
                        # The key already has an account: use it.
                        regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
                finally:
                    net.session.close()
                self._account = (jwk, alg, directory, regr)
                self._save_account(regr.uri)
            jwk, alg, directory, regr = self._account
        net = acme_client.ClientNetwork(jwk, account=regr, alg=alg, verify_ssl=verify, user_agent=USER_AGENT)
        return acme_client.ClientV2(directory, net)

    def _save_account(self, uri: str) -> None:
        record = {"directory": self.directory_url, "uri": uri, "email": self.email, "saved": time.time()}
        write_atomic(os.path.join(self.account_dir, "account.json"),
                     json.dumps(record, indent=2).encode() + b"\n", 0o600)

    def _finish(self, client, order, deadline: datetime):
        """Wait for every authorization to be decided, then finalize and download."""
        from acme import errors, messages
        pending = list(order.authorizations)
        done = []
        pause = 0.1
        while pending:
            if datetime.now() >= deadline:
                raise IssuanceError("the ACME server did not validate the challenge in time")
            still = []
            for authzr in pending:
                self.requests += 1
                authzr, _ = client.poll(authzr)
                if authzr.body.status == messages.STATUS_PENDING:
                    still.append(authzr)
                else:
                    done.append(authzr)
            pending = still
            if pending:
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
        for authzr in done:
            if authzr.body.status != messages.STATUS_VALID:
                problems = [str(c.error.detail or c.error.typ) for c in authzr.body.challenges if c.error]
                raise IssuanceError(f"validation failed: {'; '.join(problems) or authzr.body.status.name}")
        self.requests += 1
        try:
            return client.finalize_order(order.update(authorizations=done), deadline)
        except errors.TimeoutError:
            raise IssuanceError("the ACME server did not issue the certificate in time") from None

    def _store(self, domain: str, key_pem: bytes, chain_pem: bytes) -> tuple[str, str]:
        cert_path, key_path = certificate_paths(self.data_dir, domain)
        _mkdir_private(certs_dir(self.data_dir))
        _mkdir_private(os.path.dirname(cert_path))
        # Key first: until the chain is replaced too, a reload sees a mismatched pair,
        # which CertificateStore refuses (keeping the previous certificate).
        write_atomic(key_path, key_pem, 0o600)
        write_atomic(cert_path, chain_pem, 0o644)
        return cert_path, key_path


def _tls_alpn_response(key_authorization: str):
    """The (empty) response that tells the server to validate TLS-ALPN-01.

    ``acme`` 5.x dropped its TLS-ALPN-01 classes; the response body of any
    key-authorization challenge is ``{}`` (RFC 8555 section 7.5.1).
    """
    from acme import challenges

    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"

    return TLSALPN01Response(key_authorization=key_authorization)

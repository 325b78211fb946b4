"""Server-side TLS: per-hostname certificates chosen by SNI, ALPN, and hot reload from disk.

ACME TLS-ALPN-01 (RFC 8737) hooks in at ALPN time: OpenSSL runs the servername callback
before ALPN selection and pyOpenSSL exposes no ClientHello callback, so the servername
callback picks the ordinary context and the ALPN callback, seeing ``acme-tls/1``
offered for a name with a pending challenge, selects ``acme-tls/1`` and swaps in the
challenge certificate -- signed with the private key the handshake already uses, so the
swap is valid whatever TLS version and key type were negotiated.  Ordinary clients
never see a challenge certificate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTCP,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from hoodyproxy.tls.records import note_secret

_log = Logger()

# TLS 1.2 AEAD suites with forward secrecy (TLS 1.3 suites are OpenSSL's defaults, all AEAD).
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
SESSION_ID_CONTEXT = b"hoodyproxy"
#: The ALPN protocol of ACME TLS-ALPN-01, selected only for a pending challenge.
ACME_TLS_ALPN = b"acme-tls/1"


def normalize_hostname(name: bytes | str | None) -> str | None:
    """Lower-case ``name`` without a trailing dot; None for a missing or empty name."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    name = (name or "").rstrip(".").lower()
    return name or None


def server_name(connection: SSL.Connection) -> str | None:
    """The SNI name the client sent on ``connection``, normalized, or None."""
    return normalize_hostname(connection.get_servername())


class _Entry:
    """One certificate/key pair on disk, its file signature and its built context."""

    def __init__(self, cert_path: str, key_path: str, context: SSL.Context, signature: tuple):
        self.cert_path, self.key_path = cert_path, key_path
        self.context, self.signature = context, signature
        self._material = None

    def material(self):
        """(certificate, chain, private key) as cryptography objects (for QUIC), cached
        until the files change."""
        cached = self._material
        if cached is None or cached[0] != self.signature:
            with open(self.cert_path, "rb") as f:
                certs = x509.load_pem_x509_certificates(f.read())
            with open(self.key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            cached = self._material = (self.signature, (certs[0], certs[1:], key, _dns_names(certs[0])))
        return cached[1]


def _dns_names(certificate) -> frozenset[str]:
    """The DNS names (and ``*.`` patterns) a certificate is valid for, normalized."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(n for n in (normalize_hostname(d) for d in san.get_values_for_type(x509.DNSName)) if n)


def name_covered(names: frozenset[str], hostname: str | None, sni: str | None = None) -> bool:
    """Whether a connection whose certificate is valid for ``names`` (and whose client
    asked for ``sni`` in its handshake) may carry requests for ``hostname``.

    One-label wildcards count.  So does the SNI name itself: a client that accepted the
    certificate for the very name it asked for (a domain not yet issued its own
    certificate, with verification off) is not coalescing, and gets what HTTP/1.1 gives.
    """
    name = normalize_hostname(hostname)
    if name is None:
        return False
    if name in names or (sni is not None and name == normalize_hostname(sni)):
        return True
    return "." in name and "*." + name.split(".", 1)[1] in names


#: Hosts whose coverage one connection remembers (then it starts anew).
COVERED_HOSTS = 32


class Coverage:
    """:func:`name_covered` for one HTTP/2 or HTTP/3 connection: whether the certificate
    it was served (and the SNI name it asked for) covers each host a request names, the
    answer for each host asked kept (at most :data:`COVERED_HOSTS`, then anew).

    Both are the connection's for its life (chosen in its handshake), so a kept answer
    stays true; coalescing clients send the same few authorities on every request.
    """

    __slots__ = ("names", "sni", "_known")

    def __init__(self, names: frozenset[str], sni: str | None) -> None:
        self.names, self.sni = names, sni
        self._known: dict[str | None, bool] = {}

    def __call__(self, host: str | None) -> bool:
        covered = self._known.get(host)
        if covered is None:
            covered = name_covered(self.names, host, self.sni)
            if len(self._known) >= COVERED_HOSTS:
                self._known.clear()
            self._known[host] = covered
        return covered


class CertificateStore:
    """Certificates by hostname (exact or ``*.`` wildcard) with a default, as SSL contexts."""

    def __init__(
        self, default_cert_path: str, default_key_path: str, alpn: Sequence[bytes] = (b"http/1.1",),
        *, challenges=None,
    ) -> None:
        self.set_alpn(alpn)
        self._names: dict[str, _Entry] = {}
        self._default = self._load(default_cert_path, default_key_path)
        self.challenges = challenges

    def set_alpn(self, alpn: Sequence[bytes]) -> None:
        """Offer ``alpn`` (in order of preference) to connections from now on."""
        for proto in alpn:
            if not isinstance(proto, bytes) or not 0 < len(proto) < 256:
                raise ValueError(f"invalid ALPN protocol: {proto!r}")
        self._alpn = tuple(alpn)

    @property
    def default_paths(self) -> tuple[str, str]:
        """(cert_path, key_path) of the default certificate."""
        return self._default.cert_path, self._default.key_path

    def set_default(self, cert_path: str, key_path: str) -> None:
        """Serve ``cert_path``/``key_path`` as the default from the next handshake on;
        raises (and serves the old one still) if the files are unusable."""
        self._default = self._load(cert_path, key_path)

    def set_challenge_responder(self, responder) -> None:
        """Answer ACME TLS-ALPN-01 from ``responder`` (a
        :class:`hoodyproxy.tls.challenges.TLSALPN01Responder`), or stop with None."""
        self.challenges = responder

    def names(self) -> list[str]:
        """The hostnames (and ``*.`` patterns) with a certificate of their own, sorted."""
        return sorted(self._names)

    def paths(self, hostname: str) -> tuple[str, str] | None:
        """(cert_path, key_path) served for exactly ``hostname``, or None."""
        entry = self._names.get(normalize_hostname(hostname) or "")
        return (entry.cert_path, entry.key_path) if entry is not None else None

    @property
    def default_context(self) -> SSL.Context:
        """The context used before SNI is known and for unmatched names."""
        return self._default.context

    def add(self, hostnames: Iterable[str], cert_path: str, key_path: str) -> None:
        """Serve ``cert_path``/``key_path`` for ``hostnames``; raises if the files are unusable."""
        names = [self._check_pattern(h) for h in hostnames]
        entry = self._load(cert_path, key_path)
        for name in names:
            self._names[name] = entry

    def remove(self, hostname: str) -> bool:
        """Stop serving a specific certificate for ``hostname``; True if it had one."""
        return self._names.pop(normalize_hostname(hostname) or "", None) is not None

    def select(self, server_name: bytes | str | None) -> SSL.Context:
        """The context for ``server_name``: exact match, else one-label wildcard, else default."""
        return self.entry_for(server_name).context

    def entry_for(self, server_name: bytes | str | None) -> _Entry:
        """The certificate entry served for ``server_name`` (as :meth:`select` picks it)."""
        name = normalize_hostname(server_name)
        if name is not None:
            entry = self._names.get(name)
            if entry is None and "." in name:
                entry = self._names.get("*." + name.split(".", 1)[1])
            if entry is not None:
                return entry
        return self._default

    def material(self, server_name: bytes | str | None):
        """(certificate, chain, private key, DNS names) served for ``server_name``, as
        cryptography objects: what a QUIC handshake needs."""
        return self.entry_for(server_name).material()

    def expiries(self) -> dict[str, float]:
        """When each certificate served expires (its not-after, in Unix seconds), by the
        names it is served for: the default certificate's DNS names, then each name given
        a certificate of its own.  A certificate whose files cannot be read is left out."""
        out: dict[str, float] = {}
        served = [(None, self._default), *sorted(self._names.items())]
        for name, entry in served:
            try:
                certificate, _chain, _key, dns_names = entry.material()
            except Exception:  # (unreadable files: reload_if_changed says so in the log)
                continue
            not_after = certificate.not_valid_after_utc.timestamp()
            for served_name in (sorted(dns_names) if name is None else [name]):
                out[served_name] = not_after
        return out

    def names_of_context(self, context: SSL.Context) -> frozenset[str]:
        """The DNS names the certificate of ``context`` (one of ours) is valid for."""
        for entry in (self._default, *self._names.values()):
            if entry.context is context:
                return entry.material()[3]
        return frozenset()

    def reload_if_changed(self) -> bool:
        """Rebuild contexts whose files changed on disk; True if any was replaced. Never raises."""
        reloaded = False
        entries = {id(e): e for e in [self._default, *self._names.values()]}
        for entry in entries.values():
            try:
                signature = _signature(entry.cert_path, entry.key_path)
                if signature == entry.signature:
                    continue
                entry.signature = signature  # a broken version is reported once
                entry.context = self._build(entry.cert_path, entry.key_path)
            except Exception:
                _log.failure(
                    "Could not reload TLS certificate {cert_path}; keeping the previous one",
                    cert_path=entry.cert_path,
                )
            else:
                _log.info("Reloaded TLS certificate {cert_path}", cert_path=entry.cert_path)
                reloaded = True
        return reloaded

    @staticmethod
    def _check_pattern(hostname: str) -> str:
        name = normalize_hostname(hostname)
        labels = (name or "").split(".")
        if name is None or "" in labels or any("*" in label for label in labels[1:]) or (
            "*" in labels[0] and (labels[0] != "*" or len(labels) < 3)
        ):
            raise ValueError(f"invalid hostname pattern: {hostname!r}")
        return name

    def _load(self, cert_path: str, key_path: str) -> _Entry:
        signature = _signature(cert_path, key_path)
        return _Entry(cert_path, key_path, self._build(cert_path, key_path), signature)

    def _build(self, cert_path: str, key_path: str) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        # No renegotiation (TLS 1.2), as nginx and HAProxy: a client could otherwise make the
        # node do a full handshake's work again and again on one connection.  (OpenSSL 3
        # refuses a client's by default; this says so whatever OpenSSL the node has.)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        # Free OpenSSL's 16+ KiB read and write buffers while a connection is idle: most of
        # what an idle WebSocket would otherwise cost.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(CIPHERS)
        # ECDH curve selection is automatic since OpenSSL 1.1.0: no set_tmp_ecdh needed.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        ctx.set_session_id(SESSION_ID_CONTEXT)
        ctx.use_certificate_chain_file(cert_path)
        ctx.use_privatekey_file(key_path)
        ctx.check_privatekey()
        # The key again, as an object: a TLS-ALPN-01 challenge certificate is signed with it.
        with open(key_path, "rb") as f:
            ctx.set_app_data(serialization.load_pem_private_key(f.read(), password=None))
        # Always set: acme-tls/1 may need selecting even when no other protocol is offered.
        ctx.set_alpn_select_callback(self._select_alpn)
        ctx.set_tlsext_servername_callback(self._on_server_name)
        # A TLS 1.3 connection's application traffic secrets, kept (never written) for a
        # connection that becomes a tunnel and gives its OpenSSL object up (records.py).
        ctx.set_keylog_callback(note_secret)
        return ctx

    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> object:
        if ACME_TLS_ALPN in offered and self.challenges is not None:
            name = server_name(connection)
            certificate = self.challenges.certificate_for(name, connection.get_context().get_app_data())
            if certificate is not None:
                connection.use_certificate(certificate)
                return ACME_TLS_ALPN
        for proto in self._alpn:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _on_server_name(self, connection: SSL.Connection) -> None:
        context = self.select(connection.get_servername())
        if context is not connection.get_context():
            connection.set_context(context)


def release_idle_buffers(connection: SSL.Connection) -> bool:
    """Give a memory-BIO ``connection`` a fresh, empty pair of BIOs; True if it did.

    A memory BIO's buffer grows to the largest burst it has carried (the handshake's
    flights; up to 64 KB of records when Twisted writes what it aggregated) and never
    shrinks, so an idle connection keeps it for life: 2.6 KB per connection just after
    the handshake.  ``MODE_RELEASE_BUFFERS`` frees OpenSSL's own record buffers, but
    nothing frees these, and pyOpenSSL has no call for it; ``SSL_set_bio`` with a new pair
    frees the old one (OpenSSL re-points its record layers at the new pair).  Done only
    when neither BIO holds a byte, so nothing in flight is lost; a no-op for a connection
    on a socket or a pyOpenSSL without these internals.
    """
    into, out = getattr(connection, "_into_ssl", None), getattr(connection, "_from_ssl", None)
    ssl = getattr(connection, "_ssl", None)
    if into is None or out is None or ssl is None:
        return False
    if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL:
        return False
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_out == _ffi.NULL:
        _lib.BIO_free(new_into)
        return False
    # The SSL object owns its BIOs (pyOpenSSL never frees them itself): the old pair is
    # freed here, the new one by SSL_free.
    _lib.SSL_set_bio(ssl, new_into, new_out)
    connection._into_ssl, connection._from_ssl = new_into, new_out
    return True


def _signature(cert_path: str, key_path: str) -> tuple:
    stats = (os.stat(cert_path), os.stat(key_path))
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)


@implementer(IOpenSSLServerConnectionCreator)
class SNIContextFactory:
    """Creates server TLS connections whose certificate is picked from ``store`` by SNI."""

    def __init__(self, store: CertificateStore) -> None:
        self.store = store

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        """A connection on the default context; its SNI callback switches certificates."""
        return SSL.Connection(self.store.default_context, None)


def listen_tls(
    reactor: IReactorTCP,
    port: int,
    factory: IProtocolFactory,
    context_factory: IOpenSSLServerConnectionCreator,
    interface: str = "",
    backlog: int = 50,
) -> IListeningPort:
    """Listen on TCP ``port`` and speak TLS (via ``context_factory``) around ``factory``."""
    return reactor.listenTCP(
        port, TLSMemoryBIOFactory(context_factory, False, factory), backlog, interface
    )

"""ACME challenge responders: HTTP-01 (RFC 8555 8.3) and TLS-ALPN-01 (RFC 8737), in memory.

The issuer (:mod:`hoodyproxy.tls.acme`) adds a challenge before it tells the ACME server
to validate and removes it afterwards; the listeners consult the responders:

- :class:`HTTP01Responder`: the plain-HTTP listener (:mod:`hoodyproxy.frontend.redirect`)
  answers ``GET /.well-known/acme-challenge/<token>`` with the key authorization.
- :class:`TLSALPN01Responder`: the TLS listener's :class:`~hoodyproxy.tls.context.
  CertificateStore` asks it, when a ClientHello offers ALPN ``acme-tls/1``, for the
  self-signed certificate that carries the ``id-pe-acmeIdentifier`` extension.

Both are touched on the reactor thread only.  With ``shared_dir`` a responder also
writes each challenge to a file there, and answers challenges it does not hold from
those files: with ``--workers N`` every worker shares the ports, the ACME server's
validation lands in any of them, and only worker 0 issues.  The files are read only for
a challenge request (``/.well-known/acme-challenge/``, or a ClientHello offering
``acme-tls/1``), never on an ordinary request.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID, ObjectIdentifier

#: The ALPN protocol of TLS-ALPN-01 (RFC 8737 section 6.2).
ACME_TLS_ALPN = b"acme-tls/1"
#: id-pe-acmeIdentifier (RFC 8737 section 6.1).
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: Tokens are base64url (RFC 8555 section 8.1); anything else is never a challenge.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}\Z")
#: Bounds: a node never has more challenges in flight than this (each is one issuance).
MAX_PENDING = 1024
#: A name safe to use as a file name (SNI is the client's: never trusted as a path).
_SAFE_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*\Z")


def _name(domain: str) -> str:
    return domain.lower().rstrip(".")


class _SharedFiles:
    """One small file per pending challenge under ``directory`` (created 0700)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, name: str) -> str | None:
        if len(name) > 253 or not (TOKEN.match(name) or _SAFE_NAME.match(name)):
            return None
        return os.path.join(self.directory, name)

    def write(self, name: str, lines: list[str]) -> None:
        from hoodyproxy.tls.devca import write_atomic
        path = self._path(name)
        if path is not None:
            write_atomic(path, "\n".join(lines).encode("ascii") + b"\n", 0o644)

    def read(self, name: str) -> list[str] | None:
        path = self._path(name)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read(4096).decode("ascii").splitlines()
        except (OSError, UnicodeDecodeError):
            return None

    def remove(self, name: str) -> None:
        path = self._path(name)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class HTTP01Responder:
    """Token -> key authorization, for ``/.well-known/acme-challenge/<token>``."""

    path_prefix = b"/.well-known/acme-challenge/"

    def __init__(self, shared_dir: str | None = None) -> None:
        self._tokens: dict[str, tuple[str, str]] = {}
        self._shared = _SharedFiles(shared_dir) if shared_dir else None

    def add(self, domain: str, token: str, key_authorization: str) -> None:
        """Serve ``key_authorization`` for ``token`` (requested with Host ``domain``)."""
        if not TOKEN.match(token):
            raise ValueError("an ACME token is base64url")
        if len(self._tokens) >= MAX_PENDING and token not in self._tokens:
            raise RuntimeError("too many pending HTTP-01 challenges")
        self._tokens[token] = (_name(domain), key_authorization)
        if self._shared is not None:
            self._shared.write(token, [_name(domain), key_authorization])

    def remove(self, token: str) -> None:
        self._tokens.pop(token, None)
        if self._shared is not None:
            self._shared.remove(token)

    def response(self, token: str, host: str | None = None) -> bytes | None:
        """The body to answer for ``token``, or None (404).

        ``host`` is the request's hostname: when given it must be the challenge's domain,
        so one domain's challenge is never answered under another name.
        """
        entry = self._tokens.get(token)
        if entry is None and self._shared is not None and TOKEN.match(token):
            lines = self._shared.read(token)
            entry = (lines[0], lines[1]) if lines and len(lines) == 2 else None
        if entry is None or (host is not None and _name(host) != entry[0]):
            return None
        return entry[1].encode("ascii")

    def __len__(self) -> int:
        return len(self._tokens)


def key_authorization_digest(key_authorization: str) -> bytes:
    """SHA-256 of the key authorization: the value of the acmeIdentifier extension."""
    return hashlib.sha256(key_authorization.encode("ascii")).digest()


def challenge_certificate(domain: str, key_authorization: str, private_key,
                          now: datetime | None = None) -> x509.Certificate:
    """The self-signed TLS-ALPN-01 certificate for ``domain`` (RFC 8737 section 3).

    One dNSName SAN (the domain) and the critical ``id-pe-acmeIdentifier`` extension whose
    value is the DER OCTET STRING of the SHA-256 of the key authorization.  Signed with
    ``private_key`` -- the TLS store passes the key of the context the handshake is
    already using, so the certificate can be swapped in at ALPN time whatever TLS version
    and key type were negotiated.
    """
    now = now or datetime.now(timezone.utc)
    digest = key_authorization_digest(key_authorization)
    value = b"\x04\x20" + digest  # DER: OCTET STRING, 32 bytes
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    algorithm = None if _is_edwards(private_key) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_name(domain))]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, value), critical=True)
        .sign(private_key, algorithm)
    )


def _is_edwards(key) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
    return isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))


class TLSALPN01Responder:
    """Domain -> key authorization, served as a certificate to ``acme-tls/1`` clients."""

    def __init__(self, shared_dir: str | None = None) -> None:
        self._shared = _SharedFiles(shared_dir) if shared_dir else None
        self._pending: dict[str, str] = {}
        # (domain, id(key)) -> (key, key authorization, certificate); the key is kept so
        # its id stays unique.
        self._built: dict[tuple[str, int], tuple[object, str, x509.Certificate]] = {}

    def add(self, domain: str, key_authorization: str) -> None:
        """Answer TLS-ALPN-01 for ``domain`` with ``key_authorization`` until removed."""
        domain = _name(domain)
        if len(self._pending) >= MAX_PENDING and domain not in self._pending:
            raise RuntimeError("too many pending TLS-ALPN-01 challenges")
        self._pending[domain] = key_authorization
        self._forget(domain)
        if self._shared is not None:
            self._shared.write(domain, [key_authorization])

    def remove(self, domain: str) -> None:
        domain = _name(domain)
        self._pending.pop(domain, None)
        self._forget(domain)
        if self._shared is not None:
            self._shared.remove(domain)

    def pending(self, domain: str | None) -> bool:
        """Whether this process holds a challenge for ``domain`` (shared files not read)."""
        return domain is not None and _name(domain) in self._pending

    def certificate_for(self, domain: str | None, private_key) -> x509.Certificate | None:
        """The challenge certificate for ``domain`` signed with ``private_key``, or None."""
        if domain is None:
            return None
        domain = _name(domain)
        key_authorization = self._pending.get(domain)
        if key_authorization is None and self._shared is not None:
            lines = self._shared.read(domain)
            key_authorization = lines[0] if lines and len(lines) == 1 else None
        if key_authorization is None:
            return None
        built = self._built.get((domain, id(private_key)))
        if built is None or built[0] is not private_key or built[1] != key_authorization:
            if len(self._built) >= MAX_PENDING:
                self._built.clear()
            built = (private_key, key_authorization,
                     challenge_certificate(domain, key_authorization, private_key))
            self._built[(domain, id(private_key))] = built
        return built[2]

    def _forget(self, domain: str) -> None:
        for key in [k for k in self._built if k[0] == domain]:
            del self._built[key]

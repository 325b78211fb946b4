"""The ``jwt`` group: ``Authorization: Bearer <JWT>`` signed by a key the group names.

Spec (and stored form; only ``secret`` is hidden by :meth:`JWTGroup.redact`)::

    {"type": "jwt",
     "secret": "..." | "public_key": "-----BEGIN PUBLIC KEY-----..." | "jwks_url": "https://...",
     "algorithms": ["RS256"],            # required; pinned here, never read from the token
     "issuer": "https://idp.example",    # optional
     "audience": "gw" | ["gw", ...],     # optional
     "leeway": 0,                        # seconds of clock skew, 0..300
     "claims": {"role": "admin", "team": ["a", "b"]}}   # optional, all must match

The signature, ``exp`` (always required), ``nbf``, ``iss``, ``aud`` and the listed claims
are all checked by PyJWT with the stored algorithm list.  A JWKS is fetched with treq,
kept per URL, and fetched again when older than five minutes or on an unknown ``kid``,
at most once a minute per URL whatever tokens arrive.
"""

from __future__ import annotations

import ipaddress
import json
from collections import OrderedDict
from typing import Any, Mapping

import jwt
import treq
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hoodyproxy.access.groups import (REDACTED, InvalidPermissions, check_fields, check_number,
                                      check_string, check_url, default_reactor, one_of)
from hoodyproxy.interfaces import IGroupType

log = Logger()

HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}  # name -> minimum secret bytes
KEY_FAMILIES = {"RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA",
                "PS384": "RSA", "PS512": "RSA", "ES256": "EC", "ES384": "EC",
                "ES512": "EC", "EdDSA": "OKP"}
ALGORITHMS = (*HMAC_ALGORITHMS, *KEY_FAMILIES)
RESERVED_CLAIMS = ("exp", "nbf", "iat", "iss", "aud")
MAX_LEEWAY = 300
MAX_CLAIMS = 32
MAX_CLAIM_VALUES = 256

JWKS_TIMEOUT = 10.0
JWKS_MAX_AGE = 300.0
JWKS_REFETCH_INTERVAL = 60.0
JWKS_MAX_BYTES = 1024 * 1024
JWKS_MAX_URLS = 64

_DECODE_OPTIONS: Any = {"require": ["exp"], "enforce_minimum_key_length": True}


# -- parse -------------------------------------------------------------------------------

def _algorithms(value: Any, field: str, source: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InvalidPermissions(field, "must be a non-empty list")
    for i, alg in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(alg, str) and alg.lower() == "none":
            raise InvalidPermissions(where, "'none' is never allowed")
        if alg not in ALGORITHMS:
            raise InvalidPermissions(where, "must be one of " + ", ".join(ALGORITHMS))
        if value.index(alg) != i:
            raise InvalidPermissions(where, "is listed twice")
        if (alg in HMAC_ALGORITHMS) != (source == "secret"):
            raise InvalidPermissions(where, "HS* goes with secret, the others with "
                                            "public_key or jwks_url")
    return list(value)


def _secret(value: Any, field: str, algorithms: list[str]) -> str:
    secret = check_string(value, field, max_length=4096)
    need = max(HMAC_ALGORITHMS[alg] for alg in algorithms)
    if len(secret.encode("utf-8", "surrogatepass")) < need:
        raise InvalidPermissions(field, f"must be at least {need} bytes for "
                                        + ", ".join(algorithms))
    try:
        jwt.get_algorithm_by_name(algorithms[0]).prepare_key(secret)
    except jwt.PyJWTError:
        # PyJWT refuses PEM, SSH and JWK text as HMAC secrets (the key-confusion guard).
        raise InvalidPermissions(field, "looks like a key, not a shared secret") from None
    return secret


def _public_key(value: Any, field: str, algorithms: list[str]) -> str:
    pem = check_string(value, field, max_length=16384)
    if "PRIVATE KEY" in pem:
        raise InvalidPermissions(field, "is a private key: give the public key")
    for alg in algorithms:
        algorithm = jwt.get_algorithm_by_name(alg)
        try:
            key = algorithm.prepare_key(pem)
        except Exception:
            raise InvalidPermissions(field, f"is not a public key usable with {alg}") from None
        if hasattr(key, "private_bytes"):
            raise InvalidPermissions(field, "is a private key: give the public key")
        weak = algorithm.check_key_length(key)
        if weak:
            raise InvalidPermissions(field, weak)
    return pem


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _jwks_url(value: Any, field: str) -> str:
    parts = check_url(value, field)
    if parts.username is not None or parts.password is not None:
        raise InvalidPermissions(field, "must be http(s)://host[:port]/path, without credentials")
    if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(parts.hostname or "")):
        raise InvalidPermissions(field, "must be https (http only for a loopback address)")
    return value


def _audience(value: Any, field: str) -> str | list[str]:
    if isinstance(value, list):
        if not value:
            raise InvalidPermissions(field, "must not be an empty list")
        return [check_string(a, f"{field}[{i}]") for i, a in enumerate(value)]
    return check_string(value, field)


def _claim_value(value: Any, field: str) -> Any:
    if isinstance(value, (str, bool, int)) or (isinstance(value, float) and value == value):
        return value
    raise InvalidPermissions(field, "must be a string, number or boolean")


def _claims(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidPermissions(field, "must be an object")
    if len(value) > MAX_CLAIMS:
        raise InvalidPermissions(field, f"at most {MAX_CLAIMS} claims")
    claims: dict[str, Any] = {}
    for name, allowed in value.items():
        where = f"{field}.{name}"
        check_string(name, field, max_length=256)
        if name in RESERVED_CLAIMS:
            raise InvalidPermissions(where, "is checked by issuer, audience and leeway, "
                                            "not by claims")
        if isinstance(allowed, list):
            if not allowed or len(allowed) > MAX_CLAIM_VALUES:
                raise InvalidPermissions(where, f"must list 1 to {MAX_CLAIM_VALUES} values")
            claims[name] = [_claim_value(v, f"{where}[{i}]") for i, v in enumerate(allowed)]
        else:
            claims[name] = _claim_value(allowed, where)
    return claims


# -- check -------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    """JSON equality without Python's ``True == 1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) is str and a == b


def claims_match(payload: Mapping[str, Any], claims: Mapping[str, Any]) -> bool:
    """Every listed claim is present with an allowed value.

    A token claim that is a list (``"groups": ["a", "b"]``) matches when any of its
    elements is allowed.
    """
    for name, allowed in claims.items():
        if name not in payload:
            return False
        allowed_values = allowed if isinstance(allowed, (list, tuple)) else [allowed]
        value = payload[name]
        offered = value if isinstance(value, list) else [value]
        if not any(_same(v, a) for v in offered for a in allowed_values):
            return False
    return True


def _decode(token: str, key: Any, stored: Mapping[str, Any]) -> bool:
    try:
        payload = jwt.decode(token, key, algorithms=stored["algorithms"],
                             audience=stored.get("audience"), issuer=stored.get("issuer"),
                             leeway=stored["leeway"], options=_DECODE_OPTIONS)
    except jwt.PyJWTError:
        return False
    return claims_match(payload, stored.get("claims", {}))


class _KeySet:
    """One JWKS URL's keys and fetch bookkeeping."""

    def __init__(self) -> None:
        self.keys: list[jwt.PyJWK] = []
        self.fetched_at: float | None = None  # last success
        self.attempted_at: float | None = None  # last fetch started
        self.running: list[Deferred[None]] | None = None  # waiters while a fetch runs

    def find(self, kid: str | None, alg: str) -> Any:
        """The verification key for a token's ``kid`` and ``alg``, or None."""
        usable = [k for k in self.keys
                  if k.key_type == KEY_FAMILIES[alg] and k.public_key_use in (None, "sig")]
        if kid is None:
            return usable[0].key if len(usable) == 1 else None
        for k in usable:
            if k.key_id == kid:
                return k.key
        return None


class _BodyTooLarge(Exception):
    pass


@implementer(IGroupType)
class JWTGroup:
    """Matches a request whose bearer token is a JWT the group's key signed, valid now,
    with the configured issuer, audience and claims."""

    name = "jwt"
    challenge = "bearer"

    def __init__(self, reactor=None, clock=None):
        self._reactor = reactor
        self._clock = clock
        self._keysets: OrderedDict[str, _KeySet] = OrderedDict()
        self._prepared: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def parse(self, spec: Any, field: str) -> dict[str, Any]:
        spec = check_fields(spec, field, self.name, required=("algorithms",),
                            optional=("secret", "public_key", "jwks_url", "issuer",
                                      "audience", "leeway", "claims"))
        source = one_of(spec, field, ("secret", "public_key", "jwks_url"))
        algorithms = _algorithms(spec["algorithms"], f"{field}.algorithms", source)
        where = f"{field}.{source}"
        stored: dict[str, Any] = {"type": self.name}
        if source == "secret":
            stored["secret"] = _secret(spec["secret"], where, algorithms)
        elif source == "public_key":
            stored["public_key"] = _public_key(spec["public_key"], where, algorithms)
        else:
            stored["jwks_url"] = _jwks_url(spec["jwks_url"], where)
        stored["algorithms"] = algorithms
        if "issuer" in spec:
            stored["issuer"] = check_string(spec["issuer"], f"{field}.issuer")
        if "audience" in spec:
            stored["audience"] = _audience(spec["audience"], f"{field}.audience")
        stored["leeway"] = check_number(spec.get("leeway", 0), f"{field}.leeway",
                                        minimum=0, maximum=MAX_LEEWAY)
        if "claims" in spec:
            stored["claims"] = _claims(spec["claims"], f"{field}.claims")
        return stored

    def redact(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        shown = dict(stored)
        if "secret" in shown:
            shown["secret"] = REDACTED
        return shown

    def check(self, stored: Mapping[str, Any], credentials: Any) -> bool | Deferred[bool]:
        token = credentials.bearer
        if not token or token.count(".") != 2:
            return False  # not a JWT (a static token, say)
        if "secret" in stored:
            return _decode(token, self._prepared_key(stored["algorithms"][0], stored["secret"]),
                           stored)
        if "public_key" in stored:
            return _decode(token, self._prepared_key(stored["algorithms"][0],
                                                     stored["public_key"]), stored)
        return self._check_with_jwks(token, stored)

    def _prepared_key(self, alg: str, material: str) -> Any:
        # Loading a PEM costs more than verifying: keep a few prepared keys.  parse()
        # checked the key against every algorithm listed, so one family fits them all.
        cache_key = (alg, material)
        key = self._prepared.get(cache_key)
        if key is None:
            key = jwt.get_algorithm_by_name(alg).prepare_key(material)
            self._prepared[cache_key] = key
            if len(self._prepared) > 64:
                self._prepared.popitem(last=False)
        return key

    # -- JWKS ----------------------------------------------------------------------------

    def _now(self) -> float:
        self._clock = default_reactor(self._clock)
        return self._clock.seconds()

    def _keyset(self, url: str) -> _KeySet:
        keyset = self._keysets.get(url)
        if keyset is None:
            keyset = self._keysets[url] = _KeySet()
            while len(self._keysets) > JWKS_MAX_URLS:
                self._keysets.popitem(last=False)
        else:
            self._keysets.move_to_end(url)
        return keyset

    def _check_with_jwks(self, token: str, stored: Mapping[str, Any]) -> bool | Deferred[bool]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return False
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in stored["algorithms"] \
                or not isinstance(kid, (str, type(None))):
            return False  # decide before any fetch: a forged header costs nothing
        url = stored["jwks_url"]
        keyset = self._keyset(url)
        key = keyset.find(kid, alg)
        now = self._now()
        fresh = keyset.fetched_at is not None and now - keyset.fetched_at < JWKS_MAX_AGE
        if key is not None and fresh:
            return _decode(token, key, stored)
        start = keyset.running is None
        if start and keyset.attempted_at is not None \
                and now - keyset.attempted_at < JWKS_REFETCH_INTERVAL:
            # Rate-limited: answer from the keys at hand, stale or not.
            return False if key is None else _decode(token, key, stored)
        waiter: Deferred[Any] = Deferred()

        def answer(_: object) -> bool:
            found = keyset.find(kid, alg)
            return False if found is None else _decode(token, found, stored)
        waiter.addCallback(answer)
        if start:
            keyset.running = [waiter]
            self._fetch(url, keyset, now)
        else:
            keyset.running.append(waiter)  # type: ignore[union-attr]
        return waiter

    def _fetch(self, url: str, keyset: _KeySet, now: float) -> None:
        """Fetch the JWKS, then fire ``keyset.running``; on failure keep the keys (logged)."""
        keyset.attempted_at = now
        self._reactor = default_reactor(self._reactor)
        d = treq.get(url, timeout=JWKS_TIMEOUT, persistent=False, reactor=self._reactor)
        d.addCallback(self._read_body)
        d.addTimeout(JWKS_TIMEOUT, self._reactor)

        def loaded(body: bytes) -> None:
            keyset.keys = list(jwt.PyJWKSet.from_dict(json.loads(body)))
            keyset.fetched_at = self._now()

        def failed(failure: Failure) -> None:
            log.warn("JWKS fetch from {url} failed, keeping {count} known keys: {error}",
                     url=url, count=len(keyset.keys), error=failure.getErrorMessage())

        def done(_: None) -> None:
            waiters, keyset.running = keyset.running or [], None
            for waiter in waiters:
                waiter.callback(None)

        d.addCallback(loaded)
        d.addErrback(failed)
        d.addBoth(done)

    @staticmethod
    def _read_body(response: Any) -> Deferred[bytes]:
        """The body, at most JWKS_MAX_BYTES of it, read whole even on an error status."""
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > JWKS_MAX_BYTES:
                raise _BodyTooLarge(f"body over {JWKS_MAX_BYTES} bytes")
            chunks.append(data)

        def complete(_: None) -> bytes:
            if response.code != 200:
                raise ValueError(f"HTTP status {response.code}")
            return b"".join(chunks)

        return treq.collect(response, collect).addCallback(complete)

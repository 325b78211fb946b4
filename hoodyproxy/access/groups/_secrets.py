"""Hashing helpers the group types share: scrypt, digests, and a cache of recent successes.

Nothing here keeps a clear secret: stored forms hold digests or scrypt hashes, and the
success cache is keyed by an HMAC under a random per-process key, so a memory dump of
it reveals no password and its keys mean nothing to another process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from hoodyproxy.access.groups import default_reactor

SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds for hashes made elsewhere (stronger parameters are welcome; a stored hash
# must not be able to make one check cost seconds or gigabytes).
_MAX_SCRYPT_MEMORY = 64 * 1024 * 1024
_MAX_SCRYPT_P = 16

_PROCESS_KEY = os.urandom(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _utf8(text: str) -> bytes:
    # surrogatepass: a header decoded leniently must still hash, never raise.
    return text.encode("utf-8", "surrogatepass")


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt_b64$hash_b64`` for ``password``, with a fresh 16-byte salt."""
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.scrypt(_utf8(password), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def parse_password_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, hash) of an encoded scrypt hash; ValueError naming the problem."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("must look like scrypt$n$r$p$salt$hash")
    try:
        n, r, p = (int(x, 10) for x in parts[1:4])
    except ValueError:
        raise ValueError("n, r and p must be decimal integers") from None
    if n < 2 ** 10 or n & (n - 1) or not 1 <= r or not 1 <= p <= _MAX_SCRYPT_P \
            or 128 * n * r > _MAX_SCRYPT_MEMORY:
        raise ValueError("scrypt parameters out of bounds")
    try:
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError):
        raise ValueError("salt and hash must be base64") from None
    if len(salt) < SALT_BYTES or not 16 <= len(digest) <= 64:
        raise ValueError("salt or hash too short")
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches the scrypt hash; compares in constant time.  Slow."""
    n, r, p, salt, expected = parse_password_hash(encoded)
    actual = hashlib.scrypt(_utf8(password), salt=salt, n=n, r=r, p=p, dklen=len(expected),
                            maxmem=128 * r * (n + p + 2) + 1024 * 1024)
    return hmac.compare_digest(actual, expected)


def sha256_hex(value: str) -> str:
    """Lower-case hex SHA-256 of a high-entropy secret (static tokens)."""
    return hashlib.sha256(_utf8(value)).hexdigest()


def same_text(a: str, b: str) -> bool:
    """Constant-time equality of two strings."""
    return hmac.compare_digest(_utf8(a), _utf8(b))


class SuccessCache:
    """Remembers, briefly, which slow checks succeeded, and runs each slow check once.

    A browser sends the same Basic header with every request; without this each would
    cost a scrypt or an LDAP bind.  Only successes are remembered (a failure is checked
    again every time), for ``ttl`` seconds, at most ``max_entries`` of them (the oldest go
    first).  Identical checks that arrive while one is running share its result.  Keys are
    made with :meth:`key`; all methods run on the reactor thread, the work in a thread.
    """

    def __init__(self, ttl: float, max_entries: int = 1024, *,
                 reactor: IReactorThreads | None = None, clock: IReactorTime | None = None):
        self.ttl = ttl
        self.max_entries = max_entries
        self._reactor: Any = reactor
        self._clock: Any = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._running: dict[bytes, list[Deferred[bool]]] = {}

    @staticmethod
    def key(*parts: str) -> bytes:
        """An HMAC of ``parts`` under the per-process key (length-prefixed, so unambiguous)."""
        mac = hmac.new(_PROCESS_KEY, digestmod=hashlib.sha256)
        for part in parts:
            data = _utf8(part)
            mac.update(len(data).to_bytes(4, "big"))
            mac.update(data)
        return mac.digest()

    def _now(self) -> float:
        self._clock = default_reactor(self._clock)
        return self._clock.seconds()

    def fresh(self, key: bytes) -> bool:
        """True if a check with this key succeeded less than ``ttl`` seconds ago."""
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry > self._now():
            return True
        del self._expiry[key]
        return False

    def _remember(self, key: bytes) -> None:
        self._expiry.pop(key, None)
        self._expiry[key] = self._now() + self.ttl
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)

    def run(self, key: bytes, work: Callable[[], bool]) -> Deferred[bool]:
        """``work()`` in a thread unless a recent success or a running twin answers."""
        if self.fresh(key):
            return succeed(True)
        waiter: Deferred[bool] = Deferred()
        waiters = self._running.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._running[key] = [waiter]
        self._reactor = default_reactor(self._reactor)
        running = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

        def finished(result):
            if result is True:
                self._remember(key)
            for each in self._running.pop(key):
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result is True)
            return None

        running.addBoth(finished)
        return waiter

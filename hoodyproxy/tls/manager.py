"""CertificateManager: keeps every custom domain served with a certificate of its own.

A Twisted Service.  At start it loads every stored certificate of an attached domain
into the :class:`~hoodyproxy.tls.context.CertificateStore` (served at once, whether or
not the ACME server answers), then issues for attached domains that have none.  Each
certificate is renewed at two-thirds of its lifetime; a failed issuance is retried with
exponential backoff (1 minute doubling to 1 hour by default, jittered) while the
certificate already held keeps being served.  It follows the alias store: a domain
attached is issued for at once; a domain detached stops being served and renewed (its
files stay on disk, so attaching it again serves them at once while they are valid).

Only domains attached to an alias are ever issued for: the manager asks the store
before each attempt, and :class:`~hoodyproxy.tls.acme.AcmeIssuer` asks again before any
network or disk work.  Optionally (``cname``) the domain's CNAME must point at its
alias's hostname before anything is requested.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hoodyproxy.tls.acme import NotAllowed, certificate_paths, certs_dir

log = Logger()


@dataclass
class _Domain:
    """What the manager knows of one attached domain."""

    name: str
    not_before: float | None = None
    not_after: float | None = None
    timer: Any = None
    failures: int = 0
    last_error: str | None = None
    next_attempt: float | None = None
    issuing: bool = False


def read_certificate(cert_path: str, key_path: str, domain: str, now: float) -> tuple[float, float] | None:
    """(not_before, not_after) of a stored pair usable for ``domain`` at ``now``, else None.

    Usable: both files readable, the key matches the leaf, the leaf names the domain and
    has not expired.  Never raises.
    """
    try:
        with open(cert_path, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, IndexError, x509.ExtensionNotFound):
        return None
    if domain not in {n.lower() for n in names.get_values_for_type(x509.DNSName)}:
        return None
    if key.public_key() != leaf.public_key():
        return None
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        return None
    return not_before, not_after


class CertificateManager(service.Service):
    """Issues, loads, serves and renews the custom domains' certificates.

    ``store``: the TLS :class:`CertificateStore`; ``aliases``: the
    :class:`hoodyproxy.aliases.AliasStore`; ``issuer``: an ``ICertificateIssuer`` (None:
    serve what is stored, issue nothing); ``data_dir``: where certificates are stored
    (``<data_dir>/certs/<domain>/``).  ``cname``: an optional
    :class:`CnameVerifier`.  ``on_issued(domain)`` is called after a new certificate is
    served (e.g. to tell other worker processes to :meth:`reconcile`).  ``reactor`` gives
    time (``seconds``) and timers (``callLater``); ``jitter()`` returns a float in [0, 1).

    With ``issuer=None`` the manager only serves: it loads the stored certificates of
    attached domains, at start and at each :meth:`reconcile` (a worker process serving
    what worker 0 issues).
    """

    name = "certificates"
    #: Renew when this fraction of the certificate's lifetime has passed.
    renew_fraction = 2 / 3
    #: First retry delay and the cap of the doubling, in seconds.
    backoff_base = 60.0
    backoff_max = 3600.0
    #: Seconds between two passes over every domain (catches changes made elsewhere).
    check_interval = 60.0

    def __init__(self, store, aliases, issuer, data_dir: str, *, reactor=None, cname=None,
                 on_issued: Callable[[str], None] | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self.aliases = aliases
        self.issuer = issuer
        self.data_dir = data_dir
        self.reactor = reactor
        self.cname = cname
        self.on_issued = on_issued
        self.jitter = jitter
        self._domains: dict[str, _Domain] = {}
        self._inflight: set[defer.Deferred] = set()
        self._loop: LoopingCall | None = None
        #: ACME orders finished, by result (a metric: hoodyproxy_acme_orders_total).
        self.orders = {"issued": 0, "failed": 0}
        aliases.subscribe(self._changed)

    # -- the service -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.reconcile()
        self._loop = LoopingCall(self.reconcile)
        self._loop.clock = self.reactor
        self._loop.start(self.check_interval, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for state in self._domains.values():
            self._cancel(state)
        # Issuances in flight are abandoned: their challenges are withdrawn and nothing
        # they produce is served (a blocking ACME call already running in a pool thread
        # ends by itself, bounded by its timeouts).
        for d in list(self._inflight):
            d.cancel()
        return defer.succeed(None)

    # -- following the alias store ----------------------------------------------------------

    def _changed(self, kind: str, name: str) -> None:
        if kind == "domain" and self.running:
            self._sync(name)

    def reconcile(self) -> None:
        """Make the managed domains exactly the attached ones; start what is due."""
        attached = set(self.aliases.domains())
        for domain in sorted(attached - self._domains.keys()):
            self._manage(domain)
        for domain in sorted(self._domains.keys() - attached):
            self._unmanage(domain)
        now = self.reactor.seconds()
        for state in list(self._domains.values()):
            if state.not_after is None and not state.issuing:
                # Issued by another process meanwhile (or files restored by hand)?
                self._load(state, now)
            # A timer lost or overdue (suspend, a clock jump): schedule again.
            if not state.issuing and (state.timer is None or not state.timer.active()):
                self._schedule(state, self._due(state, now))

    def _sync(self, domain: str) -> None:
        attached = self.aliases.is_attached(domain)
        if attached and domain not in self._domains:
            self._manage(domain)
        elif not attached and domain in self._domains:
            self._unmanage(domain)

    def _manage(self, domain: str) -> None:
        state = self._domains[domain] = _Domain(domain)
        now = self.reactor.seconds()
        if self._load(state, now):
            log.info("certificate for {domain} loaded from disk (valid until {until})",
                     domain=domain, until=_iso(state.not_after))
        self._schedule(state, self._due(state, now))

    def _unmanage(self, domain: str) -> None:
        state = self._domains.pop(domain, None)
        if state is not None:
            self._cancel(state)
        if self.store.remove(domain):
            log.info("{domain} detached: its certificate is no longer served nor renewed "
                     "(the files stay on disk)", domain=domain)

    def _load(self, state: _Domain, now: float) -> bool:
        try:
            cert_path, key_path = certificate_paths(self.data_dir, state.name)
        except ValueError:
            return False
        validity = read_certificate(cert_path, key_path, state.name, now)
        if validity is None:
            return False
        try:
            self.store.add([state.name], cert_path, key_path)
        except Exception:
            log.failure("stored certificate for {domain} cannot be served", domain=state.name)
            return False
        state.not_before, state.not_after = validity
        return True

    # -- timing ------------------------------------------------------------------------

    def renew_at(self, not_before: float, not_after: float) -> float:
        return not_before + (not_after - not_before) * self.renew_fraction

    def _due(self, state: _Domain, now: float) -> float:
        if state.failures and state.next_attempt is not None:
            return state.next_attempt
        if state.not_after is None:
            return now
        return self.renew_at(state.not_before, state.not_after)

    def backoff(self, failures: int) -> float:
        """Seconds before retry number ``failures``: doubling from the base to the cap,
        the upper half jittered (so many nodes failing together do not retry together)."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, failures - 1))
        return delay / 2 + delay / 2 * self.jitter()

    def _schedule(self, state: _Domain, when: float) -> None:
        self._cancel(state)
        if self.issuer is None:
            return
        delay = max(0.0, when - self.reactor.seconds())
        state.timer = self.reactor.callLater(delay, self._attempt, state.name)

    @staticmethod
    def _cancel(state: _Domain) -> None:
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = None

    # -- issuing -----------------------------------------------------------------------

    def _attempt(self, domain: str) -> None:
        state = self._domains.get(domain)
        if state is None or state.issuing or not self.running:
            return
        state.timer = None
        # The gate, on the freshest state of the database.
        if not self.aliases.is_attached(domain):
            self._unmanage(domain)
            return
        state.issuing = True
        d = defer.ensureDeferred(self._issue(domain))
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            return result
        d.addBoth(done)

    async def _issue(self, domain: str) -> None:
        try:
            if self.cname is not None:
                alias = self.aliases.resolve_domain(domain)
                expected = self.aliases.hostname(alias) if alias else None
                if expected is None or not await self.cname.verify(domain, expected):
                    raise CnameMismatch(f"{domain} is not a CNAME to {expected}")
            cert_path, key_path = await self.issuer.issue(domain)
        except NotAllowed as e:
            log.info("certificate for {domain} not issued: {why}", domain=domain, why=str(e))
            self._finished(domain, None, str(e))
        except Exception as e:
            why = " ".join(str(e).split()) or type(e).__name__
            self._finished(domain, None, why)
        else:
            self._finished(domain, (cert_path, key_path), None)

    def _finished(self, domain: str, paths: tuple[str, str] | None, error: str | None) -> None:
        state = self._domains.get(domain)
        if state is None:
            return  # detached meanwhile: not served, not rescheduled
        state.issuing = False
        now = self.reactor.seconds()
        loaded = paths is not None and self._load(state, now)
        self.orders["issued" if loaded else "failed"] += 1
        if loaded:
            state.failures, state.last_error, state.next_attempt = 0, None, None
            log.info("certificate for {domain} issued, valid until {until}; renewal at {renew}",
                     domain=domain, until=_iso(state.not_after),
                     renew=_iso(self.renew_at(state.not_before, state.not_after)))
            if self.on_issued is not None:
                try:
                    self.on_issued(domain)
                except Exception:
                    log.failure("on_issued callback failed")
        else:
            state.failures += 1
            state.last_error = error or "the issued certificate could not be loaded"
            state.next_attempt = now + self.backoff(state.failures)
            held = f"still serving the one valid until {_iso(state.not_after)}" if state.not_after \
                else "no certificate held: the wildcard is served"
            log.error("certificate for {domain} failed (attempt {n}): {error}; retry at {retry}; {held}",
                      domain=domain, n=state.failures, error=state.last_error,
                      retry=_iso(state.next_attempt), held=held)
        if self.running:
            self._schedule(state, self._due(state, now))

    # -- what to watch -------------------------------------------------------------------

    def status(self, domain: str) -> dict | None:
        """What the manager knows of ``domain``, as JSON, or None if it is not managed."""
        state = self._domains.get(domain)
        if state is None:
            return None
        if state.issuing:
            phase = "issuing"
        elif state.not_after is None:
            phase = "failed" if state.failures else "pending"
        else:
            phase = "valid"
        out: dict[str, Any] = {"status": phase}
        if state.not_after is not None:
            out["not_after"] = _iso(state.not_after)
            out["renew_at"] = _iso(self.renew_at(state.not_before, state.not_after))
        if state.failures:
            out["failures"] = state.failures
            out["last_error"] = state.last_error
            out["next_attempt"] = _iso(state.next_attempt)
        return out

    def managed(self) -> list[str]:
        return sorted(self._domains)


class CnameMismatch(Exception):
    """The domain's DNS does not point at its alias's hostname."""


class CnameVerifier:
    """Checks with twisted.names that a domain is a CNAME (chain) to an expected name.

    ``resolver``: an IResolver (default: the system's, from ``/etc/resolv.conf``).
    """

    max_hops = 8

    def __init__(self, resolver=None, timeout: tuple[int, ...] = (1, 3, 5)) -> None:
        if resolver is None:
            from twisted.names import client
            resolver = client.createResolver()
        self.resolver = resolver
        self.timeout = timeout

    async def verify(self, domain: str, expected: str) -> bool:
        from twisted.names import dns
        name = domain.lower().rstrip(".")
        expected = expected.lower().rstrip(".")
        for _ in range(self.max_hops):
            try:
                answers, _, _ = await self.resolver.lookupCanonicalName(name, timeout=self.timeout)
            except Exception as e:
                log.info("CNAME lookup of {name} failed: {error}", name=name, error=str(e) or type(e).__name__)
                return False
            targets = {str(rr.name).lower().rstrip("."): str(rr.payload.name).lower().rstrip(".")
                       for rr in answers if rr.type == dns.CNAME}
            if not targets.get(name):
                return False
            # Follow the chain inside this answer, then ask again from where it ends.
            seen = 0
            while name in targets and seen < self.max_hops:
                name = targets[name]
                seen += 1
                if name == expected:
                    return True
        return False


def stored_domains(data_dir: str) -> list[str]:
    """The domains with a directory under ``<data_dir>/certs`` (for tools)."""
    try:
        return sorted(entry for entry in os.listdir(certs_dir(data_dir)) if not entry.startswith("."))
    except FileNotFoundError:
        return []


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

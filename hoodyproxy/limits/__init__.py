"""Rate limiting: GCRA over bounded tables, with an injected clock (pure: no reactor, no I/O).

Two stages of the one request path (docs: DESIGN "0. limit" and "3b. limit")::

    limiters = Limiters(settings.ratelimit, clock=reactor, workers=settings.workers)

    # 0. before routing and before any credential work
    verdict = limiters.check_client(request.client_ip)          # the TCP/QUIC peer
    # before verifying credentials (password hash, LDAP bind, JWT signature):
    verdict = limiters.check_failed_auth(client_ip, basic_or_ldap_username_or_None)
    # after a verification that failed:
    limiters.record_failed_auth(client_ip, basic_or_ldap_username_or_None)

    # 3b. after the decision let the request through
    verdict = limiters.check_after_decision(
        rate_limits, client_ip, principal, target.project, target.container,
        target.program, target.index)

    # every check:
    if verdict.limited:
        log(...)                                  # dry run included
    if not verdict.allowed:
        raise TooManyRequests(verdict)            # 429, JSON body, Retry-After, RateLimit fields

A check returns the shared :data:`ALLOWED` when the request is within its limits (so
``verdict is ALLOWED`` is the fast test), else a :class:`Verdict` naming the limit, with
``retry_after`` in whole seconds rounded up (the same request passes after that long).
:func:`rate_limit_headers` builds ``Retry-After``, ``RateLimit-Policy: "address";q=2000;w=2``
and ``RateLimit: "address";r=0;t=1`` as bytes; :class:`TooManyRequests` carries them.

``principal`` is an opaque hashable naming the credential that matched, unique across
permission sets (e.g. ``(set id, group, credential id)``, built once per cached decision);
None skips the per-principal limit.  Keys come from trusted data only: the client address
is the peer (IPv6 grouped by ``ipv6_prefix`` bits, ``::ffff:a.b.c.d`` is ``a.b.c.d``).

Configuration (the ``[ratelimit]`` table, :meth:`RateLimitSettings.from_mapping`; a key
error is :class:`InvalidRateLimit` with ``field`` = the key, reported as
``[ratelimit] KEY: problem``)::

    enabled = true                 # false: every check is ALLOWED
    per_address_rate = "1000/s"    # rates: "100/s", "6000/min", "10/m", "1000/h", "5/d", 100
    per_address_burst = 2000
    failed_auth_rate = "10/min"    # per client address and per username
    failed_auth_burst = 20
    table_size = 65536             # keys per table (eight tables)
    ipv6_prefix = 64
    dry_run = false                # over-limit requests pass; verdict.limited says so
    shared = false                 # true: N workers share one budget (limits.shared)
    shared_sync_ms = 50            # how often they exchange what they charged

A permission set may carry ``rate_limits`` (:func:`parse_rate_limits`, errors name the
dotted field, e.g. ``rate_limits.per_client.rate``, for a 422)::

    {"per_client": {"rate": "100/s", "burst": 200}, "per_principal": {...},
     "per_container": {...}, "per_project": {...},
     "per_program": {"terminal": {...}, "http-3000": {...}}, "dry_run": false}

:func:`merge_rate_limits` is the admin API's PATCH of such an object (a key given
replaces, ``null`` removes, ``per_program`` merges by program).

Memory: each table holds at most ``table_size`` keys (about 210 bytes each, key
included: 14 MB for a full table of the default size); only expired keys are evicted,
and keys that do not fit share one overflow budget, so bounding memory never lets a key
through more than its limit (the bound is stated in :mod:`hoodyproxy.limits._table` and
proven by ``tests.test_limits``).  Counters for metrics: :meth:`Limiters.stats`.
"""

from hoodyproxy.limits._keys import address_key, username_key
from hoodyproxy.limits._limiters import Limiters
from hoodyproxy.limits._rates import (EPSILON, InvalidRateLimit, Limit, Rate, parse_burst, parse_limit,
                                      parse_rate)
from hoodyproxy.limits._settings import (DEFAULT_SETTINGS, NO_RATE_LIMITS, RateLimits, RateLimitSettings,
                                         merge_rate_limits, parse_rate_limits)
from hoodyproxy.limits._table import GcraTable, TableStats
from hoodyproxy.limits._verdict import ALLOWED, TooManyRequests, Verdict, rate_limit_headers

__all__ = [
    "ALLOWED", "DEFAULT_SETTINGS", "EPSILON", "NO_RATE_LIMITS",
    "GcraTable", "InvalidRateLimit", "Limit", "Limiters", "Rate", "RateLimitSettings", "RateLimits",
    "TableStats", "TooManyRequests", "Verdict",
    "address_key", "merge_rate_limits", "parse_burst", "parse_limit", "parse_rate", "parse_rate_limits",
    "rate_limit_headers", "username_key",
]

"""The answer of a limiter, and the 429 it becomes: Retry-After and the IETF RateLimit fields.

Header fields follow draft-ietf-httpapi-ratelimit-headers (structured fields)::

    RateLimit-Policy: "address";q=2000;w=2
    RateLimit: "address";r=0;t=1

``q`` is the quota (the burst: the most requests that pass at once), ``w`` the window
(seconds a spent quota takes to refill, rounded up), ``r`` the remaining quota (0 on a
refusal), ``t`` the seconds until it is usable again (the Retry-After).  Policy names are
this package's own tokens (``address``, ``auth-address``, ``auth-user``, ``client``,
``principal``, ``container``, ``project``, ``program``), never client input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hoodyproxy import errors


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a request may pass, and if not, which limit said no and for how long.

    ``allowed`` is what the caller obeys.  ``limited`` says a limit was exceeded: a
    refusal, or (with ``dry_run``) a request let through that would have been refused,
    which the caller logs.  ``retry_after`` and ``reset`` are whole seconds, rounded up,
    at least 1 when limited; after ``retry_after`` seconds the same request passes (unless
    other requests spent the budget meanwhile).  A request within every limit gets the
    shared :data:`ALLOWED`, so the common path allocates nothing.
    """

    allowed: bool
    limiter: str
    retry_after: int
    remaining: int
    reset: int
    quota: int
    window: int
    dry_run: bool = False

    @property
    def limited(self) -> bool:
        return self.dry_run or not self.allowed


#: The verdict of every request within its limits (one shared object).
ALLOWED = Verdict(True, "", 0, 0, 0, 0, 0)


def over_limit(limiter: str, wait: float, quota: int, window: int, dry_run: bool) -> Verdict:
    """The verdict of a request ``wait`` seconds too early for ``limiter``."""
    retry_after = max(1, math.ceil(wait))
    return Verdict(dry_run, limiter, retry_after, 0, retry_after, quota, window, dry_run)


def rate_limit_headers(verdict: Verdict) -> tuple[tuple[bytes, bytes], ...]:
    """``Retry-After``, ``RateLimit-Policy`` and ``RateLimit`` for a refusal, as bytes.

    Nothing for a request let through, dry run included: telling a client it has no
    quota left while serving it would only confuse it.
    """
    if verdict.allowed:
        return ()
    name = verdict.limiter
    return (
        (b"Retry-After", b"%d" % verdict.retry_after),
        (b"RateLimit-Policy", b'"%s";q=%d;w=%d' % (name.encode("ascii"), verdict.quota, verdict.window)),
        (b"RateLimit", b'"%s";r=%d;t=%d' % (name.encode("ascii"), verdict.remaining, verdict.reset)),
    )


class TooManyRequests(errors.GatewayError):
    """A request refused by a rate limit: 429, the usual JSON body, and the fields above.

    Raised by the gateway (``raise TooManyRequests(verdict)``) and answered at the edge
    like every other :class:`~hoodyproxy.errors.GatewayError`; ``reason`` names the limit
    for the audit line.
    """

    status = 429
    code = "rate_limited"
    message = "too many requests; retry later"

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        super().__init__(reason=f"rate limited ({verdict.limiter})",
                         headers=dict(rate_limit_headers(verdict)))

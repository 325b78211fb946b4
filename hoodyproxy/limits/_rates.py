"""Rates and limits as values: ``"100/s"`` and a burst, parsed once, cheap to check against.

A :class:`Rate` is a count per period (``"100/s"``, ``"6000/min"``, ``"10/m"``, ``"1000/h"``,
``"5/d"``, or a bare number meaning per second); a :class:`Limit` is a rate with an integer
burst, the most requests that may pass at once.  Parsing errors raise
:class:`InvalidRateLimit`, whose ``field`` names the value at fault so that the config can
say ``[ratelimit] key: problem`` and the admin API a 422 naming the dotted field.  Messages
say what is wrong and what would be right; they never echo the value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

#: Slack on every comparison of times, in seconds.  A request arriving within this much
#: of its due time is on time; without it, ``0.01`` added 100 times is not ``1.0`` and
#: "one request per interval" would refuse a request that is exactly on time.  It never
#: admits an extra request, because every interval is longer (see ``MAX_PER_SECOND``).
EPSILON = 1e-6
#: The fastest rate accepted; its interval (10 us) is ten times ``EPSILON``.
MAX_PER_SECOND = 100_000
#: The slowest rate accepted: one a day.
MAX_INTERVAL = 86_400.0
#: The largest burst accepted (a burst is a count of requests, not a buffer: it costs nothing).
MAX_BURST = 1_000_000

_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}
_CANONICAL_UNIT = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "d"}
_RATE = re.compile(r"\s*([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*(?:/\s*([a-z]+)\s*)?\Z")
_RATE_HINT = "must be a rate like '100/s', '6000/min', '10/m' or '1000/h' (or a number per second)"


class InvalidRateLimit(ValueError):
    """A rate, a limit or a rate-limit setting that cannot be used.

    ``field`` names the value at fault (``per_address_rate`` for the config table,
    ``rate_limits.per_client.rate`` for the admin API's JSON, ``""`` when the caller
    named nothing); ``problem`` says what is wrong.  The config wraps it as
    ``ConfigError(f"[ratelimit] {field}", problem)``, the admin API as a 422 naming
    ``field``.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``period`` seconds, as written (``unit`` is the canonical name)."""

    count: float
    period: float
    unit: str

    @property
    def interval(self) -> float:
        """Seconds between requests at this rate (GCRA's emission interval)."""
        return self.period / self.count

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        count = int(self.count) if self.count == int(self.count) else self.count
        return f"{count}/{self.unit}"


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate and a burst: ``burst`` requests may pass at once, then one per ``interval``.

    The derived fields are what a check reads, computed once here so that a check does
    no division: ``tolerance`` is how far ahead of now the theoretical arrival time may
    run (``burst * interval``, plus ``EPSILON``), ``ceiling`` how far a charged failure may
    push it (twice the burst), ``window`` the seconds a spent burst takes to refill (the
    ``w`` of ``RateLimit-Policy``, rounded up).
    """

    rate: Rate
    burst: int
    interval: float = field(init=False, repr=False, compare=False)
    tolerance: float = field(init=False, repr=False, compare=False)
    ceiling: float = field(init=False, repr=False, compare=False)
    window: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        interval = self.rate.interval
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "tolerance", self.burst * interval + EPSILON)
        object.__setattr__(self, "ceiling", 2 * self.burst * interval)
        object.__setattr__(self, "window", max(1, math.ceil(self.burst * interval - EPSILON)))

    def to_json(self) -> dict[str, Any]:
        """The admin API's form, which :func:`parse_limit` reads back to an equal value."""
        return {"rate": str(self.rate), "burst": self.burst}


def parse_rate(value: Any, field: str = "rate") -> Rate:
    """Read ``"100/s"``, ``"6000/min"``, ``"10/m"``, ``"1000/h"``, ``"5/d"`` or a number per second."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRateLimit(field, _RATE_HINT)
    if isinstance(value, str):
        match = _RATE.match(value.lower())
        if match is None:
            raise InvalidRateLimit(field, _RATE_HINT)
        count = float(match.group(1))
        unit = match.group(2) or "s"
        if unit not in _UNITS and unit.endswith("s") and unit[:-1] in _UNITS:
            unit = unit[:-1]  # "seconds", "mins", "hours", "days"
        if unit not in _UNITS:
            raise InvalidRateLimit(field, "the unit must be s, min (or m), h or d")
        period = _UNITS[unit]
    else:
        try:
            count, period = float(value), 1.0
        except OverflowError:
            count, period = math.inf, 1.0
        if not math.isfinite(count):
            raise InvalidRateLimit(field, "must be a finite number")
    if count <= 0:
        raise InvalidRateLimit(field, "must be more than zero")
    if count / period > MAX_PER_SECOND:
        raise InvalidRateLimit(field, f"must be at most {MAX_PER_SECOND}/s")
    if period / count > MAX_INTERVAL:
        raise InvalidRateLimit(field, "must be at least 1/d")
    return Rate(count, period, _CANONICAL_UNIT[period])


def parse_burst(value: Any, field: str = "burst") -> int:
    """Read a burst: an integer from 1 to ``MAX_BURST``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRateLimit(field, "must be an integer")
    if not 1 <= value <= MAX_BURST:
        raise InvalidRateLimit(field, f"must be 1 to {MAX_BURST}")
    return value


def parse_limit(value: Any, field: str = "limit") -> Limit:
    """Read ``{"rate": RATE, "burst": N}``; both are required, nothing else is allowed."""
    if not isinstance(value, dict):
        raise InvalidRateLimit(field, 'must be an object like {"rate": "100/s", "burst": 200}')
    for key in value:
        if key not in ("rate", "burst"):
            raise InvalidRateLimit(dotted_field(field, key), "unknown key (a limit has rate and burst)")
    for key in ("rate", "burst"):
        if key not in value:
            raise InvalidRateLimit(f"{field}.{key}", "is required")
    return Limit(parse_rate(value["rate"], f"{field}.rate"),
                 parse_burst(value["burst"], f"{field}.burst"))


def dotted_field(field: str, key: Any) -> str:
    """``field.key`` when ``key`` is short and plain enough to repeat, else ``field``."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,32}", key):
        return f"{field}.{key}"
    return field

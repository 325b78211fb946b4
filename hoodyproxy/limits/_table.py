"""GCRA over a bounded table: one float per key, expired entries evicted, an overflow bucket.

The generic cell rate algorithm keeps, per key, a theoretical arrival time (TAT): when
the key's budget would be whole again if it sent at exactly its rate.  A request at
``now`` with interval ``T`` and burst ``b`` passes when ``max(TAT, now) + T - now <=
b * T``, and then ``TAT = max(TAT, now) + T``; a refused request changes nothing, and
the time it must wait is exactly the excess, which gives an exact Retry-After.  A TAT
at or before ``now`` carries no state: such a key is the same as one never seen.

Memory is bounded by ``capacity`` keys, in an ``OrderedDict`` in least-recently-used
order.  Measured with tracemalloc, an entry costs about 155 bytes when the table first
fills and about 210 once it churns (the hash table then keeps room for deleted entries),
an IPv6 /64 key included (an IPv4 string key is some 15 bytes more): 14 MB for a full
table of 65,536.  Bounding memory never lets a key through more often than its limit
allows, by this rule:

- Only **expired** entries (TAT <= now) are evicted, so an evicted key that comes back
  is treated exactly as if it had been kept: eviction gains it nothing (extra = 0).
  A new key looks at up to ``PROBES`` entries from the least-recently-used end,
  evicts the first expired one, and moves the live ones it passed to the back (they
  are looked at again only after every other entry).
- When the table is full of live entries, a new key is not stored: it is checked
  against one shared **overflow** TAT with its own interval and burst.  Keys the table
  cannot hold therefore share one key's budget.

The bound, proven by ``tests.test_limits`` (hypothesis against these formulas): within
any interval of ``t`` seconds, a table admits at most ``(capacity + 1) * (burst + t /
T)`` requests over all keys together, however many keys an attacker rotates through
(each slot of the table is a chain of entries that starts only where the previous
expired, so it behaves as one GCRA key; the overflow bucket is one more), and one key
at most ``2 * (burst + t / T)`` (its own chain plus the whole overflow bucket), so a
key that was refused a place gains at most one burst and the overflow's rate, which it
shares with every other such key.  And as long as no key was turned to the overflow,
every verdict is exactly that of an unbounded table.  The price of the bound is paid by
new keys during a flood of more than ``capacity`` live keys: they share the overflow
budget.

A key's debt is capped at the burst of the limit in force: a TAT further ahead than
that was set under a stricter limit since loosened, and is brought back to the edge of
the new burst when next refused, so a loosened limit applies at once (the next request
is one new interval away).  Under one unchanging limit the cap never acts, so the bound
above holds for every table whose keys share one limit.

Everything runs on the reactor thread; nothing here is thread-safe or needs to be.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import Hashable

#: How many entries a new key looks at for an expired one before it uses the overflow.
PROBES = 4


@dataclass(frozen=True, slots=True)
class TableStats:
    """Counters of one table, for metrics: a snapshot, cheap to take and to compare.

    ``refusals`` counts requests over the limit (whether refused or let through in dry
    run), ``dry_run`` those let through because of dry run, ``evictions`` expired entries
    dropped to make room, ``overflowed`` requests admitted through the overflow bucket.
    """

    name: str
    size: int
    capacity: int
    refusals: int
    dry_run: int
    evictions: int
    overflowed: int


class GcraTable:
    """The TATs of at most ``capacity`` keys, and the overflow TAT for keys that do not fit.

    Methods take the interval and tolerance of the limit in force for the request
    (``Limit.interval``, ``Limit.tolerance``), so keys of one table may have different
    limits and a changed limit applies at once.  ``take`` and ``peek`` return the seconds
    to wait, ``0.0`` when the request passes.
    """

    __slots__ = ("name", "capacity", "_tats", "_overflow",
                 "refusals", "dry_run", "evictions", "overflowed")

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a table holds at least one key")
        self.name = name
        self.capacity = capacity
        self._tats: OrderedDict[Hashable, float] = OrderedDict()
        self._overflow = float("-inf")
        self.refusals = 0
        self.dry_run = 0
        self.evictions = 0
        self.overflowed = 0

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tats

    def take(self, key: Hashable, now: float, interval: float, tolerance: float) -> float:
        """Count one request of ``key`` if it is within its limit; else return the wait."""
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            return self._take_new(key, now, interval, tolerance)
        if tat < now:
            tat = now
        tat += interval
        wait = tat - now - tolerance
        if wait > 0.0:
            self.refusals += 1
            if wait > interval:
                tats[key] = now + tolerance
                return interval
            return wait
        tats[key] = tat
        tats.move_to_end(key)
        return 0.0

    def peek(self, key: Hashable, now: float, interval: float, tolerance: float,
             capped: bool = True) -> float:
        """What :meth:`take` would return now, changing nothing (no counter either).

        ``capped=False`` reports debt beyond the burst as it is, for :meth:`charge`\ d
        failures, which may run past the burst on purpose.
        """
        tat = self._tats.get(key)
        if tat is None:
            if self._has_room(now):
                return 0.0
            tat = self._overflow
        wait = max(tat, now) + interval - now - tolerance
        if wait <= 0.0:
            return 0.0
        return min(wait, interval) if capped else wait

    def charge(self, key: Hashable, now: float, interval: float, ceiling: float) -> None:
        """Count one request of ``key`` whatever its budget, its TAT at most ``now + ceiling``.

        For failures that already happened: they are counted even over the limit (so that
        guesses verified concurrently are all paid for), yet the lockout they build is
        bounded (so that an attacker cannot lock a victim's name out for long).
        """
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) < self.capacity or self._reclaim(now):
                tats[key] = now + interval  # ceiling >= interval: a burst is at least 1
                return
            self.overflowed += 1
            self._overflow = min(max(self._overflow, now) + interval, now + ceiling)
            return
        tats[key] = min(max(tat, now) + interval, now + ceiling)
        tats.move_to_end(key)

    def refund(self, key: Hashable, interval: float) -> None:
        """Undo the last successful :meth:`take` of ``key`` (nothing else may have run since).

        ``take`` set ``TAT = max(old, now) + interval``; taking ``interval`` off gives
        ``max(old, now)``, which decides every later request exactly as ``old`` would.
        """
        tats = self._tats
        tat = tats.get(key)
        if tat is not None:
            tats[key] = tat - interval
        else:
            self._overflow -= interval
            self.overflowed -= 1

    def stats(self) -> TableStats:
        return TableStats(self.name, len(self._tats), self.capacity, self.refusals,
                          self.dry_run, self.evictions, self.overflowed)

    def _take_new(self, key: Hashable, now: float, interval: float, tolerance: float) -> float:
        tats = self._tats
        if len(tats) < self.capacity or self._reclaim(now):
            # A fresh key always passes: its TAT becomes now + interval <= tolerance.
            tats[key] = now + interval
            return 0.0
        tat = self._overflow
        if tat < now:
            tat = now
        tat += interval
        wait = tat - now - tolerance
        if wait > 0.0:
            self.refusals += 1
            if wait > interval:
                self._overflow = now + tolerance
                return interval
            return wait
        self._overflow = tat
        self.overflowed += 1
        return 0.0

    def _reclaim(self, now: float) -> bool:
        """Evict one expired entry among the least recently used few; False if none is."""
        tats = self._tats
        for _ in range(min(PROBES, len(tats))):
            key, tat = tats.popitem(last=False)
            if tat <= now:
                self.evictions += 1
                return True
            tats[key] = tat  # live: back of the queue, looked at again after all others
        return False

    def _has_room(self, now: float) -> bool:
        """Whether :meth:`_take_new` would store a new key now (without evicting anything)."""
        tats = self._tats
        if len(tats) < self.capacity:
            return True
        return any(tat <= now for tat in islice(tats.values(), PROBES))

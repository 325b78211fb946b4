"""Shared budgets among workers, the pure part: tables that note their charges, and the wire form.

With ``[ratelimit] shared = true`` and several workers, each worker's tables are
:class:`SharedGcraTable`: a take, a charge or a refund does what it does in a
:class:`GcraTable` (but for debt, below) and also adds the seconds it cost to ``pending``
(per key: the cost and the horizon, below).  :meth:`Limiters.drain_charges` takes them out, at most
:data:`MAX_BATCH_KEYS` keys at a time (the rest wait for the next batch, merged with what
comes meanwhile); :func:`encode_batch` makes one line of them; the other workers
:func:`decode_batch` it and :meth:`Limiters.apply_charges` it: ``TAT = min(max(TAT, now)
+ cost, now + horizon)`` (a :meth:`GcraTable.charge`), so every worker's TAT of a key
holds, within one exchange, the requests of the whole node.  The I/O (a UNIX socket,
worker 0 relaying) is :mod:`hoodyproxy.limits.shared`, which also states the bound.

A charge is sent as seconds, not as a count, so that the receiver needs no limit: keys of
the per-set tables have the limits of their permission set, which the sender knew.

**Debt.**  A plain table forgives a TAT more than the burst ahead (it can only come from a
stricter limit since loosened).  Here it is legitimate: N workers spent the burst at once
before hearing of each other, and the node must pay that back, or the long-run rate would
be N times the limit.  So a key more than a burst in debt is refused with its true wait,
and its TAT is left alone, up to the *horizon* ``N * (tolerance + lag)`` (for failed
authentications, which :meth:`GcraTable.charge` caps at the ceiling, the ceiling plus
``(N - 1) * tolerance + N * lag``): the most debt N workers can build when each hears of
the others within ``lag`` seconds.  Beyond it the debt is that of a stricter limit and is
forgiven as in a plain table (so a loosened limit still applies, within one horizon).

**Bounds.**  ``pending`` holds at most :data:`MAX_PENDING_KEYS` keys per table; a charge
to a key that does not fit is not shared (``unshared`` counts them; the key is then
limited by each worker alone, up to N times its budget).  Keys longer than
:data:`MAX_KEY_LENGTH` characters (a principal naming a very long user, say) are not
shared either.  A line is therefore at most :data:`MAX_LINE` bytes.

**Keys on the wire.**  JSON, losslessly: a ``str`` is a string (a username key with lone
surrogates travels escaped), ``bytes`` (an IPv6 network, a username digest) is
``{"b": base64}``, a ``tuple`` is a list (no key is a list, which is unhashable), and
``int``, ``float``, ``bool`` and ``None`` are themselves.  Nothing else is a key.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from itertools import islice
from typing import Any, Hashable

from hoodyproxy.limits._table import GcraTable

#: Keys in one batch, over every table (the rest wait for the next batch).
MAX_BATCH_KEYS = 4096
#: Keys waiting to be sent, per table.
MAX_PENDING_KEYS = 4096
#: Characters (of str and bytes parts together) in a key that is shared.
MAX_KEY_LENGTH = 128
#: Bound on one line: every key at its longest, each character escaped as a surrogate
#: pair (12 bytes), plus the numbers.  Real batches are a small fraction of it.
MAX_LINE = MAX_BATCH_KEYS * (12 * MAX_KEY_LENGTH + 128) + 1024
#: Nesting of tuples in a key (the per-set keys are pairs, a principal is flat).
_MAX_DEPTH = 4

Charges = dict[str, dict[Hashable, tuple[float, float]]]


class SharedGcraTable(GcraTable):
    """A :class:`GcraTable` that notes what each key was charged, and honours the debt that
    the other workers' charges build (see the module docstring).

    ``workers`` is N; ``lag`` the longest delay, in seconds, assumed between a charge on
    one worker and its arrival on the others (it only sizes the horizon).
    """

    __slots__ = ("pending", "unshared", "_workers", "_lag_slack")

    def __init__(self, name: str, capacity: int, workers: int, lag: float) -> None:
        super().__init__(name, capacity)
        #: key -> [seconds charged since the last batch, horizon]
        self.pending: dict[Hashable, list[float]] = {}
        self.unshared = 0
        self._workers = workers
        self._lag_slack = workers * lag

    def take(self, key: Hashable, now: float, interval: float, tolerance: float) -> float:
        # GcraTable.take, with a debt up to the horizon refused with its true wait and
        # kept, and each request noted (inlined: this is every request's path).
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            wait = self._take_new(key, now, interval, tolerance)
            if wait:
                return wait
        else:
            if tat < now:
                tat = now
            tat += interval
            wait = tat - now - tolerance
            if wait > 0.0:
                self.refusals += 1
                if wait > interval and tat - interval - now > self._workers * tolerance + self._lag_slack:
                    tats[key] = now + tolerance  # a stricter limit's debt: forgiven
                    return interval
                return wait
            tats[key] = tat
            tats.move_to_end(key)
        entry = self.pending.get(key)
        if entry is not None:
            entry[0] += interval  # the horizon of its first charge this batch stands
        elif len(self.pending) < MAX_PENDING_KEYS:
            self.pending[key] = [interval, self._workers * tolerance + self._lag_slack]
        else:
            self.unshared += 1
        return 0.0

    def peek(self, key: Hashable, now: float, interval: float, tolerance: float,
             capped: bool = True) -> float:
        wait = GcraTable.peek(self, key, now, interval, tolerance, capped=False)
        if capped and wait > interval:
            tat = self._tats.get(key)
            if tat is None or tat - now > self._workers * tolerance + self._lag_slack:
                return interval  # what take() says of a debt it forgives
        return wait

    def charge(self, key: Hashable, now: float, interval: float, ceiling: float) -> None:
        GcraTable.charge(self, key, now, interval, ceiling)
        # tolerance is about half the ceiling (the ceiling is twice the burst)
        horizon = ceiling + (self._workers - 1) * ceiling / 2 + self._lag_slack
        entry = self.pending.get(key)
        if entry is not None:
            entry[0] += interval
        elif len(self.pending) < MAX_PENDING_KEYS:
            self.pending[key] = [interval, horizon]
        else:
            self.unshared += 1

    def refund(self, key: Hashable, interval: float) -> None:
        GcraTable.refund(self, key, interval)
        entry = self.pending.get(key)
        if entry is not None:
            entry[0] -= interval
            if entry[0] <= interval * 1e-9:
                del self.pending[key]

    def drain(self, limit: int) -> dict[Hashable, list[float]]:
        """Take out the charges of at most ``limit`` keys, the oldest first."""
        pending = self.pending
        if len(pending) <= limit:
            self.pending = {}
            return pending
        return {key: pending.pop(key) for key in list(islice(pending, limit))}


def apply_charge(table: GcraTable, key: Hashable, now: float, cost: float, horizon: float) -> None:
    """Charge ``key`` the ``cost`` seconds another worker charged it (never noted again)."""
    # One charge of interval ``cost``: the same TAT as that many requests charged one by one.
    GcraTable.charge(table, key, now, min(cost, horizon), horizon)


# -- the wire --------------------------------------------------------------------------

def key_length(key: Any, depth: int = 0) -> int:
    """Characters of the str and bytes parts of a key; -1 if it cannot travel."""
    kind = type(key)
    if kind is str or kind is bytes:
        return len(key)
    if kind is tuple:
        if depth >= _MAX_DEPTH:
            return -1
        total = 0
        for part in key:
            n = key_length(part, depth + 1)
            if n < 0:
                return -1
            total += n
        return total
    if key is None or kind is int or kind is bool:
        return 0
    if kind is float and math.isfinite(key):
        return 0
    return -1


def encode_key(key: Any) -> Any:
    """A key as a JSON value (see the module docstring); TypeError if it cannot travel."""
    kind = type(key)
    if kind is str:
        return key
    if kind is bytes:
        return {"b": base64.b64encode(key).decode("ascii")}
    if kind is tuple:
        return [encode_key(part) for part in key]
    if key is None or kind in (int, bool) or (kind is float and math.isfinite(key)):
        return key
    raise TypeError("not a key that can travel")


def decode_key(value: Any, depth: int = 0) -> Hashable:
    """The key a JSON value stands for; ValueError if it stands for none."""
    kind = type(value)
    if kind is str:
        return value
    if kind is list:
        if depth >= _MAX_DEPTH:
            raise ValueError("key nested too deep")
        return tuple(decode_key(part, depth + 1) for part in value)
    if kind is dict:
        if len(value) != 1 or type(value.get("b")) is not str:
            raise ValueError("bytes are {\"b\": base64}")
        try:
            return base64.b64decode(value["b"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("bytes are {\"b\": base64}") from None
    if value is None or kind in (int, bool) or (kind is float and math.isfinite(value)):
        return value
    raise ValueError("not a key")


def encode_batch(charges: Charges, worker: int) -> tuple[bytes, int]:
    """One line (without its newline) carrying ``charges``, and how many keys were left out
    (too long, or of a type that cannot travel)."""
    tables: dict[str, list] = {}
    skipped = 0
    for name, entries in charges.items():
        rows = []
        for key, (cost, horizon) in entries.items():
            if not 0 <= key_length(key) <= MAX_KEY_LENGTH:
                skipped += 1
                continue
            rows.append([encode_key(key), cost, horizon])
        if rows:
            tables[name] = rows
    return json.dumps({"w": worker, "c": tables}, separators=(",", ":")).encode("ascii"), skipped


def _seconds(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError("a charge is a finite number of seconds, >= 0")
    return float(value)


def decode_batch(line: bytes) -> tuple[int | None, Charges]:
    """(the sending worker, its charges) from a line of :func:`encode_batch`.

    ValueError when the line is not one (the receiver drops it whole).  The same key twice
    in a table adds up.
    """
    if len(line) > MAX_LINE:
        raise ValueError("line too long")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if type(message) is not dict or type(message.get("c")) is not dict:
        raise ValueError("a batch is {\"w\": N, \"c\": {table: [[key, seconds, horizon], ...]}}")
    worker = message.get("w")
    if worker is not None and type(worker) is not int:
        raise ValueError("w is a worker number")
    charges: Charges = {}
    for name, rows in message["c"].items():
        if type(rows) is not list:
            raise ValueError("a table's charges are a list")
        entries: dict[Hashable, tuple[float, float]] = {}
        for row in rows:
            if type(row) is not list or len(row) != 3:
                raise ValueError("a charge is [key, seconds, horizon]")
            key = decode_key(row[0])
            cost, horizon = _seconds(row[1]), _seconds(row[2])
            before = entries.get(key)
            entries[key] = (cost, horizon) if before is None else (before[0] + cost, max(before[1], horizon))
        charges[name] = entries
    return worker, charges

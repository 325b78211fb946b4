"""Coarse deadlines: one periodic sweep per clock instead of a timer per request.

A ``callLater`` per request, cancelled when the answer comes, costs a DelayedCall, a
heap push and a cancellation on every request, and almost never fires.  Here whatever
waits on a deadline joins a :class:`Deadlines` set, and one call on the clock sweeps
the set every ``resolution`` seconds, asking each member to check its own deadline
(so a deadline that moves, such as "no progress for N seconds", costs nothing to
move: the member just records the time of its progress).  The sweep is scheduled only
while the set is non-empty, so an idle process has no timer pending.

A deadline is therefore noticed up to ``resolution`` seconds late, never early.
"""

from __future__ import annotations

import weakref
from typing import Protocol as TypingProtocol

#: How often the sweep runs while something is watched, in seconds.
RESOLUTION = 1.0


class Watched(TypingProtocol):
    """Something with a deadline of its own."""

    def check_deadline(self, now: float) -> None:
        """Called by the sweep: act if the deadline has passed (and usually stop being watched)."""


class Deadlines:
    """The things waiting on one clock, swept together."""

    def __init__(self, clock, resolution: float = RESOLUTION) -> None:
        self.clock = clock
        self.resolution = resolution
        self._watched: dict[Watched, None] = {}
        self._call = None

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, item: Watched) -> None:
        """Check ``item``'s deadline on every sweep until :meth:`unwatch`."""
        self._watched[item] = None
        if self._call is None:
            self._call = self.clock.callLater(self.resolution, self._sweep)

    def unwatch(self, item: Watched) -> None:
        """Stop checking ``item``; the sweep stops when nothing is left to check."""
        watched = self._watched
        watched.pop(item, None)
        if not watched and self._call is not None:
            self._call.cancel()
            self._call = None

    def _sweep(self) -> None:
        self._call = None
        now = self.clock.seconds()
        for item in list(self._watched):
            if item in self._watched:  # an earlier one's timeout may have ended it
                item.check_deadline(now)
        if self._watched and self._call is None:
            self._call = self.clock.callLater(self.resolution, self._sweep)


# One Deadlines per clock, alive while something holds it (each Deadlines holds its clock,
# so the id cannot be reused while the entry exists).
_shared: "weakref.WeakValueDictionary[int, Deadlines]" = weakref.WeakValueDictionary()


def shared(clock) -> Deadlines:
    """The :class:`Deadlines` every user of ``clock`` shares."""
    deadlines = _shared.get(id(clock))
    if deadlines is None:
        deadlines = _shared[id(clock)] = Deadlines(clock)
    return deadlines

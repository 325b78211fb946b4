"""Live taps: what a tap asks for, which exchanges it sees, and where its events go.

A tap is started over the admin API (``POST /api/v1/taps``, :mod:`hoodyproxy.admin.taps`)
with a *match* (which exchanges) and a *capture* (how much of each), and lives while its
client holds the connection, until its time limit, its event limit or a ``DELETE``.

Every process has one :class:`TapHub`.  The gateway asks it, per request, only
``hub.active`` (one attribute read: with no tap running the request path pays nothing
else); with a tap running, :meth:`TapHub.begin` matches the request's own side (route,
host, path, method, WebSocket, a header) and gives the exchange a
:class:`hoodyproxy.observe.capture.Capture`, which builds the events.  Where the events
go is the hub's ``sink``: in worker 0 (or a single process) the :class:`Tap` itself,
whose queue feeds its HTTP response; in the other workers the relay to worker 0
(:mod:`hoodyproxy.observe.relay`).

A tap never slows the traffic: its queue is bounded (:data:`QUEUE_EVENTS` events held
while its client does not read), and past that events are dropped and counted; the
count rides on the next event delivered (``dropped``) and on the ``end`` event.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any, Callable

import orjson
from twisted.logger import Logger

from hoodyproxy.observe.tapspec import InvalidTap, TapSpec

__all__ = ["InvalidTap", "Tap", "TapHub", "TapSpec", "dumps"]

log = Logger()

#: Events held for a client that is not reading before events are dropped.
QUEUE_EVENTS = 1000
#: Taps running at once on a node unless ``[tap] max_taps`` says.
DEFAULT_MAX_TAPS = 16


class Tap:
    """One running tap in worker 0 (or a single process): its queue and its client.

    ``write(line)`` sends one NDJSON line to the client; ``finish()`` ends its response.
    The client's transport pauses and resumes the tap (:meth:`pauseProducing`,
    :meth:`resumeProducing`): while paused, events wait in a queue of at most
    :data:`QUEUE_EVENTS`, and past that are dropped and counted.
    """

    def __init__(self, spec: TapSpec, write: Callable[[bytes], None], finish: Callable[[], None],
                 on_end: Callable[["Tap", str], None] | None = None, queue_events: int = QUEUE_EVENTS) -> None:
        self.spec = spec
        self.id = spec.id
        self._write = write
        self._finish = finish
        self.on_end = on_end
        self.queue: deque = deque()
        self.queue_events = queue_events
        self.paused = False
        self.events = 0
        self.dropped = 0
        self._dropped_since = 0
        self.ended: str | None = None
        self.expiry_call = None

    def offer(self, event: dict) -> None:
        """An event for this tap's client (from any worker): sent, queued or dropped."""
        if self.ended is not None:
            return
        if self.events >= self.spec.max_events:
            self.end("max_events")
            return
        if self.paused or self.queue:
            if len(self.queue) >= self.queue_events:
                self.dropped += 1
                self._dropped_since += 1
                return
            self.queue.append(event)
            return
        self._send(event)
        if self.events >= self.spec.max_events:
            self.end("max_events")

    def _send(self, event: dict) -> None:
        self.events += 1
        event["seq"] = self.events
        if self._dropped_since:
            event["dropped"] = self._dropped_since
            self._dropped_since = 0
        self._write(dumps(event))

    # IPushProducer, registered on the client's request
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and self.ended is None:
            self._send(self.queue.popleft())
            if self.events >= self.spec.max_events:
                self.end("max_events")

    def stopProducing(self) -> None:
        self.end("client closed")

    def end(self, reason: str) -> None:
        """End the tap: its ``end`` event (when its client is still there), then its response."""
        if self.ended is not None:
            return
        self.ended = reason
        if self.expiry_call is not None and self.expiry_call.active():
            self.expiry_call.cancel()
        self.expiry_call = None
        if reason != "client closed":
            # What waits in the queue goes out first, past the pause: it is bounded, and the
            # connection ends right after.
            while self.queue:
                self._send(self.queue.popleft())
            self._write(dumps({"type": "end", "tap": self.id, "reason": reason, "events": self.events,
                               "dropped": self.dropped + self._dropped_since}))
        self.queue.clear()
        if self.on_end is not None:
            self.on_end(self, reason)
        if reason != "client closed":
            self._finish()


def dumps(event: dict) -> bytes:
    """One NDJSON line (orjson: a tap capturing every exchange serializes one event per
    request, with bodies; the standard library's encoder costs several times more)."""
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


class TapHub:
    """The taps this process matches exchanges against, and where their events go.

    ``sink(tap_id, event)`` takes each event; :meth:`set_specs` replaces the specs (a
    worker's relay does, from worker 0's list); :meth:`add` and :meth:`remove` are worker
    0's.  ``on_change(specs)`` is called whenever the set changes (worker 0's relay sends
    it on to the workers).
    """

    def __init__(self, clock, *, worker: int = 0, now: Callable[[], float] = time.time,
                 allow_unredacted: bool = False, max_taps: int = DEFAULT_MAX_TAPS,
                 queue_events: int = QUEUE_EVENTS) -> None:
        self.clock = clock
        self.queue_events = queue_events
        self.now = now
        self.allow_unredacted = allow_unredacted
        self.max_taps = max_taps
        #: True while any tap is running: the one thing the request path reads.
        self.active = False
        self.specs: dict[str, TapSpec] = {}
        self.taps: dict[str, Tap] = {}
        self.sink: Callable[[str, dict], None] = self._deliver
        self.on_change: list[Callable[[list[TapSpec]], None]] = []
        self._exchange_ids = itertools.count(1)
        self.set_worker(worker)

    def configure(self, *, allow_unredacted: bool, max_taps: int, queue_events: int) -> None:
        """Take new ``[tap]`` settings (a config reload) for the taps started from now on;
        those running keep theirs."""
        self.allow_unredacted = allow_unredacted
        self.max_taps = max_taps
        self.queue_events = queue_events

    def set_worker(self, worker: int) -> None:
        """This process's worker number (in its events, and in its exchange ids)."""
        self.worker = worker
        self._id_prefix = "%d-" % worker

    # -- worker 0 ----------------------------------------------------------------------

    def add(self, spec: TapSpec, write, finish, on_end=None) -> Tap:
        """Start a tap; raises :class:`InvalidTap` when ``max_taps`` are running."""
        if len(self.taps) >= self.max_taps:
            raise InvalidTap("taps", f"{self.max_taps} taps are running already ([tap] max_taps)")
        spec.id = "t-" + os.urandom(6).hex()
        spec.started = self.now()
        spec.expires = spec.started + spec.ttl
        tap = Tap(spec, write, finish, on_end=self._ended_then(on_end), queue_events=self.queue_events)
        self.taps[spec.id] = tap
        tap.expiry_call = self.clock.callLater(spec.ttl, tap.end, "ttl")
        self.specs[spec.id] = spec
        self._changed()
        return tap

    def _ended_then(self, on_end):
        def ended(tap: Tap, reason: str) -> None:
            self.taps.pop(tap.id, None)
            if self.specs.pop(tap.id, None) is not None:
                self._changed()
            if on_end is not None:
                on_end(tap, reason)
        return ended

    def remove(self, tap_id: str, reason: str = "deleted") -> bool:
        tap = self.taps.get(tap_id)
        if tap is None:
            return False
        tap.end(reason)
        return True

    def end_all(self, reason: str = "shutdown") -> None:
        for tap in list(self.taps.values()):
            tap.end(reason)

    def _deliver(self, tap_id: str, event: dict) -> None:
        tap = self.taps.get(tap_id)
        if tap is not None:
            tap.offer(event)

    # -- every worker ------------------------------------------------------------------

    def set_specs(self, specs: list[TapSpec]) -> None:
        """The running taps, as worker 0 says (a worker's relay calls this)."""
        self.specs = {spec.id: spec for spec in specs}
        self.active = bool(self.specs)

    def _changed(self) -> None:
        self.active = bool(self.specs)
        specs = list(self.specs.values())
        for callback in list(self.on_change):
            callback(specs)

    def begin(self, request, target, method: bytes, path: bytes, pairs, websocket: bool, record: dict):
        """A Capture for an exchange some running tap sees, or None."""
        now = self.now()
        matched = [spec for spec in self.specs.values()
                   if spec.expires > now and spec.matches_request(target, method, path, pairs, websocket)]
        if not matched:
            return None
        from hoodyproxy.observe.capture import Capture
        return Capture(self, matched, self._id_prefix + str(next(self._exchange_ids)), request, pairs,
                       websocket, record)

    def emit(self, spec: TapSpec, event: dict) -> None:
        event["tap"] = spec.id
        event["worker"] = self.worker
        try:
            self.sink(spec.id, event)
        except Exception:
            log.failure("tap {tap}: an event could not be delivered", tap=spec.id)

    def describe(self) -> list[dict[str, Any]]:
        """The running taps as ``GET /api/v1/taps`` lists them."""
        return [{**tap.spec.to_json(), "events": tap.events, "dropped": tap.dropped + tap._dropped_since,
                 "paused": tap.paused} for tap in self.taps.values()]

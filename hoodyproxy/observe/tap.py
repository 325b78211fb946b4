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
import re
import time
from collections import deque
from typing import Any, Callable

import orjson
from twisted.logger import Logger

log = Logger()

#: Body bytes captured per direction unless the tap says, and the most it may ask for.
DEFAULT_BODY_BYTES = 4096
MAX_BODY_BYTES = 1024 * 1024
#: Bytes captured per WebSocket frame unless the tap says, and the most.
DEFAULT_WEBSOCKET_BYTES = 4096
MAX_WEBSOCKET_BYTES = 1024 * 1024
#: A tap's time limit unless it says, and the longest (seconds).
DEFAULT_TTL = 300.0
MAX_TTL = 3600.0
#: A tap's event limit unless it says, and the most.
DEFAULT_MAX_EVENTS = 100_000
MAX_MAX_EVENTS = 10_000_000
#: Events held for a client that is not reading before events are dropped.
QUEUE_EVENTS = 1000
#: Taps running at once on a node unless ``[tap] max_taps`` says.
DEFAULT_MAX_TAPS = 16

_HEX24 = re.compile(r"^[0-9a-f]{24}$")
_STATUS = re.compile(r"^([1-5])(xx|\d\d)$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_MATCH_KEYS = frozenset({"project", "container", "program", "index", "host", "alias", "path_prefix", "methods",
                         "status", "websocket_only", "header"})
_CAPTURE_KEYS = frozenset({"headers", "body_bytes", "websocket", "websocket_bytes"})
_TOP_KEYS = frozenset({"match", "capture", "ttl_s", "max_events", "redact"})


class InvalidTap(ValueError):
    """A tap request that cannot be served; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _int(value: Any, field: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidTap(field, f"must be a whole number from {low} to {high}")
    return value


def _bool(value: Any, field: str) -> bool:
    if type(value) is not bool:
        raise InvalidTap(field, "must be true or false")
    return value


def _text(value: Any, field: str, limit: int = 253) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or any(c in value for c in "\r\n\0"):
        raise InvalidTap(field, f"must be a non-empty string of at most {limit} characters")
    return value


class TapSpec:
    """What one tap asks for, parsed and checked (see :meth:`from_json`)."""

    __slots__ = ("id", "project", "container", "program", "index", "host", "alias", "path_prefix", "methods",
                 "status", "websocket_only", "header_name", "header_value", "headers", "body_bytes",
                 "websocket", "websocket_bytes", "ttl", "max_events", "redact", "started", "expires")

    def __init__(self) -> None:
        self.id = ""
        self.project = self.container = self.program = self.host = self.alias = None
        self.index: int | None = None
        self.path_prefix: bytes | None = None
        self.methods: frozenset[bytes] | None = None
        self.status: frozenset[str] | None = None
        self.websocket_only = False
        self.header_name: bytes | None = None
        self.header_value: bytes | None = None
        self.headers = True
        self.body_bytes = DEFAULT_BODY_BYTES
        self.websocket = False
        self.websocket_bytes = DEFAULT_WEBSOCKET_BYTES
        self.ttl = DEFAULT_TTL
        self.max_events = DEFAULT_MAX_EVENTS
        self.redact = True
        self.started = 0.0
        self.expires = 0.0

    @classmethod
    def from_json(cls, body: Any, *, allow_unredacted: bool = False) -> "TapSpec":
        """Parse a ``POST /api/v1/taps`` body; raises :class:`InvalidTap`.

        An absent or empty body is an empty match (every container of the node) with the
        default capture.
        """
        spec = cls()
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidTap("body", "must be a JSON object")
        for key in body:
            if key not in _TOP_KEYS:
                raise InvalidTap(key, "unknown field (known: " + ", ".join(sorted(_TOP_KEYS)) + ")")
        match = body.get("match") or {}
        capture = body.get("capture") or {}
        if not isinstance(match, dict):
            raise InvalidTap("match", "must be a JSON object")
        if not isinstance(capture, dict):
            raise InvalidTap("capture", "must be a JSON object")
        for key in match:
            if key not in _MATCH_KEYS:
                raise InvalidTap("match." + key, "unknown field (known: " + ", ".join(sorted(_MATCH_KEYS)) + ")")
        for key in capture:
            if key not in _CAPTURE_KEYS:
                raise InvalidTap("capture." + key,
                                 "unknown field (known: " + ", ".join(sorted(_CAPTURE_KEYS)) + ")")
        for key in ("project", "container"):
            if key in match:
                value = match[key]
                if not isinstance(value, str) or not _HEX24.match(value):
                    raise InvalidTap("match." + key, "must be 24 lowercase hexadecimal digits")
                setattr(spec, key, value)
        if "program" in match:
            spec.program = _text(match["program"], "match.program", 63)
        if "index" in match:
            spec.index = _int(match["index"], "match.index", 0, 65535)
        if "host" in match:
            spec.host = _text(match["host"], "match.host").lower().rstrip(".")
        if "alias" in match:
            spec.alias = _text(match["alias"], "match.alias", 63).lower()
        if "path_prefix" in match:
            prefix = _text(match["path_prefix"], "match.path_prefix", 2048)
            if not prefix.startswith("/"):
                raise InvalidTap("match.path_prefix", "must start with /")
            try:
                spec.path_prefix = prefix.encode("ascii")
            except UnicodeEncodeError:
                raise InvalidTap("match.path_prefix", "must be ASCII (percent-encode the rest)") from None
        if "methods" in match:
            methods = match["methods"]
            if (not isinstance(methods, list) or not methods
                    or not all(isinstance(m, str) and _TOKEN.match(m) for m in methods)):
                raise InvalidTap("match.methods", 'must be a non-empty list of methods, e.g. ["GET", "POST"]')
            spec.methods = frozenset(m.upper().encode("ascii") for m in methods)
        if "status" in match:
            classes = match["status"]
            if not isinstance(classes, list) or not classes:
                raise InvalidTap("match.status", 'must be a non-empty list such as ["4xx", "5xx", 302]')
            found = set()
            for item in classes:
                text = str(item).lower() if type(item) in (str, int) else ""
                if not _STATUS.match(text):
                    raise InvalidTap("match.status", f"{item!r} is neither a status (e.g. 404) nor a class (e.g. 5xx)")
                found.add(text)
            spec.status = frozenset(found)
        if "websocket_only" in match:
            spec.websocket_only = _bool(match["websocket_only"], "match.websocket_only")
        if "header" in match:
            header = match["header"]
            if isinstance(header, str):
                header = {"name": header}
            if not isinstance(header, dict) or set(header) - {"name", "value"} or "name" not in header:
                raise InvalidTap("match.header", 'must be {"name": ..., "value": ... (optional)}')
            name = _text(header["name"], "match.header.name", 256)
            if not _TOKEN.match(name):
                raise InvalidTap("match.header.name", "is not a header field name")
            spec.header_name = name.lower().encode("ascii")
            if header.get("value") is not None:
                spec.header_value = _text(header["value"], "match.header.value", 8192).encode("utf-8")
        if "headers" in capture:
            spec.headers = _bool(capture["headers"], "capture.headers")
        if "body_bytes" in capture:
            spec.body_bytes = _int(capture["body_bytes"], "capture.body_bytes", 0, MAX_BODY_BYTES)
        if "websocket" in capture:
            spec.websocket = _bool(capture["websocket"], "capture.websocket")
        if "websocket_bytes" in capture:
            spec.websocket_bytes = _int(capture["websocket_bytes"], "capture.websocket_bytes", 0,
                                        MAX_WEBSOCKET_BYTES)
        if "ttl_s" in body:
            ttl = body["ttl_s"]
            if type(ttl) not in (int, float) or not 0 < ttl <= MAX_TTL:
                raise InvalidTap("ttl_s", f"must be a number of seconds above 0 and at most {int(MAX_TTL)}")
            spec.ttl = float(ttl)
        if "max_events" in body:
            spec.max_events = _int(body["max_events"], "max_events", 1, MAX_MAX_EVENTS)
        if "redact" in body:
            spec.redact = _bool(body["redact"], "redact")
            if not spec.redact and not allow_unredacted:
                raise InvalidTap("redact", "this node does not allow unredacted taps ([tap] allow_unredacted)")
        return spec

    def to_json(self) -> dict[str, Any]:
        """The spec as the API shows it (and as the relay carries it to the workers)."""
        match: dict[str, Any] = {}
        for key in ("project", "container", "program", "index", "host", "alias"):
            value = getattr(self, key)
            if value is not None:
                match[key] = value
        if self.path_prefix is not None:
            match["path_prefix"] = self.path_prefix.decode("ascii")
        if self.methods is not None:
            match["methods"] = sorted(m.decode("ascii") for m in self.methods)
        if self.status is not None:
            match["status"] = sorted(self.status)
        if self.websocket_only:
            match["websocket_only"] = True
        if self.header_name is not None:
            match["header"] = {"name": self.header_name.decode("ascii")}
            if self.header_value is not None:
                match["header"]["value"] = self.header_value.decode("utf-8")
        return {"id": self.id, "match": match,
                "capture": {"headers": self.headers, "body_bytes": self.body_bytes, "websocket": self.websocket,
                            "websocket_bytes": self.websocket_bytes},
                "ttl_s": self.ttl, "max_events": self.max_events, "redact": self.redact,
                "started": self.started, "expires": self.expires}

    @classmethod
    def from_relay(cls, data: dict) -> "TapSpec":
        """A spec worker 0 sent (see :meth:`to_json`): parsed again, never trusted blindly."""
        spec = cls.from_json({k: data[k] for k in ("match", "capture", "ttl_s", "max_events", "redact")},
                             allow_unredacted=True)
        spec.id = str(data["id"])
        spec.started = float(data["started"])
        spec.expires = float(data["expires"])
        return spec

    # -- matching -----------------------------------------------------------------------

    def matches_request(self, target, method: bytes, path: bytes, pairs, websocket: bool) -> bool:
        """Whether an exchange's request side is one this tap sees (its status is
        checked when it is known: :meth:`matches_status`)."""
        if self.websocket_only and not websocket:
            return False
        if self.project is not None and target.project != self.project:
            return False
        if self.container is not None and target.container != self.container:
            return False
        if self.program is not None and target.program != self.program:
            return False
        if self.index is not None and target.index != self.index:
            return False
        host = target.host.lower() if target.host else ""
        if self.host is not None and host != self.host:
            return False
        if self.alias is not None and host != self.alias and not host.startswith(self.alias + "."):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.header_name is not None:
            name, wanted = self.header_name, self.header_value
            for field, value in pairs:
                if field.lower() == name and (wanted is None or value.strip() == wanted):
                    break
            else:
                return False
        return True

    def matches_status(self, status: int | None) -> bool:
        if self.status is None:
            return True
        if status is None:
            return False
        text = str(status)
        return text in self.status or (text[:1] + "xx") in self.status


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

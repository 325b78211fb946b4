"""The audit trail: one JSON line per exchange, through twisted.logger.

Records go to their own :class:`twisted.logger.LogPublisher` (namespace
``hoodyproxy.audit``), not the global one, so an audit line never lands in the
operator's diagnostic log and the diagnostic log never lands in the audit file.

The line is built once, by string formatting over the values at hand (the record's
shape is known; only client-supplied strings go through the C JSON string encoder), and
written to a buffered file flushed every ``flush_interval`` seconds (0.1 s), so the hot
path pays for neither ``json.dumps`` nor a system call per request.  A ``kill -9`` can
lose at most the last ``flush_interval`` of lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from json.encoder import encode_basestring_ascii as _q
from typing import IO

from twisted.logger import LogLevel, LogPublisher
from zope.interface import implementer

from hoodyproxy.interfaces import IAuditSink

NAMESPACE = "hoodyproxy.audit"
_KNOWN = frozenset({"time", "client", "host", "route", "method", "path", "status", "bytes_in",
                    "bytes_out", "duration_ms", "reason"})
_second_cache: list = [-1, ""]


def iso_time(ts: float) -> str:
    """UTC ISO 8601 with milliseconds; the seconds part formatted once per second."""
    second = int(ts)
    if second != _second_cache[0]:
        _second_cache[0] = second
        _second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return "%s.%03dZ" % (_second_cache[1], int((ts - second) * 1000))


def _s(value) -> str:
    return "null" if value is None else _q(value)


def format_record(r: dict) -> str:
    """One audit record as a compact JSON object (keys in a fixed order)."""
    route = r.get("route")
    if route is None:
        route_text = "null"
    else:
        route_text = '{"project":"%s","container":"%s","program":"%s","index":%d}' % (
            route["project"], route["container"], route["program"], route["index"])
    t = r["time"]
    line = ('{"time":%s,"client":%s,"host":%s,"route":%s,"method":%s,"path":%s,"status":%d,'
            '"bytes_in":%d,"bytes_out":%d,"duration_ms":%s' % (
                _q(iso_time(t) if isinstance(t, (int, float)) else t), _s(r.get("client")), _s(r.get("host")),
                route_text, _s(r.get("method")), _s(r.get("path")), r.get("status", 0),
                r.get("bytes_in", 0), r.get("bytes_out", 0), json.dumps(r.get("duration_ms", 0))))
    reason = r.get("reason")
    if reason is not None:
        line += ',"reason":' + _q(reason)
    for key, value in r.items():
        if key not in _KNOWN:
            line += "," + _q(key) + ":" + json.dumps(value, separators=(",", ":"))
    return line + "}"


class JSONLinesObserver:
    """A twisted.logger observer writing each audit event's line to a stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict) -> None:
        line = event.get("audit_line")
        if line is not None:
            self.stream.write(line + "\n")


@implementer(IAuditSink)
class AuditLog:
    """Emits audit records through a twisted.logger publisher of its own."""

    flush_interval = 0.1

    def __init__(self, path: str | None, clock=None) -> None:
        """``path`` is a file (appended, created 0600) or ``-``/None for stdout.

        ``clock`` (a reactor) schedules the periodic flush; without one every line is
        flushed at once.
        """
        self.path = path
        self.clock = clock
        if path in (None, "-"):
            self._stream: IO[str] = sys.stdout
            self._owned = False
        else:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._stream = os.fdopen(fd, "a", buffering=64 * 1024, encoding="utf-8")
            self._owned = True
        self.publisher = LogPublisher(JSONLinesObserver(self._stream))
        self._flush_call = None

    def record(self, entry: dict) -> None:
        self.publisher({"log_namespace": NAMESPACE, "log_level": LogLevel.info,
                        "log_format": "{audit_line}", "log_time": entry["time"],
                        "audit_line": format_record(entry)})
        if self.clock is None:
            self._stream.flush()
        elif self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()

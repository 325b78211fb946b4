"""The audit trail: one JSON line per exchange, through twisted.logger.

Records go to their own :class:`twisted.logger.LogPublisher` (namespace
``hoodyproxy.audit``), not the global one, so an audit line never lands in the
operator's diagnostic log and the diagnostic log never lands in the audit file.

The line is built once (the record's shape is known: the fixed fields, then ``reason``,
then the others -- ``http``, ``decision``, ``ratelimited``, ``ratelimit_dry_run``,
``closed_by`` -- in the record's order).  The gateway's usual record is serialized by orjson
from a dict of the line's fields in that order; any other, by string formatting over the
values at hand (client-supplied strings through the C JSON string encoder, a decision's
text cached, ``json.dumps`` left for values of other shapes); both give the same text.
The line is kept in a list and written in one
piece to a buffered file every ``flush_interval`` seconds (0.1 s), so the hot path pays for
neither ``json.dumps`` nor a write nor a system call per request.  A ``kill -9`` can lose
at most the last ``flush_interval`` of lines.
"""

from __future__ import annotations

import json
import os
from math import copysign
import sys
import time
from json.encoder import encode_basestring_ascii as _q
from typing import IO

from orjson import Fragment, dumps as _dumps

from twisted.logger import LogLevel, LogPublisher
from zope.interface import implementer

from hoodyproxy.interfaces import IAuditSink

NAMESPACE = "hoodyproxy.audit"
#: The fields written first, in this order, whatever their place in the record.
_KNOWN = frozenset({"time", "client", "host", "route", "method", "path", "status", "bytes_in",
                    "bytes_out", "duration_ms", "reason"})
_second_cache: list = [-1, ""]


class RouteRecord(dict):
    """An audit record's ``route`` (a dict like any other) that knows its own JSON text.

    The gateway makes one per route target and reuses it for every request to it, so the
    line's route part is rendered once, not per request.
    """

    __slots__ = ("text", "metrics_key", "fragment")

    def __init__(self, target, container_label: bool = False) -> None:
        super().__init__(project=target.project, container=target.container, program=target.program,
                         index=target.index)
        #: The route's part of a metrics key (hoodyproxy.observe.metrics), made once too:
        #: (project, program), and the container when metrics have container labels.
        self.metrics_key = ((target.project, target.program, target.container) if container_label
                            else (target.project, target.program))
        self.text = '{"project":%s,"container":%s,"program":%s,"index":%d}' % (
            _q(target.project), _q(target.container), _q(target.program), target.index)
        #: The same text for orjson, which writes it as it is (format_record's short way).
        self.fragment = Fragment(self.text)


def iso_time(ts: float) -> str:
    """UTC ISO 8601 with milliseconds; the seconds part formatted once per second."""
    second = int(ts)
    if second != _second_cache[0]:
        _second_cache[0] = second
        _second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return "%s.%03dZ" % (_second_cache[1], int((ts - second) * 1000))


def _scalar(value) -> str | None:
    """``json.dumps(value)`` for a str, None, bool, int or finite float; else None."""
    kind = type(value)
    if kind is str:
        return _q(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and value - value == 0.0:  # finite (nan and inf give nan)
        return float.__repr__(value)
    return None


_DECISION_KEYS = ("allowed", "group", "read_only", "reason")
_BOOL = {True: "true", False: "false"}
#: A decision's text by its values (only bools and strs, so an equal key is an equal text).
_decision_cache: dict = {}


def _plain_decision(value: dict) -> bool:
    """Whether a decision's values are of the types the gateway gives them."""
    allowed, group, read_only, reason = value.values()
    return (type(allowed) is bool and type(read_only) is bool and type(reason) is str
            and (group is None or type(group) is str))


def _decision(value: dict) -> str:
    """The text of a dict with the keys of a decision, in their order."""
    allowed, group, read_only, reason = key = tuple(value.values())
    if (type(allowed) is bool and type(read_only) is bool and type(reason) is str
            and (group is None or type(group) is str)):
        text = _decision_cache.get(key)
        if text is None:
            text = '{"allowed":%s,"group":%s,"read_only":%s,"reason":%s}' % (
                _BOOL[allowed], "null" if group is None else _q(group), _BOOL[read_only],
                _q(reason))
            if len(_decision_cache) < 4096:
                _decision_cache[key] = text
        return text
    return json.dumps(value, separators=(",", ":"))


def _compact(value) -> str:
    """``json.dumps(value, separators=(",", ":"))``, without the call for the usual shapes.

    A scalar, a decision (its text cached), or a flat dict of str keys and scalar values;
    anything else (a list, a nested dict, a subclass, a non-finite float) goes to
    ``json.dumps``.
    """
    text = _scalar(value)
    if text is not None:
        return text
    if type(value) is dict:
        if tuple(value) == _DECISION_KEYS:
            return _decision(value)
        parts = []
        for key, item in value.items():
            text = _scalar(item)
            if text is None or type(key) is not str:
                break
            parts.append(_q(key) + ":" + text)
        else:
            return "{" + ",".join(parts) + "}"
    return json.dumps(value, separators=(",", ":"))


#: The other fields of a record, as ``(key, ',"key":')`` in the record's order, by the
#: record's keys (a few shapes: the gateway's records differ only in their optional fields).
_extras_cache: dict = {}


def _extras(keys: tuple) -> tuple:
    extras = _extras_cache.get(keys)
    if extras is None:
        extras = tuple((key, "," + _q(key) + ":") for key in keys if key not in _KNOWN)
        if len(_extras_cache) < 1024:
            _extras_cache[keys] = extras
    return extras


#: The fields a record may lack, and what the line says then (``time`` it must have).
_DEFAULTS = {"client": None, "host": None, "route": None, "method": None, "path": None,
             "status": 0, "bytes_in": 0, "bytes_out": 0, "duration_ms": 0}
#: The end of the time's text by its milliseconds: ``.042Z"``.
_MILLIS = tuple('.%03dZ"' % ms for ms in range(1001))
#: The same without the closing quote (orjson writes it).
_MILLIS_BARE = tuple(text[:-1] for text in _MILLIS)


#: "%d.5", "%d.25", "%d.125"...: a whole number of milliseconds and its thousandths as
#: repr writes them (no trailing zeros, at least one decimal).
_DURATION = ["%d." + (("%03d" % f).rstrip("0") or "0") for f in range(1000)]


def format_record(r: dict) -> str:
    """One audit record as a compact JSON object (keys in a fixed order).

    The fixed fields first, then ``reason`` when set, then every other field in the
    record's own order; no ``json.dumps`` call for the records the gateway makes.

    The gateway's usual record (its values of the types it makes, a route it rendered
    once) takes a short way: a dict of the line's fields in the line's order, serialized
    by orjson in C.  orjson writes what the general way writes for such values (compact,
    floats as ``repr``, the same escapes below U+0080) except that it leaves non-ASCII
    characters and DEL unescaped: a line holding any goes the general way instead, so
    the line is the same text either way.
    """
    try:
        t = r["time"]
        client = r["client"]
        host = r["host"]
        route = r["route"]
        method = r["method"]
        path = r["path"]
        status = r["status"]
        bytes_in = r["bytes_in"]
        bytes_out = r["bytes_out"]
        duration = r["duration_ms"]
    except KeyError:
        if "time" not in r:
            raise
        # (the defaults first: the other fields keep their order)
        return format_record({**_DEFAULTS, **r})
    if (type(t) is float and t >= 0.0 and type(duration) is float and 0.0 <= duration < 1e15
            and type(status) is int and type(bytes_in) is int and type(bytes_out) is int
            and (route is None or type(route) is RouteRecord) and type(client) is str
            and type(method) is str and type(path) is str and (host is None or type(host) is str)):
        second = int(t)
        if second != _second_cache[0]:
            iso_time(t)
        fields = {"time": _second_cache[1] + _MILLIS_BARE[int((t - second) * 1000)], "client": client,
                  "host": host, "route": None if route is None else route.fragment, "method": method,
                  "path": path, "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out,
                  "duration_ms": duration}
        short = True
        reason = r.get("reason")
        if reason is not None:
            fields["reason"] = reason
            short = type(reason) is str
        if short:
            extras = _extras_cache.get(tuple(r))
            if extras is None:
                extras = _extras(tuple(r))
            for key, _ in extras:
                value = fields[key] = r[key]
                kind = type(value)
                if not (kind is str or kind is bool or value is None
                        or (kind is dict and tuple(value) == _DECISION_KEYS and _plain_decision(value))):
                    short = False
                    break
        if short:
            try:
                line = _dumps(fields)
            except TypeError:  # (orjson's JSONEncodeError: an int past 64 bits)
                pass
            else:
                if line.isascii() and b"\x7f" not in line:
                    return line.decode()
    if isinstance(t, (int, float)):
        second = int(t)
        if second != _second_cache[0]:
            iso_time(t)
        ms = int((t - second) * 1000)
        if 0 <= ms <= 1000:
            # (the time's text is digits, '-', ':', 'T', '.' and 'Z': nothing to escape)
            time_text = '"' + _second_cache[1] + _MILLIS[ms]
        else:
            time_text = '"%s.%03dZ"' % (_second_cache[1], ms)
    else:
        time_text = _q(t)
    if route is None:
        route_text = "null"
    elif type(route) is RouteRecord:
        route_text = route.text
    else:
        route_text = '{"project":"%s","container":"%s","program":"%s","index":%d}' % (
            route["project"], route["container"], route["program"], route["index"])
    if type(duration) is float and duration - duration == 0.0:
        # The gateway rounds to whole microseconds; such a value's repr is its three
        # decimals without trailing zeros, made here without the float-to-text search.
        # (-0.0 is left to repr, which keeps its sign as json.dumps does)
        micros = (int(duration * 1000.0 + 0.5) if 0.0 < duration < 1e12
                  or (duration == 0.0 and copysign(1.0, duration) > 0.0) else -1)
        if micros >= 0 and micros / 1000.0 == duration:
            whole, frac = divmod(micros, 1000)
            duration_text = _DURATION[frac] % whole
        else:
            duration_text = float.__repr__(duration)
    elif type(duration) is int:
        duration_text = int.__repr__(duration)
    else:
        duration_text = json.dumps(duration)
    line = ('{"time":%s,"client":%s,"host":%s,"route":%s,"method":%s,"path":%s,"status":%d,'
            '"bytes_in":%d,"bytes_out":%d,"duration_ms":%s' % (
                time_text,
                "null" if client is None else _q(client),
                "null" if host is None else _q(host),
                route_text,
                "null" if method is None else _q(method),
                "null" if path is None else _q(path),
                status, bytes_in, bytes_out, duration_text))
    reason = r.get("reason")
    if reason is not None:
        line += ',"reason":' + _q(reason)
    extras = _extras_cache.get(tuple(r))
    if extras is None:
        extras = _extras(tuple(r))
    for key, prefix in extras:
        value = r[key]
        if type(value) is str:
            line += prefix + _q(value)
        elif type(value) is dict and tuple(value) == _DECISION_KEYS:
            line += prefix + _decision(value)
        else:
            line += prefix + _compact(value)
    return line + "}"


class JSONLinesObserver:
    """A twisted.logger observer writing each audit event's line to a stream.

    With ``batch`` it keeps the lines and writes them in one piece on :meth:`write_pending`
    (or once ``batch_lines`` are kept), so a request pays for a list append, not a write.
    """

    batch_lines = 1024

    def __init__(self, stream: IO[str], batch: bool = False) -> None:
        self.stream = stream
        self.pending: list[str] | None = [] if batch else None

    def __call__(self, event: dict) -> None:
        line = event.get("audit_line")
        if line is not None:
            self.take(line)

    def take(self, line: str) -> None:
        """Write (or keep, batching) one line."""
        pending = self.pending
        if pending is None:
            self.stream.write(line + "\n")
        else:
            pending.append(line)
            if len(pending) >= self.batch_lines:
                self.write_pending()

    def write_pending(self) -> None:
        """Write the kept lines to the stream (not flushed)."""
        pending = self.pending
        if pending:
            self.pending = []
            pending.append("")
            self.stream.write("\n".join(pending))


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
        self._stream, self._owned = self.open_stream(path)
        self._observer = JSONLinesObserver(self._stream, batch=clock is not None)
        self.publisher = LogPublisher(self._observer)
        #: No observer but the file's: lines skip the publisher (see add_observer).
        self._direct = True
        self._flush_call = None

    @staticmethod
    def open_stream(path: str | None) -> tuple[IO[str], bool]:
        """The stream for ``path`` (a file, or ``-``/None for stdout), and whether it is
        ours to close; raises OSError."""
        if path in (None, "-"):
            return sys.stdout, False
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", buffering=64 * 1024, encoding="utf-8"), True

    def reopen(self) -> None:
        """Write the next lines to the file opened again by its name (``SIGUSR1``, after
        logrotate moved it away); see :meth:`move_to`."""
        self.move_to(self.path)

    def move_to(self, path: str | None, opened: tuple[IO[str], bool] | None = None) -> None:
        """Write the next lines to ``path`` (a file, or ``-``/None for stdout), opened now
        (or already, ``opened``, by :meth:`open_stream`).

        The lines kept so far go to the old file first.  Raises OSError, and keeps
        writing to the old file, if the new one cannot be opened.
        """
        stream, owned = opened if opened is not None else self.open_stream(path)
        self.flush()
        if self._owned:
            try:
                self._stream.close()
            except OSError:
                pass
        self.path, self._stream, self._owned = path, stream, owned
        self._observer.stream = stream

    def add_observer(self, observer) -> None:
        """Have ``observer`` (a twisted.logger observer) see every audit event too."""
        self._direct = False
        self.publisher.addObserver(observer)

    def remove_observer(self, observer) -> None:
        self.publisher.removeObserver(observer)
        self._direct = len(getattr(self.publisher, "_observers", ())) <= 1

    def record(self, entry: dict) -> None:
        line = format_record(entry)
        if self._direct:
            # Only the file is watching: the line goes straight to it, without the
            # event dict and the publisher's loop (a fifth of the line's cost).
            self._observer.take(line)
        else:
            self.publisher({"log_namespace": NAMESPACE, "log_level": LogLevel.info,
                            "log_format": "{audit_line}", "log_time": entry["time"],
                            "audit_line": line})
        if self.clock is None:
            self._stream.flush()
        elif self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        try:
            self._observer.write_pending()
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()

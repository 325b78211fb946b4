"""What a tap captures of one exchange, and the events made of it.

A :class:`Capture` rides on an :class:`~hoodyproxy.upstream.exchange.Exchange` that at
least one running tap matched (only then: an exchange no tap sees has none).  It keeps
the request's fields, at most the largest ``body_bytes`` any of its taps asked for of
each body, the response's head, and the times of the exchange's steps; at the end it
makes one ``exchange`` event per tap (each cut to that tap's own limits, and only for a
tap whose status filter it passes).  A response that goes on past
:data:`SEGMENT_AFTER` seconds (server-sent events, a long download) also gives
``segment`` events while it runs, at most one per :data:`SEGMENT_INTERVAL` per exchange;
a WebSocket gives a ``ws`` event per frame (:class:`FrameReader`) to the taps that
capture WebSocket frames.

Credentials are redacted before an event is made (:func:`redact_headers`,
:func:`redact_target`), unless the tap was allowed to ask otherwise.
"""

from __future__ import annotations

import base64
import re

from hoodyproxy.observe._guard import guarded as _guarded
from hoodyproxy.observe.frames import FrameReader
from hoodyproxy.observe.redact import redact_body, redact_headers, redact_target

#: A long response shows ``segment`` events once it has run this long (seconds) ...
SEGMENT_AFTER = 0.5
#: ... at most this often.
SEGMENT_INTERVAL = 0.5

#: Control characters that make a body binary (text has tabs, line ends and, from a
#: terminal, escape sequences).
_BINARY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")


def body_json(data: bytes, truncated: bool) -> dict:
    """A captured body as an event shows it: UTF-8 text, else base64; ``truncated`` when
    the real body was longer than ``data``.  A character cut by the capture's limit does
    not make a body base64: it is left out."""
    data = bytes(data)
    try:
        text = data.decode("utf-8")
        if _BINARY.search(text):
            text = None
    except UnicodeDecodeError as e:
        text = None
        if truncated and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            data = data[:e.start]
            text = data.decode("utf-8", "replace")
            if _BINARY.search(text):
                text, data = None, bytes(data)
    if text is not None:
        return {"encoding": "text", "data": text, "bytes": len(data), "truncated": truncated}
    return {"encoding": "base64", "data": base64.b64encode(data).decode("ascii"), "bytes": len(data),
            "truncated": truncated}


class Capture:
    """One tapped exchange (see the module's docstring)."""

    def __init__(self, hub, specs, exchange_id: str, request, pairs, websocket: bool, record: dict) -> None:
        self.hub = hub
        self.specs = specs
        self.id = exchange_id
        self.record = record
        self.websocket = websocket
        self.redact = any(spec.redact for spec in specs)
        self.body_limit = max(spec.body_bytes for spec in specs)
        self.headers = any(spec.headers for spec in specs)
        self.ws_specs = [spec for spec in specs if spec.websocket]
        self.started = hub.now()
        self.upstream_sent: float | None = None
        self.first_byte: float | None = None
        self.request_pairs = list(pairs) if self.headers else None
        self.request_body = bytearray()
        self.request_total = 0
        self.request_type = None
        self.status: int | None = None
        self.response_pairs = None
        self.response_body = bytearray()
        self.response_total = 0
        self.response_type = None
        # segments of a long response
        self.segment_offset = 0
        self.segment_data = bytearray()
        self.segment_length = 0
        self.segments = 0
        self.last_segment = 0.0
        self.segment_call = None
        self.streaming = False
        self.done = False
        self.failed = False
        self.path_text: str | None = None
        if self.headers or self.body_limit:
            for name, value in pairs:
                if name.lower() == b"content-type":
                    self.request_type = value.decode("latin-1")
                    break

    # -- from the exchange -------------------------------------------------------------

    @_guarded
    def request_data(self, data: bytes) -> None:
        self.request_total += len(data)
        room = self.body_limit - len(self.request_body)
        if room > 0:
            self.request_body += data[:room]

    @_guarded
    def sent_upstream(self) -> None:
        if self.upstream_sent is None:
            self.upstream_sent = self.hub.now()

    @_guarded
    def response_head(self, status: int, headers) -> None:
        self.first_byte = self.hub.now()
        self.status = status
        if self.headers:
            self.response_pairs = list(headers)
        for name, value in headers:
            if name.lower() == b"content-type":
                self.response_type = value.decode("latin-1")
                break

    @_guarded
    def response_data(self, data: bytes) -> None:
        self.response_total += len(data)
        room = self.body_limit - len(self.response_body)
        if room > 0:
            self.response_body += data[:room]
        # a long response shows while it runs
        room = self.body_limit - len(self.segment_data)
        if room > 0:
            self.segment_data += data[:room]
        self.segment_length += len(data)
        if self.streaming and self.segment_call is None and not self.done:
            self._schedule_segment()

    @_guarded
    def stream_goes_on(self) -> None:
        """The response goes on past one read from the container (most end within one:
        they get no segment timer)."""
        if not self.streaming:
            self.streaming = True
            if self.segment_length and self.segment_call is None and not self.done:
                self._schedule_segment()

    def _schedule_segment(self) -> None:
        now = self.hub.now()
        due = max((self.first_byte or now) + SEGMENT_AFTER, self.last_segment + SEGMENT_INTERVAL)
        if now >= due and self.segments:
            self._segment()
        else:
            self.segment_call = self.hub.clock.callLater(max(0.0, due - now), self._segment_due)

    @_guarded
    def _segment_due(self) -> None:
        self.segment_call = None
        if not self.done and self.segment_length:
            self._segment()

    def _segment(self) -> None:
        self.last_segment = self.hub.now()
        self.segments += 1
        data, length = self.segment_data, self.segment_length
        self.segment_data = bytearray()
        self.segment_length = 0
        for spec in self.specs:
            if not spec.matches_status(self.status):
                continue
            event = {"type": "segment", "exchange": self.id, "time": self.last_segment, **self._where(spec),
                     "status": self.status, "offset": self.segment_offset, "length": length}
            if spec.body_bytes:
                event["data"] = body_json(data[:spec.body_bytes], length > spec.body_bytes)
            self.hub.emit(spec, event)
        self.segment_offset += length

    def _where(self, spec) -> dict:
        record = self.record
        return {"host": record.get("host"), "path": self._path(spec)}

    def _path(self, spec) -> str | None:
        path = self.record.get("path")
        if path is None or not spec.redact:
            return path
        if self.path_text is None:
            self.path_text = redact_target(path)
        return self.path_text

    # -- WebSocket frames (from the tunnel) -----------------------------------------------

    @_guarded
    def frame_readers(self):
        """(client side, container side) frame readers, or None when no tap wants frames."""
        if not self.ws_specs:
            return None
        keep = max(spec.websocket_bytes for spec in self.ws_specs)
        return (FrameReader(keep, lambda *frame: self._frame("client", *frame)),
                FrameReader(keep, lambda *frame: self._frame("container", *frame)))

    @_guarded
    def _frame(self, sender: str, opcode: int, fin: bool, length: int, data: bytes) -> None:
        now = self.hub.now()
        for spec in self.ws_specs:
            event = {"type": "ws", "exchange": self.id, "time": now, **self._where(spec), "from": sender,
                     "opcode": opcode, "fin": fin, "length": length}
            if spec.websocket_bytes:
                shown = data[:spec.websocket_bytes]
                event["data"] = body_json(shown, length > len(shown))
            self.hub.emit(spec, event)

    # -- the end ------------------------------------------------------------------------

    @_guarded
    def finished(self, record: dict) -> None:
        """The exchange is over (``record`` is its completed audit record)."""
        if self.done:
            return
        self.done = True
        if self.segment_call is not None:
            if self.segment_call.active():
                self.segment_call.cancel()
            self.segment_call = None
        if self.segments and self.segment_length:
            self.done = False
            self._segment()
            self.done = True
        end = self.hub.now()
        status = record.get("status")
        for spec in self.specs:
            if spec.matches_status(status):
                self.hub.emit(spec, self._event(spec, record, end))

    def _event(self, spec, record: dict, end: float) -> dict:
        route = record.get("route")
        event = {
            "type": "exchange", "id": self.id, "time": record.get("time", self.started),
            "timings": {"start": record.get("time", self.started), "upstream_sent": self.upstream_sent,
                        "first_byte": self.first_byte, "end": end},
            "duration_ms": record.get("duration_ms"),
            "client": record.get("client"), "http": _http(record.get("http")),
            "method": record.get("method"), "host": record.get("host"), "path": self._path(spec),
            "route": dict(route) if route is not None else None,
            "decision": record.get("decision"), "status": record.get("status"),
        }
        if record.get("reason"):
            event["reason"] = record["reason"]
        event["websocket"] = self.websocket
        event["bytes_in"] = record.get("bytes_in", 0)
        event["bytes_out"] = record.get("bytes_out", 0)
        event["redacted"] = spec.redact
        request: dict = {}
        if spec.headers and self.request_pairs is not None:
            request["headers"] = redact_headers(self.request_pairs, spec.redact)
        if spec.body_bytes and self.request_body:
            data = bytes(self.request_body[:spec.body_bytes])
            complete = self.request_total <= spec.body_bytes
            if spec.redact:
                data = redact_body(data, self.request_type, complete)
            request["body"] = body_json(data, not complete)
        event["request"] = request
        response: dict = {"status": self.status if self.status is not None else record.get("status")}
        if spec.headers and self.response_pairs is not None:
            response["headers"] = redact_headers(self.response_pairs, spec.redact)
        if spec.body_bytes and self.response_body:
            data = bytes(self.response_body[:spec.body_bytes])
            complete = self.response_total <= spec.body_bytes
            if spec.redact:
                data = redact_body(data, self.response_type, complete)
            response["body"] = body_json(data, not complete)
        event["response"] = response
        return event


def _http(version) -> str | None:
    if version is None:
        return None
    text = str(version)
    return text if text.startswith("HTTP/") else "HTTP/" + text


def url_of(host: str | None, path: str | None) -> str:
    """``https://host/path`` (for the CLI and HAR)."""
    return "https://%s%s" % (host or "", path or "/")


__all__ = ["Capture", "body_json", "url_of"]

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
import json
import re
from urllib.parse import unquote_plus

from twisted.logger import Logger

from hoodyproxy.access.policy import TOKEN_NAME

log = Logger()

REDACTED = "[redacted]"
#: A long response shows ``segment`` events once it has run this long (seconds) ...
SEGMENT_AFTER = 0.5
#: ... at most this often.
SEGMENT_INTERVAL = 0.5

#: Header fields whose whole value is a credential.
_SECRET_FIELDS = frozenset((b"authorization", b"proxy-authorization", b"x-api-key", b"api-key", b"apikey",
                            b"x-auth-token", b"x-access-token", b"x-amz-security-token", b"x-csrf-token",
                            b"x-xsrf-token", b"proxy-authentication-info", b"authentication-info"))
#: Header fields that name a URL whose query may hold a credential.
_URL_FIELDS = frozenset((b"referer", b"location", b"content-location", b"refresh"))
#: Query parameters, form fields and header names that look like credentials.
_SECRET_NAME = re.compile(r"(token|secret|passw|pwd|api[-_]?key|apikey|^key$|^auth|signature|^sig$|session|"
                          r"jwt|credential|^code$|private)", re.IGNORECASE)
_TOKEN_TEXT = TOKEN_NAME.decode("ascii")
#: Control characters that make a body binary (text has tabs, line ends and, from a
#: terminal, escape sequences).
_BINARY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")


def _secret_name(name: str) -> bool:
    return name.lower() == _TOKEN_TEXT or _SECRET_NAME.search(name) is not None


def redact_query(query: str) -> str:
    """A query string with the values of credential-like parameters replaced."""
    if not query:
        return query
    parts = []
    for part in query.split("&"):
        name, eq, _value = part.partition("=")
        if eq and _secret_name(unquote_plus(name)):
            parts.append(name + "=" + REDACTED)
        else:
            parts.append(part)
    return "&".join(parts)


def redact_target(target: str) -> str:
    """A request target (``/path?query``) or URL with its credential-like query values replaced."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    query, hash_mark, fragment = query.partition("#")
    return path + "?" + redact_query(query) + hash_mark + fragment


def _redact_cookie(value: str) -> str:
    out = []
    for crumb in value.split(";"):
        name, eq, _rest = crumb.partition("=")
        out.append(name + "=" + REDACTED if eq else crumb)
    return ";".join(out)


def _redact_set_cookie(value: str) -> str:
    first, semi, attributes = value.partition(";")
    name, eq, _rest = first.partition("=")
    return (name + "=" + REDACTED if eq else first) + semi + attributes


#: How each header field name is shown (cached by name: a tap sees the same few names).
_FIELD_KIND: dict[bytes, int] = {}
_PLAIN, _SECRET, _COOKIE, _SET_COOKIE, _URL = range(5)


def _field_kind(lower: bytes) -> int:
    kind = _FIELD_KIND.get(lower)
    if kind is None:
        if lower in _SECRET_FIELDS:
            kind = _SECRET
        elif lower == b"cookie":
            kind = _COOKIE
        elif lower == b"set-cookie":
            kind = _SET_COOKIE
        elif lower in _URL_FIELDS:
            kind = _URL
        elif lower not in (b"sec-websocket-key", b"sec-websocket-accept") and _secret_name(lower.decode("latin-1")):
            kind = _SECRET
        else:
            kind = _PLAIN
        if len(_FIELD_KIND) < 4096:
            _FIELD_KIND[lower] = kind
    return kind


def redact_headers(pairs, redact: bool = True) -> list[list[str]]:
    """Header fields as ``[[name, value], ...]`` text, credentials replaced when ``redact``."""
    out = []
    for name, value in pairs:
        text_name = name.decode("latin-1") if isinstance(name, bytes) else name
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if redact:
            kind = _field_kind(name.lower() if isinstance(name, bytes) else name.lower().encode("latin-1"))
            if kind == _SECRET:
                text = REDACTED
            elif kind == _COOKIE:
                text = _redact_cookie(text)
            elif kind == _SET_COOKIE:
                text = _redact_set_cookie(text)
            elif kind == _URL:
                text = redact_target(text)
        out.append([text_name, text])
    return out


def redact_body(data: bytes, content_type: str | None, complete: bool) -> bytes:
    """A captured form or JSON body with credential-like fields replaced (other bodies as they are)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        try:
            return redact_query(data.decode("ascii")).encode("ascii")
        except UnicodeDecodeError:
            return data
    if complete and (kind == "application/json" or kind.endswith("+json")):
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return data
        changed = [False]

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(key, str) and _secret_name(key) and isinstance(value, (str, int, float)):
                        node[key] = REDACTED
                        changed[0] = True
                    else:
                        walk(value)
            elif isinstance(node, list):
                for item in node:
                    walk(item)
        walk(document)
        if changed[0]:
            return json.dumps(document, ensure_ascii=False).encode("utf-8")
    return data


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


def _guarded(method):
    """A capture's hook never fails the exchange it watches: a failure is logged and the
    capture stops watching."""
    def guarded(self, *args):
        if self.failed:
            return None
        try:
            return method(self, *args)
        except Exception:
            self.failed = True
            log.failure("tap: capturing an exchange failed; its events are left out")
            return None
    guarded.__name__ = method.__name__
    guarded.__doc__ = method.__doc__
    return guarded


class FrameReader:
    """RFC 6455 frames out of one direction of a WebSocket's bytes, for observation only.

    It reads the frame headers (and unmasks at most ``keep`` bytes of each payload); it
    never refuses anything (whatever the extensions, reserved bits or opcodes: checking
    is not its job) and never holds more than a frame header plus ``keep`` bytes.
    ``on_frame(opcode, fin, length, data)`` is called once per frame, when its captured
    part is in (for a long frame, before the rest of its payload has passed).
    """

    __slots__ = ("keep", "on_frame", "_head", "_need", "_opcode", "_fin", "_length", "_mask", "_data",
                 "_reported", "broken", "failed")

    def __init__(self, keep: int, on_frame) -> None:
        self.keep = keep
        self.on_frame = on_frame
        self._head = b""
        self._need = 0  # payload bytes still to pass of the current frame (0: reading a header)
        self._opcode = self._length = 0
        self._fin = True
        self._mask = b""
        self._data = bytearray()
        self._reported = True
        self.broken = False
        self.failed = False

    @_guarded
    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        pos, end = 0, len(data)
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                room = self.keep - len(self._data)
                if room > 0:
                    self._data += data[pos:pos + min(room, take)]
                self._need -= take
                pos += take
                if self._need == 0 or len(self._data) >= self.keep:
                    self._report()
                continue
            before = len(self._head)
            chunk = data[pos:pos + 14 - before]  # (a frame header is at most 14 bytes)
            self._head += chunk
            size = self._parse_head()
            if size is None:
                pos += len(chunk)
                continue
            pos += size - before
            self._head = b""

    def _parse_head(self):
        head = self._head
        if len(head) < 2:
            return None
        first, second = head[0], head[1]
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(head) < 4:
                return None
            length = int.from_bytes(head[2:4], "big")
            offset = 4
        elif length == 127:
            if len(head) < 10:
                return None
            length = int.from_bytes(head[2:10], "big")
            offset = 10
        masked = second & 0x80
        if masked:
            if len(head) < offset + 4:
                return None
            self._mask = head[offset:offset + 4]
            offset += 4
        else:
            self._mask = b""
        self._fin = bool(first & 0x80)
        self._opcode = first & 0x0F
        self._length = length
        self._need = length
        self._data = bytearray()
        self._reported = False
        if length == 0:
            self._report()
        return offset

    def _report(self) -> None:
        if self._reported:
            return
        self._reported = True
        data = bytes(self._data)
        if self._mask and data:
            size = len(data)
            mask = (self._mask * (size // 4 + 1))[:size]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")
        self.on_frame(self._opcode, self._fin, self._length, data)


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


__all__ = ["Capture", "FrameReader", "REDACTED", "body_json", "redact_body", "redact_headers", "redact_query",
           "redact_target", "url_of"]

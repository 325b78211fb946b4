"""A HAR 1.2 log from a tap's event stream (``POST /api/v1/taps``).

:class:`HarBuilder` takes the stream's events one at a time (:meth:`HarBuilder.add`) and
makes the ``{"log": ...}`` of the HTTP Archive 1.2 format
(http://www.softwareishard.com/blog/har-12-spec/): one entry per ``exchange`` event, with
the headers and the captured bodies as the tap recorded them.  It is written here from
the spec: the Python HAR libraries that exist read HAR files (``haralyzer``, which the
tests use as an independent reader) or come with a whole proxy (mitmproxy's exporter);
none is a maintained writer of plain data that fits.

What the stream does not carry is given as the spec's "unknown": ``headersSize`` is -1,
``dns``/``connect``/``ssl`` timings -1, ``serverIPAddress`` left out.  Timings come from
the exchange's ``timings``: ``blocked`` (start to the request sent upstream, -1 when it
never was), ``send`` 0, ``wait`` (to the first response byte), ``receive`` (to the end);
``time`` is their sum, as the spec requires.  Bodies are the captured prefix: a base64
body keeps its base64 text with ``encoding: "base64"`` (``_encoding`` on ``postData``,
which has no such field), and a truncated one says so in its ``comment``.  Compressed
bodies stay as sent (the prefix of a gzip stream cannot be decoded).

WebSocket exchanges carry Chrome's (and mitmproxy's) ``_resourceType: "websocket"`` and
``_webSocketMessages`` (``send`` from the client, ``receive`` from the container).  The
``ws`` events come before their exchange, which arrives when the WebSocket closes; a
WebSocket still open when the tap ended gets an entry of its own (status 101, the URL and
the frames, no headers).  ``segment`` events are only counted (the exchange's body is its
content).  hoodyproxy's own fields (the exchange id, the client, the route, the decision,
dropped events, the tap) are under ``_hoodyproxy`` keys, which other readers ignore.

Memory is what the tap sends: the tap's ``max_events`` and capture sizes bound it.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import http
import json
import os
import tempfile
import urllib.parse
from typing import Any, Iterable

import hoodyproxy

#: The HAR version written.
HAR_VERSION = "1.2"

_UTC = datetime.timezone.utc


def iso_time(seconds: float) -> str:
    """Unix ``seconds`` as ISO 8601 with milliseconds and a timezone (UTC):
    ``2025-12-07T04:00:01.123+00:00``."""
    return datetime.datetime.fromtimestamp(seconds, _UTC).isoformat(timespec="milliseconds")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _number(value: Any) -> float | None:
    """``value`` if it is a number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def entry_timings(event: dict) -> dict[str, float]:
    """The HAR ``timings`` of an exchange event, in milliseconds, never negative except
    the optional ones the spec writes -1 for.

    From the event's ``timings`` points (``start``, ``upstream_sent``, ``first_byte``,
    ``end``): ``blocked`` = upstream_sent - start (or -1), ``send`` = 0, ``wait`` = from
    the request sent (or the start) to the first byte (or the end), ``receive`` = first
    byte to end.  Without points, ``duration_ms`` is all ``wait``.
    """
    points = event.get("timings") if isinstance(event.get("timings"), dict) else {}
    start, sent = _number(points.get("start")), _number(points.get("upstream_sent"))
    first, end = _number(points.get("first_byte")), _number(points.get("end"))
    timings: dict[str, float] = {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 0, "wait": 0,
                                 "receive": 0}
    if start is None or end is None:
        duration = _number(event.get("duration_ms"))
        timings["wait"] = max(0.0, round(duration, 3)) if duration is not None else 0
        return timings
    if sent is not None:
        timings["blocked"] = max(0.0, _ms(sent - start))
    waiting_from = sent if sent is not None else start
    timings["wait"] = max(0.0, _ms((first if first is not None else end) - waiting_from))
    if first is not None:
        timings["receive"] = max(0.0, _ms(end - first))
    return timings


def entry_time(timings: dict[str, float]) -> float:
    """The entry's ``time``: the sum of its timings, leaving out the -1s (the spec's rule)."""
    return round(sum(value for value in timings.values() if value >= 0), 3)


def _size(value: Any) -> int:
    """A byte count as given, or the spec's -1 for unknown."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1


def _headers(pairs: Any) -> list[dict[str, str]]:
    if not isinstance(pairs, list):
        return []
    return [{"name": str(pair[0]), "value": str(pair[1])}
            for pair in pairs if isinstance(pair, (list, tuple)) and len(pair) == 2]


def _header(headers: list[dict[str, str]], name: str) -> str | None:
    name = name.lower()
    for header in headers:
        if header["name"].lower() == name:
            return header["value"]
    return None


def request_cookies(headers: list[dict[str, str]]) -> list[dict[str, str]]:
    """``Cookie: a=1; b=2`` as ``[{"name": "a", "value": "1"}, ...]``; a piece with no
    ``=`` (a redacted header: ``[redacted]``) is a cookie with an empty name, as browsers
    read it, its value kept as given."""
    cookies = []
    for header in headers:
        if header["name"].lower() != "cookie":
            continue
        for piece in header["value"].split(";"):
            piece = piece.strip()
            if piece:
                name, sep, value = piece.partition("=")
                cookies.append({"name": name.strip(), "value": value.strip()} if sep
                               else {"name": "", "value": piece})
    return cookies


def _cookie_expires(text: str) -> str | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_UTC)
    return when.isoformat(timespec="milliseconds")


def response_cookies(headers: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Each ``Set-Cookie`` as a HAR cookie: name, value, and the path, domain, expires,
    httpOnly and secure it sets (values kept as given, redacted or not)."""
    cookies = []
    for header in headers:
        if header["name"].lower() != "set-cookie":
            continue
        first, *attributes = header["value"].split(";")
        name, sep, value = first.strip().partition("=")
        cookie: dict[str, Any] = ({"name": name.strip(), "value": value.strip()} if sep
                                  else {"name": "", "value": first.strip()})
        for attribute in attributes:
            key, _, text = attribute.strip().partition("=")
            key, text = key.strip().lower(), text.strip()
            if key == "path":
                cookie["path"] = text
            elif key == "domain":
                cookie["domain"] = text
            elif key == "expires" and (expires := _cookie_expires(text)) is not None:
                cookie["expires"] = expires
            elif key == "httponly":
                cookie["httpOnly"] = True
            elif key == "secure":
                cookie["secure"] = True
        cookies.append(cookie)
    return cookies


def query_string(path: str) -> list[dict[str, str]]:
    """The ``?`` part of ``path`` as HAR ``queryString`` pairs (decoded, blanks kept)."""
    _, sep, query = path.partition("?")
    if not sep:
        return []
    query = query.partition("#")[0]
    return [{"name": name, "value": value} for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True)]


def _body(body: Any) -> dict | None:
    """A captured BODY (``{"encoding", "data", "bytes", "truncated"}``) if it is one."""
    if isinstance(body, dict) and isinstance(body.get("data"), str):
        return body
    return None


def _truncation_note(body: dict, size: int) -> str:
    captured = body.get("bytes")
    return f"truncated: the first {captured} of {size} bytes" if size >= 0 else f"truncated: the first {captured} bytes"


def _http_version(value: Any) -> str:
    """``HTTP/2`` as given; a bare ``2`` (the audit record's form) as ``HTTP/2``."""
    if not isinstance(value, str) or not value:
        return "unknown"
    return value if value.upper().startswith("HTTP/") else f"HTTP/{value}"


def _status_text(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _url(host: Any, path: Any) -> str:
    path = path if isinstance(path, str) else "/"
    if not path.startswith("/"):
        path = "/" + path
    return f"https://{host if isinstance(host, str) else ''}{path}"


def ws_message(event: dict) -> dict[str, Any]:
    """A ``ws`` event as one of Chrome's ``_webSocketMessages``: type (``send`` from the
    client, ``receive`` from the container), time (unix seconds), opcode, data (text, or
    base64 for binary frames as Chrome writes them)."""
    opcode = event.get("opcode") if isinstance(event.get("opcode"), int) else 1
    message: dict[str, Any] = {"type": "send" if event.get("from") == "client" else "receive",
                               "time": _number(event.get("time")) or 0.0, "opcode": opcode, "data": ""}
    body = _body(event.get("data"))
    if body is not None:
        data, base64_data = body["data"], body.get("encoding") == "base64"
        if opcode == 2 and not base64_data:
            data, base64_data = base64.b64encode(data.encode("utf-8")).decode("ascii"), True
        message["data"] = data
        if base64_data and opcode != 2:
            message["_encoding"] = "base64"  # a text frame's prefix that is not UTF-8
        if body.get("truncated"):
            message["_truncated"] = True
    if isinstance(event.get("length"), int):
        message["_length"] = event["length"]
    return message


def har_request(event: dict, version: str, body_size: int) -> dict[str, Any]:
    """The HAR ``request`` of an exchange event (``postData`` when a body was captured)."""
    captured = event.get("request") if isinstance(event.get("request"), dict) else {}
    path = event.get("path") if isinstance(event.get("path"), str) else "/"
    headers = _headers(captured.get("headers"))
    request: dict[str, Any] = {
        "method": str(event.get("method") or "GET"), "url": _url(event.get("host"), path), "httpVersion": version,
        "cookies": request_cookies(headers), "headers": headers, "queryString": query_string(path),
        "headersSize": -1, "bodySize": body_size}
    body = _body(captured.get("body"))
    if body is not None:
        post: dict[str, Any] = {"mimeType": _header(headers, "content-type") or "", "text": body["data"]}
        if body.get("encoding") == "base64":
            post["_encoding"] = "base64"  # postData has no encoding field in HAR 1.2
        if body.get("truncated"):
            post["comment"] = _truncation_note(body, body_size)
        request["postData"] = post
    return request


def har_response(event: dict, version: str, body_size: int) -> dict[str, Any]:
    """The HAR ``response`` of an exchange event (``content.text`` when a body was captured)."""
    captured = event.get("response") if isinstance(event.get("response"), dict) else {}
    status = captured.get("status", event.get("status"))
    status = status if isinstance(status, int) and not isinstance(status, bool) else 0
    headers = _headers(captured.get("headers"))
    body = _body(captured.get("body"))
    captured_size = body.get("bytes") if body is not None and isinstance(body.get("bytes"), int) else 0
    content: dict[str, Any] = {"size": body_size if body_size >= 0 else captured_size,
                               "mimeType": _header(headers, "content-type") or ""}
    if body is not None:
        content["text"] = body["data"]
        if body.get("encoding") == "base64":
            content["encoding"] = "base64"
        if body.get("truncated"):
            content["comment"] = _truncation_note(body, body_size)
    return {"status": status, "statusText": _status_text(status), "httpVersion": version,
            "cookies": response_cookies(headers), "headers": headers, "content": content,
            "redirectURL": _header(headers, "location") or "", "headersSize": -1, "bodySize": body_size}


def open_websocket_entry(exchange: str, first: dict, messages: list[dict]) -> dict[str, Any]:
    """The entry of a WebSocket whose exchange event never came (the tap ended while it
    was open): what its ws events tell, status 101, no headers."""
    started = _number(first.get("time")) or 0.0
    last = max((message["time"] for message in messages), default=started)
    timings = {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 0, "wait": 0,
               "receive": max(0.0, _ms(last - started))}
    path = first.get("path") if isinstance(first.get("path"), str) else "/"
    return {
        "startedDateTime": iso_time(started), "time": entry_time(timings),
        "request": {"method": "GET", "url": _url(first.get("host"), path), "httpVersion": "unknown",
                    "cookies": [], "headers": [], "queryString": query_string(path), "headersSize": -1,
                    "bodySize": 0},
        "response": {"status": 101, "statusText": _status_text(101), "httpVersion": "unknown", "cookies": [],
                     "headers": [], "content": {"size": 0, "mimeType": ""}, "redirectURL": "",
                     "headersSize": -1, "bodySize": 0},
        "cache": {}, "timings": timings,
        "comment": "the tap ended before this WebSocket closed: its frames until then, no headers",
        "_resourceType": "websocket", "_webSocketMessages": messages,
        "_hoodyproxy": {"id": exchange, "open": True}}


#: The exchange event's keys kept under the entry's ``_hoodyproxy``.
OWN_FIELDS = ("id", "worker", "seq", "client", "route", "decision", "reason", "redacted", "bytes_in", "bytes_out",
              "duration_ms")


class HarBuilder:
    """The HAR 1.2 log of one tap, event by event.

    ::

        builder = HarBuilder()
        for line in stream:
            builder.add(json.loads(line))
        builder.dump("tap.har")

    Events of unknown types and unknown keys are ignored, so a newer node's stream works.
    """

    def __init__(self) -> None:
        #: (start time, arrival order, entry): sorted by start when the log is made.
        self._entries: list[tuple[float, int, dict]] = []
        #: ws messages waiting for their exchange event, and the first ws event of each
        #: (host, path, time of the entry if the exchange never comes), by exchange id.
        self._messages: dict[str, list[dict]] = {}
        self._first_frame: dict[str, dict] = {}
        self._segments: dict[str, int] = {}
        self._tap: dict | None = None
        self._end: dict | None = None
        self._dropped = 0

    def add(self, event: dict) -> None:
        """Take one event of the stream (a parsed JSON line)."""
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        dropped = _number(event.get("dropped"))
        if dropped and kind != "end":  # the end event's count is the total, not news
            self._dropped += int(dropped)
        if kind == "exchange":
            self._add_exchange(event)
        elif kind == "ws":
            exchange = str(event.get("exchange"))
            self._messages.setdefault(exchange, []).append(ws_message(event))
            self._first_frame.setdefault(exchange, event)
        elif kind == "segment":
            exchange = str(event.get("exchange"))
            self._segments[exchange] = self._segments.get(exchange, 0) + 1
        elif kind == "tap":
            self._tap = {k: v for k, v in event.items() if k != "type"}
        elif kind == "end":
            self._end = {k: v for k, v in event.items() if k != "type"}

    def _add_exchange(self, event: dict) -> None:
        exchange = str(event.get("id"))
        started = _number(event.get("time")) or 0.0
        version = _http_version(event.get("http"))
        websocket = event.get("websocket") is True
        # A WebSocket's byte counts are its frames', not a body: its bodies are empty, as browsers write them.
        timings = entry_timings(event)
        entry: dict[str, Any] = {
            "startedDateTime": iso_time(started), "time": entry_time(timings),
            "request": har_request(event, version, 0 if websocket else _size(event.get("bytes_in"))),
            "response": har_response(event, version, 0 if websocket else _size(event.get("bytes_out"))),
            "cache": {}, "timings": timings}
        messages = self._messages.pop(exchange, None)
        self._first_frame.pop(exchange, None)
        if websocket or messages:
            entry["_resourceType"] = "websocket"
            entry["_webSocketMessages"] = messages or []
        own = {key: event[key] for key in OWN_FIELDS if key in event}
        segments = self._segments.pop(exchange, 0)
        if segments:
            own["segments"] = segments
        entry["_hoodyproxy"] = own
        self._entries.append((started, len(self._entries), entry))

    def har(self) -> dict:
        """The whole HAR: ``{"log": {...}}``, entries by their start time."""
        entries = list(self._entries)
        for exchange, messages in self._messages.items():
            entry = open_websocket_entry(exchange, self._first_frame.get(exchange, {}), messages)
            entries.append((_number(self._first_frame.get(exchange, {}).get("time")) or 0.0, len(entries), entry))
        entries.sort(key=lambda item: (item[0], item[1]))
        creator = {"name": "hoodyproxy", "version": str(getattr(hoodyproxy, "__version__", "0"))}
        log: dict[str, Any] = {"version": HAR_VERSION, "creator": creator,
                               "entries": [entry for _, _, entry in entries]}
        comment = self._comment()
        if comment:
            log["comment"] = comment
        own: dict[str, Any] = {key: value for key, value in (("tap", self._tap), ("end", self._end))
                               if value is not None}
        if self._dropped:
            own["dropped"] = self._dropped
        if own:
            log["_hoodyproxy"] = own
        return {"log": log}

    def _comment(self) -> str:
        parts = []
        if self._tap is not None:
            parts.append(f"hoodyproxy tap {self._tap.get('id')}")
        if self._end is not None:
            parts.append(f"ended: {self._end.get('reason')}")
        dropped = max(self._dropped, int(_number((self._end or {}).get("dropped")) or 0))
        if dropped:
            parts.append(f"{dropped} events dropped (not in this log)")
        return "; ".join(parts)

    def dump(self, path: str | os.PathLike) -> int:
        """Write :meth:`har` to ``path`` as UTF-8 JSON, whole or not at all (a temporary
        file beside it, renamed over it), readable by its owner only: a HAR holds
        headers and bodies.  The number of entries written."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, temporary = tempfile.mkstemp(prefix=".har-", dir=directory)
        har = self.har()
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(har, f, ensure_ascii=False, indent=1)
                f.write("\n")
            os.replace(temporary, path)
            return len(har["log"]["entries"])
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise


def build_har(events: Iterable[dict]) -> dict:
    """The HAR of a whole list of events (one :class:`HarBuilder`)."""
    builder = HarBuilder()
    for event in events:
        builder.add(event)
    return builder.har()

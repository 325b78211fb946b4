"""What ``hoodyproxy tap`` shows of a tap's event stream (stdlib only, no I/O of its own).

A tap (``POST /api/v1/taps``) answers with newline-delimited JSON events: ``tap`` first,
then ``exchange``, ``ws`` and ``segment`` events, and ``end`` when the node ends it.
:func:`format_event` makes one readable line of an event, mitmdump style::

    12:00:01.123 203.0.113.5 GET x.node.zone/api/items?a=1 -> 200 12B 8ms
    12:00:02.500 203.0.113.5 GET x.node.zone/socket -> 101 ws 4 frames 2.5s
      ws client>container text 5B: hello

:class:`TapOutput` routes each raw line: the exchange lines (and the ws lines, if asked)
to stdout, the tap's start and end to stderr, every event to a HAR builder if there is
one; or, raw, every line as received.  Everything the node passes on from a request
(host, path, method, frame data) is shown with control characters escaped: a path with
an ANSI escape in it must not drive the operator's terminal.
"""

from __future__ import annotations

import base64
import datetime
import json
from typing import IO, Any, Callable, Iterator

#: WebSocket opcodes by number, as shown.
OPCODES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}
#: How much of a frame's data a ws line shows.
PREVIEW_CHARS = 60


def printable(value: Any, limit: int | None = None) -> str:
    """``value`` as text with every non-printable character escaped (``\\x1b``, ``\\n``),
    cut to ``limit`` characters with an ellipsis."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "\u2026"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def human_size(size: Any) -> str:
    """Bytes as ``12B``, ``3.4k``, ``56k``, ``1.2M`` (powers of 1024); ``-`` if unknown."""
    if not isinstance(size, (int, float)) or isinstance(size, bool) or size < 0:
        return "-"
    if size < 1024:
        return f"{int(size)}B"
    value = float(size)
    for unit in "kMGT":
        value /= 1024
        if value < 1024 or unit == "T":
            break
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"


def human_duration(milliseconds: Any) -> str:
    """Milliseconds as ``8ms``, ``1.2s``, ``2m05s``; ``-`` if unknown."""
    if not isinstance(milliseconds, (int, float)) or isinstance(milliseconds, bool) or milliseconds < 0:
        return "-"
    if milliseconds < 1000:
        return f"{milliseconds:.0f}ms"
    if milliseconds < 60_000:
        return f"{milliseconds / 1000:.1f}s"
    minutes, seconds = divmod(int(milliseconds // 1000), 60)
    return f"{minutes}m{seconds:02d}s"


def clock(seconds: Any) -> str:
    """Unix seconds as local ``HH:MM:SS.mmm``."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "--:--:--.---"
    return datetime.datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]


def _preview(data: Any) -> str | None:
    """The start of a captured BODY as one line: text as text, base64 as the bytes'
    escapes (``\\x00\\x01``)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), str):
        return None
    if data.get("encoding") == "base64":
        try:
            raw = base64.b64decode(data["data"])
        except ValueError:
            return "(bad base64)"
        text = raw[:PREVIEW_CHARS].decode("ascii", "backslashreplace")
        return printable(text) + ("\u2026" if len(raw) > PREVIEW_CHARS else "")
    return printable(data["data"], PREVIEW_CHARS)


def _match_text(match: Any) -> str:
    if not isinstance(match, dict) or not match:
        return "everything"
    parts = []
    for key, value in match.items():
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        elif isinstance(value, dict):
            value = "=".join(str(value[k]) for k in ("name", "value") if k in value)
        parts.append(f"{key}={value}")
    return printable(" ".join(parts))


def _exchange_line(event: dict, frames: int | None) -> str:
    target = printable(f"{event.get('host', '')}{event.get('path', '')}")
    line = (f"{clock(event.get('time'))} {printable(event.get('client', '-'))} "
            f"{printable(event.get('method', '-'))} {target} -> {event.get('status', '-')}")
    if event.get("websocket") is True:
        line += " ws" + (f" {frames} frame{'s' if frames != 1 else ''}" if frames is not None else "")
    else:
        line += f" {human_size(event.get('bytes_out'))}"
    line += f" {human_duration(event.get('duration_ms'))}"
    if event.get("reason"):
        line += f" ({printable(event['reason'], 80)})"
    return line


def _ws_line(event: dict) -> str:
    direction = "client>container" if event.get("from") == "client" else "container>client"
    opcode = event.get("opcode")
    kind = OPCODES.get(opcode, f"opcode-{opcode}") if isinstance(opcode, int) else "frame"
    line = f"  ws {direction} {kind} {human_size(event.get('length'))}"
    preview = _preview(event.get("data"))
    return line + (f": {preview}" if preview else "")


def format_event(event: dict, frames: int | None = None) -> str | None:
    """One line showing ``event``, or None for events not shown (``segment``, unknown types).

    ``exchange``: ``HH:MM:SS.mmm CLIENT METHOD host/path -> STATUS SIZE DURATION`` (a
    WebSocket: ``-> 101 ws N frames DURATION``, ``frames`` being the ws events seen for
    it, if known); ``ws``: ``  ws client>container text 5B: hello``; ``tap``: its id and
    match; ``end``: why it ended, and how many events were sent and dropped.
    """
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    if kind == "exchange":
        return _exchange_line(event, frames)
    if kind == "ws":
        return _ws_line(event)
    if kind == "tap":
        limits = []
        if isinstance(event.get("ttl_s"), (int, float)):
            limits.append(f"ttl {event['ttl_s']:g}s")
        if isinstance(event.get("max_events"), int):
            limits.append(f"max {event['max_events']} events")
        return (f"tap {printable(event.get('id'))}: {_match_text(event.get('match'))}"
                + (f" ({', '.join(limits)})" if limits else ""))
    if kind == "end":
        return (f"tap {printable(event.get('tap'))} ended ({printable(event.get('reason'))}): "
                f"{event.get('events', '?')} events, {event.get('dropped', 0)} dropped")
    return None


def read_lines(readline: Callable[[int], bytes], limit: int) -> Iterator[bytes | None]:
    """The lines ``readline`` gives, each at most ``limit`` bytes; a longer line is read
    through and given as None (too long to parse, bounded in memory)."""
    while True:
        line = readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = readline(limit + 1)
            yield None
            continue
        yield line


class TapOutput:
    """Shows a tap's raw lines: readable lines (or, ``raw``, the lines as received) on
    ``out``, notes on ``err`` (each starting with ``prefix``), every event into ``har``
    (anything with ``add(event)``) if given.

    Counts the ws events of each WebSocket until its exchange event, which shows the
    count; one counter per WebSocket open in the tap.
    """

    def __init__(self, out: IO[str], err: IO[str], *, raw: bool = False, show_ws: bool = False,
                 har: Any = None, prefix: str = "") -> None:
        self.out, self.err = out, err
        self.raw, self.show_ws, self.har, self.prefix = raw, show_ws, har, prefix
        self.tap: dict | None = None
        self.end: dict | None = None
        self.events = 0
        self._frames: dict[str, int] = {}

    def note(self, text: str) -> None:
        """One line on ``err``."""
        self.err.write(f"{self.prefix}{text}\n")
        self.err.flush()

    def _show(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def handle(self, line: bytes | None) -> dict | None:
        """Take one raw line of the stream (None: one too long to read); the event, if it
        was one."""
        if self.raw and line is not None:
            self.out.write(line.decode("utf-8", "replace").rstrip("\r\n") + "\n")
            self.out.flush()
        if line is None:
            self.note("skipped an event too long to read")
            return None
        if not line.strip():
            return None  # a blank line keeps a quiet connection alive
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict):
            if not self.raw:
                shown = printable(line.decode("utf-8", "replace").rstrip("\r\n"), 80)
                self.note(f"skipped a line that is not a JSON object: {shown}")
            return None
        self.events += 1
        if self.har is not None:
            self.har.add(event)
        self._route(event)
        return event

    def _route(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "tap" and self.tap is None:
            self.tap = event
        elif kind == "end":
            self.end = event
        elif kind == "ws":
            exchange = str(event.get("exchange"))
            self._frames[exchange] = self._frames.get(exchange, 0) + 1
        frames = self._frames.pop(str(event.get("id")), None) if kind == "exchange" else None
        if self.raw:
            return
        if kind == "exchange" and event.get("websocket") is True and frames is None:
            frames = 0 if self._captures_websocket() else None
        text = format_event(event, frames)
        if text is None or (kind == "ws" and not self.show_ws):
            return
        if kind in ("tap", "end"):
            self.note(text)
        else:
            self._show(text)
        if isinstance(event.get("dropped"), int) and event["dropped"] > 0 and kind != "end":
            self.note(f"{event['dropped']} events dropped before this one")

    def _captures_websocket(self) -> bool:
        capture = (self.tap or {}).get("capture")
        return isinstance(capture, dict) and capture.get("websocket") is True

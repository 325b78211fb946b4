"""What a tap asks for: its match and its capture, parsed and checked, and matching.

A tap's request body (``POST /api/v1/taps``) becomes a :class:`TapSpec`; a bad one is an
:class:`InvalidTap` naming the field.  Worker 0 sends specs to the other workers as
:meth:`TapSpec.to_json`, and they parse them again (:meth:`TapSpec.from_relay`).
"""

from __future__ import annotations

import re
from typing import Any

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

"""Credentials out of what a tap shows: header fields, cookies, query strings, form and JSON bodies.

Applied before any event is made (see :mod:`hoodyproxy.observe.capture`), so a tap's
stream never carries them unless the tap was allowed to ask (``[tap] allow_unredacted``).
What counts as a credential is in docs/observe.rst, "Safe by default".
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote_plus

from hoodyproxy.access.policy import TOKEN_NAME

REDACTED = "[redacted]"

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

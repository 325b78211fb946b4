"""Requests the gateway cannot classify safely under a restricted grant (pure: no I/O).

A kind that decides by method or path (terminal, files, display, sqlite) trusts the
container to read the request the way the gateway classified it.  Small servers do not
always: one that never reads a ``GET`` body parses it as the next request; one that
routes case-insensitively, strips ``;params`` or trailing dots, decodes twice, or honours
``X-HTTP-Method-Override`` runs a request the gateway classified as something else.  The
gateway cannot know the container's router, so when a grant allows a request only at a
lower level than the kind's strictest, it refuses (400) what could mean more:

- a body on a method the kind (or small servers) treat as bodiless: ``GET``, ``HEAD``,
  ``OPTIONS``, ``TRACE`` and the kind's own low methods (``PROPFIND`` for files);
- a method override: the ``X-HTTP-Method-Override``, ``X-HTTP-Method`` and
  ``X-Method-Override`` headers (any spelling, ``_`` as ``-``) and a ``_method`` query
  parameter;
- when the classification of this method depends on the path: a path that holds ``;``,
  ``\\``, ``#``, NUL or another control byte, that changes when decoded once more, or
  that falls under another classification when read case-insensitively or with trailing
  dots and spaces stripped from its segments (``/EXEC/run``, ``/exec./run``).

A grant that covers the strictest classification anyway (``exec``, ``files: write``...)
forwards all of these untouched: nothing it could mean is beyond what the grant allows.
"""

from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import unquote_to_bytes

from hoodyproxy.access.capabilities import Classification, classify, normalize_path

#: Methods whose bodies small servers do not read (so a body there is the next request).
BODYLESS_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
#: Request headers that ask a server to treat the request as another method.
METHOD_OVERRIDE_HEADERS = frozenset((b"x-http-method-override", b"x-http-method", b"x-method-override"))
_CONTROL = frozenset(range(0x20)) | {0x7F}


def strictest_of(kind: Any) -> Classification | None:
    """What a request to ``kind`` needs when the gateway cannot see what it means; None for
    a kind that decides by neither method nor path (``http``, ``generic``, most plugins)."""
    strictest = getattr(kind, "strictest", None)
    if (isinstance(strictest, tuple) and len(strictest) == 2 and isinstance(strictest[0], str)
            and (strictest[1] is None or isinstance(strictest[1], str))):
        return strictest
    return None


def _names(header_names: Iterable[bytes]) -> set[bytes]:
    return {name.lower().replace(b"_", b"-") for name in header_names}


def _has_method_parameter(target: bytes) -> bool:
    query = target.partition(b"?")[2].partition(b"#")[0]
    if not query:
        return False
    for part in query.split(b"&"):
        name = unquote_to_bytes(part.partition(b"=")[0].replace(b"+", b" ")).strip().lower()
        if name == b"_method":
            return True
    return False


def _loose(path: bytes) -> bytes:
    """``path`` as a lenient router might read it: any case, no trailing dots or spaces on
    a segment, no ``;params``, backslashes as slashes."""
    path = path.replace(b"\\", b"/").lower()
    segments = []
    for segment in path.split(b"/"):
        segment = segment.split(b";", 1)[0]
        if segment not in (b".", b".."):
            segment = segment.rstrip(b". ")
        segments.append(segment)
    return b"/".join(segments)


def _path_problem(kind: Any, method: bytes, target: bytes, websocket: bool,
                  classification: Classification) -> str | None:
    raw = target.partition(b"?")[0]
    if b"#" in raw:
        return "'#' in the path"
    once = unquote_to_bytes(raw)
    if b";" in once:
        return "';' in the path"
    if b"\\" in once:
        return "'\\' in the path"
    if any(byte in _CONTROL for byte in once):
        return "a control byte in the path"
    if unquote_to_bytes(once) != once:
        return "the path is encoded twice"
    if classify(kind, method, normalize_path(_loose(once)), websocket) != classification:
        return "the path differs from a restricted path only by case or trailing dots"
    return None


def refusal(kind: Any, method: bytes, target: bytes, websocket: bool, has_body: bool,
            header_names: Iterable[bytes], classification: Classification) -> str | None:
    """Why a request classified ``classification`` (below ``kind``'s strictest, and allowed
    at that level) must be refused as ambiguous, or None when it is not; for the audit line.

    ``target`` is the request target as the container will receive it (path and query).
    """
    if has_body and (method in BODYLESS_METHODS or method in getattr(kind, "low_methods", ())):
        return "a body on a %s request" % method.decode("latin-1")
    if _names(header_names) & METHOD_OVERRIDE_HEADERS:
        return "a method override header"
    if _has_method_parameter(target):
        return "a _method parameter"
    paths = tuple(getattr(kind, "decisive_paths", ()) or ())
    if paths:
        classifications = {classify(kind, method, p, websocket) for p in paths + (b"/",)}
        classifications.add(classification)
        if len(classifications) > 1:  # for this method, the path decides
            return _path_problem(kind, method, target, websocket, classification)
    return None

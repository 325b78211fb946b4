"""The admin REST API (a twisted.web Resource): the live container map, over JSON.

Every request needs ``Authorization: Bearer <admin token>``.  A 2xx answer means the
change is committed to disk.  Errors are a status and a short JSON body naming what was
wrong; a traceback never reaches the client.
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from twisted.logger import Logger
from twisted.web.resource import Resource

from hoodyproxy.directory import InvalidContainer, container_from_json
from hoodyproxy.directory._model import CONTAINER_ID

log = Logger()
MAX_BODY = 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _json_body(request) -> Any:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise ApiError(413, "payload_too_large", "the body is larger than 1 MiB")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None


class AdminAPI(Resource):
    """``/api/v1/...``: containers now; permissions, aliases and domains plug in later."""

    isLeaf = True

    def __init__(self, directory, token: str) -> None:
        super().__init__()
        self.directory = directory
        self.token = token.encode()

    def render(self, request) -> bytes:
        try:
            if request.path in (b"/healthz", b"/api/v1/health"):
                status, body = 200, {"status": "ok"}
            else:
                self._authenticate(request)
                status, body = self._dispatch(request)
        except ApiError as e:
            status, body = e.status, {"error": e.code, "message": e.message}
            for name, value in e.headers.items():
                request.setHeader(name, value)
        except Exception:
            log.failure("admin API request failed")
            status, body = 500, {"error": "internal_error", "message": "internal error"}
        request.setResponseCode(status)
        request.setHeader(b"Cache-Control", b"no-store")
        if status == 204:
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode() + b"\n"

    def _authenticate(self, request) -> None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
            raise ApiError(401, "unauthorized", "a valid admin bearer token is required",
                           {b"WWW-Authenticate": b'Bearer realm="hoodyproxy-admin"'})

    def _dispatch(self, request) -> tuple[int, Any]:
        parts = request.path.decode("latin-1").strip("/").split("/")
        if parts[:2] != ["api", "v1"] or len(parts) < 3:
            raise ApiError(404, "not_found", "no such endpoint")
        if parts[2] == "containers":
            if len(parts) == 3:
                return self._containers(request)
            if len(parts) == 4:
                return self._container(request, parts[3])
        raise ApiError(404, "not_found", "no such endpoint")

    @staticmethod
    def _allow(request, *methods: bytes) -> None:
        if request.method not in methods:
            raise ApiError(405, "method_not_allowed", "method not allowed here",
                           {b"Allow": b", ".join(methods)})

    def _containers(self, request) -> tuple[int, Any]:
        self._allow(request, b"GET")
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
        project = query.get("project", [None])[0]
        if project is not None and not CONTAINER_ID.match(project):
            raise ApiError(422, "invalid", "project: must be 24 lowercase hexadecimal digits")
        return 200, {"containers": [c.to_json() for c in self.directory.list(project)]}

    def _container(self, request, container_id: str) -> tuple[int, Any]:
        self._allow(request, b"GET", b"PUT", b"DELETE")
        if not CONTAINER_ID.match(container_id):
            raise ApiError(404, "not_found", "container ids are 24 lowercase hexadecimal digits")
        if request.method == b"GET":
            container = self.directory.lookup(container_id)
            if container is None:
                raise ApiError(404, "not_found", "no such container")
            return 200, container.to_json()
        if request.method == b"DELETE":
            if not self.directory.delete(container_id):
                raise ApiError(404, "not_found", "no such container")
            return 204, None
        try:
            container = container_from_json(container_id, _json_body(request))
        except InvalidContainer as e:
            raise ApiError(422, "invalid", str(e)) from None
        existed = self.directory.lookup(container_id) is not None
        self.directory.put(container)
        return (200 if existed else 201), container.to_json()

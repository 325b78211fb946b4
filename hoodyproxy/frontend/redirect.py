"""The plain-HTTP listener: a permanent redirect to HTTPS and nothing else in clear."""

from __future__ import annotations

import json

from twisted.web.resource import Resource

from hoodyproxy.routing import split_host
from hoodyproxy import errors


class RedirectToHTTPS(Resource):
    """Answers every request with 308 to the same host and path over HTTPS."""

    isLeaf = True

    def __init__(self, https_port: int) -> None:
        super().__init__()
        self.port_suffix = b"" if https_port == 443 else b":%d" % https_port

    def render(self, request) -> bytes:
        try:
            host = split_host(request.getHeader(b"host")).encode()
        except errors.GatewayError as e:
            request.setResponseCode(e.status)
            request.setHeader(b"Content-Type", b"application/json")
            return e.body()
        if b"[" in host or any(c in host for c in b"/\\?#@ "):
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"error": "bad_request", "message": "bad host"}).encode()
        uri = request.uri if request.uri.startswith(b"/") else b"/"
        request.setResponseCode(308)
        request.setHeader(b"Location", b"https://" + host + self.port_suffix + uri)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": "https_required", "message": "use HTTPS"}).encode() + b"\n"

"""The plain-HTTP listener: a permanent redirect to HTTPS, and ACME HTTP-01 answers.

The only thing ever served in clear is ``GET`` (or ``HEAD``)
``/.well-known/acme-challenge/<token>`` for a challenge the node's ACME issuer has
pending (RFC 8555 section 8.3); an unknown token under that path is a 404.  Every other
request is a 308 to the same host and path over HTTPS.

Nothing on this port needs a request body, so none is ever read: :func:`plain_http_site`
answers each request at the end of its head (a body announced with it, however large, is
neither buffered nor waited for) and then closes the connection, dropping what the client
still sends for a bounded time (:class:`~hoodyproxy.frontend.http1.EarlyAnswerChannel`).
"""

from __future__ import annotations

import json

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from hoodyproxy import errors
from hoodyproxy.frontend.http1 import SERVER, early_answer_site, http_date, take_site_request_line
from hoodyproxy.routing import split_host

ACME_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


class RedirectToHTTPS(Resource):
    """Answers every request with 308 to the same host and path over HTTPS.

    ``http01`` (a :class:`hoodyproxy.tls.challenges.HTTP01Responder`, optional) answers
    ACME HTTP-01 challenges; without it the challenge path is redirected like any other.
    """

    isLeaf = True

    def __init__(self, https_port: int, http01=None) -> None:
        super().__init__()
        self.port_suffix = b"" if https_port == 443 else b":%d" % https_port
        self.http01 = http01

    def render(self, request) -> bytes:
        request.setHeader(b"Server", SERVER)
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
        if self.http01 is not None and request.path.startswith(ACME_CHALLENGE_PREFIX) \
                and request.method in (b"GET", b"HEAD"):
            return self._challenge(request, host)
        uri = request.uri if request.uri.startswith(b"/") else b"/"
        request.setResponseCode(308)
        request.setHeader(b"Location", b"https://" + host + self.port_suffix + uri)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": "https_required", "message": "use HTTPS"}).encode() + b"\n"

    def _challenge(self, request, host: bytes) -> bytes:
        token = request.path[len(ACME_CHALLENGE_PREFIX):].decode("ascii", "replace")
        body = self.http01.response(token, host.decode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        if body is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"error": "not_found", "message": "no such challenge"}).encode() + b"\n"
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        return body


class PlainRequest(Request):
    """A request on the plain port, answered at the end of its head; its body is never read."""

    def gotLength(self, length: int | None) -> None:
        take_site_request_line(self)
        self.content = None
        self.channel.persistent = False  # the body, if any, is not read: the connection ends
        self.setHeader(b"Date", http_date())
        self.setHeader(b"Connection", b"close")
        try:
            self.render(self.site.getResourceFor(self))
        except Exception:
            self.processingFailed(Failure())

    def handleContentChunk(self, data: bytes) -> None:
        pass  # (answered already; never kept)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        pass  # (answered at end of head)


def plain_http_site(resource: Resource, reactor, head_timeout: float | None = None) -> Site:
    """The plain-HTTP port's factory: ``resource`` (a :class:`RedirectToHTTPS`) answers each
    request from its head, and ``head_timeout`` bounds how long a head may take (408)."""
    return early_answer_site(resource, PlainRequest, reactor, head_timeout)

"""Container services for the end-to-end tests: real twisted.web resources on loopback."""

from __future__ import annotations

import hashlib
import json

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted.internet import reactor

from hoodyproxy.demo import make_echo_factory


class Headers(Resource):
    """Answers with JSON: method, uri, headers (as lists) and the peer the service saw."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "peer": request.getClientAddress().host,
            "body_length": len(body),
        }).encode()


class Digest(Resource):
    """Consumes an upload and answers with its length and SHA-256."""

    isLeaf = True

    def render_POST(self, request):
        h = hashlib.sha256()
        n = 0
        while True:
            block = request.content.read(1 << 20)
            if not block:
                break
            h.update(block)
            n += len(block)
        return json.dumps({"length": n, "sha256": h.hexdigest()}).encode()

    render_PUT = render_POST


def pattern(size: int) -> bytes:
    """Deterministic bytes of a given size."""
    block = bytes(range(256)) * 4096
    return (block * (size // len(block) + 1))[:size]


class Download(Resource):
    """``/big?size=N``: N deterministic bytes, written block by block under backpressure."""

    isLeaf = True

    def render_GET(self, request):
        size = int(request.args.get(b"size", [b"1048576"])[0])
        chunked = request.args.get(b"chunked", [b"0"])[0] == b"1"
        if not chunked:
            request.setHeader(b"Content-Length", b"%d" % size)
        block = pattern(1 << 20)
        state = {"left": size}

        class Producer:
            def resumeProducing(self):
                if state["left"] <= 0:
                    request.unregisterProducer()
                    request.finish()
                    return
                piece = block[: min(len(block), state["left"])]
                state["left"] -= len(piece)
                request.write(piece)

            def stopProducing(self):
                state["left"] = 0

        request.registerProducer(Producer(), False)
        return NOT_DONE_YET


def app() -> Resource:
    root = Resource()
    root.putChild(b"headers", Headers())
    root.putChild(b"digest", Digest())
    root.putChild(b"big", Download())
    root.putChild(b"echo", WebSocketResource(make_echo_factory(reactor)))
    root.putChild(b"", Headers())
    return root

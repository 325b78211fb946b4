"""A small built-in sample service for ``twistd -n hoodyproxy --demo``.

It plays the part of a container behind the gateway, so that a person (or a test) can
see what the container receives:

``GET /``
    an HTML page showing the ``Host`` the request carried, the peer address the
    service saw (the gateway's side of the connection, not the browser's) and the
    ``X-Forwarded-For`` header; an inline script opens a WebSocket to ``/echo`` on the
    same host (``wss://`` when the page came over https) and shows the echo.
``GET /echo``
    a WebSocket echo endpoint (autobahn): text and binary messages come back as sent.
``GET /headers``
    JSON: the request headers (lower-cased names, repeated headers joined with
    ``", "``) plus ``"peer"``, the peer IP address the service saw.  ``"peer"`` always
    wins over a request header of that name.

The node registers the service in its live map as a container while it runs
(:class:`DemoRegistration`), and takes it out again at stop: the entry points at a port
that dies with the process, so left behind it would answer 502 until someone deleted it.
A node that crashed cannot take it out, so the registration is marked as the demo's in
the data directory and the next start -- with ``--demo`` or without -- removes it.
"""

from __future__ import annotations

import html
import json
import os

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.web.resource import Resource
from twisted.web.server import Site

__all__ = ["make_demo_site", "listen_demo", "EchoProtocol", "make_echo_factory", "DemoRegistration"]

#: the largest WebSocket message the echo endpoint accepts
MAX_MESSAGE = 1024 * 1024


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def _header(request, name: bytes) -> str | None:
    """All values of one request header joined with ``", "``, or None when absent."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return ", ".join(_text(v) for v in values)


def _peer_ip(request) -> str:
    address = request.getClientAddress()
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return str(address)


def _peer_display(request) -> str:
    address = request.getClientAddress()
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    return str(address)


class EchoProtocol(WebSocketServerProtocol):
    """Sends every message back as it came: text as text, binary as binary."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def make_echo_factory(reactor) -> WebSocketServerFactory:
    """The autobahn factory behind ``/echo``; it accepts any Host and any Origin.

    The service sits behind a gateway that keeps the browser's ``Host`` (for example
    ``app.example.test`` or ``app.example.test:443``) while the service itself listens
    on some other port.  Autobahn checks the Host port only when the factory has an
    ``externalPort`` (set from the URL's port or given explicitly), so no URL and no
    ``externalPort`` are given here.  ``allowedOrigins=["*"]`` is the default; it is
    set explicitly, and ``allowNullOrigin`` must be passed on every
    ``setProtocolOptions`` call because that method resets it to False otherwise.
    """
    factory = WebSocketServerFactory(reactor=reactor, server="hoodyproxy-demo")
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(
        allowedOrigins=["*"],
        allowNullOrigin=True,
        webStatus=False,  # a plain GET /echo gets an error, not autobahn's status page
        maxMessagePayloadSize=MAX_MESSAGE,
        maxFramePayloadSize=MAX_MESSAGE,
    )
    return factory


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>hoodyproxy demo</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
dt {{ font-weight: bold; margin-top: 0.6em; }}
dd {{ font-family: monospace; }}
</style>
</head>
<body>
<h1>hoodyproxy demo</h1>
<p>This is the sample service that <code>twistd hoodyproxy --demo</code> runs behind the gateway.</p>
<dl>
<dt>Host</dt><dd id="host">{host}</dd>
<dt>Peer address seen by the service</dt><dd id="peer">{peer}</dd>
<dt>X-Forwarded-For</dt><dd id="xff">{xff}</dd>
<dt>WebSocket echo</dt><dd id="ws">connecting&hellip;</dd>
</dl>
<p><a href="/headers">/headers</a> shows every request header as JSON.</p>
<script>
(function () {{
  var out = document.getElementById("ws");
  var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
  var url = scheme + window.location.host + "/echo";
  var ws;
  try {{
    ws = new WebSocket(url);
  }} catch (e) {{
    out.textContent = "could not open " + url + ": " + e;
    return;
  }}
  ws.onopen = function () {{
    out.textContent = "connected to " + url + ", sent \\"hello\\"";
    ws.send("hello");
  }};
  ws.onmessage = function (event) {{
    out.textContent = "echo from " + url + ": " + event.data;
    ws.close();
  }};
  ws.onerror = function () {{
    out.textContent = "WebSocket error on " + url;
  }};
}})();
</script>
</body>
</html>
"""


class _Headers(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        result: dict[str, str] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = _text(name).lower()
            value = ", ".join(_text(v) for v in values)
            result[key] = f"{result[key]}, {value}" if key in result else value
        result["peer"] = _peer_ip(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(result, sort_keys=True, indent=2).encode("utf-8") + b"\n"


class _Root(Resource):
    def getChild(self, path: bytes, request):
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request) -> bytes:
        xff = _header(request, b"x-forwarded-for")
        page = _PAGE.format(
            host=html.escape(_header(request, b"host") or "(none)"),
            peer=html.escape(_peer_display(request)),
            xff=html.escape(xff if xff is not None else "(none)"),
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return page.encode("utf-8")


def make_demo_site(reactor) -> Site:
    """The demo service as a :class:`twisted.web.server.Site` (see the module docstring)."""
    root = _Root()
    root.putChild(b"echo", WebSocketResource(make_echo_factory(reactor)))
    root.putChild(b"headers", _Headers())
    site = Site(root, reactor=reactor)
    site.displayTracebacks = False
    return site


def listen_demo(reactor: IReactorTCP, interface: str = "127.0.0.1") -> IListeningPort:
    """Start the demo service on an ephemeral TCP port of ``interface``.

    ``getHost().port`` on the result tells which port it got.
    """
    return reactor.listenTCP(0, make_demo_site(reactor), interface=interface)


class DemoRegistration:
    """The demo's container in the live map, and the mark in the data directory that says so.

    The mark (``<data-dir>/demo-container.json``: the container as registered) is written
    before the container is put and removed after it is deleted, so that whatever moment
    a node dies at, the next start knows what to take out.  A container is taken out only
    while it is still as the demo registered it (same project, loopback address and
    port): one the operator has since changed is the operator's.  With no mark, a
    container that looks exactly like a registration of the demo (its ids, loopback, one
    ``http-80`` port) is what a node from before the mark existed left, and goes too.
    """

    MARK = "demo-container.json"

    def __init__(self, directory, data_dir: str, container_id: str, project: str) -> None:
        self.directory = directory
        self.path = os.path.join(data_dir, self.MARK)
        self.container_id = container_id
        self.project = project

    def _read_mark(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                mark = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: nothing can match it, and it is removed
        return mark if isinstance(mark, dict) else {}

    def remove(self) -> bool:
        """Delete the marked container if it is still the demo's, then the mark; True if deleted.

        At stop, and at every start (a node that died left its demo's container behind).
        """
        mark = self._read_mark()
        if mark is None:
            # Unmarked: what a node from before the mark existed left, if it looks exactly
            # like the demo's registration (its own ids, loopback, one http-80 port).
            current = self.directory.lookup(self.container_id)
            if (current is not None and current.project == self.project and current.address == "127.0.0.1"
                    and set(current.ports) == {"http-80"}):
                return self.directory.delete(current.id)
            return False
        deleted = False
        current = self.directory.lookup(str(mark.get("id", "")))
        if (current is not None and current.project == mark.get("project")
                and current.address == mark.get("address") and dict(current.ports) == mark.get("ports")):
            deleted = self.directory.delete(current.id)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        return deleted

    def register(self, port: int, address: str = "127.0.0.1"):
        """Mark, then put the demo's container (running, ``http-80`` on ``port``); returns it."""
        from hoodyproxy.directory import Container
        from hoodyproxy.tls.devca import write_atomic

        container = Container(self.container_id, self.project, address, "running", {"http-80": port})
        mark = {"id": container.id, "project": container.project, "address": container.address,
                "ports": dict(container.ports)}
        write_atomic(self.path, json.dumps(mark).encode("utf-8") + b"\n", mode=0o600)
        self.directory.put(container)
        return container

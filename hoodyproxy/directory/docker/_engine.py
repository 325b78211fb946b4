"""A read-only client of the Docker Engine API (Podman's too) over its UNIX socket (or a TCP proxy).

The socket is root-equivalent: whoever may ``POST`` to it may start a privileged
container.  This client can only send ``GET``: no method is a parameter anywhere below,
so a read-only socket proxy in front of the daemon (docs/docker.rst) loses nothing.

Everything goes through Twisted's Agent over a :class:`UNIXClientEndpoint` (or, for a
read-only socket proxy such as docker-socket-proxy, ``tcp://host:port``), so nothing
blocks the reactor.  The API version is negotiated once per connection to the daemon
(:meth:`EngineClient.negotiate`): the daemon's own ``ApiVersion``, never above the
newest this client was written against; Debian's Docker 20.10 speaks 1.41 and refuses
newer paths.  A proxy that refuses ``/version`` gets unversioned paths, which the daemon
answers in its own version.  Every request but the events stream has a timeout; every
body read has a bound.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from hoodyproxy.config import tcp_address
from hoodyproxy.directory.docker._lines import LineBuffer, LineTooLong

log = Logger()

DEFAULT_SOCKET = "/var/run/docker.sock"
#: The oldest API this client can use (label filters on /containers/json and /events,
#: State.Health in inspect), and the newest it was written against.
MIN_API_VERSION = (1, 25)
MAX_API_VERSION = (1, 45)
#: Largest JSON answer read (a list of thousands of containers is a few megabytes).
MAX_BODY = 64 * 1024 * 1024


class EngineError(Exception):
    """The Engine API answered with an error, or not in a way this client understands."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(EngineError):
    """404: the container is gone."""


def socket_path(configured: str = "", environ: Mapping[str, str] = os.environ) -> str:
    """The socket to use: ``configured`` (``[docker] socket``), else ``$DOCKER_HOST`` when it
    names a UNIX socket, else :data:`DEFAULT_SOCKET`.  Raises ValueError for a
    ``DOCKER_HOST`` that is not ``unix://``: a TCP daemon is usually one with TLS, which the
    provider does not speak (a plain-HTTP socket proxy is named in the config instead)."""
    if configured:
        return configured
    host = environ.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://") and len(host) > len("unix://"):
        return host[len("unix://"):]
    raise ValueError(f"DOCKER_HOST={host} is not a unix:// socket, the only kind the Docker provider takes "
                     f"from DOCKER_HOST: set [docker] socket or --docker-socket (a socket path, or "
                     f"tcp://host:port of a read-only socket proxy)")


def parse_api_version(text: Any) -> tuple[int, int] | None:
    """``"1.41"`` -> ``(1, 41)``; None when it is not a version."""
    if not isinstance(text, str):
        return None
    major, dot, minor = text.partition(".")
    if not dot or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def negotiated_version(server: Any) -> tuple[int, int]:
    """The API version to speak with a daemon whose ``/version`` says ``server``: its own,
    at most :data:`MAX_API_VERSION`; raises EngineError if it is older than we can use."""
    version = parse_api_version(server)
    if version is None:
        raise EngineError(f"the daemon's /version has no usable ApiVersion ({server!r})")
    if version < MIN_API_VERSION:
        raise EngineError("the daemon speaks API %d.%d; the provider needs %d.%d or newer"
                          % (*version, *MIN_API_VERSION))
    return min(version, MAX_API_VERSION)


@implementer(IAgentEndpointFactory)
class _DaemonEndpoints:
    """Every URI to the one daemon address: a UNIX socket path, or ``tcp://host:port``."""

    def __init__(self, reactor, address: str, timeout: float) -> None:
        self.reactor, self.address, self.timeout = reactor, address, timeout
        self.tcp = tcp_address(address)

    def endpointForURI(self, uri):
        if self.tcp is not None:
            return HostnameEndpoint(self.reactor, self.tcp[0], self.tcp[1], timeout=self.timeout)
        return UNIXClientEndpoint(self.reactor, self.address, timeout=self.timeout)


class _BoundedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; ``done`` fires with it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        # Cancelled (a timeout, the provider stopping): the connection is closed.
        self.done: defer.Deferred = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(EngineError(f"an answer longer than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class _LineStream(Protocol):
    """A streamed body handed on a line at a time; ``ended`` fires with the reason it ended."""

    def __init__(self, on_line: Callable[[bytes], None], max_line: int) -> None:
        self.on_line = on_line
        self.lines = LineBuffer(max_line)
        self.ended: defer.Deferred = defer.Deferred()
        self._broken = None

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None:
            return
        try:
            lines = self.lines.feed(data)
        except LineTooLong as e:
            self._broken = e
            self.transport.stopProducing()
            return
        for line in lines:
            self.on_line(line)

    def connectionLost(self, reason) -> None:
        if not self.ended.called:
            self.ended.callback(self._broken or reason.value)

    def stop(self) -> None:
        """End the stream from this side."""
        if self.transport is not None and not self.ended.called:
            self.transport.stopProducing()


class EventStream:
    """A followed ``/events`` answer: :meth:`stop` ends it; ``ended`` fires (with the
    reason, never an error) when it ends for any reason."""

    def __init__(self, protocol: _LineStream) -> None:
        self._protocol = protocol
        self.ended = protocol.ended

    def stop(self) -> None:
        self._protocol.stop()


class EngineClient:
    """GET-only Engine API calls to one daemon (``address``: a UNIX socket path, or
    ``tcp://host:port`` for a socket proxy); :meth:`negotiate` first."""

    def __init__(self, reactor, address: str, *, timeout: float = 30.0, max_body: int = MAX_BODY,
                 max_line: int = 1024 * 1024) -> None:
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        self.max_body = max_body
        self.max_line = max_line
        # One connection per request: connecting to a UNIX socket costs next to nothing, and
        # no idle connection outlives the client (or a request that finishes after close()).
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent.usingEndpointFactory(reactor, _DaemonEndpoints(reactor, address, timeout),
                                                 pool=self._pool)
        self._closed = False
        #: The negotiated version, "1.41": every path but /version is prefixed with it
        #: ("": none, the daemon's own, when /version is refused).
        self.api_version: str | None = None

    def _url(self, path: str, query: Mapping[str, Any] | None = None, versioned: bool = True) -> bytes:
        if versioned:
            if self.api_version is None:
                raise EngineError("the API version is not negotiated yet")
            if self.api_version:
                path = f"/v{self.api_version}{path}"
        url = "http://docker" + quote(path, safe="/:")
        if query:
            url += "?" + urlencode({k: (json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else v)
                                    for k, v in query.items()})
        return url.encode("ascii")

    async def _get(self, url: bytes):
        """Send ``GET url``; the response once its head is in (bounded by ``timeout``)."""
        if self._closed:
            raise EngineError("the client is closed")
        request = self._agent.request(b"GET", url, Headers({b"Accept": [b"application/json"]}))
        request.addTimeout(self.timeout, self.reactor)
        return await request

    async def _get_json(self, url: bytes) -> Any:
        response = await self._get(url)
        body = _BoundedBody(self.max_body)
        response.deliverBody(body)
        reading = body.done
        reading.addTimeout(self.timeout, self.reactor)
        raw = await reading
        if response.code == 404:
            raise NotFound(_message(raw) or "not found", 404)
        if response.code != 200:
            raise EngineError(f"{url.decode()} answered {response.code}: {_message(raw)}", response.code)
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineError(f"{url.decode()} answered something that is not JSON") from None

    async def negotiate(self) -> str:
        """``GET /version``: use the daemon's API version (at most ours); returns it as "1.41",
        or "" when a proxy refuses /version (403): paths then go unversioned."""
        try:
            doc = await self._get_json(self._url("/version", versioned=False))
        except EngineError as e:
            if e.status != 403:
                raise
            self.api_version = ""
            return self.api_version
        if not isinstance(doc, dict):
            raise EngineError("/version answered something that is not an object")
        self.api_version = "%d.%d" % negotiated_version(doc.get("ApiVersion"))
        return self.api_version

    async def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        """``GET /v<version><path>?<query>`` as JSON (dict and list query values are sent as
        JSON, as the API's ``filters`` are)."""
        return await self._get_json(self._url(path, query))

    async def follow(self, path: str, query: Mapping[str, Any] | None,
                     on_line: Callable[[bytes], None]) -> EventStream:
        """``GET`` a streamed answer (``/events``): returns once its head is in; each line of
        the body goes to ``on_line`` as it comes (no timeout: it may be quiet for hours)."""
        url = self._url(path, query)
        response = await self._get(url)
        if response.code != 200:
            body = _BoundedBody(64 * 1024)
            response.deliverBody(body)
            try:
                raw = await body.done.addTimeout(self.timeout, self.reactor)
            except Exception:
                raw = b""
            raise EngineError(f"{url.decode()} answered {response.code}: {_message(raw)}", response.code)
        protocol = _LineStream(on_line, self.max_line)
        response.deliverBody(protocol)
        return EventStream(protocol)

    def close(self) -> defer.Deferred:
        """Send no more requests (those running end on their own, or when cancelled)."""
        self._closed = True
        return self._pool.closeCachedConnections()


def _message(raw: bytes) -> str:
    """The Engine API's ``{"message": ...}``, or the start of the body."""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            return doc["message"][:300]
    except ValueError:
        pass
    return raw[:300].decode("utf-8", "replace")

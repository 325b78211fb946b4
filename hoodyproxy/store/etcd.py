"""A small etcd v3 client over etcd's HTTP/JSON gateway, with treq.

etcd serves its gRPC API as JSON at ``/v3/...`` on every client URL (Debian's etcd 3.4
included): keys and values are base64, 64-bit numbers are strings, and a field whose
value is the zero value is left out (a failed transaction has no ``succeeded``, a
``PUT`` event no ``type``).  What the gateway cannot do is a bidirectional stream: a watch
is one request whose response streams one JSON object per line, and a lease keep-alive is
one request, one answer.

Every call has a deadline (``request_timeout``) and tries the members in turn when one
cannot be reached; a member that answers with an error is believed.  What goes wrong
is :class:`EtcdUnavailable` (no member answered, or the cluster could not commit: no
quorum) or :class:`EtcdError` (the request itself was refused).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import treq
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

log = Logger()

#: A watch line longer than this ends the watch (it is restarted); etcd's own default
#: limit on one request is 1.5 MiB, and a watch response batches events.
MAX_WATCH_LINE = 64 * 1024 * 1024
#: gRPC status codes that mean "this member cannot serve now" (try another).
_UNAVAILABLE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE


class EtcdUnavailable(Exception):
    """No member could be reached, or the cluster could not answer (no quorum, timeout)."""


class EtcdError(Exception):
    """etcd refused the request; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class WatchCompacted(Exception):
    """The watch started before the oldest revision etcd still has: read everything again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"compacted at revision {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it (``value`` None: deleted, in a watch event)."""

    key: str
    value: bytes | None
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _kv(raw: dict[str, Any], deleted: bool = False) -> KeyValue:
    return KeyValue(_unb64(raw.get("key")).decode("utf-8", "replace"),
                    None if deleted else _unb64(raw.get("value")),
                    int(raw.get("mod_revision", 0)), int(raw.get("create_revision", 0)),
                    int(raw.get("lease", 0)))


def prefix_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range or watch cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


# -- transaction parts (plain dicts, as the gateway takes them) ---------------------------

def compare_mod(key: str, revision: int) -> dict[str, Any]:
    """True when ``key`` was last changed at ``revision`` (0: the key does not exist)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def compare_absent(key: str) -> dict[str, Any]:
    """True when ``key`` does not exist."""
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """TLS to the members: their CA (or the system's), and a client certificate if given."""

    def __init__(self, ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
        from twisted.internet import ssl
        self.trust = None
        if ca_file:
            with open(ca_file, "rb") as f:
                self.trust = ssl.Certificate.loadPEM(f.read())
        self.client = None
        if cert_file and key_file:
            with open(cert_file, "rb") as c, open(key_file, "rb") as k:
                self.client = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())

    def creatorForNetloc(self, hostname: bytes, port: int):
        from twisted.internet import ssl
        kw: dict[str, Any] = {}
        if self.trust is not None:
            kw["trustRoot"] = self.trust
        if self.client is not None:
            kw["clientCertificate"] = self.client
        return ssl.optionsForClientTLS(hostname.decode(), **kw)


class _Lines(Protocol):
    """A watch response's body, cut into lines, each handed to ``on_line``; bounded."""

    def __init__(self, on_line: Callable[[bytes], None], done: defer.Deferred) -> None:
        self.on_line = on_line
        self.done = done
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line.strip():
                try:
                    self.on_line(line)
                except Exception as e:
                    self.buffer = b""
                    self.abort(e)
                    return
        if len(self.buffer) > MAX_WATCH_LINE:
            self.buffer = b""
            self.abort(EtcdError("a watch response line is over 64 MiB"))

    def abort(self, reason: Exception | None = None) -> None:
        if reason is not None and not self.done.called:
            self.done.errback(reason)
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(None)


class Watch:
    """A running watch: ``done`` fires (None) when the stream ends, or fails with
    :class:`WatchCompacted`, :class:`EtcdUnavailable` or :class:`EtcdError`."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self._lines: _Lines | None = None
        self._request: defer.Deferred | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop watching; ``done`` fires (None)."""
        self.cancelled = True
        if self._lines is not None:
            self._lines.abort()
        elif self._request is not None:
            self._request.cancel()
        if not self.done.called:
            self.done.callback(None)


class EtcdClient:
    """etcd's KV, lease and watch calls over its JSON gateway.

    ``endpoints`` are client URLs (``http://10.0.0.1:2379``); the one that answered last
    is tried first.  ``username``/``password``: etcd's authentication (a token is fetched
    and renewed as needed).  ``ca_file``, ``cert_file``, ``key_file``: TLS to ``https://``
    endpoints.
    """

    def __init__(self, endpoints: Sequence[str], reactor, *, dial_timeout: float = 2.0,
                 request_timeout: float = 5.0, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.reactor = reactor
        self.request_timeout = request_timeout
        self.username, self.password = username, password
        self._token: str | None = None
        self._current = 0
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.pool.retryAutomatically = False  # a write is never sent twice behind our back
        agent = Agent(reactor, contextFactory=_TLSPolicy(ca_file, cert_file, key_file), connectTimeout=dial_timeout,
                      pool=self.pool)
        self.http = treq.client.HTTPClient(agent)
        # Watches hold their connection for as long as they run: not from the pool.
        stream_pool = HTTPConnectionPool(reactor, persistent=False)
        self.stream_http = treq.client.HTTPClient(Agent(
            reactor, contextFactory=_TLSPolicy(ca_file, cert_file, key_file), connectTimeout=dial_timeout,
            pool=stream_pool))
        self._watches: set[Watch] = set()
        #: Requests (and pauses between rounds) under way: cancelled by close().
        self._inflight: set[defer.Deferred] = set()
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------

    def _headers(self) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"]}
        if self._token:
            headers[b"Authorization"] = [self._token.encode()]
        return headers

    async def _authenticate(self, base: str, timeout: float) -> None:
        response = await self.http.post(f"{base}/v3/auth/authenticate",
                                        data=json.dumps({"name": self.username, "password": self.password}).encode(),
                                        headers={b"Content-Type": [b"application/json"]}, timeout=timeout)
        body = await _json(response)
        if response.code != 200 or "token" not in body:
            raise EtcdError(f"authentication failed: {body.get('message') or body.get('error') or response.code}",
                            int(body.get("code", 16)))
        self._token = body["token"]

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on a member that answers; the answer's JSON."""
        deadline = self.reactor.seconds() + self.request_timeout
        problem = "no endpoint tried"
        authenticated_again = False
        attempts = 0
        while True:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0 or self._closed:
                break
            if attempts and attempts % len(self.endpoints) == 0:
                # Every member refused (an election under way?): a pause, then round again.
                await self._pause(min(0.2, remaining))
                continue
            base = self.endpoints[self._current]
            try:
                if self.username and self._token is None:
                    await self._authenticate(base, remaining)
                    remaining = max(0.1, deadline - self.reactor.seconds())
                request = self.http.post(f"{base}/v3/{path}", data=json.dumps(body).encode(),
                                         headers=self._headers(), timeout=remaining)
                self._inflight.add(request)
                try:
                    response = await request
                    answer = await _json(response)
                finally:
                    self._inflight.discard(request)
            except ResponseNeverReceived as e:
                if any(reason.check(defer.CancelledError) for reason in e.reasons):
                    # Our deadline: sent, and no answer in time (an election may be under
                    # way, or no quorum): the request may or may not be applied.
                    raise EtcdUnavailable(f"{base} did not answer within {self.request_timeout:g} s") from None
                # Closed with no answer: a pooled connection to a member that was killed.
                # The next member may take it.  (Had the member applied a write before it
                # died, the write lands twice: every write here is a put of a whole value,
                # or a transaction whose comparison then fails and is read again.)
                problem = f"{base}: the member closed the connection without answering"
                self._current = (self._current + 1) % len(self.endpoints)
                attempts += 1
                continue
            except (ConnectError, ConnectingCancelledError, DNSLookupError, RequestTransmissionFailed) as e:
                # Nothing was sent (refused, unreachable): the next member may take it.
                problem = f"{base}: {e.__class__.__name__}"
                self._current = (self._current + 1) % len(self.endpoints)
                attempts += 1
                continue
            except (defer.CancelledError, TimeoutError) as e:
                # Sent, and no answer in time: the request may or may not be applied.
                raise EtcdUnavailable(f"{base} did not answer in time ({e.__class__.__name__})") from None
            except (EtcdError, EtcdUnavailable):
                raise
            except Exception as e:
                # The answer was cut off (ResponseFailed), the request could not be
                # written (RequestGenerationFailed: e.g. the client is closing)...
                raise EtcdUnavailable(f"{base}: no answer ({e.__class__.__name__})") from None
            if response.code == 200:
                return answer
            message = str(answer.get("message") or answer.get("error") or f"HTTP {response.code}")
            code = int(answer.get("code", 0) or 0)
            if "auth token" in message and self.username and not authenticated_again:
                self._token, authenticated_again = None, True
                continue
            if code in _UNAVAILABLE_CODES or response.code == 503:
                # No leader, leader changed, "request timed out" (an election under way,
                # or no quorum): the proposal was dropped, or (rarely) lands anyway.  Again,
                # on the next member, until our deadline: every write here is a put of a
                # whole value or a transaction that checks what it changes, so a second
                # landing changes nothing (see SharedAliases.create for the one that would
                # say "exists").
                problem = f"{base}: {message}"
                self._current = (self._current + 1) % len(self.endpoints)
                attempts += 1
                continue
            raise EtcdError(message, code)
        raise EtcdUnavailable(problem if attempts else f"no answer within {self.request_timeout:g} s")

    def _pause(self, seconds: float) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        call = self.reactor.callLater(seconds, d.callback, None)
        self._inflight.add(d)
        d.addBoth(lambda result: (self._inflight.discard(d), call.active() and call.cancel(), result)[2])
        return d

    # -- keys ---------------------------------------------------------------------------

    async def range(self, key: str, *, prefix: bool = False, revision: int = 0,
                    serializable: bool = False) -> tuple[int, list[KeyValue]]:
        """(the store's revision, the keys): ``key``, or every key under it with ``prefix``."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        if revision:
            body["revision"] = str(revision)
        if serializable:
            body["serializable"] = True
        answer = await self.call("kv/range", body)
        return _revision(answer), [_kv(kv) for kv in answer.get("kvs", [])]

    async def get(self, key: str) -> tuple[int, KeyValue | None]:
        revision, kvs = await self.range(key)
        return revision, (kvs[0] if kvs else None)

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> tuple[int, KeyValue | None]:
        """(the revision of the write, the key as it was before or None)."""
        body = {**put_op(key, value, lease)["request_put"], "prev_kv": True}
        answer = await self.call("kv/put", body)
        previous = answer.get("prev_kv")
        return _revision(answer), (_kv(previous) if previous else None)

    async def delete(self, key: str, *, prefix: bool = False) -> tuple[int, int]:
        """(the revision of the delete, how many keys went)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        answer = await self.call("kv/deleterange", body)
        return _revision(answer), int(answer.get("deleted", 0))

    async def txn(self, compare: list[dict], success: list[dict],
                  failure: list[dict] | None = None) -> tuple[bool, int]:
        """Run a transaction: (whether every comparison held, the revision after it)."""
        answer = await self.call("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(answer.get("succeeded", False)), _revision(answer)

    async def compact(self, revision: int, physical: bool = True) -> None:
        await self.call("kv/compaction", {"revision": str(revision), "physical": physical})

    # -- leases -------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        answer = await self.call("lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise EtcdError(str(answer["error"]))
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL now (0: the lease is gone)."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", answer).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` and delete every key bound to it."""
        try:
            await self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    # -- watch --------------------------------------------------------------------------

    def watch(self, key: str, *, prefix: bool, start_revision: int,
              on_events: Callable[[int, list[KeyValue]], None],
              on_progress: Callable[[int], None] | None = None) -> Watch:
        """Watch ``key`` (or every key under it) from ``start_revision``.

        ``on_events(revision, events)`` gets each batch (a deleted key's ``value`` is None);
        ``on_progress(revision)`` each progress notification (every event up to
        ``revision`` was delivered), and ``on_progress(0)`` the creation (whose header's
        revision is the store's, not how far the events have come).  The watch
        asks for progress notifications, and to be cancelled when its member loses its
        leader (``hasleader``), so a member cut off from the cluster does not keep the
        node on a silent stream.
        """
        watch = Watch()
        self._watches.add(watch)
        watch.done.addBoth(lambda result: (self._watches.discard(watch), result)[1])
        request = {"key": _b64(key), "start_revision": str(start_revision), "progress_notify": True}
        if prefix:
            request["range_end"] = _b64(prefix_end(key))

        def on_line(line: bytes) -> None:
            message = json.loads(line)
            if "error" in message:
                error = message["error"]
                raise EtcdUnavailable(f"watch: {error.get('message') or error}")
            result = message.get("result", {})
            revision = _revision(result)
            if result.get("compact_revision") and result.get("canceled"):
                raise WatchCompacted(int(result["compact_revision"]))
            if result.get("canceled"):
                raise EtcdUnavailable(f"watch cancelled: {result.get('cancel_reason') or 'by the member'}")
            events = result.get("events")
            if events:
                on_events(revision, [_kv(e.get("kv", {}), deleted=e.get("type") == "DELETE") for e in events])
            elif on_progress is not None:
                on_progress(0 if result.get("created") else revision)

        defer.ensureDeferred(self._start_watch(watch, {"create_request": request}, on_line))
        return watch

    async def _start_watch(self, watch: Watch, body: dict, on_line: Callable[[bytes], None]) -> None:
        for _ in range(len(self.endpoints)):
            if watch.cancelled:
                return
            base = self.endpoints[self._current]
            headers = {**self._headers(), b"Grpc-Metadata-hasleader": [b"true"]}
            try:
                if self.username and self._token is None:
                    await self._authenticate(base, self.request_timeout)
                    headers = {**self._headers(), b"Grpc-Metadata-hasleader": [b"true"]}
                watch._request = self.stream_http.post(f"{base}/v3/watch", data=json.dumps(body).encode(),
                                                       headers=headers, unbuffered=True,
                                                       timeout=self.request_timeout)
                response = await watch._request
            except (ConnectError, ConnectingCancelledError, DNSLookupError):
                self._current = (self._current + 1) % len(self.endpoints)
                continue
            except Exception as e:
                if not watch.done.called:
                    watch.done.errback(e if isinstance(e, (EtcdError, EtcdUnavailable))
                                       else EtcdUnavailable(f"watch: {e.__class__.__name__}"))
                return
            if watch.cancelled:
                response.deliverBody(_Lines(lambda line: None, defer.Deferred()))
                return
            if response.code != 200:
                answer = await _json(response)
                if not watch.done.called:
                    watch.done.errback(EtcdUnavailable(f"watch: {answer.get('message') or response.code}"))
                return
            watch._lines = _Lines(on_line, watch.done)
            response.deliverBody(watch._lines)
            return
        if not watch.done.called:
            watch.done.errback(EtcdUnavailable("watch: no member could be reached"))

    def close(self) -> defer.Deferred:
        """Cancel every watch and close the pooled connections."""
        self._closed = True
        self.pool.persistent = False  # a request finishing now closes its connection
        for watch in list(self._watches):
            watch.cancel()
        for request in list(self._inflight):
            request.cancel()
        return self.pool.closeCachedConnections()


async def _json(response) -> dict[str, Any]:
    raw = await response.content()
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        return {"error": f"not JSON (HTTP {response.code})"}
    return answer if isinstance(answer, dict) else {}


def _revision(answer: dict[str, Any]) -> int:
    return int(answer.get("header", {}).get("revision", 0))

"""A lean HTTP/1.1 client protocol for talking to containers: one exchange at a time.

The gateway writes a request head it built itself, streams the body with
:meth:`UpstreamConnection.write_body`, and receives the response as events on a
listener (:class:`ResponseListener`).  The parser knows exactly what a proxy needs:
the status, the raw headers, and where the body ends (Content-Length, chunked, until
close, or none).  After a 101 the connection becomes a byte pipe.  Buffers are bounded.

The head is parsed by llhttp (through httptools), fed exactly the bytes of one head:
llhttp judges the syntax (status line, field names as tokens, no control bytes or bare
CR/LF in values, no obs-fold), and the framing is decided here, from the header list,
by the rules in :meth:`UpstreamConnection._frame`.  Where llhttp's own framing checks
are stricter than those rules (a Content-Length repeated with one value; Content-Length
beside Transfer-Encoding), the head is parsed by hand instead, as it always was.  The
body is framed here too: httptools reports no byte offsets, chunk sizes or extension
lengths, so through it the bounds on chunk lines, the end of a response to HEAD and
the bytes that follow a response could not be kept.

The response timeout is not a timer per request but a deadline checked by one shared
sweep (:mod:`hoodyproxy.deadlines`): noticed up to a second late, never early.  A
connection joins the sweep when it is made and leaves it when it is closed, lost or
upgraded; a request only marks it as awaiting a response, so even one request at a time
starts and stops no timer.
"""

from __future__ import annotations

from typing import Callable, Protocol as TypingProtocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from hoodyproxy import deadlines

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
#: Bytes read from the container at a time (Twisted's default), for heads and small
#: bodies: a larger ``recv()`` allocates its whole size first, and past glibc's mmap
#: threshold that costs about 20 us per read of a small response.
READ_SIZE = 64 * 1024
#: Bytes read at a time once a response's body has filled a whole read: fewer reads,
#: and fewer, larger writes towards the client (each TLS write ends in a send()).
LARGE_READ_SIZE = 256 * 1024

# connection states
IDLE, WAITING, BODY, UPGRADED, CLOSED = "idle", "waiting", "body", "upgraded", "closed"

# body framings
_NONE, _LENGTH, _CHUNKED, _CLOSE = 0, 1, 2, 3


class UpstreamProtocolError(Exception):
    """The container sent something that is not HTTP/1.1."""


class ResponseListener(TypingProtocol):
    """What an :class:`UpstreamConnection` tells the exchange that owns it."""

    def upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_end(self) -> None: ...

    # (optional) the response goes on past the read just handled:
    # def upstream_streaming(self) -> None: ...

    def upstream_failed(self, why: str, got_response: bool) -> None: ...

    def upstream_upgraded(self, leftover: bytes) -> None: ...


_VERSIONS = (b"HTTP/1.1 ", b"HTTP/1.0 ")
_OWS = frozenset(b" \t")


class _HeadCollector:
    """httptools' callbacks for one head: the reason, the fields, and whether it ended."""

    __slots__ = ("reason", "headers", "lnames", "complete")
    # The callbacks httptools looks up and this collector does not want, found as None
    # (a failed attribute lookup costs more than a found one, six per response).
    on_message_begin = on_url = on_body = on_message_complete = on_chunk_header = on_chunk_complete = None

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        #: The field names in lower case, computed once here for every later pass.
        self.lnames: list[bytes] = []
        self.complete = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in _OWS:  # llhttp strips the leading whitespace only
            value = value.rstrip(b" \t")
        self.headers.append((name, value))
        self.lnames.append(name.lower())

    def on_headers_complete(self) -> None:
        self.complete = True


#: Response heads parsed already, by their bytes: a container answers most requests with
#: the same head (nginx's differs by its Date, once a second), and parsing is a function of
#: the bytes alone, so a head seen before is not parsed again.  Bounded: emptied when full;
#: a head longer than :data:`HEAD_CACHE_LONGEST` is never kept.
_heads: dict[bytes, tuple] = {}
HEAD_CACHE_SIZE = 256
HEAD_CACHE_LONGEST = 2048


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], list[bytes]]:
    """Status, reason, fields and lower-case field names of ``head`` (one whole head, its
    blank line included); the lists are the caller's own."""
    seen = _heads.get(head)
    if seen is not None:
        status, reason, headers, lnames = seen
        return status, reason, list(headers), list(lnames)
    status, reason, headers, lnames = parsed = _parse_new_head(head)
    if len(head) <= HEAD_CACHE_LONGEST:
        if len(_heads) >= HEAD_CACHE_SIZE:
            _heads.clear()
        _heads[head] = (status, reason, tuple(headers), tuple(lnames))
    return parsed


def _parse_new_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], list[bytes]]:
    """:func:`_parse_head`'s work: llhttp's parse (a refused head raises
    :class:`UpstreamProtocolError`, and is not kept)."""
    if not head.startswith(_VERSIONS):
        raise UpstreamProtocolError("bad status line")
    collector = _HeadCollector()
    parser = HttpResponseParser(collector)
    try:
        parser.feed_data(head)
    except HttpParserUpgrade:
        pass  # a 101 with Upgrade fields: llhttp stops after its head, as we do
    except HttpParserError as e:
        if not collector.complete:
            reason = str(e)
            if "Content-Length" in reason or "Transfer-Encoding" in reason:
                # llhttp refuses a repeated Content-Length even with one value, and a
                # Content-Length beside Transfer-Encoding; ours are the framing rules.
                return _parse_head_by_hand(head[:-4])
            raise UpstreamProtocolError("bad response head: " + reason) from None
        # After a complete head: llhttp pausing on a 101 without Upgrade fields.
    if not collector.complete:
        raise UpstreamProtocolError("bad response head")
    status = parser.get_status_code()
    if status < 100:
        raise UpstreamProtocolError("bad status code")
    return status, collector.reason, collector.headers, collector.lnames


def _parse_head_by_hand(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], list[bytes]]:
    """The head (without its blank line) parsed in Python: the rules llhttp's framing
    checks would refuse are judged here instead (see :meth:`UpstreamConnection._frame`)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise UpstreamProtocolError("bad status line")
    status = int(parts[1])
    if status < 100:
        raise UpstreamProtocolError("bad status code")
    reason = parts[2] if len(parts) == 3 else b""
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise UpstreamProtocolError("bad header line")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise UpstreamProtocolError("bad header value")
        headers.append((name, value))
    return status, reason, headers, [name.lower() for name, _ in headers]


_HEX = frozenset(b"0123456789abcdefABCDEF")


class UpstreamConnection(Protocol):
    """One keep-alive connection to one container address and port."""

    listener: ResponseListener | None = None
    state = IDLE
    #: The lower-case field names of the last response head (for the exchange's filter).
    head_lnames: list[bytes] | None = None
    #: Set by the pool: called when this connection can carry another request.
    on_reusable: Callable[["UpstreamConnection"], None] | None = None
    #: Set by the pool: called once when the connection is gone.
    on_closed: Callable[["UpstreamConnection"], None] | None = None
    #: Set by the pool: called once the connection is established.
    on_connected: Callable[["UpstreamConnection"], None] | None = None

    def __init__(self, key: tuple[str, int], clock) -> None:
        self.key = key
        self.clock = clock
        self.requests = 0
        self.last_used = clock.seconds()
        self._buf = b""
        self._deadlines = deadlines.shared(clock)
        #: Whether a response is due (what the sweep asks of each connection it holds).
        self._watched = False
        #: Whether the sweep holds this connection.
        self._swept = False
        self._timeout_period = 0.0
        self._progress = 0.0
        self._reusable = False
        self._request_done = True
        self._head_request = False
        self._upgrade = False
        self._got_response = False
        self._streaming = False
        self._framing = _NONE
        self._http10 = False
        self._remaining = 0
        self._chunked_body = False
        self._chunk_state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._large_reads = False
        self.paused = False

    def connectionMade(self) -> None:
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self._swept = True
        self._deadlines.watch(self)
        callback, self.on_connected = self.on_connected, None
        if callback is not None:
            callback(self)

    # -- sending ----------------------------------------------------------------------

    def send_head(self, head: bytes, listener: ResponseListener, *, chunked_body: bool,
                  has_body: bool, head_request: bool, upgrade: bool, timeout: float,
                  reusable: bool = True) -> None:
        """Start an exchange: write the request head and wait for the response.

        ``reusable`` False closes the connection after this exchange whatever the
        container says (a body it may not have read as one, for instance).
        """
        assert self.state == IDLE
        self.state = WAITING
        self.listener = listener
        self.requests += 1
        self._buf = b""
        self._got_response = False
        self._streaming = False
        self._reusable = reusable
        self._chunked_body = chunked_body
        self._request_done = not has_body
        self._head_request = head_request
        self._upgrade = upgrade
        # The response timeout counts from the end of the request; while a body is still
        # going up, it is the longest time without progress (a slow upload is not late).
        self._timeout_period = timeout
        self._progress = self.clock.seconds()
        self._watched = True
        if not self._swept:  # (a protocol driven without connectionMade, or after close(): the deadline holds)
            self._swept = True
            self._deadlines.watch(self)
        self.transport.write(head)

    def write_body(self, data: bytes) -> None:
        """Forward a piece of the request body."""
        if self.state in (CLOSED, UPGRADED) or self._request_done or not data:
            return
        self._progress = self.clock.seconds()
        if self._chunked_body:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def end_body(self) -> None:
        """The request body is complete."""
        if self._request_done:
            return
        self._request_done = True
        self._progress = self.clock.seconds()
        if self.state not in (CLOSED, UPGRADED) and self._chunked_body:
            self.transport.write(b"0\r\n\r\n")
        if self.state == IDLE:
            self._maybe_reusable()

    # -- flow control of the response -------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once (never reused); no further events are delivered."""
        self._reusable = False
        self.listener = None
        self._leave_sweep()
        if self.state != CLOSED:
            self.state = CLOSED
            if self.transport is not None:
                self.transport.abortConnection()

    # -- receiving --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if len(data) >= READ_SIZE and not self._large_reads and (state == BODY or state == WAITING):
            self._set_read_size(True)  # a read that filled the buffer: more is waiting
        if state == BODY and not self._buf:
            self._body(data)
            if self.state == BODY and not self._streaming:
                self._now_streaming()
            return
        if state == UPGRADED:
            if self.listener is not None:
                self.listener.upstream_data(data)
            return
        if state == CLOSED:
            return
        if state == IDLE:
            # Nothing was asked: a server talking out of turn cannot be trusted with the next request.
            self._reusable = False
            self.close()
            return
        self._buf += data
        if state == WAITING:
            self._got_response = True  # the container has begun answering: never resend
            self._head()
        elif state == BODY:
            data, self._buf = self._buf, b""
            self._body(data)
        if self.state == BODY and not self._streaming:
            self._now_streaming()

    def _now_streaming(self) -> None:
        """The response goes on past this read: the listener may want to pace it."""
        self._streaming = True
        streaming = getattr(self.listener, "upstream_streaming", None)
        if streaming is not None:
            streaming()

    def _head(self) -> None:
        while self.state == WAITING:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0 and len(self._buf) <= MAX_HEAD:
                return
            if end < 0 or end > MAX_HEAD:
                self._fail("response head too large")
                return
            head, self._buf = self._buf[:end + 4], self._buf[end + 4:]
            try:
                status, reason, headers, lnames = _parse_head(head)
                self._http10 = head.startswith(b"HTTP/1.0")
            except UpstreamProtocolError as e:
                self._fail(str(e))
                return
            if status == 101:
                if not self._upgrade:
                    self._fail("unexpected 101")
                    return
                self._leave_sweep()  # (a tunnel has an idle timer of its own)
                self.state = UPGRADED
                self._reusable = False
                if self._large_reads:
                    self._set_read_size(False)  # a tunnel's messages are small
                leftover, self._buf = self._buf, b""
                listener = self.listener
                listener.upstream_head(status, reason, headers)
                listener.upstream_upgraded(leftover)
                return
            if 100 <= status < 200:
                continue  # interim responses (100 Continue, 103) are not forwarded
            self._watched = False  # (the response has begun: no deadline until the next request)
            self.head_lnames = lnames
            if not self._frame(status, headers, lnames):
                return
            self.state = BODY
            listener = self.listener
            listener.upstream_head(status, reason, headers)
            if self.state != BODY:
                return
            if self._framing == _NONE or (self._framing == _LENGTH and self._remaining == 0):
                if self._buf:
                    self._reusable = False  # bytes nobody asked for: do not trust this connection
                    self._buf = b""
                self._response_complete()
                return
            data, self._buf = self._buf, b""
            if data:
                self._body(data)
            return

    def _frame(self, status: int, headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> bool:
        if (b"transfer-encoding" not in lnames and lnames.count(b"content-length") == 1
                and lnames.count(b"connection") <= 1 and not self._head_request
                and status != 204 and status != 304):
            # The usual response: one Content-Length of one value, at most one Connection
            # (the names' passes are C loops; the rules below give the same answer for it).
            value = headers[lnames.index(b"content-length")][1].strip()
            if b"," not in value:
                keep_alive = False
                if b"connection" in lnames:
                    connection = headers[lnames.index(b"connection")][1]
                    if connection == b"keep-alive":
                        keep_alive = True  # (nginx's, on every response: no split)
                    else:
                        tokens = {t.strip() for t in connection.lower().split(b",")}
                        if b"close" in tokens:
                            self._reusable = False
                        keep_alive = b"keep-alive" in tokens
                if self._http10 and not keep_alive:
                    self._reusable = False
                if not value.isdigit() or len(value) > 18:
                    self._fail("bad content-length")
                    return False
                self._framing = _LENGTH
                self._remaining = int(value)
                return True
        return self._frame_by_rules(status, headers, lnames)

    def _frame_by_rules(self, status: int, headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> bool:
        """The framing of any response head (RFC 9112 6.3, strict): :meth:`_frame`'s
        answer for every head, in one pass over its fields."""
        te = None
        lengths = []
        keep_alive = False
        for (name, value), lname in zip(headers, lnames):
            if lname == b"transfer-encoding":
                te = value.lower() if te is None else te + b"," + value.lower()
            elif lname == b"content-length":
                lengths.append(value)
            elif lname == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"close" in tokens:
                    self._reusable = False
                keep_alive = keep_alive or b"keep-alive" in tokens
        if self._http10 and not keep_alive:
            self._reusable = False
        if self._head_request or status in (204, 304):
            self._framing = _NONE
        elif te is not None:
            if te.rsplit(b",", 1)[-1].strip() == b"chunked":
                self._framing = _CHUNKED
                self._chunk_state = 0
            else:
                self._framing = _CLOSE
                self._reusable = False
        elif lengths:
            values = {v.strip() for v in b",".join(lengths).split(b",")}
            if len(values) != 1:
                self._fail("conflicting content-length")
                return False
            value = values.pop()
            if not value.isdigit() or len(value) > 18:
                self._fail("bad content-length")
                return False
            self._framing = _LENGTH
            self._remaining = int(value)
        else:
            self._framing = _CLOSE
            self._reusable = False
        return True

    def _body(self, data: bytes) -> None:
        framing = self._framing
        if framing == _LENGTH:
            n = len(data)
            if n < self._remaining:
                self._remaining -= n
                self.listener.upstream_data(data)
                return
            body, extra = data[: self._remaining], data[self._remaining:]
            self._remaining = 0
            if body:
                self.listener.upstream_data(body)
            if extra:
                self._reusable = False
            if self.state == BODY:
                self._response_complete()
        elif framing == _CHUNKED:
            self._chunked(data)
        elif framing == _CLOSE:
            self.listener.upstream_data(data)

    def _chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        n = len(buf)
        while pos < n and self.state == BODY:
            st = self._chunk_state
            if st == 1:
                take = min(self._remaining, n - pos)
                piece = buf[pos:pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = 2
                self.listener.upstream_data(piece)
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > MAX_CHUNK_LINE:
                    self._fail("chunk line too long")
                    return
                self._buf = buf[pos:]
                return
            line = buf[pos:end]
            pos = end + 2
            if len(line) > MAX_CHUNK_LINE:
                self._fail("chunk line too long")
                return
            if st == 0:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 15 or not _HEX.issuperset(size):
                    self._fail("bad chunk size")
                    return
                self._remaining = int(size, 16)
                self._chunk_state = 1 if self._remaining else 3
            elif st == 2:
                if line:
                    self._fail("bad chunk terminator")
                    return
                self._chunk_state = 0
            elif st == 3:
                if not line:  # end of trailers
                    if pos < n:
                        self._reusable = False
                    self._response_complete()
                    return

    def _set_read_size(self, large: bool) -> None:
        self._large_reads = large
        if self.transport is not None:
            self.transport.bufferSize = LARGE_READ_SIZE if large else READ_SIZE

    def _response_complete(self) -> None:
        listener, self.listener = self.listener, None
        self.state = IDLE
        if self._large_reads:
            self._set_read_size(False)
        self._maybe_reusable()
        if listener is not None:
            listener.upstream_end()

    def _maybe_reusable(self) -> None:
        if self.state != IDLE or self.listener is not None:
            return
        if self._reusable and self._request_done:
            if self.paused:
                self.resumeProducing()
            self.last_used = self.clock.seconds()
            if self.on_reusable is not None:
                self.on_reusable(self)
                return
        if not (self._reusable and self._request_done):
            self._reusable = False
            self.close()

    # -- failure ----------------------------------------------------------------------

    def _leave_sweep(self) -> None:
        """No response will be due on this connection again (closed, lost or upgraded)."""
        self._watched = False
        if self._swept:
            self._swept = False
            self._deadlines.unwatch(self)

    def close(self) -> None:
        """Close the connection once what is written is sent (the pool's way: an idle
        connection timed out, evicted, or not kept)."""
        self._leave_sweep()
        if self.transport is not None:
            self.transport.loseConnection()

    def check_deadline(self, now: float) -> None:
        """The shared sweep's question: is a response due, and has it been due for
        ``timeout`` since the last progress of the request (its start, a piece of body,
        its end)?"""
        if self._watched and now - self._progress >= self._timeout_period:
            self._fail("timeout")

    def _fail(self, why: str) -> None:
        self._leave_sweep()
        listener, self.listener = self.listener, None
        self._reusable = False
        if self.transport is not None and self.state != CLOSED:
            self.transport.abortConnection()
        if listener is not None:
            listener.upstream_failed(why, self._got_response)

    def connectionLost(self, reason: Failure = None) -> None:
        state, self.state = self.state, CLOSED
        self._leave_sweep()
        listener, self.listener = self.listener, None
        if self.on_closed is not None:
            self.on_closed(self)
        if listener is None:
            return
        if state == UPGRADED:
            listener.upstream_end()
        elif state == BODY and self._framing == _CLOSE:
            listener.upstream_end()
        elif state in (WAITING, BODY):
            listener.upstream_failed("closed", self._got_response)

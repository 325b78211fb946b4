"""The HTTPS port's TLS transport: Twisted's, with fewer exceptions, copies and sends.

Twisted's :class:`~twisted.protocols.tls.BufferingTLSTransport` drives pyOpenSSL over
memory BIOs.  Per proxied request it asks OpenSSL for more decrypted bytes until
``WantReadError`` says there are none, and for more encrypted bytes the same way: two or
three exceptions raised and caught per request, each after a fresh 32 KiB buffer.  It
encrypts a large write 16 KiB at a time and sends after each record (64 ``send`` calls
per MiB), and it writes a complete small answer on the next reactor turn (a
``callLater(0)`` per response).  :class:`GatewayTLSTransport` keeps everything else
(handshake, shutdown, producers, the small-write aggregation) and changes only that:

- before asking for more decrypted bytes, it checks whether any can exist (bytes in the
  incoming BIO or a decrypted record pending in OpenSSL); likewise for encrypted bytes;
- once the handshake is done, it calls OpenSSL's ``BIO_write``, ``SSL_read``, ``SSL_write``
  and ``BIO_read`` itself, through pyOpenSSL's binding, and leaves errors to pyOpenSSL's
  own raising only when a call fails: pyOpenSSL's methods check for a callback's failure
  and look up the error after every call, and allocate a buffer for every read (four
  such calls per proxied request). A callback that fails (certificate verification,
  ALPN, OCSP) fails the handshake, so there is nothing to report after a call that
  succeeded; decrypted and encrypted bytes are copied out of one module buffer before
  anything else runs;
- a write is encrypted record by record into the outgoing BIO and sent once, whole;
- :meth:`GatewayTLSTransport.write_now` writes at once, after whatever the aggregation
  holds, for a frontend that knows an answer is complete;
- on a TLS 1.3 connection it counts the records each way since the handshake ended, so
  that a connection that becomes a tunnel can give its OpenSSL object up for
  :class:`~hoodyproxy.tls.records.RecordLayer13` (:meth:`GatewayTLSTransport.shed_openssl`).

The checks read pyOpenSSL's memory BIOs (``Connection._into_ssl``/``_from_ssl``) through
the OpenSSL binding pyOpenSSL itself uses; a pyOpenSSL without them, or a Twisted whose
TLS protocol lacks the methods overridden here, gets Twisted's own transport
(:func:`tls_factory`).
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols import tls as _tls
from twisted.python.failure import Failure

from hoodyproxy.tls.records import SUITES, RecordLayer13, plain_records, record_count, secrets_of

try:
    from OpenSSL._util import ffi as _ffi, lib as _lib, no_zero_allocator as _allocate
    _get_mem_data = _lib.BIO_get_mem_data
    _SSL_read, _SSL_write, _SSL_pending = _lib.SSL_read, _lib.SSL_write, _lib.SSL_pending
    _BIO_read, _BIO_write = _lib.BIO_read, _lib.BIO_write
    _SSL_version = _lib.SSL_version
    _from_buffer, _cbuffer = _ffi.from_buffer, _ffi.buffer
except (ImportError, AttributeError):  # pragma: no cover - a pyOpenSSL without its binding
    _get_mem_data = None


def _pending(bio) -> int:
    """Bytes waiting in a memory BIO."""
    return _get_mem_data(bio, _ffi.NULL)


def _peek(bio) -> bytes:
    """A copy of the bytes waiting in a memory BIO, left where they are."""
    pointer = _ffi.new("char **")
    size = _get_mem_data(bio, pointer)
    return _cbuffer(pointer[0], size)[:] if size > 0 else b""

#: The plaintext of one TLS record (RFC 8446 5.1).
RECORD = 16384
TLS1_3 = 0x0304
#: A record's bytes beyond its plaintext in TLS 1.3 when it is application data without
#: padding: its header, the inner content type and the AEAD's tag.
_OVERHEAD_13 = 22
#: The most of what a client sends first that is kept to read its ClientHello (a record).
MAX_HELLO = 5 + 16384 + 256
#: The most decrypted bytes asked for at once (Twisted's figure).
READ_SIZE = 32768
#: Where OpenSSL's output is copied from, one call at a time (the reactor is one thread,
#: and each call's bytes are copied out before anything else runs).
_BUFFER = _allocate("char[]", READ_SIZE) if _get_mem_data is not None else None


def _recv(connection) -> bytes:
    """``connection.recv(READ_SIZE)``, without pyOpenSSL's checks after a call that succeeded
    (a buffer of its own, the error check on every call; the callbacks whose failures
    those checks report fail the handshake, so they can only follow a failed call)."""
    ssl = connection._ssl
    result = _SSL_read(ssl, _BUFFER, READ_SIZE)
    if result <= 0:
        connection._raise_ssl_error(ssl, result)  # (WantReadError, ZeroReturnError, Error)
        return b""
    return _cbuffer(_BUFFER, result)[:]


def _send(connection, data) -> int:
    """``connection.send(data)`` (bytes or a memoryview), likewise."""
    ssl = connection._ssl
    result = _SSL_write(ssl, _from_buffer(data), len(data))
    if result <= 0:
        connection._raise_ssl_error(ssl, result)
    return result


_OVERRIDDEN = ("dataReceived", "_flushReceiveBIO", "_flushSendBIO", "_write", "_bufferedWrite",
               "_tlsShutdownFinished", "_shutdownTLS", "_handshakeDone", "_checkHandshakeStatus",
               "_aborted", "_lostTLSConnection")
#: pyOpenSSL's own error raising, called after a failed call as its methods do.
_RAISERS = ("_raise_ssl_error", "_handle_bio_errors")


class GatewayTLSTransport(_tls.BufferingTLSTransport):
    """BufferingTLSTransport without needless WantReadErrors, sending each write once."""

    # What a TLS 1.3 connection carried each way since its handshake ended, for
    # shed_openssl (a connection that can become a tunnel: not HTTP/2's).  Counted in
    # bytes and calls, a few additions per request, and checked exactly when used.
    #: Counting (TLS 1.3, HTTP/1.1, no max_fragment_length asked for).
    _counting = False
    #: Bytes received, plaintext OpenSSL gave for them, and the reads that gave it.
    _in_bytes = _in_plain = _in_records = 0
    #: Bytes sent, plaintext given to OpenSSL, and the writes (SSL_write calls) it took.
    _out_bytes = _out_plain = _out_records = 0
    #: The session tickets OpenSSL wrote as the handshake ended: records, bytes.
    _tickets = _ticket_bytes = 0
    #: The start of what the client sent while its ClientHello's record is incomplete;
    #: then whether it leaves records plain (records.plain_records), kept to the flip.
    _hello: bytes | bool = b""
    #: Set by _checkHandshakeStatus when the handshake ends: the bytes received after it.
    _after_handshake: int | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._counting:
            self._in_bytes += len(data)
        incoming = getattr(self._tlsConnection, "_into_ssl", None)
        if (incoming is None or not self._handshakeDone or self._appSendBuffer or not data
                or _BIO_write(incoming, data, len(data)) <= 0):
            # (the handshake, writes waiting for it, or bytes a memory BIO refused whole:
            # Twisted's way, which raises what pyOpenSSL raises)
            hello = self._hello
            if hello.__class__ is bytes and not self._handshakeDone:
                hello += data[:MAX_HELLO - len(hello)]
                # (kept only until its first record is in: then only the answer)
                whole = len(hello) >= 5 and len(hello) >= 5 + (hello[3] << 8 | hello[4])
                self._hello = plain_records(hello) if whole or len(hello) >= MAX_HELLO else hello
            _tls.TLSMemoryBIOProtocol.dataReceived(self, data)
            after = self._after_handshake
            if after is not None:  # (the handshake ended in this call)
                self._after_handshake = None
                self._in_bytes += after
            return
        self._flushReceiveBIO()

    def _checkHandshakeStatus(self) -> None:
        done = self._handshakeDone
        _tls.TLSMemoryBIOProtocol._checkHandshakeStatus(self)
        if done or not self._handshakeDone:
            return
        plain, self._hello = self._hello is True, False
        connection = self._tlsConnection
        incoming = getattr(connection, "_into_ssl", None)
        if (not plain or incoming is None or _SSL_version(connection._ssl) != TLS1_3
                or connection.get_alpn_proto_negotiated() == b"h2"):
            # Never shed: the traffic secrets the key log kept are not kept any longer.
            if getattr(connection, "hoody_secrets", None) is not None:
                connection.hoody_secrets = None
            return
        # From here every record each way is under the application traffic keys: the
        # session tickets OpenSSL has just written (still in the outgoing BIO), and
        # whatever the client sent after its Finished (still in the incoming one).
        tickets = _peek(connection._from_ssl)
        count = record_count(tickets)
        if count is None:
            connection.hoody_secrets = None
            return  # (not whole records: never seen from OpenSSL, and then not counted)
        self._tickets, self._ticket_bytes = count, len(tickets)
        self._counting = True
        self._after_handshake = _pending(incoming)

    def shed_openssl(self) -> bool:
        """Give a quiet TLS 1.3 connection's OpenSSL object up: its records are sealed and
        opened by a :class:`~hoodyproxy.tls.records.RecordLayer13` from now on (about
        5 KiB instead of 24).  True if it was (or had been) done; False if it cannot be
        done now (nothing changes): not TLS 1.3, HTTP/2, bytes waiting either way or a
        record in part, or anything the counts cannot account for exactly.

        The sequence numbers are the records each way since the handshake, and the counts
        say them exactly or not at all: each record OpenSSL reads or writes costs 22 bytes
        beyond its plaintext (header, content type, tag) when it is unpadded application
        data, so the bytes received equal 22 per read plus the plaintext read only if
        every record received was unpadded application data read whole by one read (a
        padded one, a KeyUpdate, an empty record or one in part breaks the equality);
        likewise each way out, one record per SSL_write."""
        if (not self._counting or self._lostTLSConnection or self.disconnecting or self._aborted
                or self._appSendBuffer):
            return False
        connection = self._tlsConnection
        secrets = secrets_of(connection)
        suite = connection.get_cipher_name()
        if secrets is None or suite not in SUITES:
            return False
        self._aggregator.flush()  # (what it holds is sealed by OpenSSL, and counted)
        if (self._lostTLSConnection or self._appSendBuffer
                or self._in_bytes != _OVERHEAD_13 * self._in_records + self._in_plain
                or self._out_bytes - self._ticket_bytes != _OVERHEAD_13 * self._out_records + self._out_plain
                or _pending(connection._into_ssl) or _SSL_pending(connection._ssl)
                or _pending(connection._from_ssl)):
            return False
        self._tlsConnection = RecordLayer13(
            suite, secrets[0], secrets[1], read_seq=self._in_records,
            write_seq=self._tickets + self._out_records,
            alpn=connection.get_alpn_proto_negotiated() or None, servername=connection.get_servername())
        connection.hoody_secrets = None
        for name in ("_counting", "_in_bytes", "_in_plain", "_in_records", "_out_bytes", "_out_plain",
                     "_out_records", "_tickets", "_ticket_bytes", "_hello"):
            self.__dict__.pop(name, None)
        self.__class__ = ShedTLSTransport
        return True

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        incoming = getattr(connection, "_into_ssl", None)
        if incoming is None:  # (not a memory-BIO connection: Twisted's own loop)
            _tls.TLSMemoryBIOProtocol._flushReceiveBIO(self)
            return
        while not self._lostTLSConnection:
            try:
                data = _recv(connection)
            except WantReadError:
                break  # (the bytes received did not complete a record)
            except ZeroReturnError:
                # TLS is shut down: no more data will come on this connection.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if self._counting:
                    self._in_plain += len(data)
                    self._in_records += 1
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(data)  # (ProtocolWrapper.dataReceived's work)
                if not _SSL_pending(connection._ssl) and not _pending(incoming):
                    break  # nothing left to decrypt: another recv would only raise
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        outgoing = getattr(connection, "_from_ssl", None)
        if outgoing is None:
            _tls.TLSMemoryBIOProtocol._flushSendBIO(self)
            return
        waiting = _pending(outgoing)
        if waiting:
            buffer = _BUFFER if waiting <= READ_SIZE else _allocate("char[]", waiting)
            got = _BIO_read(outgoing, buffer, waiting)
            if got <= 0:
                connection._handle_bio_errors(outgoing, got)
            if self._counting:
                self._out_bytes += got
            self.transport.write(_cbuffer(buffer, got)[:])

    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        view = memoryview(data) if len(data) > RECORD else data
        done, size, calls = 0, len(data), 0
        while done < size:
            try:
                done += _send(connection, view[done:done + RECORD])
            except WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                break
            except Error:
                # As Twisted does: the connection is lost, with the error as the reason.
                self._tlsShutdownFinished(Failure())
                return
            calls += 1
        if self._counting:
            self._out_plain += done
            self._out_records += calls
        self._flushSendBIO()

    def write_now(self, data: bytes) -> None:
        """Write ``data`` now (after anything the small-write aggregation holds), not on
        the next reactor turn: for an answer known to be complete."""
        self._aggregator.flush()
        if not self.disconnecting or self._producer is not None:  # (TLSMemoryBIOProtocol.write's rule)
            self._write(data)


class ShedTLSTransport(GatewayTLSTransport):
    """A GatewayTLSTransport whose connection is a :class:`RecordLayer13` (see
    :meth:`GatewayTLSTransport.shed_openssl`): Twisted's own methods drive it, as they
    drive pyOpenSSL; a write is sealed whole and sent once."""

    dataReceived = _tls.TLSMemoryBIOProtocol.dataReceived
    _flushReceiveBIO = _tls.TLSMemoryBIOProtocol._flushReceiveBIO

    def _flushSendBIO(self) -> None:
        try:
            data = self._tlsConnection.bio_read(1 << 62)
        except WantReadError:
            return
        self.transport.write(data)

    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        try:
            self._tlsConnection.send(data)
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        self._flushSendBIO()

    def shed_openssl(self) -> bool:
        return True


class GatewayTLSFactory(_tls.TLSMemoryBIOFactory):
    protocol = GatewayTLSTransport


def tls_factory(context_factory, is_client: bool, wrapped_factory) -> _tls.TLSMemoryBIOFactory:
    """A TLS wrapping factory: :class:`GatewayTLSFactory` where this Twisted and pyOpenSSL
    have what it relies on, else Twisted's own."""
    from OpenSSL.SSL import Connection
    usable = _get_mem_data is not None and all(hasattr(_tls.TLSMemoryBIOProtocol, name) for name in _OVERRIDDEN) \
        and hasattr(_tls.BufferingTLSTransport, "__init__") and all(hasattr(Connection, name) for name in _RAISERS)
    factory = GatewayTLSFactory if usable else _tls.TLSMemoryBIOFactory
    return factory(context_factory, is_client, wrapped_factory)

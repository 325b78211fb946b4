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
  holds, for a frontend that knows an answer is complete.

The checks read pyOpenSSL's memory BIOs (``Connection._into_ssl``/``_from_ssl``) through
the OpenSSL binding pyOpenSSL itself uses; a pyOpenSSL without them, or a Twisted whose
TLS protocol lacks the methods overridden here, gets Twisted's own transport
(:func:`tls_factory`).
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols import tls as _tls
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure

try:
    from OpenSSL._util import ffi as _ffi, lib as _lib, no_zero_allocator as _allocate
    _get_mem_data = _lib.BIO_get_mem_data
    _SSL_read, _SSL_write, _SSL_pending = _lib.SSL_read, _lib.SSL_write, _lib.SSL_pending
    _BIO_read, _BIO_write = _lib.BIO_read, _lib.BIO_write
    _from_buffer, _cbuffer = _ffi.from_buffer, _ffi.buffer
except (ImportError, AttributeError):  # pragma: no cover - a pyOpenSSL without its binding
    _get_mem_data = None


def _pending(bio) -> int:
    """Bytes waiting in a memory BIO."""
    return _get_mem_data(bio, _ffi.NULL)

#: The plaintext of one TLS record (RFC 8446 5.1).
RECORD = 16384
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
               "_tlsShutdownFinished", "_shutdownTLS", "_handshakeDone")
#: pyOpenSSL's own error raising, called after a failed call as its methods do.
_RAISERS = ("_raise_ssl_error", "_handle_bio_errors")


class GatewayTLSTransport(_tls.BufferingTLSTransport):
    """BufferingTLSTransport without needless WantReadErrors, sending each write once."""

    def dataReceived(self, data: bytes) -> None:
        incoming = getattr(self._tlsConnection, "_into_ssl", None)
        if (incoming is None or not self._handshakeDone or self._appSendBuffer or not data
                or _BIO_write(incoming, data, len(data)) <= 0):
            # (the handshake, writes waiting for it, or bytes a memory BIO refused whole:
            # Twisted's way, which raises what pyOpenSSL raises)
            _tls.TLSMemoryBIOProtocol.dataReceived(self, data)
            return
        self._flushReceiveBIO()

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
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
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
            self.transport.write(_cbuffer(buffer, got)[:])

    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        view = memoryview(data) if len(data) > RECORD else data
        done, size = 0, len(data)
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
        self._flushSendBIO()

    def write_now(self, data: bytes) -> None:
        """Write ``data`` now (after anything the small-write aggregation holds), not on
        the next reactor turn: for an answer known to be complete."""
        self._aggregator.flush()
        _tls.TLSMemoryBIOProtocol.write(self, data)


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

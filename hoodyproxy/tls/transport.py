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
    from OpenSSL._util import ffi as _ffi, lib as _lib
    _get_mem_data = _lib.BIO_get_mem_data
except (ImportError, AttributeError):  # pragma: no cover - a pyOpenSSL without its binding
    _get_mem_data = None


def _pending(bio) -> int:
    """Bytes waiting in a memory BIO."""
    return _get_mem_data(bio, _ffi.NULL)

#: The plaintext of one TLS record (RFC 8446 5.1).
RECORD = 16384
#: The most decrypted bytes asked for at once (Twisted's figure).
READ_SIZE = 32768

_OVERRIDDEN = ("_flushReceiveBIO", "_flushSendBIO", "_write", "_bufferedWrite", "_tlsShutdownFinished",
               "_shutdownTLS")


class GatewayTLSTransport(_tls.BufferingTLSTransport):
    """BufferingTLSTransport without needless WantReadErrors, sending each write once."""

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        incoming = getattr(connection, "_into_ssl", None)
        if incoming is None:  # (not a memory-BIO connection: Twisted's own loop)
            _tls.TLSMemoryBIOProtocol._flushReceiveBIO(self)
            return
        while not self._lostTLSConnection:
            try:
                data = connection.recv(READ_SIZE)
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
                if not connection.pending() and not _pending(incoming):
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
            self.transport.write(connection.bio_read(waiting))

    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        view = memoryview(data) if len(data) > RECORD else data
        done, size = 0, len(data)
        while done < size:
            try:
                done += connection.send(view[done:done + RECORD])
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
    usable = _get_mem_data is not None and all(hasattr(_tls.TLSMemoryBIOProtocol, name) for name in _OVERRIDDEN) \
        and hasattr(_tls.BufferingTLSTransport, "__init__")
    factory = GatewayTLSFactory if usable else _tls.TLSMemoryBIOFactory
    return factory(context_factory, is_client, wrapped_factory)

"""TLS 1.3's record layer after the handshake, without OpenSSL's per-connection state.

OpenSSL keeps about 24 KiB per established connection (4.0's SSL object, its two record
layers and memory BIOs; ``bench/tls_idle_memory.py``) whether or not anything moves.  For
a WebSocket that idles for hours that is most of what it costs.  Linux's kTLS exists for
exactly this: after the handshake, OpenSSL hands the traffic keys and sequence numbers to
the kernel and the connection's records are sealed and opened there.  This kernel has no
kTLS, so :class:`RecordLayer13` is the same idea in the gateway: a TLS 1.3 connection that
becomes a tunnel gives up its OpenSSL object and keeps only what RFC 8446 section 5 needs
to carry on: for each direction an AEAD key (cryptography's AESGCM or ChaCha20Poly1305,
OpenSSL's own code underneath), an IV, a sequence number and the traffic secret (for
KeyUpdate).  About 5 KiB instead of 24.

It speaks to :class:`twisted.protocols.tls.TLSMemoryBIOProtocol` as pyOpenSSL's
memory-BIO ``Connection`` does (``bio_write``/``recv``/``send``/``bio_read``/``shutdown``,
raising pyOpenSSL's ``WantReadError``, ``ZeroReturnError`` and ``Error``), so Twisted's
own TLS transport drives it unchanged.  What it accepts is what RFC 8446 allows after the
handshake, no more: application data (padding removed), alerts (close_notify ends the
stream, any other is fatal), and KeyUpdate (answered when asked for).  Everything else is
a fatal alert and the end of the connection: an unprotected record or one of another
type, a record that fails authentication, one longer than 2^14 + 256 bytes (or 2^14 of
plaintext), a handshake message other than KeyUpdate, one that does not end where its
record ends (stricter than OpenSSL, which takes a KeyUpdate cut across records: no
client sends one so), a protected record of no known content type.  The keys come from
OpenSSL's key log callback (:func:`note_secret`; nothing is written anywhere), the
sequence numbers from what each direction carried since the handshake, counted exactly
or not used (:meth:`hoodyproxy.tls.transport.GatewayTLSTransport.shed_openssl`).  A
client that asked for smaller records (``max_fragment_length``, which OpenSSL honours)
keeps OpenSSL (:func:`plain_records`), as do TLS 1.2 and HTTP/2 connections.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL.SSL import Error, SysCallError, WantReadError, ZeroReturnError

#: TLS 1.3's cipher suites (OpenSSL's names): (hash, key length, AEAD).  TLS_AES_128_CCM
#: suites are not enabled by the gateway's contexts (nor by OpenSSL's defaults).
SUITES = {
    "TLS_AES_128_GCM_SHA256": (hashes.SHA256, 16, AESGCM),
    "TLS_AES_256_GCM_SHA384": (hashes.SHA384, 32, AESGCM),
    "TLS_CHACHA20_POLY1305_SHA256": (hashes.SHA256, 32, ChaCha20Poly1305),
}

APPLICATION_DATA, ALERT, HANDSHAKE = 23, 21, 22
KEY_UPDATE = 24
#: The extension a client asks for smaller records with.
MAX_FRAGMENT_LENGTH = 1
#: RFC 8446 5.1/5.2: the most plaintext in a record, and the most ciphertext.
MAX_PLAINTEXT = 16384
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
#: The AEAD's tag, and the inner content type byte: a record's overhead.
TAG = 16
#: Alert descriptions (RFC 8446 6).
CLOSE_NOTIFY, UNEXPECTED_MESSAGE, BAD_RECORD_MAC, RECORD_OVERFLOW = 0, 10, 20, 22
ILLEGAL_PARAMETER, DECODE_ERROR, USER_CANCELED = 47, 50, 90
_REASONS = {UNEXPECTED_MESSAGE: "unexpected message", BAD_RECORD_MAC: "bad record mac",
            RECORD_OVERFLOW: "record overflow", ILLEGAL_PARAMETER: "illegal parameter",
            DECODE_ERROR: "decode error"}
_HEADER_PREFIX = b"\x17\x03\x03"

#: The key log lines kept (NSS's SSLKEYLOGFILE labels), as the index they are kept at.
_KEPT = {b"CLIENT_TRAFFIC_SECRET_0": 0, b"SERVER_TRAFFIC_SECRET_0": 1}


def note_secret(connection, line: bytes) -> None:
    """OpenSSL's key log callback (``Context.set_keylog_callback``): keep the two
    application traffic secrets of a TLS 1.3 connection on its pyOpenSSL ``Connection``,
    for :class:`RecordLayer13`.  Nothing is written anywhere."""
    label, _, rest = line.partition(b" ")
    index = _KEPT.get(label)
    if index is None:
        return
    secret = bytes.fromhex(rest.rpartition(b" ")[2].decode("ascii"))
    kept = getattr(connection, "hoody_secrets", None)
    if kept is None:
        kept = connection.hoody_secrets = [None, None]
    kept[index] = secret


def secrets_of(connection) -> tuple[bytes, bytes] | None:
    """The (client, server) application traffic secrets :func:`note_secret` kept, if both."""
    kept = getattr(connection, "hoody_secrets", None)
    if kept is None or kept[0] is None or kept[1] is None:
        return None
    return kept[0], kept[1]


def record_count(data: bytes) -> int | None:
    """How many whole records ``data`` is (None if it is not whole records)."""
    position = count = 0
    size = len(data)
    while position + 5 <= size:
        position += 5 + (data[position + 3] << 8 | data[position + 4])
        count += 1
    return count if position == size else None


def plain_records(hello: bytes | None) -> bool:
    """Whether the client whose first bytes were ``hello`` (its ClientHello, in one record)
    leaves records at their usual size limit: False when it asked for smaller records
    (``max_fragment_length``, RFC 6066 4, which OpenSSL honours and a RecordLayer13 would
    not know of), or when the ClientHello cannot be read from one record."""
    try:
        if not hello or hello[0] != HANDSHAKE or hello[5] != 1:
            return False
        record_end = 5 + (hello[3] << 8 | hello[4])
        end = 9 + (hello[6] << 16 | hello[7] << 8 | hello[8])
        if end > record_end or end > len(hello):
            return False  # (a ClientHello cut across records: not read, not counted)
        position = 9 + 2 + 32
        position += 1 + hello[position]  # legacy_session_id
        position += 2 + (hello[position] << 8 | hello[position + 1])  # cipher_suites
        position += 1 + hello[position]  # legacy_compression_methods
        if position == end:
            return True  # (no extensions)
        extensions_end = position + 2 + (hello[position] << 8 | hello[position + 1])
        if extensions_end != end:
            return False
        position += 2
        while position + 4 <= extensions_end:
            kind = hello[position] << 8 | hello[position + 1]
            if kind == MAX_FRAGMENT_LENGTH:
                return False
            position += 4 + (hello[position + 2] << 8 | hello[position + 3])
        return position == extensions_end
    except IndexError:
        return False


def expand_label(hash_type, secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with an empty context."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00"
    return HKDFExpand(hash_type(), length, info).derive(secret)


class _Direction:
    """One direction's traffic protection: AEAD, IV, sequence number, secret."""

    __slots__ = ("aead", "iv", "seq", "secret")

    def __init__(self, suite: tuple, secret: bytes, seq: int) -> None:
        self.rekey(suite, secret)
        self.seq = seq

    def rekey(self, suite: tuple, secret: bytes) -> None:
        hash_type, key_length, aead = suite
        self.secret = secret
        self.aead = aead(expand_label(hash_type, secret, b"key", key_length))
        self.iv = int.from_bytes(expand_label(hash_type, secret, b"iv", 12), "big")
        self.seq = 0

    def nonce(self) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return (self.iv ^ seq).to_bytes(12, "big")


def _error(reason: str) -> Error:
    return Error([("SSL routines", "", reason)])


class RecordLayer13:
    """A TLS 1.3 server connection's records after its handshake, pyOpenSSL's way.

    ``read_seq`` and ``write_seq`` are the records each way since the handshake ended
    under the initial application traffic secrets; ``alpn`` and ``servername`` what the
    handshake settled, for those who ask the handle afterwards.
    """

    __slots__ = ("_suite", "_suite_name", "_read", "_write", "_in", "_out", "_plain", "_eof",
                 "_peer_closed", "_closed", "_failed", "_alpn", "_servername")

    def __init__(self, suite_name: str, client_secret: bytes, server_secret: bytes, read_seq: int,
                 write_seq: int, alpn: bytes | None = None, servername: bytes | None = None) -> None:
        suite = SUITES[suite_name]
        self._suite = suite
        self._suite_name = suite_name
        self._read = _Direction(suite, client_secret, read_seq)
        self._write = _Direction(suite, server_secret, write_seq)
        #: Received bytes not yet a whole record, records to send (None: empty).
        self._in: bytearray | None = None
        self._out: bytearray | None = None
        #: Decrypted bytes not yet taken by recv.
        self._plain = b""
        self._eof = False
        self._peer_closed = False
        self._closed = False
        #: The error this connection failed with: every later call raises it again.
        self._failed: Error | None = None
        self._alpn = alpn
        self._servername = servername

    # -- what Twisted's TLS transport calls ----------------------------------------------------

    def bio_write(self, data) -> int:
        if self._eof:
            raise _error("bio shut down")
        if self._in is None:
            self._in = bytearray(data)
        else:
            self._in += data
        return len(data)

    def bio_shutdown(self) -> None:
        self._eof = True

    def bio_read(self, bufsiz: int) -> bytes:
        out = self._out
        if not out:
            raise WantReadError()
        if len(out) <= bufsiz:
            self._out = None
            return bytes(out)
        data = bytes(out[:bufsiz])
        del out[:bufsiz]
        return data

    def recv(self, bufsiz: int, flags=None) -> bytes:
        plain = self._plain
        if plain:
            if len(plain) > bufsiz:
                self._plain = plain[bufsiz:]
                return plain[:bufsiz]
            self._plain = b""
            return plain
        while True:
            content = self._open_one()
            if content:
                if len(content) > bufsiz:
                    self._plain = content[bufsiz:]
                    return content[:bufsiz]
                return content

    def send(self, data, flags=None) -> int:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise _error("protocol is shutdown")
        size = len(data)
        view = memoryview(data) if size > MAX_PLAINTEXT else data
        for start in range(0, size, MAX_PLAINTEXT):
            self._seal(APPLICATION_DATA, bytes(view[start:start + MAX_PLAINTEXT]))
        return size

    sendall = send

    def shutdown(self) -> bool:
        """Send close_notify (once); True when the peer has sent its own."""
        if not self._closed and self._failed is None:
            self._closed = True
            self._seal(ALERT, bytes((1, CLOSE_NOTIFY)))
        return self._peer_closed

    def do_handshake(self) -> None:
        """The handshake is over: nothing to do."""

    def pending(self) -> int:
        return len(self._plain)

    def get_alpn_proto_negotiated(self) -> bytes:
        return self._alpn or b""

    def get_servername(self) -> bytes | None:
        return self._servername

    def get_peer_certificate(self):
        return None

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return self._suite_name

    # -- records -----------------------------------------------------------------------------

    def _seal(self, content_type: int, data: bytes) -> None:
        """Encrypt one record's worth of ``data`` onto what is to be sent."""
        direction = self._write
        inner = data + bytes((content_type,))
        header = _HEADER_PREFIX + (len(inner) + TAG).to_bytes(2, "big")
        record = header + direction.aead.encrypt(direction.nonce(), inner, header)
        if self._out is None:
            self._out = bytearray(record)
        else:
            self._out += record

    def _fail(self, alert: int) -> Error:
        """Send a fatal ``alert`` and fail the connection (the error to raise)."""
        error = _error(_REASONS.get(alert, "fatal alert"))
        if self._failed is None:
            if not self._closed:
                self._closed = True
                self._seal(ALERT, bytes((2, alert)))
            self._failed = error
        self._in = None
        return self._failed

    def _open_one(self) -> bytes:
        """Open the next whole record received: its application data (maybe empty), or
        raise what pyOpenSSL would (WantReadError for none, ZeroReturnError after
        close_notify, Error for anything else)."""
        if self._failed is not None:
            raise self._failed
        if self._peer_closed:
            raise ZeroReturnError()
        buffer = self._in
        have = len(buffer) if buffer is not None else 0
        if have >= 5:
            if buffer[0] != APPLICATION_DATA or buffer[1] != 3 or buffer[2] != 3:
                # After the handshake every record is protected, as application_data
                # with legacy version 1.2 (RFC 8446 5, 5.1): a change_cipher_spec, a
                # plaintext alert or handshake, or garbage, is the end.
                raise self._fail(UNEXPECTED_MESSAGE)
            length = buffer[3] << 8 | buffer[4]
            if length > MAX_CIPHERTEXT:
                raise self._fail(RECORD_OVERFLOW)
            if length < TAG + 1:
                raise self._fail(BAD_RECORD_MAC)  # (no room for a tag and a content type)
            end = 5 + length
            if have >= end:
                header = bytes(buffer[:5])
                ciphertext = bytes(buffer[5:end])
                if have == end:
                    self._in = None
                else:
                    del buffer[:end]
                return self._open(header, ciphertext)
        if self._eof:
            # The stream ended without close_notify (a truncation): what OpenSSL says.
            raise SysCallError(-1, "Unexpected EOF")
        raise WantReadError()

    def _open(self, header: bytes, ciphertext: bytes) -> bytes:
        direction = self._read
        try:
            inner = direction.aead.decrypt(direction.nonce(), ciphertext, header)
        except InvalidTag:
            raise self._fail(BAD_RECORD_MAC) from None
        content = inner.rstrip(b"\x00")  # (zero padding, RFC 8446 5.4)
        if not content:
            raise self._fail(UNEXPECTED_MESSAGE)  # (no content type at all)
        content_type = content[-1]
        content = content[:-1]
        if len(content) > MAX_PLAINTEXT:
            raise self._fail(RECORD_OVERFLOW)
        if content_type == APPLICATION_DATA:
            return content
        if content_type == ALERT:
            if len(content) != 2:
                raise self._fail(DECODE_ERROR)
            if content[1] == CLOSE_NOTIFY:
                self._peer_closed = True
                raise ZeroReturnError()
            if content[1] == USER_CANCELED:
                return b""  # (a close_notify follows, RFC 8446 6.1)
            # Any other alert is fatal, whatever level it says (RFC 8446 6): none is sent back.
            self._closed = True
            self._in = None
            self._failed = _error("peer sent alert %d" % content[1])
            raise self._failed
        if content_type == HANDSHAKE:
            self._handshake(content)
            return b""
        raise self._fail(UNEXPECTED_MESSAGE)

    def _handshake(self, content: bytes) -> None:
        """Post-handshake messages: only KeyUpdate, whole in its record (a key change
        must align with a record boundary, RFC 8446 5.1)."""
        if (len(content) != 5 or content[0] != KEY_UPDATE or content[1] != 0 or content[2] != 0
                or content[3] != 1):
            # A client's NewSessionTicket, a CertificateRequest, a fragment, ...: refused.
            raise self._fail(UNEXPECTED_MESSAGE)
        requested = content[4]
        if requested > 1:
            raise self._fail(ILLEGAL_PARAMETER)
        read = self._read
        hash_type = self._suite[0]
        read.rekey(self._suite, expand_label(hash_type, read.secret, b"traffic upd", hash_type.digest_size))
        if requested and not self._closed:
            # update_requested: answer with our own KeyUpdate (not requesting one back),
            # then send under the next secret (RFC 8446 4.6.3).
            self._seal(HANDSHAKE, bytes((KEY_UPDATE, 0, 0, 1, 0)))
            write = self._write
            write.rekey(self._suite, expand_label(hash_type, write.secret, b"traffic upd", hash_type.digest_size))

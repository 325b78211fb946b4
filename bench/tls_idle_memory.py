"""What one idle server-side TLS connection costs in malloc'd bytes, and what changes it.

    python bench/tls_idle_memory.py [--conns N] [--variant NAME ...]

In one process, with no sockets: N server connections (pyOpenSSL, memory BIOs, the
gateway's own context from :class:`hoodyproxy.tls.context.CertificateStore`) each do a
handshake with a client (the standard library's ``ssl``, as the benchmark's WebSocket
client uses), take a ~250-byte request and answer a ~150-byte 101 head, as an idle
WebSocket's client side does; then the clients are dropped and the servers kept.
glibc's ``mallinfo2().uordblks`` (bytes in use, exact) is read before and after, so
the figures are live bytes per connection, not RSS (which adds fragmentation).

Each stage is reported separately: the bare ``SSL.Connection`` (SSL_new and two
memory BIOs), after the handshake and the 101, (variant ``shrink-bios``) after
:func:`hoodyproxy.tls.context.release_idle_buffers`, and (variant ``record-layer``) once
each connection's OpenSSL object is given up for a
:class:`hoodyproxy.tls.records.RecordLayer13` with its keys, as a WebSocket's is when its
tunnel starts (``GatewayTLSTransport.shed_openssl``).  Python objects are counted by ``tracemalloc`` on the side.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import ssl
import sys
import tempfile
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from OpenSSL import SSL  # noqa: E402

from hoodyproxy.tls import context as tls_context  # noqa: E402
from hoodyproxy.tls.context import release_idle_buffers  # noqa: E402
from hoodyproxy.tls.devca import ensure_dev_certificates  # noqa: E402
from hoodyproxy.tls.records import RecordLayer13, secrets_of  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def in_use() -> int:
    """Bytes malloc has handed out and not had back (small blocks and mmapped ones)."""
    gc.collect()
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


REQUEST = (b"GET /echo HTTP/1.1\r\nHost: p-c-http-1.node-local.containers.localhost\r\n"
           b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\nUser-Agent: bench\r\n\r\n")
RESPONSE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def _pump(server: SSL.Connection, client: ssl.SSLObject, c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO) -> None:
    done = False
    for _ in range(20):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        data = c_out.read()
        if data:
            server.bio_write(data)
            try:
                server.do_handshake()
            except SSL.WantReadError:
                pass
        try:
            out = server.bio_read(65536)
        except SSL.WantReadError:
            out = b""
        if out:
            c_in.write(out)
        elif done and not data:
            return
    raise RuntimeError("handshake did not finish")


def connect(ctx: SSL.Context, client_ctx: ssl.SSLContext) -> SSL.Connection:
    """A server connection after a handshake, a request in and a 101 out."""
    server = SSL.Connection(ctx, None)
    server.set_accept_state()
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="p-c-http-1.node-local.containers.localhost")
    _pump(server, client, c_in, c_out)
    client.write(REQUEST)
    server.bio_write(c_out.read())
    got = b""
    while len(got) < len(REQUEST):
        got += server.recv(65536)
    server.sendall(RESPONSE) if hasattr(server, "sendall") else server.send(RESPONSE)
    c_in.write(server.bio_read(65536))
    assert client.read(65536) == RESPONSE
    # The server read everything; the tickets (TLS 1.3) were consumed by the client.
    return server


def build_context(store: tls_context.CertificateStore, variant: str) -> SSL.Context:
    ctx = store.default_context
    if variant == "no-tickets":
        ctx.set_options(SSL.OP_NO_TICKET)
    elif variant == "no-session-cache":
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
    elif variant == "tls12":
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    elif variant == "tls12-no-cache":
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
    elif variant == "tls13-aes128":
        ctx.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    elif variant == "tls13-chacha":
        ctx.set_tls13_ciphersuites(b"TLS_CHACHA20_POLY1305_SHA256")
    elif variant == "no-release-buffers":
        ctx.clear_mode(SSL.MODE_RELEASE_BUFFERS) if hasattr(ctx, "clear_mode") else None
        from OpenSSL._util import lib
        lib.SSL_CTX_clear_mode(ctx._context, lib.SSL_MODE_RELEASE_BUFFERS)
    return ctx


VARIANTS = ["as-built", "shrink-bios", "record-layer", "no-tickets", "no-session-cache", "tls12", "tls12-no-cache",
            "tls13-aes128", "tls13-chacha", "no-release-buffers"]


def measure(variant: str, conns: int, certs) -> dict:
    store = tls_context.CertificateStore(certs.cert_path, certs.key_path)
    ctx = build_context(store, variant)
    client_ctx = ssl.create_default_context(cafile=certs.ca_path)
    for _ in range(20):  # warm: lazily built tables, the session cache's first entries
        connect(ctx, client_ctx)
    base = in_use()
    bare = [SSL.Connection(ctx, None) for _ in range(conns)]
    per_bare = (in_use() - base) / conns
    del bare
    base = in_use()
    tracemalloc.start()
    servers = [connect(ctx, client_ctx) for _ in range(conns)]
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_idle = (in_use() - base) / conns
    result = {"variant": variant, "conns": conns, "bare_B": round(per_bare), "idle_B": round(per_idle),
              "python_B": round(python_bytes / conns),
              "version": servers[0].get_protocol_version_name()}
    if variant == "shrink-bios":
        for s in servers:
            assert release_idle_buffers(s)
        result["after_shrink_B"] = round((in_use() - base) / conns)
    if variant == "record-layer":
        # (The sequence numbers do not change the size; these are the counts such a
        # connection would have: the request read, the tickets and the 101 written.)
        servers = [RecordLayer13(s.get_cipher_name(), *secrets_of(s), read_seq=1, write_seq=3) for s in servers]
        result["after_shed_B"] = round((in_use() - base) / conns)
    del servers
    result["left_after_free_B"] = round((in_use() - base) / conns)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        certs = ensure_dev_certificates(d, "node-local", "containers.localhost")
        for variant in args.variant or VARIANTS:
            print(measure(variant, args.conns, certs), flush=True)


if __name__ == "__main__":
    main()

"""One large transfer through the gateway over HTTP/3, in a process of its own.

    python bench/h3_transfer.py --port P --authority HOST --ca CA.pem (--upload N | --download N | --get PATH)

A client for bench/streaming.py (curl here has no HTTP/3): tests/h3client.py's aioquic
client driven by Twisted, run as a separate process so that the gateway's RSS is not
mixed with the client's.  ``--upload N`` POSTs N pattern bytes (with a Content-Length)
to the sink backend, pulled from a generator as the QUIC send buffer drains (and hashed
as they go: ``sha256`` is that of the body sent), and checks that the backend answered
``{"received": N}`` (the sink only counts).  ``--download N`` GETs ``/bytes?n=N``
(N zero bytes) and counts and hashes the answer without holding it, then checks the
count, the content-length and that the SHA-256 is that of N zeros.  ``--get PATH`` is one
small request (a warm-up).  Prints one JSON line: ``bytes``, ``sha256``, ``seconds``,
``mib_per_s``; on a short, failed or mismatching transfer it prints the error and
exits non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402

from tests.h3client import Collect, Digest, connect, pattern_chunks, within  # noqa: E402


class _Cleanups:
    """The ``case`` tests/h3client.py's ``connect`` wants: it only registers cleanups."""

    def __init__(self) -> None:
        self.calls: list = []

    def addCleanup(self, f, *args, **kw) -> None:
        self.calls.append((f, args, kw))

    async def run(self) -> None:
        for f, args, kw in reversed(self.calls):
            await defer.maybeDeferred(f, *args, **kw)


def zeros_sha256(n: int) -> str:
    h = hashlib.sha256()
    block = bytes(1 << 20)
    while n:
        piece = block if n >= len(block) else block[:n]
        h.update(piece)
        n -= len(piece)
    return h.hexdigest()


async def run(reactor, args) -> dict:
    cleanups = _Cleanups()
    try:
        client = await connect(cleanups, reactor, args.port, server_name=args.authority, ca_path=args.ca,
                               host=args.host, timeout=30)
        started = time.monotonic()
        if args.upload is not None:
            n = args.upload
            sent_hash = hashlib.sha256()

            def body():
                for piece in pattern_chunks(n):
                    sent_hash.update(piece)
                    yield piece

            stream = client.request("POST", "/upload", args.authority, upload=body(),
                                    headers=[("content-length", str(n))], sink=Collect())
            await within(stream.done, args.timeout)
            seconds = time.monotonic() - started
            answer = stream.sink.body
            result = {"direction": "upload", "bytes": stream.bytes_sent, "sha256": sent_hash.hexdigest(),
                      "answer": answer.decode("latin-1")[:200]}
            if stream.status != 200 or stream.reset_code is not None or stream.bytes_sent != n:
                raise RuntimeError(f"upload: status {stream.status}, reset {stream.reset_code}, "
                                   f"sent {stream.bytes_sent} of {n}")
            if stream.json() != {"received": n}:
                raise RuntimeError(f"upload: the backend answered {answer[:200]!r}, not {{'received': {n}}}")
        else:
            n = args.download if args.download is not None else None
            path = f"/bytes?n={n}" if n is not None else args.get
            stream = client.request("GET", path, args.authority, sink=Digest())
            await within(stream.done, args.timeout)
            seconds = time.monotonic() - started
            got = stream.sink.length
            result = {"direction": "download", "bytes": got, "sha256": stream.sink.sha256}
            if stream.status != 200 or stream.reset_code is not None:
                raise RuntimeError(f"GET {path}: status {stream.status}, reset {stream.reset_code}, {got} bytes")
            if n is not None:
                length = stream.headers.get(b"content-length")
                if got != n or length != b"%d" % n:
                    raise RuntimeError(f"download: {got} bytes of {n} (content-length {length!r})")
                if stream.sink.sha256 != zeros_sha256(n):
                    raise RuntimeError("download: the body is not the backend's zeros (SHA-256 differs)")
        if client.terminated is not None:
            raise RuntimeError(f"QUIC connection terminated: {client.terminated}")
        result.update(seconds=round(seconds, 3), mib_per_s=round(result["bytes"] / (1 << 20) / seconds, 1))
        return result
    finally:
        await cleanups.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="the gateway's UDP (HTTPS) port")
    p.add_argument("--authority", required=True, help="the container's hostname (SNI and :authority)")
    p.add_argument("--ca", required=True, help="the gateway's CA (PEM)")
    p.add_argument("--host", default="127.0.0.1", help="the gateway's address")
    p.add_argument("--timeout", type=float, default=600.0)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--upload", type=int, metavar="N", help="POST N bytes to /upload")
    what.add_argument("--download", type=int, metavar="N", help="GET /bytes?n=N")
    what.add_argument("--get", metavar="PATH", help="one small GET")
    args = p.parse_args(argv)
    box: dict = {}

    async def go(reactor):
        try:
            box["result"] = await run(reactor, args)
        except Exception as e:  # noqa: BLE001 - reported below, the exit status says it
            box["error"] = f"{type(e).__name__}: {e}"

    try:
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit:
        pass
    if "result" not in box:
        print(f"h3_transfer: {box.get('error', 'no result')}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(box["result"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

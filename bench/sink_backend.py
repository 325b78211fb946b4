"""A container service for streaming measurements: sinks uploads, streams downloads.

Run as a separate process so that only the gateway's memory is measured:

    python bench/sink_backend.py PORT

``POST``/``PUT`` (Content-Length or chunked): the body is read and thrown away; the
answer is JSON ``{"received": N}``.  ``GET /bytes?n=N``: N bytes of zeros, streamed
under backpressure.  Anything else: a 12-byte body.  Keep-alive throughout.
"""

from __future__ import annotations

import asyncio
import sys

BLOCK = b"\0" * (256 * 1024)


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> int:
    received = 0
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return received
            left = size
            while left:
                data = await reader.read(min(left, 1 << 20))
                if not data:
                    raise ConnectionError("closed in body")
                left -= len(data)
            received += size
            await reader.readexactly(2)
    left = int(headers.get(b"content-length", b"0"))
    while left:
        data = await reader.read(min(left, 1 << 20))
        if not data:
            raise ConnectionError("closed in body")
        left -= len(data)
        received += len(data)
    return received


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                if b":" in line:
                    name, value = line.split(b":", 1)
                    headers[name.strip().lower()] = value.strip()
            if method in (b"POST", b"PUT"):
                n = await _read_body(reader, headers)
                body = b'{"received": %d}' % n
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            elif target.startswith(b"/bytes?n="):
                n = int(target.split(b"=", 1)[1])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % n)
                while n:
                    piece = BLOCK if n >= len(BLOCK) else BLOCK[:n]
                    writer.write(piece)
                    n -= len(piece)
                    await writer.drain()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))

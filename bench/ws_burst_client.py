"""Idle WebSockets that each carried one large message first, for ``bench/ws_idle_quick.py --burst``.

    python bench/ws_burst_client.py --port P --host H --conns N --size BYTES [--hold S]

Opens N WebSockets over TLS (the benchmark's client, ``bench/ws_client.py``), sends one
binary message of BYTES on each and waits for its echo, prints ``OPEN <n>`` and then
holds them, idle, until a line on stdin (or ``--hold`` seconds), then closes them and
prints ``CLOSED``.  What an idle WebSocket keeps after a burst is the question.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ws_client  # noqa: E402


def masked_frame(payload: bytes) -> bytes:
    """One masked final binary frame of any size."""
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 65536:
        head = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


async def main(args) -> None:
    ctx = ws_client._ssl_context(True)
    payload = os.urandom(args.size)
    frame = masked_frame(payload)
    sem = asyncio.Semaphore(args.concurrency)
    echoed: list[int] = []

    async def one():
        async with sem:
            done = asyncio.get_running_loop().create_future()

            def on_message(client, data):
                if not done.done():
                    done.set_result(data == payload)
            client = await asyncio.wait_for(ws_client._open(args, ctx, on_message), 30)
            client.transport.write(frame)
            if await asyncio.wait_for(done, 30):
                echoed.append(1)
            return client

    clients = await asyncio.gather(*(one() for _ in range(args.conns)), return_exceptions=True)
    print(f"OPEN {len(echoed)}", flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.hold)
    except asyncio.TimeoutError:
        pass
    for c in clients:
        if not isinstance(c, BaseException):
            c.transport.close()
    await asyncio.sleep(0.5)
    print("CLOSED", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--path", default="/echo")
    parser.add_argument("--tls", action="store_true", default=True)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--hold", type=float, default=300)
    asyncio.run(main(parser.parse_args()))

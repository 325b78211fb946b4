"""WebSocket load client for the benchmarks (its own process, so its CPU is never the proxy's).

    python bench/ws_client.py echo --port P --host H [--tls] --conns N --duration S [--size B]
    python bench/ws_client.py idle --port P --host H [--tls] --conns N [--concurrency C] [--hold S]

A minimal hand-written client on plain asyncio (no WebSocket library): an HTTP/1.1
upgrade request to ``/echo`` with ``Host: H`` (TLS: SNI H unless H is an address), then
masked binary frames out and unmasked frames in.  Certificates are not verified.

``echo``: N connections, each with one message in flight (a closed loop): when the echo
comes back the next message goes out.  Runs for S seconds after every connection is open;
prints ``WSJSON {...}`` with the messages echoed, the window and the round trips (median
and 99th percentile, microseconds).

``idle``: opens N connections (at most C handshakes at a time), prints
``OPEN <opened> <failed>``, then keeps them open, sending nothing, until a line arrives
on standard input (or ``--hold`` seconds pass), closes them all and prints ``CLOSED``.
The open phase is bounded by ``--open-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import resource
import ssl
import sys
import time
from array import array

MAX_MESSAGES = 20_000_000  # a bound on any echo run, whatever its duration


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked final frame (client to server) carrying ``payload`` (< 126 bytes)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


class WSClient(asyncio.Protocol):
    """One WebSocket client connection: handshake, then frame parsing."""

    def __init__(self, host: str, path: str, on_message=None) -> None:
        self.host, self.path = host, path
        self.on_message = on_message
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False
        self.transport = None
        self.buf = bytearray()
        self.upgraded = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         f"Sec-WebSocket-Version: 13\r\nOrigin: http://{self.host}\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self._fail("response head too large")
                return
            status = bytes(self.buf[:end]).split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self._fail(status.decode("latin-1"))
                return
            del self.buf[:end + 4]
            self.upgraded = True
            if not self.opened.done():
                self.opened.set_result(self)
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            start = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, start = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, start = int.from_bytes(buf[2:10], "big"), 10
            if buf[1] & 0x80:
                start += 4  # a masked server frame: not expected, but skip the key
            if len(buf) < start + n:
                return
            payload = bytes(buf[start:start + n])
            del buf[:start + n]
            if opcode == 0x9:  # ping: answer with a pong carrying the same payload
                if len(payload) < 126:
                    self.transport.write(_masked_frame(payload, opcode=0xA))
            elif opcode == 0x8:
                self.transport.close()
                return
            elif self.on_message is not None:
                self.on_message(self, payload)

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"upgrade refused: {reason}"))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before upgrade: {exc}"))


def _ssl_context(tls: bool):
    if not tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _open(args, ctx, on_message=None) -> WSClient:
    loop = asyncio.get_running_loop()
    sni = None if not ctx or _is_address(args.host) else args.host
    kwargs = {"ssl": ctx, "server_hostname": sni or ("localhost" if ctx else None)} if ctx else {}
    _, proto = await loop.create_connection(lambda: WSClient(args.host, args.path, on_message),
                                            "127.0.0.1", args.port, **kwargs)
    return await proto.opened


async def echo(args) -> dict:
    ctx = _ssl_context(args.tls)
    loop = asyncio.get_running_loop()
    rtts = array("q")
    state = {"running": False, "count": 0, "stop_at": 0.0}
    sent_at: dict[WSClient, int] = {}
    frame = {}
    done = loop.create_future()

    def on_message(conn: WSClient, payload: bytes) -> None:
        now = time.perf_counter_ns()
        if state["running"]:
            rtts.append(now - sent_at[conn])
            state["count"] += 1
            if time.monotonic() >= state["stop_at"] or state["count"] >= MAX_MESSAGES:
                state["running"] = False
                if not done.done():
                    done.set_result(None)
                return
            sent_at[conn] = time.perf_counter_ns()
            conn.transport.write(frame[conn])

    conns = await asyncio.wait_for(asyncio.gather(*(_open(args, ctx, on_message) for _ in range(args.conns))),
                                   args.open_timeout)
    payload = b"x" * args.size
    for c in conns:
        frame[c] = _masked_frame(payload)
    state["running"] = True
    started = time.monotonic()
    state["stop_at"] = started + args.duration
    for c in conns:
        sent_at[c] = time.perf_counter_ns()
        c.transport.write(frame[c])
    error = None
    try:
        await asyncio.wait_for(done, args.duration + 10)
    except asyncio.TimeoutError:
        error = "timed out waiting for echoes"
    elapsed = time.monotonic() - started
    state["running"] = False
    for c in conns:
        c.transport.close()
    ordered = sorted(rtts)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000 if ordered else 0.0

    return {"messages": state["count"], "seconds": elapsed, "rtt_p50_us": pct(0.50),
            "rtt_p99_us": pct(0.99), "conns": len(conns), "error": error}


async def idle(args) -> None:
    ctx = _ssl_context(args.tls)
    sem = asyncio.Semaphore(args.concurrency)
    conns: list[WSClient] = []
    failures: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                conns.append(await asyncio.wait_for(_open(args, ctx), 30))
            except Exception as e:  # noqa: BLE001 -- counted and reported
                failures.append(str(e) or type(e).__name__)

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(args.conns)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.open_timeout)
    except asyncio.TimeoutError:
        for t in tasks:
            t.cancel()
        failures.append("open phase timed out")
    alive = sum(1 for c in conns if not c.closed)
    print(f"OPEN {alive} {args.conns - alive} {time.monotonic() - started:.1f}"
          + (f" first-error: {failures[0]}" if failures else ""), flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.hold)
    except asyncio.TimeoutError:
        pass
    still = sum(1 for c in conns if not c.closed)
    for c in conns:
        c.transport.close()
    await asyncio.sleep(0.5)
    print(f"CLOSED {still}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["echo", "idle"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="Host header (and SNI unless an address)")
    parser.add_argument("--path", default="/echo")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=32, help="message size in bytes (< 126)")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--open-timeout", type=float, default=120.0)
    parser.add_argument("--hold", type=float, default=120.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "echo":
        print("WSJSON " + json.dumps(asyncio.run(echo(args))), flush=True)
    else:
        asyncio.run(idle(args))


if __name__ == "__main__":
    main()

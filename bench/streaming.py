"""Measure the gateway's memory while a large upload and a large download pass through.

    python -m bench.streaming [SIZE_MIB] [--protocol http/1.1|h2|h3|all] [--trace]

(SIZE_MIB defaults to 1024, the protocol to ``http/1.1``.)  Starts a gateway (twistd)
and a sink backend in their own processes, then a client in a third process sends SIZE
MiB through the gateway (upload, then download), sampling the gateway's RSS every 50 ms:

- ``http/1.1``: curl over TLS;
- ``h2``: curl ``--http2`` (ALPN h2 on the TLS port; ``%{http_version}`` must say 2);
- ``h3``: bench/h3_transfer.py (aioquic; this curl has no HTTP/3) on the gateway's UDP
  port, the same number as its TLS port.

Every transfer is checked: the upload's byte count as the backend received it, the
download's byte count (and, over HTTP/3, its SHA-256).  Prints a markdown table, one row
per protocol (``all``: the three, each on a fresh gateway): RSS before, peak RSS during
each transfer, RSS after it, throughput; ``--trace`` adds the RSS over time.
:func:`measure` is used by ``make bench`` (bench/harness.py, HTTP/1.1) and by
tests/test_streaming_memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from bench.procs import ROOT, Gateway, rss_kib, start_backend

PROTOCOLS = ("http/1.1", "h2", "h3")
#: What curl's ``%{http_version}`` says for each protocol it is asked to speak.
CURL_VERSION = {"http/1.1": "1.1", "h2": "2"}
H3_CLIENT = os.path.join(ROOT, "bench", "h3_transfer.py")


def _sample(pid: int, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    started = time.monotonic()
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - started, rss_kib(pid)[0]))
        except OSError:
            return
        stop.wait(0.05)


def _run(gateway: Gateway, cmd: list[str], timeout: float, what: str) -> tuple[float, str, list[tuple[float, int]]]:
    """Run a client process while sampling the gateway's RSS: (seconds, stdout, samples)."""
    stop = threading.Event()
    samples: list[tuple[float, int]] = []
    sampler = threading.Thread(target=_sample, args=(gateway.pid, stop, samples), daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr.decode(errors='replace')[-300:]}")
    return elapsed, result.stdout.decode(errors="replace"), samples


class _Curl:
    """HTTP/1.1 or HTTP/2 over TLS with curl; checks the version curl really spoke."""

    def __init__(self, gateway: Gateway, host: str, protocol: str) -> None:
        self.gateway, self.protocol = gateway, protocol
        self.url = f"https://{host}:{gateway.https_port}"
        self.base = ["curl", "-sS", "--fail", "--http1.1" if protocol == "http/1.1" else "--http2",
                     *gateway.curl_args(host)]

    def _version(self, out: str, what: str) -> list[str]:
        fields = out.rsplit("\n", 1)[-1].split()
        if not fields or fields[0] != CURL_VERSION[self.protocol]:
            raise RuntimeError(f"{what}: curl spoke HTTP/{fields[0] if fields else '?'}, "
                               f"not {self.protocol} ({out[-200:]!r})")
        return fields[1:]

    def warm_up(self) -> None:
        out = subprocess.run([*self.base, "-o", "/dev/null", "-w", "%{http_version}", self.url + "/"],
                             check=True, timeout=30, capture_output=True, text=True).stdout
        self._version(out, "warm-up")

    def upload(self, size: int, timeout: float):
        # A sparse file: curl sends it with Content-Length, and reading it costs no disk.
        with tempfile.NamedTemporaryFile(prefix="hoodyproxy-upload-") as upload:
            upload.truncate(size)
            upload.flush()
            elapsed, out, samples = _run(self.gateway, [
                *self.base, "-T", upload.name, "-X", "POST", "-w", "\n%{http_version} %{size_upload}",
                self.url + "/upload"], timeout, f"curl upload ({self.protocol})")
        sent = int(self._version(out, "upload")[0])
        answer = out.rsplit("\n", 1)[0]
        if sent != size or json.loads(answer) != {"received": size}:
            raise RuntimeError(f"upload: curl sent {sent} of {size} bytes, the backend answered {answer[:200]!r}")
        return elapsed, samples

    def download(self, size: int, timeout: float):
        elapsed, out, samples = _run(self.gateway, [
            *self.base, "-o", "/dev/null", "-w", "%{http_version} %{size_download}",
            self.url + f"/bytes?n={size}"], timeout, f"curl download ({self.protocol})")
        got = int(self._version(out, "download")[0])
        if got != size:
            raise RuntimeError(f"download: {got} bytes of {size}")
        return elapsed, samples


class _H3:
    """HTTP/3 with bench/h3_transfer.py (which checks counts and digests itself)."""

    def __init__(self, gateway: Gateway, host: str) -> None:
        self.gateway = gateway
        self.base = [sys.executable, H3_CLIENT, "--port", str(gateway.https_port), "--authority", host,
                     "--ca", gateway.ca_path]

    def warm_up(self) -> None:
        subprocess.run([*self.base, "--get", "/"], check=True, timeout=60, capture_output=True)

    def _transfer(self, flag: str, size: int, timeout: float):
        elapsed, out, samples = _run(self.gateway, [*self.base, flag, str(size), "--timeout", str(timeout)],
                                     timeout + 30, f"h3 {flag[2:]}")
        result = json.loads(out.strip().splitlines()[-1])
        if result["bytes"] != size:  # h3_transfer.py already failed; belt and braces
            raise RuntimeError(f"h3 {flag[2:]}: {result['bytes']} bytes of {size}")
        return elapsed, samples

    def upload(self, size: int, timeout: float):
        return self._transfer("--upload", size, timeout)

    def download(self, size: int, timeout: float):
        return self._transfer("--download", size, timeout)


def measure(size_mib: int = 1024, timeout: float = 600.0, protocol: str = "http/1.1", trace: bool = False) -> dict:
    """Push ``size_mib`` MiB up and down through a fresh gateway over ``protocol``
    (``http/1.1``, ``h2`` or ``h3``); return the figures (KiB, s).  ``timeout`` bounds
    each transfer.  With ``trace`` the RSS samples ((s, KiB) pairs) are included."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    size = size_mib << 20
    backend, port = start_backend()
    try:
        # Embedded defaults: a 1 GiB upload over HTTP/3 takes minutes, longer than
        # [upstream] response_timeout, which counts only while the body makes no progress.
        with Gateway([]) as gateway:
            host = gateway.register(port)
            client = _H3(gateway, host) if protocol == "h3" else _Curl(gateway, host, protocol)
            # Warm up: one small request so connection pools, TLS/QUIC state and lazily
            # imported modules exist before the baseline is taken.
            client.warm_up()
            before = rss_kib(gateway.pid)[0]
            up_s, up_samples = client.upload(size, timeout)
            up_end = rss_kib(gateway.pid)[0]
            down_s, down_samples = client.download(size, timeout)
            down_end, hwm = rss_kib(gateway.pid)
    finally:
        backend.stop()
    figures = {"protocol": protocol, "size_mib": size_mib, "rss_before_kib": before,
               "upload_peak_kib": max([before, *(rss for _, rss in up_samples)]), "upload_end_kib": up_end,
               "download_peak_kib": max([up_end, *(rss for _, rss in down_samples)]), "download_end_kib": down_end,
               "hwm_kib": hwm, "upload_s": up_s, "download_s": down_s}
    if trace:
        figures.update(upload_trace=up_samples, download_trace=down_samples)
    return figures


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def table(r: dict) -> str:
    """One measurement (HTTP/1.1 layout of the docs)."""
    rate = lambda s: f"{r['size_mib'] / r[s]:.0f} MiB/s"  # noqa: E731
    return "\n".join([
        f"| transfer ({r['size_mib']} MiB over {r.get('protocol', 'http/1.1')}) | gateway RSS before "
        "| peak RSS during | throughput |",
        "|---|---:|---:|---:|",
        f"| upload | {_mib(r['rss_before_kib'])} | {_mib(r['upload_peak_kib'])} | {rate('upload_s')} |",
        f"| download | {_mib(r['rss_before_kib'])} | {_mib(r['download_peak_kib'])} | {rate('download_s')} |",
        f"\nGateway VmHWM over the whole run: {_mib(r['hwm_kib'])}.",
    ])


TABLE_HEAD = ("| protocol | size each way | gateway RSS before | upload peak | after upload | download peak "
              "| after download | VmHWM | upload | download |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row(r: dict) -> str:
    """One markdown table row (under :data:`TABLE_HEAD`) per protocol."""
    rate = lambda s: f"{r['size_mib'] / r[s]:.1f} MiB/s ({r[s]:.1f} s)"  # noqa: E731
    return (f"| {r['protocol']} | {r['size_mib']} MiB | {_mib(r['rss_before_kib'])} | {_mib(r['upload_peak_kib'])} "
            f"| {_mib(r['upload_end_kib'])} | {_mib(r['download_peak_kib'])} | {_mib(r['download_end_kib'])} "
            f"| {_mib(r['hwm_kib'])} | {rate('upload_s')} | {rate('download_s')} |")


def trace_text(r: dict, points: int = 12) -> str:
    """The RSS over time of each transfer, thinned to about ``points`` samples."""
    lines = []
    for way in ("upload", "download"):
        samples = r.get(f"{way}_trace") or []
        step = max(1, len(samples) // points)
        shown = samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])
        lines.append(f"{r['protocol']} {way} RSS (s: MiB): "
                     + ", ".join(f"{t:.1f}: {kib / 1024:.1f}" for t, kib in shown))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n\n")[0])
    p.add_argument("size_mib", nargs="?", type=int, default=1024, help="MiB each way (default 1024)")
    p.add_argument("--protocol", choices=[*PROTOCOLS, "all"], default="http/1.1")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per transfer (default 600; over h3 at least 1.5 s per MiB)")
    p.add_argument("--trace", action="store_true", help="also print the gateway's RSS over time")
    args = p.parse_args(argv)
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    print(TABLE_HEAD, flush=True)
    traces, failed = [], False
    for protocol in protocols:
        timeout = args.timeout or (max(600.0, 1.5 * args.size_mib) if protocol == "h3" else 600.0)
        try:
            r = measure(args.size_mib, timeout, protocol, trace=args.trace)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            print(f"| {protocol} | {args.size_mib} MiB | failed: {e} |", flush=True)
            failed = True
            continue
        print(row(r), flush=True)
        if args.trace:
            traces.append(trace_text(r))
    if traces:
        print("\n" + "\n".join(traces))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

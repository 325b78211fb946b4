"""Measure the gateway's memory while a large upload and a large download pass through.

    python -m bench.streaming [SIZE_MIB]       (default 1024)

Starts a gateway (twistd) and a sink backend in their own processes, then curl sends
SIZE MiB through the gateway over TLS (upload, then download), sampling the gateway's
RSS every 50 ms.  Prints a markdown table: RSS before, peak during each transfer, and
the peak high-water mark.  Used by ``make bench`` and by tests/test_streaming_memory.py.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time

from bench.procs import Gateway, rss_kib, start_backend


def _sample(pid: int, stop: threading.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        try:
            peaks.append(rss_kib(pid)[0])
        except OSError:
            return
        stop.wait(0.05)


def _transfer(gateway: Gateway, cmd: list[str], timeout: float, stdin=None) -> tuple[float, int, list[int]]:
    stop = threading.Event()
    samples: list[int] = []
    sampler = threading.Thread(target=_sample, args=(gateway.pid, stop, samples), daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=timeout)
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"curl failed ({result.returncode}): {result.stderr.decode()[:200]}")
    return elapsed, len(result.stdout), samples


def measure(size_mib: int = 1024, timeout: float = 600.0) -> dict:
    """Push ``size_mib`` MiB up and down through a fresh gateway; return the figures (KiB, s)."""
    size = size_mib << 20
    backend, port = start_backend()
    try:
        with Gateway() as gateway:
            host = gateway.register(port)
            url = f"https://{host}:{gateway.https_port}"
            base = ["curl", "-sS", "--fail", *gateway.curl_args(host)]
            # Warm up: one small request so connection pools and TLS state exist.
            subprocess.run([*base, "-o", "/dev/null", url + "/"], check=True, timeout=30)
            before = rss_kib(gateway.pid)[0]
            # A sparse file: curl sends it with Content-Length, and reading it costs no disk.
            with tempfile.NamedTemporaryFile(prefix="hoodyproxy-upload-") as upload:
                upload.truncate(size)
                upload.flush()
                up_s, out_len, up_samples = _transfer(
                    gateway, [*base, "-T", upload.name, "-X", "POST", url + "/upload"], timeout)
            up_peak = max(up_samples or [before])
            down_s, _, down_samples = _transfer(
                gateway, [*base, "-o", "/dev/null", "-w", "%{size_download}", url + f"/bytes?n={size}"], timeout)
            down_peak = max(down_samples or [before])
            hwm = rss_kib(gateway.pid)[1]
    finally:
        backend.stop()
    return {"size_mib": size_mib, "rss_before_kib": before, "upload_peak_kib": up_peak,
            "download_peak_kib": down_peak, "hwm_kib": hwm, "upload_s": up_s, "download_s": down_s}


def table(r: dict) -> str:
    mib = lambda k: f"{r[k] / 1024:.1f} MiB"  # noqa: E731
    rate = lambda s: f"{r['size_mib'] / r[s]:.0f} MiB/s"  # noqa: E731
    return "\n".join([
        f"| transfer ({r['size_mib']} MiB over TLS) | gateway RSS before | peak RSS during | throughput |",
        "|---|---:|---:|---:|",
        f"| upload | {mib('rss_before_kib')} | {mib('upload_peak_kib')} | {rate('upload_s')} |",
        f"| download | {mib('rss_before_kib')} | {mib('download_peak_kib')} | {rate('download_s')} |",
        f"\nGateway VmHWM over the whole run: {mib('hwm_kib')}.",
    ])


if __name__ == "__main__":
    print(table(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)))

"""Processes for measurements: a gateway (twistd) and a backend, each in its own process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "67e89abc123def456789abcd"
CONTAINER = "890abcdef12345678901cdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    """Read proc's stdout until a line matches ``pattern`` (bounded in time)."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before printing {pattern!r}")
            continue
        m = regex.search(line)
        if m:
            return m
    raise RuntimeError(f"no line matching {pattern!r} within {timeout}s")


class Process:
    """A child process that is always stopped (context manager)."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_backend() -> tuple[Process, int]:
    proc = Process([sys.executable, os.path.join(ROOT, "bench", "sink_backend.py"), "0"])
    port = int(wait_for_line(proc.proc, r"listening on (\d+)").group(1))
    return proc, port


class Gateway(Process):
    """``twistd -n hoodyproxy`` on loopback ports with a fresh data directory."""

    def __init__(self, extra: list[str] | None = None, wrapper: list[str] | None = None,
                 ratelimit: bool = True) -> None:
        """``wrapper``: a command line that replaces ``twistd`` (and is given twistd's arguments),
        e.g. ``[python, "bench/profiled_twistd.py", OUT]``; ``ratelimit`` False turns rate
        limiting off (to measure what it costs)."""
        self.data_dir = tempfile.mkdtemp(prefix="hoodyproxy-bench-")
        self.https_port, self.http_port, self.admin_port = free_port(), free_port(), free_port()
        twistd = wrapper or [os.path.join(os.path.dirname(sys.executable), "twistd")]
        # Every feature on, the rate limiter included, with a per-address budget the load
        # generator (one address, tens of thousands of requests a second) never meets.
        config = os.path.join(self.data_dir, "bench.toml")
        with open(config, "w") as f:
            f.write('[ratelimit]\nper_address_rate = "100000/s"\nper_address_burst = 1000000\n' if ratelimit
                    else '[ratelimit]\nenabled = false\n')
        super().__init__([*twistd, "-n", "--pidfile=", "hoodyproxy", "--config", config,
                          "--data-dir", self.data_dir,
                          "--https", f"127.0.0.1:{self.https_port}", "--http", f"127.0.0.1:{self.http_port}",
                          "--admin", f"127.0.0.1:{self.admin_port}", "--audit", os.devnull,
                          # Loopback only: the forwarding headers carry the client address, and
                          # the host's netfilter rules are left alone.
                          *([] if any(a.startswith("--client-ip-mode") for a in (extra or []))
                            else ["--client-ip-mode", "headers"]),
                          *(extra or [])],
                         env={"PYTHONPATH": ROOT}, cwd=self.data_dir)
        try:
            wait_for_line(self.proc, r"hoodyproxy admin listening")
        except BaseException:
            self.stop()  # e.g. an option this version rejects: no process or data dir left behind
            raise
        with open(os.path.join(self.data_dir, "admin-token")) as f:
            self.token = f.read().strip()
        self.ca_path = os.path.join(self.data_dir, "tls", "ca.pem")
        # Keep draining the log so the child never blocks on a full pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in iter(self.proc.stdout.readline, "")], daemon=True).start()

    def register(self, port: int, container: str = CONTAINER, project: str = PROJECT) -> str:
        """Register a running container on 127.0.0.1 and return its hostname for ``http-<port>``."""
        body = json.dumps({"project": project, "address": "127.0.0.1", "state": "running"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/api/v1/containers/{container}",
                                     data=body, method="PUT",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 201)
        return f"{project}-{container}-http-{port}.node-local.containers.localhost"

    def curl_args(self, host: str) -> list[str]:
        return ["--cacert", self.ca_path, "--resolve", f"{host}:{self.https_port}:127.0.0.1"]

    def stop(self) -> None:
        super().stop()
        import shutil
        shutil.rmtree(self.data_dir, ignore_errors=True)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]

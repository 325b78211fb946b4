"""Reload and log reopening of a real ``twistd -n hoodyproxy --config FILE``, with workers.

Each test starts twistd with its listen addresses in the config file (so that a reload
can try to change them), on ephemeral loopback ports, and a sink backend
(bench/sink_backend.py); it rewrites the file and sends ``SIGHUP`` (or ``SIGUSR1``), then
judges by the log lines and the next requests.  Requests go on fresh connections (curl
``--next``), so that the kernel spreads them over the workers.  Every wait is bounded;
nothing asserts how fast anything is.  Every process a test starts, it stops.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from unittest import skipIf

from twisted.trial import unittest

from bench.loadgen import WRK_SCRIPT
from bench.procs import CONTAINER, PROJECT, start_backend
from tests.test_process import LISTENING, READY, REPO, TIMEOUT, TWISTD, Twistd, free_port, port_is_free

SILENT_CONTAINER = "fedcba9876543210fedcba98"
NO_CURL = "curl is not installed" if shutil.which("curl") is None else None
NO_WRK = "wrk is not installed" if shutil.which("wrk") is None else None
NO_H2LOAD = "h2load is not installed" if shutil.which("h2load") is None else None


class Node(Twistd):
    """One ``twistd -n hoodyproxy --config FILE`` child: its config file, its log, its ports
    (``stop`` and ``output`` as :class:`tests.test_process.Twistd`'s)."""

    def __init__(self, case: unittest.TestCase, config: str = "", *, workers: int = 1,
                 logfile: bool = False) -> None:
        self.case = case
        self.workers = workers
        self.workdir = os.path.abspath(case.mktemp())
        os.makedirs(self.workdir)
        self.data_dir = os.path.join(self.workdir, "data")
        self.config_path = os.path.join(self.workdir, "node.toml")
        self.log_path = os.path.join(self.workdir, "output.log")  # (stdout and stderr)
        self.logfile = os.path.join(self.workdir, "twistd.log") if logfile else None
        self.write_config(config)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("HOODYPROXY_DATA_DIR", None)
        cmd = [TWISTD, "-n", "--pidfile", "", *(["--logfile", self.logfile] if logfile else []), "hoodyproxy",
               "--config", self.config_path, "--data-dir", self.data_dir, "--client-ip-mode", "headers",
               "--workers", str(workers)]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=env)
        case.addCleanup(self.stop)
        self.wait_for(re.escape(READY))
        self.ports = {kind: int(port) for kind, _host, port in LISTENING.findall(self.log())}
        if workers > 1:
            self.wait_for(rf"worker {workers - 1} serving")
        self.ca_path = os.path.join(self.data_dir, "tls", "ca.pem")

    def write_config(self, text: str, http: str = "127.0.0.1:0") -> None:
        """The config file: the loopback listen addresses, then ``text``; replaced atomically."""
        with open(self.config_path + ".tmp", "w") as f:
            f.write(f'[listen]\nhttps = "127.0.0.1:0"\nhttp = "{http}"\nadmin = "127.0.0.1:0"\n{text}')
        os.replace(self.config_path + ".tmp", self.config_path)

    def log(self) -> str:
        """What the node logged: its output, and its --logfile if it has one."""
        return self.output() + (read(self.logfile) if self.logfile else "")

    def wait_for(self, pattern: str, count: int = 1, log=None) -> list[str]:
        """The lines matching ``pattern`` once there are ``count``; fails after TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            lines = [line for line in (log or self.log)().splitlines() if re.search(pattern, line)]
            if len(lines) >= count:
                return lines
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.case.fail(f"no {count} lines matching {pattern!r} (twistd "
                               f"{'exited' if self.proc.poll() is not None else 'running'}):\n{self.log()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def reload(self, text: str, *, expect: str = "hoodyproxy reload: applied", **listen) -> str:
        """Write ``text`` as the config, SIGHUP, wait for worker 0's reload line (matching
        ``expect``) and, with workers, for every worker's; the line."""
        before = self.log().count("hoodyproxy reload:")
        workers_before = self.log().count("settings reloaded")
        self.write_config(text, **listen)
        self.signal(signal.SIGHUP)
        line = self.wait_for("hoodyproxy reload:", before + 1)[-1]
        self.case.assertIn(expect, line)
        if "applied" in expect and self.workers > 1:
            self.wait_for("settings reloaded", workers_before + self.workers - 1)
        return line

    def register(self, port: int, container: str = CONTAINER) -> str:
        """Register a running container on 127.0.0.1; its hostname for ``http-<port>``."""
        status, _, _ = self.admin("PUT", f"/api/v1/containers/{container}",
                               {"project": PROJECT, "address": "127.0.0.1", "state": "running"})
        self.case.assertIn(status, (200, 201))
        return f"{PROJECT}-{container}-http-{port}.node-local.containers.localhost"

    def statuses(self, host: str, n: int, path: str = "/") -> list[int]:
        """n requests, each on a fresh connection (spread over the workers by the kernel)."""
        url = f"https://{host}:{self.ports['https']}{path}"
        one = ["--cacert", self.ca_path, "--resolve", f"{host}:{self.ports['https']}:127.0.0.1",
               "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", "--max-time", str(TIMEOUT), url]
        args = ["curl", *one]
        for _ in range(n - 1):
            args += ["--next", *one]
        out = subprocess.run(args, capture_output=True, text=True, timeout=n * TIMEOUT + 10).stdout
        return [int(code) for code in out.split()]


def read(path: str) -> str:
    """The text of ``path``; empty if there is no such file (yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def until(case: unittest.TestCase, predicate, what: str) -> None:
    """Wait until ``predicate()`` holds; fail after TIMEOUT saying ``what`` did not happen."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            case.fail(f"{what} within {TIMEOUT}s")
        time.sleep(0.05)


def audit_paths(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [json.loads(line)["path"] for line in f if line.strip()]
    except FileNotFoundError:
        return []


@skipIf(NO_CURL, NO_CURL)
class SighupTests(unittest.TestCase):
    """SIGHUP applies what can change live, in worker 0 and every other worker."""

    workers = 1
    LIMIT = '[ratelimit]\nper_address_rate = "1/min"\nper_address_burst = {burst}\n'

    def setUp(self):
        backend, self.backend_port = start_backend()
        self.addCleanup(backend.stop)
        self.node = Node(self, self.LIMIT.format(burst=1000), workers=self.workers)
        self.host = self.node.register(self.backend_port)

    def test_changed_rate_limit_applies_to_the_next_requests(self):
        """A smaller per-address burst: every worker refuses this client past it (each
        worker enforces the full budget, so at most burst x workers get through)."""
        n = 6 * self.workers
        self.assertEqual(self.node.statuses(self.host, n), [200] * n)
        line = self.node.reload(self.LIMIT.format(burst=2))
        self.assertIn("applied [ratelimit] per_address_burst", line)
        after = self.node.statuses(self.host, n)
        self.assertLessEqual(after.count(200), 2 * self.workers, after)
        self.assertEqual(after.count(200) + after.count(429), n, after)

    def test_changed_response_timeout_applies(self):
        """response_timeout 60 -> 1: a container that never answers is a 504 on every worker."""
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the backlog; nothing ever answers
        port = silent.getsockname()[1]
        host = self.node.register(port, SILENT_CONTAINER)
        self.node.reload(self.LIMIT.format(burst=1000) + "[upstream]\nresponse_timeout = 1\n")
        self.assertEqual(self.node.statuses(host, 2 * self.workers), [504] * 2 * self.workers)

    def test_invalid_config_is_rejected_and_the_old_stays(self):
        """One log line naming the key and the problem; the limits in force stay."""
        line = self.node.reload(self.LIMIT.format(burst=2) + "[upstream]\nconnect_timeout = -1\n",
                                expect="config rejected")
        self.assertIn("[upstream] connect_timeout: must be greater than 0", line)
        self.assertEqual(len(re.findall("hoodyproxy reload", self.node.log())), 1)
        self.assertEqual(self.node.statuses(self.host, 6), [200] * 6)

    def test_listen_address_change_is_reported_and_not_applied(self):
        """A new [listen] http is named in the reload line and left as it was: the old port
        still answers, the new one is not bound."""
        new_port = free_port()
        line = self.node.reload(self.LIMIT.format(burst=1000), http=f"127.0.0.1:{new_port}",
                                expect="needs a restart, left as it was: [listen] http")
        self.assertIn("nothing to apply", line)
        self.assertTrue(port_is_free(new_port))
        with socket.create_connection(("127.0.0.1", self.node.ports["http"]), timeout=TIMEOUT) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
            self.assertTrue(s.recv(100).startswith(b"HTTP/1.1 308"))

    def test_post_reload_answers_what_changed(self):
        """POST /api/v1/reload does what SIGHUP does and answers with the keys."""
        self.node.write_config(self.LIMIT.format(burst=2), http=f"127.0.0.1:{free_port()}")
        status, _, body = self.node.admin("POST", "/api/v1/reload")
        self.assertEqual((status, body), (200, {"changed": ["[ratelimit] per_address_burst"],
                                                "not_applied": ["[listen] http"]}))
        if self.workers > 1:
            self.node.wait_for("settings reloaded", self.workers - 1)
        after = self.node.statuses(self.host, 6 * self.workers)
        self.assertLessEqual(after.count(200), 2 * self.workers, after)


class SighupWithWorkersTests(SighupTests):
    workers = 2


@skipIf(NO_CURL, NO_CURL)
class LogReopenTests(unittest.TestCase):

    def test_sigusr1_reopens_the_audit_and_diagnostic_logs(self):
        """logrotate renames both logs; after SIGUSR1 the next lines (the node's and every
        worker's) land in new files at the original paths."""
        backend, port = start_backend()
        self.addCleanup(backend.stop)
        node = Node(self, workers=2, logfile=True)
        host = node.register(port)
        audit = os.path.join(node.data_dir, "audit.log")
        self.assertEqual(node.statuses(host, 2, "/before"), [200, 200])
        until(self, lambda: audit_paths(audit).count("/before") == 2, "no audit lines for /before")
        os.rename(audit, audit + ".1")
        os.rename(node.logfile, node.logfile + ".1")
        node.signal(signal.SIGUSR1)

        def new_log() -> str:
            return read(node.logfile)
        node.wait_for("hoodyproxy: logs reopened", log=new_log)
        node.wait_for("worker 1: .*audit log reopened", log=new_log)
        self.assertEqual(node.statuses(host, 4, "/after"), [200] * 4)
        until(self, lambda: audit_paths(audit).count("/after") == 4, "no audit lines for /after in the new file")
        self.assertNotIn("/after", audit_paths(audit + ".1"))
        self.assertIn("/before", audit_paths(audit + ".1"))


@skipIf(NO_CURL, NO_CURL)
class ReloadUnderLoadTests(unittest.TestCase):
    """A reload while a load generator runs loses no request, and the new limit applies.

    The new limit is a per-address budget far under the load's, in dry run: it refuses
    nothing, but every request it would have refused says so in its audit line, which
    shows that the very next requests were judged by it.
    """

    LOAD_SECONDS = 3

    def setUp(self):
        backend, port = start_backend()
        self.addCleanup(backend.stop)
        self.node = Node(self, '[ratelimit]\nper_address_rate = "100000/s"\nper_address_burst = 1000000\n',
                         workers=2)
        self.host = self.node.register(port)
        self.assertEqual(self.node.statuses(self.host, 2), [200, 200])
        self.audit = os.path.join(self.node.data_dir, "audit.log")

    def reload_midway(self, failures: list) -> None:
        time.sleep(self.LOAD_SECONDS / 3)
        try:
            self.node.reload('[ratelimit]\nper_address_rate = "1/min"\nper_address_burst = 5\ndry_run = true\n')
        except BaseException as e:  # (a failure in this thread is the test's)
            failures.append(e)

    def judged_by_the_new_limit(self) -> int:
        with open(self.audit) as f:
            return sum(1 for line in f if '"ratelimit_dry_run":true' in line.replace(" ", ""))

    def run_with_reload(self, args: list[str]) -> subprocess.CompletedProcess:
        failures: list = []
        reloading = threading.Thread(target=self.reload_midway, args=(failures,))
        reloading.start()
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=self.LOAD_SECONDS + 30)
        finally:
            reloading.join(TIMEOUT)
        if failures:
            raise failures[0]
        return done

    @skipIf(NO_WRK, NO_WRK)
    def test_wrk_http1(self):
        """wrk over HTTP/1.1 keep-alive: zero non-2xx, zero socket errors."""
        done = self.run_with_reload([
            "wrk", "-t1", "-c8", f"-d{self.LOAD_SECONDS}s", "--timeout=10s", "-s", WRK_SCRIPT,
            "-H", f"Host: {self.host}", f"https://127.0.0.1:{self.node.ports['https']}/"])
        report = json.loads(re.search(r"^WRKJSON (\{.*\})$", done.stdout, re.M).group(1))
        self.assertGreater(report["requests"], 0)
        errors = {k: report[k] for k in ("connect", "read", "write", "status", "timeout")}
        self.assertEqual(errors, dict.fromkeys(errors, 0), report)
        until(self, lambda: self.judged_by_the_new_limit() > 0, "no request judged by the new limit")

    @skipIf(NO_H2LOAD, NO_H2LOAD)
    def test_h2load_http2(self):
        """h2load over HTTP/2: every request succeeds with a 2xx."""
        done = self.run_with_reload([
            "h2load", "-t1", "-c4", "-m8", f"-D{self.LOAD_SECONDS}", "--npn-list=h2",
            "-H", f":authority: {self.host}", f"https://127.0.0.1:{self.node.ports['https']}/"])
        text = done.stdout + done.stderr
        requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                             r"(\d+) errored, (\d+) timeout", text)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        self.assertIsNotNone(requests, text)
        done_, succeeded, failed, errored, timeouts = (int(requests.group(i)) for i in (3, 4, 5, 6, 7))
        self.assertGreater(succeeded, 0, text)
        self.assertEqual((failed, errored, timeouts), (0, 0, 0), text)
        self.assertEqual((int(codes.group(1)), int(codes.group(3)) + int(codes.group(4))), (done_, 0), text)
        until(self, lambda: self.judged_by_the_new_limit() > 0, "no request judged by the new limit")

"""Tests that run the real ``twistd -n hoodyproxy`` as a child process.

Each test starts twistd (the script next to this interpreter, with the repository on
PYTHONPATH so the ``twisted/plugins`` drop-in is found) in its own working directory
with ``--pidfile ''`` and its own ``--data-dir``, on ephemeral loopback ports read back
from the "hoodyproxy <kind> listening on <host>:<port>" log lines.  Output (stdout and
stderr together) goes to a file that is polled with a bounded wait.  Every process is
stopped by the test that started it (SIGTERM, then SIGKILL if it does not exit).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from unittest import skipIf

from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: bound on every wait for the child (start-up, exit); never an assertion about speed
TIMEOUT = 20.0

LISTENING = re.compile(r"hoodyproxy (https|http|admin) listening on ([0-9.]+):(\d+)")
READY = "hoodyproxy audit log:"
ROUTE = "0123456789abcdef01234567-fedcba9876543210fedcba98-http-80.node-local.containers.localhost"
PROJECT = "0123456789abcdef01234567"
CONTAINER = "fedcba9876543210fedcba98"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = TIMEOUT) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def count_lines(path: str) -> int:
    """Lines in the file at ``path`` (0 if there is none yet): an audit log's exchanges."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Twistd:
    """One ``twistd -n hoodyproxy`` child process and its output."""

    def __init__(self, case: unittest.TestCase, data_dir: str, *args: str, https: str = "127.0.0.1:0",
                 http: str = "127.0.0.1:0", admin: str = "127.0.0.1:0", twistd_args: tuple = (),
                 wrapper: tuple = (), pass_fds: tuple = (), env: dict | None = None) -> None:
        """``wrapper``: a command line that runs the rest (e.g. one that sets LISTEN_PID and
        execs); ``pass_fds``: descriptors the child inherits; ``env``: more variables."""
        self.case = case
        self.data_dir = data_dir
        self.workdir = os.path.abspath(case.mktemp())
        os.makedirs(self.workdir)
        self.log_path = os.path.join(self.workdir, "output.log")
        extra_env = env or {}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("HOODYPROXY_DATA_DIR", None)
        env.update(extra_env)
        cmd = [*wrapper, TWISTD, *twistd_args, "-n", "--pidfile", "", "hoodyproxy", "--data-dir", data_dir,
               "--https", https, "--http", http, "--admin", admin, *args]
        if not any(a.startswith("--client-ip-mode") for a in args):
            # Leave the host namespace's netfilter rules alone (tests/test_real_client_ip.py
            # covers transparent mode in namespaces of its own).
            cmd += ["--client-ip-mode", "headers"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=env, pass_fds=pass_fds)
        case.addCleanup(self.stop)
        self.ports: dict[str, int] = {}

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for(self, pattern: str) -> re.Match:
        """The first match of ``pattern`` in the output; fails if the child exits first."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                match = re.search(pattern, self.output())
                if match:
                    return match
                self.case.fail(f"twistd exited ({self.proc.returncode}) without printing "
                               f"{pattern!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.case.fail(f"twistd did not print {pattern!r} within {TIMEOUT}s:\n{self.output()}")
            time.sleep(0.05)

    def wait_ready(self) -> Twistd:
        """Wait for the end of the start-up lines and read the bound ports."""
        self.wait_for(re.escape(READY))
        for kind, _host, port in LISTENING.findall(self.output()):
            self.ports[kind] = int(port)
        return self

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.case.fail(f"twistd did not exit within {TIMEOUT}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def token(self) -> str:
        with open(os.path.join(self.data_dir, "admin-token")) as f:
            return f.read().strip()

    def admin(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict | None]:
        """One admin API request with the node's token: (status, headers, JSON body or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["admin"], timeout=TIMEOUT)
        try:
            headers = {"Authorization": f"Bearer {self.token()}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
        finally:
            conn.close()

    def curl(self, url: str, host: str, port: int, *args: str) -> tuple[int, dict, bytes]:
        """curl ``url`` trusting the node's CA, ``host`` resolved to 127.0.0.1.

        Returns (status, lower-cased headers, body).
        """
        ca = os.path.join(self.data_dir, "tls", "ca.pem")
        result = subprocess.run(
            ["curl", "-sS", "-i", "--max-time", str(TIMEOUT), "--cacert", ca,
             "--resolve", f"{host}:{port}:127.0.0.1", *args, url],
            capture_output=True, timeout=TIMEOUT + 10)
        self.case.assertEqual(result.returncode, 0, result.stderr)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, body


class ProcessTestCase(unittest.TestCase):
    def data_dir(self) -> str:
        return os.path.join(os.path.abspath(self.mktemp()), "data")

    def start(self, *args: str, data_dir: str | None = None, **listen: str) -> Twistd:
        return Twistd(self, data_dir or self.data_dir(), *args, **listen).wait_ready()


NO_CURL = "curl is not installed" if shutil.which("curl") is None else None


class StartTests(ProcessTestCase):
    @skipIf(NO_CURL, NO_CURL)
    def test_first_start(self):
        """
        With only --data-dir and ports, the node starts, names its development CA,
        writes ``admin-token`` (0600) and ``hoodyproxy.db``, and serves HTTPS with that
        CA: a route to an unknown container answers 503 JSON with Retry-After.
        """
        node = self.start()
        ca_line = node.wait_for(r"[^\n]*development CA[^\n]*").group(0)
        ca = os.path.join(node.data_dir, "tls", "ca.pem")
        self.assertIn(ca, ca_line)
        self.assertTrue(os.path.isfile(ca))
        token = os.path.join(node.data_dir, "admin-token")
        self.assertEqual(stat.S_IMODE(os.stat(token).st_mode), 0o600)
        self.assertGreaterEqual(len(node.token()), 16)
        self.assertTrue(os.path.isfile(os.path.join(node.data_dir, "hoodyproxy.db")))
        self.assertEqual(set(node.ports), {"https", "http", "admin"})

        port = node.ports["https"]
        status, headers, body = node.curl(f"https://{ROUTE}:{port}/some/path", ROUTE, port)
        self.assertEqual(status, 503, body)
        self.assertEqual(headers.get("content-type"), "application/json")
        self.assertTrue(headers.get("retry-after", "").isdigit(), headers)
        self.assertEqual(json.loads(body)["error"], "container_unavailable")

    def test_gateway_reactor_unless_one_is_chosen(self):
        """``twistd -n hoodyproxy`` runs on the gateway's epoll reactor (no log context per
        I/O event); ``twistd --reactor poll`` still gets the reactor it asked for."""
        node = self.start()
        node.wait_for(r"reactor class: hoodyproxy\.reactor\.GatewayReactor")
        node.stop()
        chosen = Twistd(self, self.data_dir(), twistd_args=("--reactor=poll",)).wait_ready()
        chosen.wait_for(r"reactor class: twisted\.internet\.pollreactor\.PollReactor")

    @skipIf(NO_CURL, NO_CURL)
    def test_demo(self):
        """--demo prints a URL; fetching it through the gateway returns the demo page."""
        node = self.start("--demo")
        url = node.wait_for(r"hoodyproxy demo: open (https://\S+)").group(1)
        match = re.fullmatch(r"https://([^/:]+):(\d+)/", url)
        self.assertIsNotNone(match, url)
        host, port = match.group(1), int(match.group(2))
        self.assertEqual(port, node.ports["https"])
        status, headers, body = node.curl(url, host, port)
        self.assertEqual(status, 200, body)
        self.assertTrue(headers.get("content-type", "").startswith("text/html"), headers)
        page = body.decode("utf-8")
        self.assertIn("<title>hoodyproxy demo</title>", page)
        self.assertIn(f"{host}:{port}", page)

    def test_survives_kill_9(self):
        """A container PUT that got 2xx is still there after ``kill -9`` and a restart."""
        data_dir = self.data_dir()
        node = self.start(data_dir=data_dir)
        token = node.token()
        container = {"project": PROJECT, "address": "10.1.2.3", "state": "running", "ports": {"http-80": 8080}}
        status, _, stored = node.admin("PUT", f"/api/v1/containers/{CONTAINER}", container)
        self.assertEqual(status, 201, stored)
        os.kill(node.proc.pid, signal.SIGKILL)
        self.assertEqual(node.wait_exit(), -signal.SIGKILL)

        again = self.start(data_dir=data_dir)
        self.assertEqual(again.token(), token)
        status, _, body = again.admin("GET", f"/api/v1/containers/{CONTAINER}")
        self.assertEqual(status, 200, body)
        self.assertEqual(body, stored)
        self.assertEqual(body, dict(container, id=CONTAINER, source="admin"))


class RedirectTests(ProcessTestCase):
    def redirect(self, node: Twistd, host: str, target: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", node.ports["http"], timeout=TIMEOUT)
        self.addCleanup(conn.close)
        conn.request("GET", target, headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response

    def test_http_redirects_to_https_port(self):
        """Plain HTTP answers 308 to ``https://<host>:<https port><path>?<query>``."""
        https = free_port()
        node = self.start(https=f"127.0.0.1:{https}")
        self.assertEqual(node.ports["https"], https)
        response = self.redirect(node, f"{ROUTE}:{node.ports['http']}", "/a/b?x=1&y=two")
        self.assertEqual(response.status, 308)
        self.assertEqual(response.getheader("Location"), f"https://{ROUTE}:{https}/a/b?x=1&y=two")

    def test_redirect_with_ephemeral_https_port(self):
        """With ``--https 127.0.0.1:0`` the redirect names the port actually bound, not 0."""
        node = self.start()
        response = self.redirect(node, ROUTE, "/p?q=1")
        self.assertEqual(response.status, 308)
        self.assertEqual(response.getheader("Location"), f"https://{ROUTE}:{node.ports['https']}/p?q=1")


class FailureTests(ProcessTestCase):
    def test_bad_config(self):
        """
        ``[upstream] connect_timeout = -1`` exits non-zero with one line naming the key,
        and nothing listens.
        """
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write("[upstream]\nconnect_timeout = -1\n")
        https = free_port()
        node = Twistd(self, self.data_dir(), "--config", config, https=f"127.0.0.1:{https}")
        self.assertNotEqual(node.wait_exit(), 0)
        lines = [line for line in node.output().splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, node.output())
        self.assertIn("[upstream] connect_timeout", lines[0])
        self.assertTrue(port_is_free(https))

    def test_port_in_use(self):
        """An HTTPS port already in use: one error line naming it, non-zero exit, no traceback."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        node = Twistd(self, self.data_dir(), https=f"127.0.0.1:{port}")
        self.assertNotEqual(node.wait_exit(), 0)
        output = node.output()
        self.assertNotIn("Traceback", output)
        errors = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertEqual(len(errors), 1, output)
        self.assertIn(f"127.0.0.1:{port}", errors[0])
        self.assertNotIn("listening on", output)

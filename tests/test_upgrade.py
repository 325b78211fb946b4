"""Binary upgrade (hoodyproxy.upgrade): SIGUSR2 starts the next generation on the same
sockets, then the old one drains -- under load, with real twistd processes, no request lost.

The load is wrk (keep-alive HTTP/1.1 over TLS), running from before the signal until the
old generation has exited and the new one has served a few hundred more requests (the
audit log, which both write, says so); it is then stopped and its figures read: every
answer 2xx, and no socket error (no refused connection, no connection closed under a
request, no timeout).  The new generation is not the test's child: it is found in the
log line that names it, and stopped at cleanup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

from unittest import skipIf

from bench.procs import CONTAINER, PROJECT, start_backend
from tests.load import NO_WRK, Wrk, load_config
from tests.test_process import NO_CURL, ProcessTestCase, count_lines, wait_until
from tests.test_sockets import DEMO_HOST, _children


NO_H2LOAD = "h2load is not installed (nghttp2-client)" if shutil.which("h2load") is None else None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _stop(pid: int) -> None:
    """SIGTERM a process that is not ours to wait for; SIGKILL if it does not go."""
    if _gone(pid):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: _gone(pid)):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _gone(pid))


class UpgradeTests(ProcessTestCase):

    def upgrade(self, node) -> int:
        """SIGUSR2 to ``node``; wait until the next generation serves and the old one has
        exited (status 0); the new one's PID (stopped at cleanup)."""
        os.kill(node.proc.pid, signal.SIGUSR2)
        new = int(node.wait_for(r"upgrade: started the next generation \(pid (\d+)\)").group(1))
        self.addCleanup(_stop, new)
        node.wait_for(rf"upgrade: generation {new} serves; this one \(pid {node.proc.pid}\) drains")
        self.assertEqual(node.wait_exit(), 0, node.output())
        return new

    def with_backend(self, *args: str):
        """A node and a container behind it: a backend process (bench's sink) registered
        through the admin API; the route's hostname."""
        backend, backend_port = start_backend()
        self.addCleanup(backend.stop)
        node = self.start("--config", load_config(self), *args)
        status, _headers, _body = node.admin("PUT", f"/api/v1/containers/{CONTAINER}",
                                             {"project": PROJECT, "address": "127.0.0.1", "state": "running"})
        self.assertIn(status, (200, 201))
        return node, f"{PROJECT}-{CONTAINER}-http-{backend_port}.node-local.containers.localhost"

    def load_across_upgrade(self, *args: str) -> None:
        node, host = self.with_backend(*args)
        port = node.ports["https"]
        audit = os.path.join(node.data_dir, "audit.log")
        load = Wrk(self, f"https://127.0.0.1:{port}/", host, connections=16)
        self.assertTrue(wait_until(lambda: count_lines(audit) > 200), "the load does not get through")
        new = self.upgrade(node)
        served = count_lines(audit)
        self.assertTrue(wait_until(lambda: count_lines(audit) > served + 300), "the new generation serves nothing")
        result = load.stop()
        self.assertEqual((result.socket_errors, result.non_2xx), (0, 0), result.output)
        self.assertFalse(_gone(new))
        status, _headers, body = node.curl(f"https://{host}:{port}/", host, port)
        self.assertEqual(status, 200, body)
        sys.stderr.write(f"\n[upgrade under load {' '.join(args)}] {result.requests} requests, socket errors "
                         f"{result.socket_errors}, non-2xx {result.non_2xx}\n")
        return new

    @skipIf(NO_WRK, NO_WRK)
    @skipIf(NO_CURL, NO_CURL)
    def test_upgrade_under_load_loses_no_request(self):
        """wrk across the upgrade: every request answered 2xx, no socket error; the new
        generation holds the data directory's lock and answers on the admin port."""
        new = self.load_across_upgrade()
        with open(os.path.join(self.node_data_dir, "lock")) as f:
            self.assertEqual(int(f.read().strip()), new)

    def start(self, *args, **kw):
        node = super().start(*args, **kw)
        self.node_data_dir = node.data_dir
        return node

    @skipIf(NO_WRK, NO_WRK)
    @skipIf(NO_CURL, NO_CURL)
    def test_upgrade_with_workers_under_load_loses_no_request(self):
        """The same with two workers: the new generation starts its own worker on the
        sockets; the old generation's worker drains and exits with it."""
        new = self.load_across_upgrade("--workers", "2")
        self.assertTrue(wait_until(lambda: len(_children(new)) == 1), "the new generation has no worker")

    @skipIf(NO_H2LOAD, NO_H2LOAD)
    def test_http2_load_across_the_upgrade(self):
        """h2load (HTTP/2, 4 streams at once on each of 8 connections) in back-to-back
        rounds of 400 requests from before the signal until a round has run wholly against the new
        generation: the old one's connections get GOAWAY and finish their streams.  Every
        request that reached the node was answered 2xx (the audit log, which both
        generations write, has exactly as many lines as h2load counts successes).

        h2load may count a few requests as failed: those it had queued but not yet sent
        when a GOAWAY arrived, which nghttp2 then refuses to send (a browser sends them
        again on a new connection; h2load does not retry).  They never reached the node."""
        node, host = self.with_backend()
        port = node.ports["https"]
        command = ["h2load", "-c", "8", "-m", "4", "-n", "400", f"--connect-to=127.0.0.1:{port}",
                   f"https://{host}:{port}/"]
        os.kill(node.proc.pid, signal.SIGUSR2)
        new = int(node.wait_for(r"upgrade: started the next generation \(pid (\d+)\)").group(1))
        self.addCleanup(_stop, new)
        totals = {"requests": 0, "succeeded": 0, "failed": 0, "errored": 0, "timeout": 0}
        for _round in range(200):
            old_gone = node.proc.poll() is not None
            out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
            figures = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                                r"(\d+) errored, (\d+) timeout", out)
            self.assertIsNotNone(figures, out)
            for key, value in zip(totals, map(int, figures.groups())):
                totals[key] += value
            if old_gone:
                break
        self.assertEqual(node.wait_exit(), 0)
        self.assertTrue(old_gone, "the old generation was still there after every round")
        self.assertEqual(totals["timeout"], 0, totals)
        audit = os.path.join(node.data_dir, "audit.log")
        wait_until(lambda: count_lines(audit) >= totals["succeeded"])  # (the new generation flushes its log)
        with open(audit) as f:
            statuses = [json.loads(line)["status"] for line in f]
        self.assertEqual(len(statuses), totals["succeeded"], totals)
        self.assertEqual(set(statuses), {200})
        sys.stderr.write(f"\n[upgrade under h2load] {totals}; the node received {len(statuses)} requests, "
                         f"all answered 200\n")

    @skipIf(NO_CURL, NO_CURL)
    def test_a_next_generation_that_fails_leaves_the_node_serving(self):
        """If the next generation cannot start (here: its config no longer loads), the old
        one says so in one line and goes on serving; it stops cleanly after."""
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write("[client]\nidle_timeout = 75.0\n")
        node = self.start("--demo", "--config", config)
        with open(config, "w") as f:
            f.write("[client\n")
        os.kill(node.proc.pid, signal.SIGUSR2)
        node.wait_for(r"next generation \(pid \d+\) exited with status 2 before it was ready; "
                      r"this one goes on serving")
        port = node.ports["https"]
        status, _headers, body = node.curl(f"https://{DEMO_HOST}:{port}/", DEMO_HOST, port)
        self.assertEqual(status, 200, body)
        node.proc.terminate()
        self.assertEqual(node.wait_exit(), -signal.SIGTERM)  # (twistd ends with the signal that stopped it)
        self.assertIn("Server Shut Down", node.output())


"""--workers N: several processes share the ports and the state, and are looked after."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request

from twisted.trial import unittest

from bench.procs import Gateway, start_backend
from tests.test_process import wait_until


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class WorkersTests(unittest.SynchronousTestCase):

    def setUp(self):
        backend, self.backend_port = start_backend()
        self.addCleanup(backend.stop)
        self.gateway = Gateway(["--workers", "2"])
        self.addCleanup(self.gateway.stop)
        self.host = self.gateway.register(self.backend_port)
        self.assertTrue(wait_until(lambda: len(_children(self.gateway.pid)) == 1), "worker 1 did not start")
        self.worker = _children(self.gateway.pid)[0]
        # Worker 1 is listening once a fresh connection can land on it; give it time to bind.
        self.assertTrue(wait_until(lambda: self._statuses(4) == [200] * 4))

    def _statuses(self, n: int) -> list[int]:
        """n requests, each on a fresh connection (so the kernel spreads them over workers)."""
        url = f"https://{self.host}:{self.gateway.https_port}/"
        one = [*self.gateway.curl_args(self.host), "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", url]
        args = ["curl", *one]
        for _ in range(n - 1):
            args += ["--next", *one]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
        return [int(code) for code in out.split()]

    def _put_state(self, state: str) -> None:
        from bench.procs import CONTAINER, PROJECT
        body = json.dumps({"project": PROJECT, "address": "127.0.0.1", "state": state}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.gateway.admin_port}/api/v1/containers/{CONTAINER}", data=body,
            method="PUT", headers={"Authorization": f"Bearer {self.gateway.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.assertEqual(r.status, 200)

    def test_second_worker_serves_requests(self):
        """Connections are spread over both processes: worker 1 does real work under load."""
        before = _cpu_ticks(self.worker)
        self.assertEqual(self._statuses(60), [200] * 60)
        self.assertGreater(_cpu_ticks(self.worker), before)

    def test_admin_change_applies_in_every_worker(self):
        """Stopping a container through the admin API turns every worker's next answer into 503."""
        self._put_state("stopped")
        self.assertEqual(self._statuses(20), [503] * 20)
        self._put_state("running")
        self.assertEqual(self._statuses(20), [200] * 20)

    def test_dead_worker_is_started_again(self):
        """A worker killed with SIGKILL is replaced by a new process."""
        os.kill(self.worker, 9)
        self.assertTrue(wait_until(lambda: _children(self.gateway.pid) and _children(self.gateway.pid)[0] != self.worker))
        self.assertTrue(wait_until(lambda: self._statuses(4) == [200] * 4))

    def test_stopping_the_node_stops_its_workers(self):
        """SIGTERM to twistd ends the worker processes too."""
        worker = self.worker
        self.gateway.stop()
        self.assertTrue(wait_until(lambda: not os.path.exists(f"/proc/{worker}") or
                              open(f"/proc/{worker}/stat").read().split()[2] == "Z"))

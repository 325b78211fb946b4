"""The listening sockets (hoodyproxy.sockets): owned by worker 0, inherited by the
workers, or handed in by socket activation -- with real twistd processes.

- Socket activation: the test binds the sockets, puts them at descriptors 3, 4, ... and
  starts the node through a small wrapper that sets ``LISTEN_PID`` to its own PID and
  execs, with ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` -- what systemd does for a socket unit.
- Workers: a worker killed with SIGKILL takes no listener with it.  With every process
  stopped, connections wait in the accept queue; worker 1 is killed; worker 0, let go
  again, serves every one of them.  (Each worker had a socket and a queue of its own with
  SO_REUSEPORT, and those queued on the dead one were reset.)  And the same under wrk.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import skipIf

from tests.load import NO_WRK, Wrk, load_config
from tests.test_process import NO_CURL, TIMEOUT, ProcessTestCase, wait_until

DEMO_HOST = "0123456789abcdef01234567-89abcdef0123456789abcdef-http-80.node-local.containers.localhost"
#: Sets LISTEN_PID to its own PID, moves the descriptors named on its command line to 3, 4, ...
#: and execs the rest: what systemd does between fork and exec.
ACTIVATE = ("import os, sys\n"
            "fds = [int(fd) for fd in sys.argv[1].split(',')]\n"
            "for i, fd in enumerate(fds):\n"
            "    os.dup2(fd, 3 + i)\n"
            "for fd in fds:\n"
            "    if fd >= 3 + len(fds): os.close(fd)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _high_fd(sock: socket.socket) -> int:
    """A duplicate of ``sock``'s descriptor numbered above those the wrapper moves to."""
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 64)
    os.set_inheritable(fd, True)
    return fd


def _accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:``port``."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


class SocketActivationTests(ProcessTestCase):

    def activated(self, named: list[tuple[str, socket.socket]], *args: str, ready: bool = True, **listen):
        fds = [_high_fd(sock) for _name, sock in named]
        self.addCleanup(lambda: [os.close(fd) for fd in fds])
        from tests.test_process import Twistd
        node = Twistd(self, self.data_dir(), *args,
                      wrapper=(sys.executable, "-c", ACTIVATE, ",".join(map(str, fds))), pass_fds=tuple(fds),
                      env={"LISTEN_FDS": str(len(named)), "LISTEN_FDNAMES": ":".join(n for n, _ in named)},
                      **listen)
        return node.wait_ready() if ready else node

    def listening(self, kind=socket.SOCK_STREAM) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        return sock

    @skipIf(NO_CURL, NO_CURL)
    def test_sockets_handed_in_as_systemd_would(self):
        """Sockets named https, http, admin (TCP) and http3 (UDP) handed in at 3..6 are the
        node's listeners: requests through them work, and the [listen] addresses -- taken
        here by another socket -- are never bound."""
        https, http, admin = self.listening(), self.listening(), self.listening()
        udp = self.listening(socket.SOCK_DGRAM)
        taken = self.listening()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        node = self.activated([("https", https), ("http", http), ("admin", admin), ("http3", udp)], "--demo",
                              https=busy, http=busy, admin=busy)
        self.assertIn("listening sockets handed in", node.output())
        self.assertEqual(node.ports, {"https": https.getsockname()[1], "http": http.getsockname()[1],
                                      "admin": admin.getsockname()[1]})
        self.assertIn(f"hoodyproxy http3 listening on 127.0.0.1:{udp.getsockname()[1]}", node.output())
        port = node.ports["https"]
        status, _headers, body = node.curl(f"https://{DEMO_HOST}:{port}/", DEMO_HOST, port)
        self.assertEqual(status, 200, body)
        status, _body, _ = node.admin("GET", "/api/v1/containers")
        self.assertEqual(status, 200)
        status, headers, _ = node.curl(f"http://{DEMO_HOST}:{node.ports['http']}/x", DEMO_HOST, node.ports["http"])
        self.assertEqual((status, headers["location"]), (308, f"https://{DEMO_HOST}:{port}/x"))

    def test_only_https_handed_in_the_rest_bound_from_the_config(self):
        """A kind not handed in is bound as [listen] says."""
        https = self.listening()
        node = self.activated([("https", https)])
        self.assertEqual(node.ports["https"], https.getsockname()[1])
        self.assertNotEqual(node.ports["admin"], 0)
        status, _body, _ = node.admin("GET", "/api/v1/containers")
        self.assertEqual(status, 200)

    def test_a_misnamed_descriptor_stops_the_node_with_one_line(self):
        """A descriptor named neither https, http, admin nor http3 ends the start with one
        line naming it."""
        node = self.activated([("htps", self.listening())], ready=False)
        self.assertEqual(node.wait_exit(), 1)
        self.assertIn("hoodyproxy: cannot start: listening sockets handed in: descriptor 3 is named 'htps'",
                      node.output())


class KilledWorkerTests(ProcessTestCase):

    def setUp(self):
        self.node = self.start("--workers", "2", "--demo", "--config", load_config(self))
        self.assertTrue(wait_until(lambda: len(_children(self.node.proc.pid)) == 1), "worker 1 did not start")
        self.worker = _children(self.node.proc.pid)[0]
        self.node.wait_for(r"worker 1 serving")

    def _resume(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def _fresh_connections(self, n: int) -> list[int]:
        """n requests, each on a connection of its own."""
        port = self.node.ports["https"]
        ca = os.path.join(self.node.data_dir, "tls", "ca.pem")
        one = ["--cacert", ca, "--resolve", f"{DEMO_HOST}:{port}:127.0.0.1", "-s", "-o", "/dev/null",
               "-w", "%{http_code}\\n", f"https://{DEMO_HOST}:{port}/"]
        args = ["curl", *one]
        for _ in range(n - 1):
            args += ["--next", *one]
        out = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT * 3).stdout
        return [int(code) for code in out.split()]

    @skipIf(NO_CURL, NO_CURL)
    def test_connections_queued_when_a_worker_dies_are_served(self):
        """Every process stopped, connections queue; worker 1 is killed; worker 0, resumed,
        answers every queued connection 200 (none reset)."""
        port = self.node.ports["https"]
        root = self.node.proc.pid
        os.kill(root, signal.SIGSTOP)
        self.addCleanup(self._resume, root)
        os.kill(self.worker, signal.SIGSTOP)
        self.addCleanup(self._resume, self.worker)
        ca = os.path.join(self.node.data_dir, "tls", "ca.pem")
        clients = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(TIMEOUT),
                                     "--cacert", ca, "--resolve", f"{DEMO_HOST}:{port}:127.0.0.1",
                                     f"https://{DEMO_HOST}:{port}/"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(12)]
        self.addCleanup(lambda: [c.kill() for c in clients if c.poll() is None])
        self.assertTrue(wait_until(lambda: _accept_queue(port) == len(clients)), "the connections did not queue")
        os.kill(self.worker, signal.SIGKILL)
        os.kill(root, signal.SIGCONT)
        results = [c.communicate(timeout=TIMEOUT + 10) for c in clients]
        self.assertEqual([out for out, _err in results], ["200"] * len(clients), [err for _out, err in results])
        self.assertTrue(wait_until(lambda: _children(root) and _children(root)[0] != self.worker),
                        "worker 1 was not started again")

    @skipIf(NO_WRK, NO_WRK)
    @skipIf(NO_CURL, NO_CURL)
    def test_load_across_a_killed_worker(self):
        """Under load, worker 1 killed with SIGKILL: the listener never refuses a connection
        and no answer is an error; the only requests lost are those on connections worker
        1 had accepted (at most one per connection); the new worker 1 serves."""
        port = self.node.ports["https"]
        load = Wrk(self, f"https://127.0.0.1:{port}/", DEMO_HOST, connections=8)
        time.sleep(1.0)  # (let the load reach both workers; not an assertion about speed)
        os.kill(self.worker, signal.SIGKILL)
        root = self.node.proc.pid
        self.assertTrue(wait_until(lambda: _children(root) and _children(root)[0] != self.worker),
                        "worker 1 was not started again")
        replacement = _children(root)[0]
        self.node.wait_for(rf"worker 1 serving \(pid {replacement}\)")
        # wrk's connections are kept alive: fresh ones, batch after batch, show the new
        # worker's share (whichever process accepts first gets a connection).
        before = _cpu_ticks(replacement)
        statuses: list[int] = []

        def replacement_served() -> bool:
            statuses.extend(self._fresh_connections(10))
            return _cpu_ticks(replacement) > before
        self.assertTrue(wait_until(replacement_served), "the new worker 1 serves nothing")
        self.assertEqual(set(statuses), {200})
        result = load.stop()
        self.assertGreater(result.requests, 0)
        self.assertEqual((result.connect_errors, result.timeouts, result.non_2xx), (0, 0, 0), result.output)
        self.assertLessEqual(result.read_errors + result.write_errors, 8, result.output)
        sys.stderr.write(f"\n[kill a worker under load] {result.requests} requests, connect errors "
                         f"{result.connect_errors}, read {result.read_errors}, write {result.write_errors}, "
                         f"timeouts {result.timeouts}, non-2xx {result.non_2xx}\n")


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])

"""One node per data directory, and each node's netfilter rules its own.

A second node on a data directory that a running node holds is refused before it binds
a port or touches a rule, with one line naming the first one's PID, and the first one
goes on serving.  Two nodes on two data directories in one network namespace (the
real ``twistd -n hoodyproxy``, transparent mode, as root) each take away only their own
netfilter rules when they stop -- including when they share the default mark and
table, whose policy rule and route must then outlive the first stop.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys

from twisted.trial import unittest

from hoodyproxy.datadir import DataDirInUse, DataDirLock
from hoodyproxy.netfilter import comment_for
from tests import netns
from tests.test_process import Twistd, port_is_free

NAMESPACES_SKIP = netns.missing_requirements()


class DataDirLockTests(unittest.SynchronousTestCase):
    """The lock itself, in this process."""

    def data_dir(self) -> str:
        return os.path.join(os.path.abspath(self.mktemp()), "data")

    def test_second_holder_is_refused_with_the_pid(self):
        """While one holder has the lock, another is refused at once, told the holder's PID."""
        data_dir = self.data_dir()
        first = DataDirLock(data_dir)
        first.acquire()
        self.addCleanup(first.release)
        error = self.assertRaises(DataDirInUse, DataDirLock(data_dir).acquire)
        self.assertEqual(error.pid, os.getpid())
        self.assertIn(f"PID {os.getpid()}", str(error))
        self.assertIn(data_dir, str(error))

    def test_lock_file_holds_the_pid_and_is_private(self):
        """The lock file (created with the directory, 0700) says which process holds it, mode 0600."""
        data_dir = self.data_dir()
        lock = DataDirLock(data_dir)
        lock.acquire()
        self.addCleanup(lock.release)
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(lock.path).st_mode), 0o600)
        with open(lock.path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")

    def test_release_lets_the_next_holder_in(self):
        """A released lock is free again; the file stays (removing it would race the next holder)."""
        data_dir = self.data_dir()
        first = DataDirLock(data_dir)
        first.acquire()
        first.release()
        self.assertTrue(os.path.exists(first.path))
        second = DataDirLock(data_dir)
        second.acquire()
        self.addCleanup(second.release)
        self.assertTrue(second.held)

    def test_a_dead_holder_leaves_no_lock(self):
        """A process that held the lock and died (SIGKILL: no cleanup at all) leaves it free."""
        data_dir = self.data_dir()
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time; from hoodyproxy.datadir import DataDirLock; "
             "DataDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", data_dir],
            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=netns.REPO))
        self.addCleanup(netns.stop_process, child, signal.SIGKILL)
        self.addCleanup(child.stdout.close)
        self.assertEqual(child.stdout.readline(), b"held\n")
        error = self.assertRaises(DataDirInUse, DataDirLock(data_dir).acquire)
        self.assertEqual(error.pid, child.pid)
        netns.stop_process(child, signal.SIGKILL)
        lock = DataDirLock(data_dir)
        lock.acquire()
        self.addCleanup(lock.release)
        with open(lock.path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")


class SecondNodeTests(unittest.TestCase):
    """Two real ``twistd -n hoodyproxy`` processes on one data directory."""

    def test_second_node_on_the_same_data_dir_is_refused(self):
        """The second node exits non-zero with one line naming the first one's PID and binds
        nothing; the first keeps running and serving."""
        data_dir = os.path.join(os.path.abspath(self.mktemp()), "data")
        first = Twistd(self, data_dir).wait_ready()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            https = s.getsockname()[1]
        second = Twistd(self, data_dir, https=f"127.0.0.1:{https}")
        self.assertNotEqual(second.wait_exit(), 0)
        lines = [line for line in second.output().splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, second.output())
        self.assertIn(f"PID {first.proc.pid}", lines[0])
        self.assertIn(data_dir, lines[0])
        self.assertTrue(lines[0].startswith("hoodyproxy: cannot start: "), lines[0])
        self.assertTrue(port_is_free(https))

        self.assertIsNone(first.proc.poll())
        status, _, body = first.admin("GET", "/api/v1/containers")
        self.assertEqual(status, 200, body)
        with open(os.path.join(data_dir, "lock")) as f:
            self.assertEqual(f.read().strip(), str(first.proc.pid))

    def test_next_node_starts_once_the_first_has_stopped(self):
        """The lock goes with the process: after a clean stop the data directory is free again."""
        data_dir = os.path.join(os.path.abspath(self.mktemp()), "data")
        first = Twistd(self, data_dir).wait_ready()
        first.stop()
        second = Twistd(self, data_dir).wait_ready()
        with open(os.path.join(data_dir, "lock")) as f:
            self.assertEqual(f.read().strip(), str(second.proc.pid))


class TwoNodesRulesTests(unittest.SynchronousTestCase):
    """Two transparent-mode nodes on two data directories in one gateway namespace."""

    skip = NAMESPACES_SKIP

    def setUp(self):
        self.net = netns.Topology(self)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, str]:
        """A node in the gateway namespace on a data directory of its own (ephemeral ports)."""
        data_dir = os.path.join(self.workdir, name)
        log_path = os.path.join(self.workdir, f"{name}.log")
        open(log_path, "wb").close()
        proc = self.net.start(self.net.gateway, [
            netns.TWISTD, "-n", "--pidfile", "", "hoodyproxy", "--data-dir", data_dir,
            "--https", "127.0.0.1:0", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--client-ip-mode", "transparent", *args], log_path)
        netns.wait_for(log_path, re.escape("hoodyproxy audit log:"), proc)
        return proc, data_dir

    def rules(self) -> dict[str, str]:
        """The namespace's legacy mangle rules (no dates, no counters), policy rules and routes of
        every table, per family."""
        ns = self.net.gateway

        def mangle(save: str) -> str:
            lines = self.net.run(ns, save, "-t", "mangle").stdout.splitlines()
            return "\n".join(line for line in lines if line.startswith("-A "))
        return {
            "mangle v4": mangle("iptables-legacy-save"),
            "mangle v6": mangle("ip6tables-legacy-save"),
            "rule v4": self.net.run(ns, "ip", "-4", "rule").stdout,
            "rule v6": self.net.run(ns, "ip", "-6", "rule").stdout,
            "route v4": self.net.run(ns, "ip", "-4", "route", "show", "table", "all").stdout,
            "route v6": self.net.run(ns, "ip", "-6", "route", "show", "table", "all").stdout,
        }

    def count(self, rules: dict[str, str], comment: str, mark: int, table: int) -> dict[str, int]:
        """How many of one node's mangle rules, policy rules and routes ``rules`` holds."""
        return {
            "mangle v4": rules["mangle v4"].count(f'"{comment}"'),
            "mangle v6": rules["mangle v6"].count(f'"{comment}"'),
            "rule v4": rules["rule v4"].count(f"fwmark {mark:#x} lookup {table}"),
            "rule v6": rules["rule v6"].count(f"fwmark {mark:#x} lookup {table}"),
            "route v4": rules["route v4"].count(f"local default dev lo table {table}"),
            "route v6": rules["route v6"].count(f"local default dev lo table {table}"),
        }

    def test_each_node_removes_only_its_own_rules(self):
        """Nodes with their own marks and tables: stopping one leaves every rule of the other."""
        before = self.rules()
        first, first_dir = self.start("first")
        config = os.path.join(self.workdir, "second.toml")
        with open(config, "w") as f:
            f.write("[client_ip]\nmark = 0x4871\ntable = 4871\n")
        second, second_dir = self.start("second", "--config", config)
        ones = {key: 1 for key in ("mangle v4", "mangle v6", "rule v4", "rule v6", "route v4", "route v6")}
        zeros = dict.fromkeys(ones, 0)
        first_comment = comment_for("node-local", first_dir)
        second_comment = comment_for("node-local", second_dir)
        self.assertNotEqual(first_comment, second_comment)
        running = self.rules()
        self.assertEqual(self.count(running, first_comment, 0x4870, 4870), ones)
        self.assertEqual(self.count(running, second_comment, 0x4871, 4871), ones)

        self.assertIn(netns.stop_process(first), netns.STOPPED_BY_SIGTERM)
        after_first = self.rules()
        self.assertEqual(self.count(after_first, first_comment, 0x4870, 4870), zeros)
        self.assertEqual(self.count(after_first, second_comment, 0x4871, 4871), ones)

        self.assertIn(netns.stop_process(second), netns.STOPPED_BY_SIGTERM)
        self.assertEqual(self.rules(), before)

    def test_nodes_sharing_the_default_mark_keep_the_routing_until_the_last_stops(self):
        """Two nodes of the same name on the default mark and table: the first stop takes only its
        own mangle rule; the policy rule and route both use go with the last one."""
        before = self.rules()
        first, first_dir = self.start("first")
        second, second_dir = self.start("second")
        first_comment = comment_for("node-local", first_dir)
        second_comment = comment_for("node-local", second_dir)
        running = self.rules()
        self.assertEqual(self.count(running, first_comment, 0x4870, 4870)["mangle v4"], 1)
        self.assertEqual(self.count(running, second_comment, 0x4870, 4870),
                         {"mangle v4": 1, "mangle v6": 1, "rule v4": 1, "rule v6": 1, "route v4": 1,
                          "route v6": 1})

        self.assertIn(netns.stop_process(first), netns.STOPPED_BY_SIGTERM)
        after_first = self.rules()
        self.assertEqual(self.count(after_first, second_comment, 0x4870, 4870),
                         {"mangle v4": 1, "mangle v6": 1, "rule v4": 1, "rule v6": 1, "route v4": 1,
                          "route v6": 1})
        self.assertNotIn(first_comment, after_first["mangle v4"] + after_first["mangle v6"])

        self.assertIn(netns.stop_process(second), netns.STOPPED_BY_SIGTERM)
        self.assertEqual(self.rules(), before)

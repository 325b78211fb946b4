"""Running under systemd: the unit files in contrib/systemd parse, their sockets carry the
names the node takes, and the node tells systemd when it is ready and when it stops
(sd_notify, hoodyproxy.notify) -- with a real twistd and a datagram socket standing in
for systemd's."""

from __future__ import annotations

import configparser
import glob
import os
import shutil
import signal
import socket
import tempfile
import subprocess
from unittest import skipIf

from twisted.trial import unittest

from hoodyproxy.notify import notify
from hoodyproxy.sockets import KINDS
from tests.test_process import REPO, TIMEOUT, TWISTD, ProcessTestCase

UNITS = os.path.join(REPO, "contrib", "systemd")
ANALYZE = shutil.which("systemd-analyze")
NO_ANALYZE = "systemd-analyze is not installed (Debian package systemd)" if ANALYZE is None else None


def _unit(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    with open(path) as f:
        parser.read_string(f.read())
    return parser


class UnitFileTests(unittest.SynchronousTestCase):

    @skipIf(NO_ANALYZE, NO_ANALYZE)
    def test_units_verify(self):
        """``systemd-analyze verify`` accepts every unit without a warning (the ExecStart
        program pointed at this machine's twistd: verify checks that it exists)."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        units = sorted(glob.glob(os.path.join(UNITS, "*.s*")))
        self.assertEqual(len(units), 6, units)
        for path in units:
            with open(path) as f:
                text = f.read().replace("/opt/hoodyproxy/venv/bin/twistd", TWISTD)
            with open(os.path.join(work, os.path.basename(path)), "w") as f:
                f.write(text)
        result = subprocess.run([ANALYZE, "verify", *sorted(glob.glob(os.path.join(work, "*")))],
                                capture_output=True, text=True, timeout=60, cwd=work)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""), result.stdout)

    def test_socket_units_name_what_the_node_takes(self):
        """Each socket unit names its descriptor after a kind the node takes (https, http,
        admin, http3), once each, and activates the socket variant of the service, which
        lists them all."""
        names = {}
        for path in glob.glob(os.path.join(UNITS, "*.socket")):
            socket_section = _unit(path)["Socket"]
            self.assertEqual(socket_section["Service"], "hoodyproxy-activated.service")
            names[socket_section["FileDescriptorName"]] = os.path.basename(path)
        self.assertEqual(sorted(names), sorted(KINDS))
        service = _unit(os.path.join(UNITS, "hoodyproxy-activated.service"))["Service"]
        self.assertEqual(sorted(service["Sockets"].split()), sorted(names.values()))

    def test_services_are_notify_with_the_capabilities_they_need(self):
        """Type=notify (readiness when the node serves), NotifyAccess=all (the next
        generation of a binary upgrade says MAINPID=), a non-root user, and only the
        capabilities each variant needs."""
        for name, caps in (("hoodyproxy.service", {"CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"}),
                           ("hoodyproxy-activated.service", {"CAP_NET_ADMIN"})):
            service = _unit(os.path.join(UNITS, name))["Service"]
            self.assertEqual((service["Type"], service["NotifyAccess"]), ("notify", "all"), name)
            self.assertEqual(service["User"], "hoodyproxy")
            self.assertEqual(set(service["AmbientCapabilities"].split()), caps, name)
            self.assertIn("--nodaemon", service["ExecStart"])


class NotifyTests(unittest.SynchronousTestCase):

    def listen(self, abstract: bool = False) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = f"hoodyproxy-test-{os.getpid()}-{id(sock)}"
            sock.bind("\0" + name)
            return sock, "@" + name
        # (a short directory of its own: a socket's path must fit in 108 bytes, and the
        # test's own temporary directory is as deep as the checkout)
        directory = tempfile.mkdtemp(prefix="hp-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "notify")
        sock.bind(path)
        return sock, path

    def test_one_datagram_of_lines(self):
        """The fields go as one datagram, one KEY=value a line."""
        sock, path = self.listen()
        self.assertTrue(notify("READY=1", "STATUS=serving", environ={"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=serving")

    def test_abstract_socket(self):
        """A NOTIFY_SOCKET starting with @ is in the abstract namespace."""
        sock, name = self.listen(abstract=True)
        self.assertTrue(notify("STOPPING=1", environ={"NOTIFY_SOCKET": name}))
        self.assertEqual(sock.recv(4096), b"STOPPING=1")

    def test_nothing_without_systemd(self):
        """No NOTIFY_SOCKET (not under systemd), or one nobody listens on: nothing sent, no error."""
        self.assertFalse(notify("READY=1", environ={}))
        self.assertFalse(notify("READY=1", environ={"NOTIFY_SOCKET": "/nonexistent/notify"}))


class ReadinessTests(ProcessTestCase):

    def test_ready_when_serving_and_stopping_when_draining(self):
        """Started with NOTIFY_SOCKET, the node says READY=1 once it serves, and
        STOPPING=1 when SIGTERM begins the drain."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        # (a short directory of its own: a socket's path must fit in 108 bytes, and the
        # test's own temporary directory is as deep as the checkout)
        directory = tempfile.mkdtemp(prefix="hp-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.settimeout(TIMEOUT)
        from tests.test_process import Twistd
        node = Twistd(self, self.data_dir(), env={"NOTIFY_SOCKET": path})
        self.assertIn(b"READY=1", sock.recv(4096).split(b"\n"))
        node.wait_ready()
        self.assertIn("hoodyproxy https listening", node.output())
        node.proc.send_signal(signal.SIGTERM)
        self.assertIn(b"STOPPING=1", sock.recv(4096).split(b"\n"))
        self.assertEqual(node.wait_exit(), -signal.SIGTERM)

"""README.rst's five-minute tour, replayed as printed.

The tour's literal blocks are read from README.rst (the ``::`` blocks of its "A
five-minute tour" section, in order) and run with bash the way a person pastes them:
the first block (``make run ...``) in a terminal of its own -- that is the node -- and
every other block into one second bash session, so that the variables and the
background job one block makes are there for the next.  A block's lines that start with
``{`` or ``<`` are what its commands print, and are compared with what they did print.
Every command of every block must succeed.

Only what a test machine forces is changed:

- ``make run`` is not run (it would install into the shared ``.venv``); ``make -n``
  says what it would run, and that is run, in a directory of the test's own whose
  ``.venv`` is a link to the checkout's (so ``.venv/bin/...`` and ``./data`` mean what
  they mean in the tour).
- As root, the whole tour runs in a network namespace of its own, on the printed ports,
  with the node in transparent mode as ``make run`` as root is: the test checks that the
  node says it installs netfilter rules and routes, and that its clean stop removes
  them.  Elsewhere the tour runs beside everything else on the machine, so free ports
  stand in for 8443, 8081 and 3000 in the blocks, and the node is told to listen on
  loopback and to leave the host's netfilter rules alone (``--client-ip-mode headers``).

Beyond what the tour prints, the test checks what it must never do: the sample service
serves a directory of its own, so ``GET /data/admin-token`` (or the CA's key) through the
gateway is a 404, and after the tour what it leaves in the checkout is ignored by git.

Everything the test starts -- the node, the session and its background job -- runs in a
process group of its own that the cleanup kills, and the namespace is removed.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

from twisted.trial import unittest

from tests import netns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.rst")
#: bound on every wait (a block, the node's start, its stop); never an assertion about speed
TIMEOUT = 30.0
CONTAINER = "890abcdef12345678901cdef"

_counter = itertools.count(1)


def missing_tools() -> str | None:
    for tool in ("bash", "make", "curl", "git"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command"
    if not os.path.exists(os.path.join(REPO, ".venv", "bin", "twistd")):
        return "needs the checkout's .venv (make venv)"
    return None


def tour_blocks(text: str) -> list[str]:
    """The literal blocks of the "A five-minute tour" section, dedented, in order."""
    lines = text.splitlines()
    start = lines.index("A five-minute tour")
    end = len(lines)
    for i in range(start + 2, len(lines)):
        if lines[i] and set(lines[i]) == {"="} and lines[i - 1].strip():
            end = i - 1
            break
    blocks, i = [], start + 2
    while i < end:
        if not lines[i].rstrip().endswith("::"):
            i += 1
            continue
        j = i + 1
        while j < end and not lines[j].strip():
            j += 1
        block = []
        while j < end and (not lines[j].strip() or lines[j].startswith("    ")):
            block.append(lines[j][4:])
            j += 1
        blocks.append("\n".join(block).strip("\n"))
        i = j
    return blocks


def split_output(block: str) -> tuple[str, list[str]]:
    """A block's commands, and the lines it shows them printing (those after the commands)."""
    lines = block.splitlines()
    for n, line in enumerate(lines):
        if line.startswith(("{", "<")):
            return "\n".join(lines[:n]), lines[n:]
    return block, []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop ``proc`` and everything in its process group (``sig``, then SIGKILL)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class Session:
    """One bash reading commands on its stdin, like a terminal: state carries over."""

    BANNER = "Serving HTTP on "  # what python3 -m http.server prints once it listens

    def __init__(self, case, cwd: str, env: dict, prefix: list[str]) -> None:
        self.case = case
        self.stderr_path = os.path.join(cwd, "..", "session-stderr.log")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen([*prefix, "bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, cwd=cwd, env=env,
                                         start_new_session=True, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.banners: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        case.addCleanup(self._close)
        case.addCleanup(kill_group, self.proc)  # first: cleanups run last-in, first-out

    def _close(self) -> None:
        # The reader ends when the group is gone (end of file); closing the pipe under a
        # reading thread would block on the reader's lock.
        self.reader.join(TIMEOUT)
        self.proc.stdin.close()
        if not self.reader.is_alive():
            self.proc.stdout.close()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def run(self, script: str) -> list[str]:
        """Run ``script``; the lines it printed.  Fails if any command in it failed."""
        marker = f"__done_{uuid.uuid4().hex}"
        # The ERR trap remembers a failing command anywhere in the script (not only the last).
        self.proc.stdin.write(f"__status=0\ntrap '__status=$?' ERR\n{script}\ntrap - ERR\n"
                              f"echo {marker} $__status\n")
        self.proc.stdin.flush()
        out, deadline = [], time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.case.fail(f"no end of {script!r} within {TIMEOUT}s; printed {out}\n{self.stderr()}")
            if line is None:
                self.case.fail(f"bash ended during {script!r}; printed {out}\n{self.stderr()}")
            if line.startswith(marker):
                status = int(line.split()[1])
                self.case.assertEqual(status, 0, f"a command of {script!r} failed ({status}); printed "
                                                 f"{out}\n{self.stderr()}")
                return out
            if line.startswith(self.BANNER):
                self.banners.append(line)  # the background server's, whenever it comes
            else:
                out.append(line)

    def wait_for_banner(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.banners:
            if time.monotonic() > deadline:
                self.case.fail(f"the sample service did not start:\n{self.stderr()}")
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is not None and line.startswith(self.BANNER):
                self.banners.append(line)


class TourTests(unittest.SynchronousTestCase):
    skip = missing_tools()

    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        self.tour_dir = os.path.join(self.home, "checkout")
        os.makedirs(self.tour_dir)
        os.symlink(os.path.join(REPO, ".venv"), os.path.join(self.tour_dir, ".venv"))
        self.prefix: list[str] = []
        self.namespace = None
        if netns.missing_requirements() is None:
            self.namespace = f"hpxtour{os.getpid()}n{next(_counter)}"
            subprocess.run(["ip", "netns", "add", self.namespace], check=True, timeout=TIMEOUT)
            self.addCleanup(subprocess.run, ["ip", "netns", "del", self.namespace], timeout=TIMEOUT)
            subprocess.run(["ip", "-n", self.namespace, "link", "set", "lo", "up"], check=True, timeout=TIMEOUT)
            self.prefix = ["ip", "netns", "exec", self.namespace]
            self.ports = {8443: 8443, 8081: 8081, 3000: 3000}
        else:
            self.ports = {printed: free_port() for printed in (8443, 8081, 3000)}
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("HOODYPROXY_") and key != "PYTHONPATH"}
        self.env["PYTHONUNBUFFERED"] = "1"  # a terminal sees http.server's banner at once; so should we
        # The tour's mktemp -d lands in this test's directory, which trial removes even when
        # the tour stops half-way.
        self.env["TMPDIR"] = os.path.join(self.home, "tmp")
        os.makedirs(self.env["TMPDIR"])

    def substitute(self, text: str) -> str:
        """The tour's text with this machine's ports (the printed ones in a namespace)."""
        for printed, port in self.ports.items():
            text = re.sub(rf"(?<![0-9]){printed}(?![0-9])", str(port), text)
        return text

    def start_node(self, block: str) -> tuple[subprocess.Popen, str]:
        """The first block, ``make run ARGS=...``, as make would run it."""
        words = shlex.split(block)
        self.assertEqual(words[:2], ["make", "run"], block)
        dry = subprocess.run(["make", "-n", "-B", "--no-print-directory", "-C", REPO, *words[1:]],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        commands = [line for line in dry.stdout.splitlines() if "twistd" in line]
        self.assertEqual(len(commands), 1, dry.stdout)
        self.assertNotIn("[test]", dry.stdout, "make run installs the test extras")
        command = commands[0]
        if self.namespace is None:
            # Beside everything else: loopback, free ports, and the host's netfilter rules left alone.
            command += (f" --https 127.0.0.1:{self.ports[8443]} --http 127.0.0.1:{free_port()}"
                        f" --admin 127.0.0.1:{self.ports[8081]} --client-ip-mode headers")
        log_path = os.path.join(self.home, "node.log")
        with open(log_path, "wb") as log:
            node = subprocess.Popen([*self.prefix, "bash", "-c", command], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.tour_dir, env=self.env,
                                    start_new_session=True)
        self.addCleanup(kill_group, node)
        netns.wait_for(log_path, re.escape("hoodyproxy audit log:"), node, timeout=TIMEOUT)
        return node, log_path

    def netfilter_state(self) -> str:
        """The namespace's legacy mangle rules and policy rules, both families."""
        out = []
        for command in (["iptables-legacy-save", "-t", "mangle"], ["ip6tables-legacy-save", "-t", "mangle"],
                        ["ip", "-4", "rule"], ["ip", "-6", "rule"]):
            out.append(subprocess.run([*self.prefix, *command], capture_output=True, text=True,
                                      timeout=TIMEOUT).stdout)
        return "\n".join(out)

    def test_the_tour_as_printed(self):
        """Every block of the tour runs as printed and prints what the README shows; the data
        directory is never served; the node's clean stop leaves nothing behind."""
        with open(README, encoding="utf-8") as f:
            blocks = tour_blocks(f.read())
        self.assertGreaterEqual(len(blocks), 7, blocks)
        node, log_path = self.start_node(blocks[0])
        if self.namespace is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                log = f.read()
            self.assertIn("client IP mode: transparent", log)
            self.assertIn("installed netfilter rules and routes", log)
            self.assertIn("a clean stop (SIGTERM, Ctrl-C) removes them", log)
            self.assertIn("hoodyproxy:node-local:", self.netfilter_state())

        session = Session(self, self.tour_dir, self.env, self.prefix)
        url = None
        for block in blocks[1:]:
            commands, expected = split_output(self.substitute(block))
            printed = session.run(commands)
            if "http.server" in commands:
                session.wait_for_banner()
            if expected and expected[0].startswith("<"):
                url = re.search(r"https://\S+/", commands).group(0)
                self.assertEqual(printed, expected, commands)
            elif expected:
                self.check_audit_line(session, commands, printed, expected)
                self.check_data_dir_is_not_served(session, url)
            if '"state": "stopped"' in commands:
                self.check_unavailable(session, url)
            if "containers list" in commands:
                self.assertNotIn(CONTAINER, "\n".join(printed))

        # The tour's last block stopped the sample service (a moment may pass before it is gone).
        self.assertTrue(any("kill %1" in block for block in blocks), "the tour never stops its sample service")
        probe = f"(exec 3<>/dev/tcp/127.0.0.1/{self.ports[3000]}) 2>/dev/null"
        self.assertEqual(session.run(f"for i in $(seq 100); do {probe} || break; sleep 0.1; done; "
                                     f"if {probe}; then echo still serving; fi"), [])
        self.check_checkout_ignores_what_the_tour_leaves()

        # Ctrl-C in the node's terminal.
        os.killpg(node.pid, signal.SIGINT)
        node.wait(TIMEOUT)
        if self.namespace is not None:
            state = self.netfilter_state()
            self.assertNotIn("hoodyproxy", state)
            self.assertNotIn("lookup 4870", state)

    def check_audit_line(self, session: Session, commands: str, printed: list[str], expected: list[str]) -> None:
        """The audit line printed in the README has the fields of a real one, with the same values
        but for the time and the duration."""
        deadline = time.monotonic() + TIMEOUT
        while not printed and time.monotonic() < deadline:  # the audit file is flushed every 0.1 s
            time.sleep(0.1)
            printed = session.run(commands)
        self.assertEqual(len(printed), 1, printed)
        real, shown = json.loads(printed[0]), json.loads(expected[0])
        self.assertEqual(list(real), list(shown))
        for key in ("time", "duration_ms"):
            real.pop(key)
            shown.pop(key)
        self.assertEqual(real, shown)

    def check_data_dir_is_not_served(self, session: Session, url: str) -> None:
        """Through the gateway, the sample service has no admin token and no CA key to give."""
        for path in ("data/admin-token", "data/tls/ca-key.pem", "admin-token", "tls/ca-key.pem",
                     "data/", ".venv/"):
            status = session.run(f"curl -s -o /dev/null -w '%{{http_code}}\\n' --cacert data/tls/ca.pem {url}{path}")
            self.assertEqual(status, ["404"], path)

    def check_unavailable(self, session: Session, url: str) -> None:
        """A stopped (then deleted) container: 503 with Retry-After."""
        head = session.run(f"curl -s -o /dev/null -D - --cacert data/tls/ca.pem {url}")
        self.assertRegex(head[0], r"^HTTP/\S+ 503")
        self.assertTrue(any(line.lower().startswith("retry-after:") for line in head), head)

    def check_checkout_ignores_what_the_tour_leaves(self) -> None:
        """``data/`` (secrets) and ``twistd.pid`` (while the node runs) would be in a checkout
        during the tour: git ignores them."""
        left = sorted(name for name in os.listdir(self.tour_dir) if name != ".venv")
        self.assertIn("data", left)
        self.assertIn("twistd.pid", left)
        for name in left + [".venv"]:
            path = name + "/" if os.path.isdir(os.path.join(self.tour_dir, name)) else name
            ignored = subprocess.run(["git", "-C", REPO, "check-ignore", "-q", "--no-index", path],
                                     timeout=TIMEOUT)
            self.assertEqual(ignored.returncode, 0, f"{path} is not ignored by git")

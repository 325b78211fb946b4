"""The ``hoodyproxy`` command finds a node by its data directory (``<data-dir>/admin.json``).

After ``make run ARGS='--data-dir ./data'`` the command, run in the same directory with
no option, used to read the token of the *default* data directory and get a 401.  A
started node now writes ``<data-dir>/admin.json`` (its admin API's URL and its token
file); the command reads it with ``--data-dir``, ``$HOODYPROXY_DATA_DIR`` or from
``./data``, and a 401 names the token it sent and how to point elsewhere.  Each test
starts a real node (:func:`tests.support.start_node`, admin API on an ephemeral port that
only ``admin.json`` tells) and runs the real command as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from hoodyproxy.admin.discovery import admin_document, admin_url_for, read_admin_file
from tests.support import start_node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "hoodyproxy")


class DataDirTestCase(unittest.TestCase):
    """A node with its data directory, a HOME of the test's own, and the command."""

    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="hoodyproxy-cli-home-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.node = start_node(self)
        self.data_dir = self.node.settings.data_dir

    def environment(self, extra: dict | None = None) -> dict:
        """No HOODYPROXY_* of the caller's; the default data directory is under the test's HOME."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HOODYPROXY_") and k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env.update(HOME=self.home, XDG_DATA_HOME=os.path.join(self.home, "share"),
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        env.update(extra or {})
        return env

    async def cli(self, *args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run the installed ``hoodyproxy`` script (else ``python -m hoodyproxy.admin.cli``)."""
        command = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "hoodyproxy.admin.cli"]
        return await deferToThread(subprocess.run, command + list(args), capture_output=True, text=True,
                                   env=self.environment(env), cwd=cwd or self.home, timeout=60)

    def assertListed(self, done: subprocess.CompletedProcess) -> None:
        """``containers list`` reached the node: exit 0, its (empty) live map on stdout."""
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        self.assertEqual(json.loads(done.stdout), {"containers": []})

    def assertOneLine(self, done: subprocess.CompletedProcess, status: int) -> str:
        """Exit ``status``, nothing on stdout, exactly one line on stderr (returned)."""
        self.assertEqual((done.returncode, done.stdout), (status, ""), done)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        return done.stderr.strip()


class AdminFileTests(DataDirTestCase):
    """What a started node writes."""

    def test_node_writes_admin_json(self):
        """``<data-dir>/admin.json``: the admin API's URL and the token file, mode 0600."""
        path = os.path.join(self.data_dir, "admin.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        document = read_admin_file(self.data_dir)
        self.assertEqual(document["url"], f"http://127.0.0.1:{self.node.admin_port}")
        self.assertEqual(document["token_file"], os.path.join(os.path.abspath(self.data_dir), "admin-token"))
        self.assertEqual((document["node"], document["pid"]), ("node-local", os.getpid()))

    def test_no_temporary_file_is_left(self):
        """The file is written under a temporary name and renamed: none of those is left."""
        self.assertEqual([name for name in os.listdir(self.data_dir) if name.startswith(".admin.json")], [])

    def test_config_token_is_not_written(self):
        """A token from the config is not copied to disk: ``token_file`` is null."""
        node = start_node(self, {"admin": {"token": "a-configured-admin-token-0123456789"}})
        document = read_admin_file(node.settings.data_dir)
        self.assertIsNone(document["token_file"])
        self.assertNotIn("a-configured-admin-token", json.dumps(document))

    def test_wildcard_listener_is_reached_on_loopback(self):
        """A node listening on every address is published at its loopback address."""
        self.assertEqual(admin_url_for("0.0.0.0", 8081), "http://127.0.0.1:8081")
        self.assertEqual(admin_url_for("::", 8081), "http://[::1]:8081")
        self.assertEqual(admin_url_for("::1", 9000), "http://[::1]:9000")


class FindTheNodeTests(DataDirTestCase):
    """The command reaches the node from its data directory alone."""

    async def test_data_dir_option(self):
        """``--data-dir DIR`` alone: the URL and the token come from DIR/admin.json."""
        self.assertListed(await self.cli("--data-dir", self.data_dir, "containers", "list"))

    async def test_data_dir_option_after_the_command(self):
        """``--data-dir`` may follow the command, like the other connection options."""
        self.assertListed(await self.cli("containers", "list", "--data-dir", self.data_dir))

    async def test_data_dir_environment(self):
        """``$HOODYPROXY_DATA_DIR`` alone is enough."""
        self.assertListed(await self.cli("containers", "list", env={"HOODYPROXY_DATA_DIR": self.data_dir}))

    async def test_data_in_the_current_directory(self):
        """Run where ``./data/admin.json`` is (``make run ARGS='--data-dir ./data'`` there): no option needed."""
        checkout = tempfile.mkdtemp(prefix="hoodyproxy-checkout-")
        self.addCleanup(shutil.rmtree, checkout, True)
        start_node(self, {"node": {"data_dir": os.path.join(checkout, "data")}})
        self.assertListed(await self.cli("containers", "list", cwd=checkout))

    async def test_options_still_win(self):
        """``--admin-url`` and ``--token`` win over what ``--data-dir`` would say."""
        other = start_node(self)
        done = await self.cli("--data-dir", self.data_dir, "--admin-url", f"http://127.0.0.1:{other.admin_port}",
                              "--token", other.token, "containers", "list")
        self.assertListed(done)

    async def test_config_token_needs_the_token(self):
        """A node whose token is in its config: the command says to give it, then uses admin.json's URL."""
        token = "a-configured-admin-token-0123456789"
        node = start_node(self, {"admin": {"token": token}})
        line = self.assertOneLine(await self.cli("--data-dir", node.settings.data_dir, "containers", "list"), 2)
        self.assertIn("takes it from its config", line)
        self.assertListed(await self.cli("--data-dir", node.settings.data_dir, "--token", token,
                                         "containers", "list"))


class WrongTokenTests(DataDirTestCase):
    """A 401 names the token the command sent and how to point it elsewhere."""

    async def test_stale_token_file_names_its_file(self):
        """Another node's token file (a data directory without admin.json, as a node of an
        older version or a default data directory leaves it): the 401 names the file, how
        it was chosen, and the ways out; never the token."""
        stale_dir = os.path.join(self.home, "stale")
        os.makedirs(stale_dir)
        with open(os.path.join(stale_dir, "admin-token"), "w") as f:
            f.write("the-token-of-another-node-0123456789\n")
        done = await self.cli("--admin-url", f"http://127.0.0.1:{self.node.admin_port}", "containers", "list",
                              env={"HOODYPROXY_DATA_DIR": stale_dir})
        line = self.assertOneLine(done, 1)
        self.assertTrue(line.startswith("hoodyproxy: 401 a valid admin bearer token is required (the token "
                                        f"sent: {os.path.join(stale_dir, 'admin-token')}, from $HOODYPROXY_DATA_DIR;"),
                        line)
        for way_out in ("--data-dir DIR", "set $HOODYPROXY_DATA_DIR", "--token"):
            self.assertIn(way_out, line)
        self.assertNotIn("the-token-of-another-node", line)

    async def test_wrong_environment_token_names_the_variable(self):
        """A wrong ``$HOODYPROXY_ADMIN_TOKEN``: the 401 says that is where the token came from."""
        done = await self.cli("containers", "list", env={
            "HOODYPROXY_ADMIN_URL": f"http://127.0.0.1:{self.node.admin_port}",
            "HOODYPROXY_ADMIN_TOKEN": "wrong-token-wrong-token"})
        line = self.assertOneLine(done, 1)
        self.assertIn("(the token sent: $HOODYPROXY_ADMIN_TOKEN;", line)

    async def test_stale_admin_json_says_the_node_may_be_gone(self):
        """An admin.json whose node is gone (killed: nothing listens at its url any more):
        exit 2, naming the file and asking if the node runs."""
        gone_dir = tempfile.mkdtemp(prefix="hoodyproxy-gone-")
        self.addCleanup(shutil.rmtree, gone_dir, True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        with open(os.path.join(gone_dir, "admin-token"), "w") as f:
            f.write("the-token-of-a-killed-node-0123456789\n")
        with open(os.path.join(gone_dir, "admin.json"), "w") as f:
            json.dump(admin_document(f"http://127.0.0.1:{closed_port}", os.path.join(gone_dir, "admin-token"),
                                     "node-local", 1), f)
        line = self.assertOneLine(await self.cli("--data-dir", gone_dir, "containers", "list"), 2)
        self.assertTrue(line.startswith("hoodyproxy: cannot reach the admin API at http://127.0.0.1:"), line)
        self.assertIn(os.path.join(gone_dir, "admin.json"), line)
        self.assertIn("still running", line)

    async def test_broken_admin_json_is_a_usage_error(self):
        """An admin.json that is not the node's document: exit 2 naming it, never a traceback."""
        broken = tempfile.mkdtemp(prefix="hoodyproxy-broken-")
        self.addCleanup(shutil.rmtree, broken, True)
        with open(os.path.join(broken, "admin.json"), "w") as f:
            f.write("{not json")
        line = self.assertOneLine(await self.cli("--data-dir", broken, "containers", "list"), 2)
        self.assertIn(os.path.join(broken, "admin.json"), line)

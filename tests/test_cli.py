"""Specification of the ``hoodyproxy`` command (:mod:`hoodyproxy.admin.cli`).

Every test starts a real node in this process (:func:`tests.support.start_node`) and runs
the real command as a subprocess, in a thread (``deferToThread``) so the reactor keeps
serving the admin API meanwhile.  What a command did is checked through the node's own
stores or over the admin API, never through the command's word alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import start_node

PROJECT = "67e89abc123def456789abcd"
OTHER_PROJECT = "0000000000000000000000aa"
CONTAINER = "890abcdef12345678901cdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OFFICE = '{"type":"ip","range":"203.0.113.0/24"}'
FULL = '{"terminal":true,"files":true,"display":true}'
PASSWORD = "correct horse battery staple"
TOKEN = "static-viewer-token-0123456789abcdef"
JWT_SECRET = "a-shared-hmac-secret-of-at-least-32-bytes!"
BIND_PASSWORD = "the-gateway-search-account-password"
SECRETS = (PASSWORD, TOKEN, JWT_SECRET, BIND_PASSWORD)

PROJECT_PATH = f"/api/v1/projects/{PROJECT}/proxy/permissions"
CONTAINER_PATH = f"/api/v1/containers/{CONTAINER}/proxy/permissions"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CLITestCase(unittest.TestCase):
    """A node, its admin URL, and helpers running the command against it."""

    def setUp(self) -> None:
        self.node = start_node(self)
        self.url = f"http://127.0.0.1:{self.node.admin_port}"
        self.home = tempfile.mkdtemp(prefix="hoodyproxy-cli-home-")
        self.addCleanup(shutil.rmtree, self.home, True)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    def environment(self, extra: dict | None = None) -> dict:
        """A clean environment: no HOODYPROXY_* of the caller's, a HOME of the test's own."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HOODYPROXY_") and k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env.update(HOME=self.home, XDG_DATA_HOME=os.path.join(self.home, "share"),
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        # Never the real default data directory: a test without a token source gets an empty one.
        env["HOODYPROXY_DATA_DIR"] = os.path.join(self.home, "data")
        env.update(extra or {})
        return env

    async def cli(self, *args: str, env: dict | None = None,
                  command: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run the command with exactly ``args``; the CompletedProcess (text)."""
        argv = (command or [sys.executable, "-m", "hoodyproxy.admin.cli"]) + list(args)
        return await deferToThread(subprocess.run, argv, capture_output=True, text=True,
                                   env=self.environment(env), timeout=60)

    async def invoke(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the command against this test's node (``--admin-url`` and ``--token`` given)."""
        return await self.cli("--admin-url", self.url, "--token", self.node.token, *args, env=env)

    async def ok(self, *args: str, env: dict | None = None):
        """Run against the node, expect exit 0 and nothing on stderr; the parsed stdout (or None)."""
        done = await self.invoke(*args, env=env)
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        return json.loads(done.stdout) if done.stdout else None

    def assertFailed(self, done: subprocess.CompletedProcess, status: int, line: str | None = None) -> str:
        """Exit ``status``, nothing on stdout, one line on stderr (``line`` if given), no traceback."""
        self.assertEqual(done.returncode, status, done)
        self.assertEqual(done.stdout, "", done)
        self.assertNotIn("Traceback", done.stderr)
        last = done.stderr.splitlines()[-1]
        if line is not None:
            self.assertEqual(done.stderr, line + "\n")
        return last

    async def api(self, method: str, path: str) -> tuple[int, object]:
        """Ask the admin API directly: (status, parsed body or None)."""
        response = await treq.request(method, self.url + path, agent=self.agent,
                                      headers={b"Authorization": [b"Bearer " + self.node.token.encode()]})
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    @property
    def store(self):
        return self.node.stack.permissions


class ProjectPermissionTests(CLITestCase):
    async def test_replace_the_issue_example(self):
        """The issue's own command stores the set; stdout is the API's JSON, indented."""
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}",
                              "--default", "deny")
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        expected = {"project": PROJECT, "groups": {"office": {"type": "ip", "ranges": ["203.0.113.0/24"]}},
                    "permissions": {"office": {"terminal": True, "files": True, "display": True}},
                    "default": "deny"}
        self.assertEqual(json.loads(done.stdout), expected)
        self.assertEqual(done.stdout, json.dumps(expected, indent=2) + "\n")
        pset = self.store.get("project", PROJECT)
        self.assertEqual((pset.scope, pset.default, dict(pset.groups["office"])),
                         ("project", "deny", {"type": "ip", "ranges": ["203.0.113.0/24"]}))
        self.assertEqual(await self.api("GET", PROJECT_PATH), (200, expected))

    async def test_replace_replaces_the_whole_set(self):
        """A second replace keeps nothing of the first; without --default the default is deny."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}", "--default", "allow")
        answer = await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                               "--groups", 'lab={"type":"ip","ranges":["10.0.0.0/8","fd00::/8"]}',
                               "--permissions", 'lab={"http":true}')
        self.assertEqual(answer["groups"], {"lab": {"type": "ip", "ranges": ["10.0.0.0/8", "fd00::/8"]}})
        pset = self.store.get("project", PROJECT)
        self.assertEqual((sorted(pset.groups), pset.default), (["lab"], "deny"))

    async def test_replace_with_nothing(self):
        """A replace naming no group stores an empty set (every request goes to the default)."""
        answer = await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                               "--default", "allow")
        self.assertEqual(answer, {"project": PROJECT, "groups": {}, "permissions": {}, "default": "allow"})

    async def test_get(self):
        """get prints the stored set."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office={OFFICE}", "--permissions", 'office={"files":"read"}')
        answer = await self.ok("projects", "proxy", "permissions", "get", "--project", PROJECT)
        self.assertEqual(answer["permissions"], {"office": {"files": "read"}})
        self.assertEqual(answer, (await self.api("GET", PROJECT_PATH))[1])

    async def test_get_missing(self):
        """get of a project without a set: exit 1 and the API's message."""
        done = await self.invoke("projects", "proxy", "permissions", "get", "--project", PROJECT)
        self.assertFailed(done, 1, "hoodyproxy: 404 no permission set for this project")

    async def test_patch_sets_and_removes_by_name(self):
        """patch: named groups and permissions set, --remove-* deleted, the others kept."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}",
                      "--groups", f'team={{"type":"token","value":"{TOKEN}"}}',
                      "--permissions", 'team={"files":"read"}')
        stored_team = dict(self.store.get("project", PROJECT).groups["office"])
        answer = await self.ok("projects", "proxy", "permissions", "patch", "--project", PROJECT,
                               "--groups", 'lab={"type":"ip","range":"10.0.0.0/8"}',
                               "--permissions", 'lab={"display":"view"}',
                               "--remove-group", "team", "--remove-permissions", "team",
                               "--default", "allow")
        self.assertEqual(sorted(answer["groups"]), ["lab", "office"])
        pset = self.store.get("project", PROJECT)
        self.assertEqual(sorted(pset.groups), ["lab", "office"])
        self.assertEqual(dict(pset.groups["office"]), stored_team)
        self.assertEqual({k: dict(v) for k, v in pset.permissions.items()},
                         {"office": {"terminal": True, "files": True, "display": True},
                          "lab": {"display": "view"}})
        self.assertEqual(pset.default, "allow")

    async def test_patch_only_the_default(self):
        """A patch with only --default changes only the default."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}")
        await self.ok("projects", "proxy", "permissions", "patch", "--project", PROJECT, "--default", "allow")
        pset = self.store.get("project", PROJECT)
        self.assertEqual((sorted(pset.groups), pset.default), (["office"], "allow"))

    async def test_patch_removing_a_group_still_granted(self):
        """Removing a group whose permissions stay is the API's 422, and changes nothing."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}")
        done = await self.invoke("projects", "proxy", "permissions", "patch", "--project", PROJECT,
                              "--remove-group", "office")
        self.assertFailed(done, 1, "hoodyproxy: 422 permissions.office: no such group (define it under 'groups')")
        self.assertEqual(sorted(self.store.get("project", PROJECT).groups), ["office"])

    async def test_patch_without_a_set(self):
        """patch with no stored set creates one from what it gives (the API's 201): exit 0."""
        answer = await self.ok("projects", "proxy", "permissions", "patch", "--project", PROJECT,
                               "--default", "allow")
        self.assertEqual((answer["groups"], answer["default"]), ({}, "allow"))
        self.assertEqual(self.store.get("project", PROJECT).default, "allow")

    async def test_patch_with_nothing_to_change(self):
        """A patch that changes nothing is a usage error (exit 2); nothing is sent."""
        done = await self.invoke("projects", "proxy", "permissions", "patch", "--project", PROJECT)
        last = self.assertFailed(done, 2)
        self.assertIn("nothing to change", last)

    async def test_patch_set_and_remove_same_name(self):
        """A name both given a value and removed is a usage error naming the option."""
        done = await self.invoke("projects", "proxy", "permissions", "patch", "--project", PROJECT,
                              "--groups", f"office={OFFICE}", "--remove-group", "office")
        self.assertIn("--remove-group", self.assertFailed(done, 2))

    async def test_delete(self):
        """delete removes the set (exit 0, nothing printed); a second delete is exit 1, 404."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}")
        done = await self.invoke("projects", "proxy", "permissions", "delete", "--project", PROJECT)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "", ""))
        self.assertIsNone(self.store.get("project", PROJECT))
        self.assertEqual((await self.api("GET", PROJECT_PATH))[0], 404)
        done = await self.invoke("projects", "proxy", "permissions", "delete", "--project", PROJECT)
        self.assertFailed(done, 1, "hoodyproxy: 404 no permission set for this project")


class ContainerPermissionTests(CLITestCase):
    async def test_replace(self):
        """A container-level replace stores a container set, which wins over the project's."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT, "--default", "allow")
        answer = await self.ok("containers", "proxy", "permissions", "replace", "--container", CONTAINER,
                               "--project", PROJECT, "--groups", f"office={OFFICE}",
                               "--permissions", f"office={FULL}", "--default", "deny")
        self.assertEqual((answer["project"], answer["container"], answer["default"]), (PROJECT, CONTAINER, "deny"))
        pset = self.store.get("container", CONTAINER)
        self.assertEqual((pset.scope, pset.project, pset.container), ("container", PROJECT, CONTAINER))
        self.assertEqual(self.store.effective(PROJECT, CONTAINER).scope, "container")
        self.assertEqual(await self.api("GET", CONTAINER_PATH), (200, answer))

    async def test_replace_needs_project(self):
        """A container-level replace without --project is a usage error naming it."""
        done = await self.invoke("containers", "proxy", "permissions", "replace", "--container", CONTAINER,
                              "--groups", f"office={OFFICE}")
        self.assertIn("--project", self.assertFailed(done, 2))
        self.assertIsNone(self.store.get("container", CONTAINER))

    async def test_replace_other_project_than_live_map(self):
        """A container in the live map refuses a set naming another project: the API's 422."""
        await self.ok("containers", "put", "--container", CONTAINER, "--project", OTHER_PROJECT,
                      "--address", "10.0.0.7")
        done = await self.invoke("containers", "proxy", "permissions", "replace", "--container", CONTAINER,
                              "--project", PROJECT)
        self.assertFailed(done, 1, "hoodyproxy: 422 project: is not the container's project")

    async def test_get_patch_delete(self):
        """get, patch (project kept when not given) and delete of a container set."""
        await self.ok("containers", "proxy", "permissions", "replace", "--container", CONTAINER,
                      "--project", PROJECT, "--groups", f"office={OFFICE}", "--permissions", f"office={FULL}")
        answer = await self.ok("containers", "proxy", "permissions", "get", "--container", CONTAINER)
        self.assertEqual(answer["permissions"], {"office": {"terminal": True, "files": True, "display": True}})
        answer = await self.ok("containers", "proxy", "permissions", "patch", "--container", CONTAINER,
                               "--permissions", 'office={"files":"read"}')
        self.assertEqual((answer["project"], answer["permissions"]), (PROJECT, {"office": {"files": "read"}}))
        self.assertEqual(dict(self.store.get("container", CONTAINER).permissions["office"]), {"files": "read"})
        await self.ok("containers", "proxy", "permissions", "delete", "--container", CONTAINER)
        self.assertIsNone(self.store.get("container", CONTAINER))
        done = await self.invoke("containers", "proxy", "permissions", "get", "--container", CONTAINER)
        self.assertFailed(done, 1, "hoodyproxy: 404 no permission set for this container")

    async def test_scopes_are_separate(self):
        """A project set is not shown as a container set of the same id."""
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT)
        done = await self.invoke("containers", "proxy", "permissions", "get", "--container", PROJECT)
        self.assertEqual(done.returncode, 1)


class ConnectionTests(CLITestCase):
    """Where the API and the token come from: flags, environment, data directory."""

    async def test_environment(self):
        """$HOODYPROXY_ADMIN_URL and $HOODYPROXY_ADMIN_TOKEN alone are enough."""
        done = await self.cli("containers", "list",
                              env={"HOODYPROXY_ADMIN_URL": self.url, "HOODYPROXY_ADMIN_TOKEN": self.node.token})
        self.assertEqual((done.returncode, json.loads(done.stdout)), (0, {"containers": []}), done)

    async def test_flags_win_over_environment(self):
        """--admin-url and --token win over a dead URL and a wrong token in the environment."""
        env = {"HOODYPROXY_ADMIN_URL": f"http://127.0.0.1:{closed_port()}",
               "HOODYPROXY_ADMIN_TOKEN": "wrong-token-wrong-token"}
        done = await self.cli("--admin-url", self.url, "--token", self.node.token, "containers", "list", env=env)
        self.assertEqual(done.returncode, 0, done)

    async def test_wrong_token_flag(self):
        """A wrong --token (the right one in the environment) is the API's 401: exit 1, naming --token."""
        done = await self.cli("--admin-url", self.url, "--token", "wrong-token-wrong-token", "containers", "list",
                              env={"HOODYPROXY_ADMIN_TOKEN": self.node.token})
        last = self.assertFailed(done, 1)
        self.assertEqual(len(done.stderr.splitlines()), 1)
        self.assertTrue(last.startswith("hoodyproxy: 401 a valid admin bearer token is required "
                                        "(the token sent: --token;"), last)

    async def test_token_from_data_dir(self):
        """--data-dir reads <dir>/admin-token (and wins over $HOODYPROXY_ADMIN_TOKEN)."""
        done = await self.cli("--admin-url", self.url, "--data-dir", self.node.data_dir, "containers", "list",
                              env={"HOODYPROXY_ADMIN_TOKEN": "wrong-token-wrong-token"})
        self.assertEqual(done.returncode, 0, done)

    async def test_token_from_default_data_dir(self):
        """With no token given, the default data directory's admin-token is used."""
        done = await self.cli("--admin-url", self.url, "containers", "list",
                              env={"HOODYPROXY_DATA_DIR": self.node.data_dir})
        self.assertEqual(done.returncode, 0, done)

    async def test_options_after_the_command(self):
        """The connection options may follow the command too."""
        done = await self.cli("containers", "list", "--admin-url", self.url, "--data-dir", self.node.data_dir)
        self.assertEqual(done.returncode, 0, done)
        done = await self.cli("projects", "proxy", "permissions", "get", "--project", PROJECT,
                              "--token", self.node.token, env={"HOODYPROXY_ADMIN_URL": self.url})
        self.assertFailed(done, 1, "hoodyproxy: 404 no permission set for this project")

    async def test_no_token_anywhere(self):
        """No --token, no environment token, no token file: exit 2, one line saying so."""
        done = await self.cli("--admin-url", self.url, "containers", "list")
        last = self.assertFailed(done, 2)
        self.assertEqual(len(done.stderr.splitlines()), 1)
        self.assertTrue(last.startswith("hoodyproxy: no admin token: cannot read "), last)

    async def test_unreachable(self):
        """Nothing listening: exit 2 with one line naming the URL, no traceback."""
        url = f"http://127.0.0.1:{closed_port()}"
        done = await self.cli("--admin-url", url, "--token", self.node.token, "containers", "list")
        last = self.assertFailed(done, 2)
        self.assertEqual(len(done.stderr.splitlines()), 1)
        self.assertTrue(last.startswith(f"hoodyproxy: cannot reach the admin API at {url}: "), last)

    async def test_proxy_environment_ignored(self):
        """http_proxy in the environment does not carry the admin token to a proxy."""
        env = {"http_proxy": f"http://127.0.0.1:{closed_port()}", "HTTP_PROXY": f"http://127.0.0.1:{closed_port()}"}
        done = await self.invoke("containers", "list", env=env)
        self.assertEqual(done.returncode, 0, done)

    async def test_bad_admin_url(self):
        """An admin URL that is not http(s) is a usage error."""
        done = await self.cli("--admin-url", "ftp://127.0.0.1/", "--token", "x", "containers", "list")
        self.assertIn("admin URL", self.assertFailed(done, 2))

    async def test_token_starting_with_a_dash(self):
        """A token that starts with '-' (one generated token in 64 does) is taken as --token's value."""
        node = start_node(self, {"admin": {"token": "-Dash-first-token-0123456789"}})
        url = f"http://127.0.0.1:{node.admin_port}"
        for args in (["--token", node.token, "containers", "list"],
                     ["containers", "list", "--token", node.token]):
            done = await self.cli("--admin-url", url, *args)
            self.assertEqual(done.returncode, 0, done)

    async def test_console_script(self):
        """The installed ``hoodyproxy`` script is this command."""
        script = os.path.join(os.path.dirname(sys.executable), "hoodyproxy")
        if not os.path.exists(script):
            raise unittest.SkipTest(f"{script} is not installed (pip install -e .)")
        done = await self.cli("--admin-url", self.url, "--token", self.node.token, "containers", "list",
                              command=[script])
        self.assertEqual((done.returncode, json.loads(done.stdout)), (0, {"containers": []}), done)


class RedactionTests(CLITestCase):
    async def test_secrets_never_printed(self):
        """replace, patch and get print every group redacted: no secret reaches stdout."""
        groups = {
            "admins": {"type": "password", "username": "alice", "password": PASSWORD},
            "viewer": {"type": "token", "value": TOKEN},
            "idp": {"type": "jwt", "secret": JWT_SECRET, "algorithms": ["HS256"]},
        }
        ldap = {"type": "ldap", "url": "ldap://ldap.example:389", "search_base": "ou=people,dc=example,dc=org",
                "search_filter": "(uid={username})", "bind_dn": "cn=gateway,dc=example,dc=org",
                "bind_password": BIND_PASSWORD}
        args = []
        for name, spec in groups.items():
            args += ["--groups", f"{name}={json.dumps(spec)}", "--permissions", f'{name}={{"files":"read"}}']
        outputs = [await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT, *args)]
        outputs.append(await self.invoke("projects", "proxy", "permissions", "patch", "--project", PROJECT,
                                      "--groups", f"staff={json.dumps(ldap)}"))
        outputs.append(await self.invoke("projects", "proxy", "permissions", "get", "--project", PROJECT))
        for done in outputs:
            self.assertEqual(done.returncode, 0, done)
            for secret in SECRETS:
                self.assertNotIn(secret, done.stdout + done.stderr)
        shown = json.loads(outputs[-1].stdout)["groups"]
        self.assertEqual(shown["admins"], {"type": "password", "username": "alice", "password": "***"})
        self.assertEqual(shown["viewer"], {"type": "token", "value": "***"})
        self.assertEqual(shown["idp"]["secret"], "***")
        self.assertEqual(shown["staff"]["bind_password"], "***")
        # The store kept a hash, not the clear password.
        stored = self.store.get("project", PROJECT).groups["admins"]
        self.assertNotIn(PASSWORD, json.dumps(dict(stored)))


class UsageErrorTests(CLITestCase):
    """Bad NAME=JSON values and ids are usage errors (exit 2) naming the option; nothing is sent."""

    async def test_api_error_is_one_line(self):
        """A 422: exit 1, ``hoodyproxy: 422 FIELD: problem`` on stderr, nothing stored."""
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--groups", 'office={"type":"ip","range":"nope"}')
        self.assertFailed(done, 1,
                          "hoodyproxy: 422 groups.office.range: must be an IPv4 or IPv6 address or CIDR range")
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_bad_json_in_groups(self):
        """Bad JSON in --groups: exit 2, the message names --groups and the group."""
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--groups", 'office={"type":"ip",')
        last = self.assertFailed(done, 2)
        self.assertIn("argument --groups: office: the value is not valid JSON", last)
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_bad_json_in_permissions(self):
        """Bad JSON in --permissions: exit 2 naming --permissions."""
        done = await self.invoke("containers", "proxy", "permissions", "patch", "--container", CONTAINER,
                              "--permissions", "office={files:true}")
        self.assertIn("argument --permissions: office:", self.assertFailed(done, 2))

    async def test_not_name_equals_json(self):
        """A value without NAME= is a usage error."""
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--groups", OFFICE)
        self.assertIn("argument --groups:", self.assertFailed(done, 2))

    async def test_name_given_twice(self):
        """The same name twice in --groups is a usage error."""
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--groups", f"office={OFFICE}", "--groups", f"office={OFFICE}")
        self.assertIn("argument --groups: office is given twice", self.assertFailed(done, 2))
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_json_from_file(self):
        """NAME=@FILE reads the JSON from FILE; a missing file is a usage error."""
        path = os.path.join(self.home, "office.json")
        with open(path, "w") as f:
            f.write(OFFICE)
        await self.ok("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                      "--groups", f"office=@{path}", "--permissions", f"office={FULL}")
        self.assertEqual(dict(self.store.get("project", PROJECT).groups["office"]),
                         {"type": "ip", "ranges": ["203.0.113.0/24"]})
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--groups", f"office=@{path}.missing")
        self.assertIn("argument --groups: office: cannot read", self.assertFailed(done, 2))

    async def test_bad_id(self):
        """An id that is not 24 lowercase hex digits is a usage error."""
        done = await self.invoke("projects", "proxy", "permissions", "get", "--project", "../containers")
        self.assertIn("argument --project:", self.assertFailed(done, 2))

    async def test_bad_default(self):
        """--default takes allow or deny only."""
        done = await self.invoke("projects", "proxy", "permissions", "replace", "--project", PROJECT,
                              "--default", "maybe")
        self.assertIn("argument --default", self.assertFailed(done, 2))


class ContainerTests(CLITestCase):
    """containers put, get, list and delete: the live map."""

    async def test_put_get_list_delete(self):
        answer = await self.ok("containers", "put", "--container", CONTAINER, "--project", PROJECT,
                               "--address", "10.0.0.7", "--state", "stopped",
                               "--port", "terminal=7681", "--port", "http-80=8080")
        expected = {"id": CONTAINER, "project": PROJECT, "address": "10.0.0.7", "state": "stopped",
                    "ports": {"terminal": 7681, "http-80": 8080}, "source": "admin"}
        self.assertEqual(answer, expected)
        stored = self.node.directory.lookup(CONTAINER)
        self.assertEqual((stored.project, stored.address, stored.state), (PROJECT, "10.0.0.7", "stopped"))
        self.assertEqual(await self.ok("containers", "get", "--container", CONTAINER), expected)
        self.assertEqual(await self.ok("containers", "list"), {"containers": [expected]})
        self.assertEqual(await self.ok("containers", "list", "--project", PROJECT), {"containers": [expected]})
        self.assertEqual(await self.ok("containers", "list", "--project", OTHER_PROJECT), {"containers": []})
        done = await self.invoke("containers", "delete", "--container", CONTAINER)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "", ""))
        self.assertIsNone(self.node.directory.lookup(CONTAINER))
        done = await self.invoke("containers", "get", "--container", CONTAINER)
        self.assertFailed(done, 1, "hoodyproxy: 404 no such container")

    async def test_force_over_a_provided_entry(self):
        """``--force`` sends ``?force=true``: without it a provider-owned entry is a 409."""
        from hoodyproxy.directory import Container
        self.node.directory.put(Container(CONTAINER, PROJECT, "10.9.9.9", source="docker"))
        put = ("containers", "put", "--container", CONTAINER, "--project", PROJECT, "--address", "10.0.0.7")
        self.assertIn("hoodyproxy: 409", self.assertFailed(await self.invoke(*put), 1))
        self.assertEqual(self.node.directory.lookup(CONTAINER).address, "10.9.9.9")
        self.assertEqual((await self.ok(*put, "--force"))["source"], "admin")
        self.node.directory.put(Container(CONTAINER, PROJECT, "10.9.9.9", source="docker"))
        delete = ("containers", "delete", "--container", CONTAINER)
        self.assertIn("hoodyproxy: 409", self.assertFailed(await self.invoke(*delete), 1))
        done = await self.invoke(*delete, "--force")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertIsNone(self.node.directory.lookup(CONTAINER))

    async def test_put_defaults_to_running(self):
        answer = await self.ok("containers", "put", "--container", CONTAINER, "--project", PROJECT,
                               "--address", "::1")
        self.assertEqual((answer["state"], answer["ports"]), ("running", {}))
        self.assertTrue(self.node.directory.lookup(CONTAINER).running)

    async def test_put_invalid_address(self):
        done = await self.invoke("containers", "put", "--container", CONTAINER, "--project", PROJECT,
                              "--address", "not-an-address")
        self.assertFailed(done, 1, "hoodyproxy: 422 address: must be an IPv4 or IPv6 address")
        self.assertIsNone(self.node.directory.lookup(CONTAINER))

    async def test_put_bad_port(self):
        done = await self.invoke("containers", "put", "--container", CONTAINER, "--project", PROJECT,
                              "--address", "10.0.0.7", "--port", "terminal=99999")
        self.assertIn("argument --port:", self.assertFailed(done, 2))

    async def test_put_needs_address(self):
        done = await self.invoke("containers", "put", "--container", CONTAINER, "--project", PROJECT)
        self.assertIn("--address", self.assertFailed(done, 2))


class ProxyCommandTests(CLITestCase):
    """``proxy create/list/get/delete`` and ``proxy domains add/list/delete``: aliases and domains.

    The command talks to a real AdminAPI with an alias store on loopback
    (:func:`tests.test_aliases.start_admin`), checked through that store.
    """

    def setUp(self) -> None:
        from types import SimpleNamespace

        from hoodyproxy.directory import Container
        from tests.test_aliases import TOKEN, start_admin
        self.url, self.directory, self.aliases = start_admin(self)
        self.node = SimpleNamespace(token=TOKEN)
        self.home = tempfile.mkdtemp(prefix="hoodyproxy-cli-home-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.directory.put(Container(CONTAINER, PROJECT, "10.0.0.7"))

    async def test_create_the_issue_example(self):
        """The issue's own command creates the alias; stdout is the API's 201 body."""
        answer = await self.ok("proxy", "create", "--container-id", CONTAINER, "--alias", "my-api",
                               "--program", "http", "--index", "3000")
        self.assertEqual(answer, {"alias": "my-api", "container_id": CONTAINER, "program": "http",
                                  "index": 3000, "url": "https://my-api.node-local.containers.localhost/"})
        self.assertEqual(self.aliases.resolve_alias("my-api"), (CONTAINER, "http", 3000))

    async def test_list_get_delete(self):
        await self.ok("proxy", "create", "--container-id", CONTAINER, "--alias", "my-api",
                      "--program", "http", "--index", "3000")
        await self.ok("proxy", "create", "--container-id", CONTAINER, "--alias", "shell",
                      "--program", "terminal", "--index", "1")
        listed = await self.ok("proxy", "list")
        self.assertEqual([a["alias"] for a in listed["aliases"]], ["my-api", "shell"])
        listed = await self.ok("proxy", "list", "--container-id", OTHER_PROJECT)
        self.assertEqual(listed, {"aliases": []})
        shown = await self.ok("proxy", "get", "--alias", "shell")
        self.assertEqual((shown["program"], shown["index"], shown["domains"]), ("terminal", 1, []))
        done = await self.invoke("proxy", "delete", "--alias", "shell")
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "", ""))
        self.assertIsNone(self.aliases.get("shell"))
        done = await self.invoke("proxy", "delete", "--alias", "shell")
        self.assertFailed(done, 1, "hoodyproxy: 404 no such alias")

    async def test_create_errors(self):
        """API errors are exit 1 with the API's message; usage errors exit 2, nothing sent."""
        done = await self.invoke("proxy", "create", "--container-id", CONTAINER, "--alias", "My-Api",
                                 "--program", "http", "--index", "3000")
        self.assertTrue(self.assertFailed(done, 1).startswith("hoodyproxy: 422 alias: "))
        done = await self.invoke("proxy", "create", "--container-id", CONTAINER, "--alias", "x",
                                 "--program", "http", "--index", "70000")
        self.assertFailed(done, 1, "hoodyproxy: 422 index: must be a port from 1 to 65535")
        done = await self.invoke("proxy", "create", "--container-id", "111111111111111111111111",
                                 "--alias", "x", "--program", "http", "--index", "80")
        self.assertFailed(done, 1, "hoodyproxy: 422 container_id: no such container in the live map")
        await self.ok("proxy", "create", "--container-id", CONTAINER, "--alias", "x", "--program", "http",
                      "--index", "8080")
        done = await self.invoke("proxy", "create", "--container-id", CONTAINER, "--alias", "x",
                                 "--program", "http", "--index", "8081")
        self.assertFailed(done, 1, "hoodyproxy: 409 alias: already exists on this node")
        done = await self.invoke("proxy", "create", "--container-id", CONTAINER, "--alias", "y",
                                 "--program", "http", "--index", "eighty")
        self.assertIn("argument --index", self.assertFailed(done, 2))
        done = await self.invoke("proxy", "create", "--container-id", CONTAINER, "--alias", "y",
                                 "--program", "http")
        self.assertIn("--index", self.assertFailed(done, 2))
        done = await self.invoke("proxy", "get", "--alias", "../containers")
        self.assertIn("argument --alias", self.assertFailed(done, 2))
        self.assertEqual([a.alias for a in self.aliases.list()], ["x"])

    async def test_domains(self):
        """domains add, list and delete; a domain attached twice is the API's 409."""
        await self.ok("proxy", "create", "--container-id", CONTAINER, "--alias", "my-api",
                      "--program", "http", "--index", "3000")
        answer = await self.ok("proxy", "domains", "add", "--alias", "my-api", "--domain", "api.yourcompany.com")
        self.assertEqual(answer, {"domain": "api.yourcompany.com", "alias": "my-api",
                                  "cname": "my-api.node-local.containers.localhost"})
        self.assertEqual(self.aliases.resolve_domain("api.yourcompany.com"), "my-api")
        listed = await self.ok("proxy", "domains", "list", "--alias", "my-api")
        self.assertEqual([d["domain"] for d in listed["domains"]], ["api.yourcompany.com"])
        done = await self.invoke("proxy", "domains", "add", "--alias", "my-api", "--domain", "api.yourcompany.com")
        self.assertFailed(done, 1, "hoodyproxy: 409 domain: already attached to this alias")
        done = await self.invoke("proxy", "domains", "add", "--alias", "my-api", "--domain", "*.yourcompany.com")
        self.assertFailed(done, 1, "hoodyproxy: 422 domain: must not be a wildcard")
        done = await self.invoke("proxy", "domains", "delete", "--alias", "my-api", "--domain", "api.yourcompany.com")
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "", ""))
        self.assertFalse(self.aliases.is_attached("api.yourcompany.com"))
        done = await self.invoke("proxy", "domains", "list", "--alias", "nope")
        self.assertFailed(done, 1, "hoodyproxy: 404 no such alias")
        done = await self.invoke("proxy", "domains", "add", "--alias", "my-api")
        self.assertIn("--domain", self.assertFailed(done, 2))

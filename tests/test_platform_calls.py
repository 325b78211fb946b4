"""The container platform's documented calls, verbatim, against a real node.

The platform talks to a node's admin API with fixed calls: it PATCHes whole permission
sets whether or not one is stored, uses short example tokens, and creates aliases with a
program and an *index* (``"program": "http", "index": 1``: its first HTTP service).  Each
test makes the exact call through the admin API of a node started by
:func:`tests.support.start_node` (and through the ``hoodyproxy`` command where the
platform's docs show it), then checks what the node stored or routed, never the answer
alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from hoodyproxy.access import PermissionStore
from hoodyproxy.aliases import target_advice
from hoodyproxy.config import DEFAULT_PROGRAMS
from hoodyproxy.directory import Container, open_database
from tests import backends
from tests.support import Backend, audit_lines, host_for, https_agent, start_node

PROJECT = "67e89abc123def456789abcd"
CONTAINER = "890abcdef12345678901cdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The platform's example token: 15 characters.
CI_TOKEN = "ci-secret-token"
#: The platform's documented body for a container's permission set, as it sends it.
PLATFORM_BODY = {"project": PROJECT, "container": CONTAINER,
                 "groups": {"ci": {"type": "token", "value": CI_TOKEN}},
                 "permissions": {"ci": {"terminal": True, "exec": True}},
                 "default": "deny"}
CONTAINER_PERMISSIONS = f"/api/v1/containers/{CONTAINER}/proxy/permissions"
PROJECT_PERMISSIONS = f"/api/v1/projects/{PROJECT}/proxy/permissions"
ALIASES = "/api/v1/proxy/aliases"
#: The platform's alias call: "the container's HTTP service".
PLATFORM_ALIAS = {"container_id": CONTAINER, "alias": "my-api", "program": "http", "index": 1}


class PlatformCallTestCase(unittest.TestCase):
    """A started node, and helpers to call its admin API and run the ``hoodyproxy`` command."""

    def setUp(self) -> None:
        self.node = start_node(self)
        self.admin = f"http://127.0.0.1:{self.node.admin_port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    async def api(self, method: str, path: str, body=None) -> tuple[int, object]:
        """One admin API call with the node's token: (status, parsed body or None)."""
        response = await treq.request(
            method, self.admin + path, agent=self.agent,
            headers={b"Authorization": [b"Bearer " + self.node.token.encode()]},
            data=json.dumps(body).encode() if body is not None else None)
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    async def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The ``hoodyproxy`` command against this node (``--admin-url`` and ``--token`` given)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOODYPROXY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "hoodyproxy.admin.cli", "--admin-url", self.admin,
                "--token", self.node.token, *args]
        return await deferToThread(subprocess.run, argv, capture_output=True, text=True, env=env, timeout=60)

    def stored_on_disk(self, scope: str, set_id: str):
        """The set as a fresh connection to the node's database reads it (what survives a crash)."""
        conn = open_database(os.path.join(self.node.settings.data_dir, "hoodyproxy.db"))
        self.addCleanup(conn.close)
        return PermissionStore(conn).get(scope, set_id)

    def register(self, ports: dict | None = None) -> Backend:
        """The orchestrator's part: a real HTTP service on loopback, registered as the container."""
        backend = Backend(self, backends.Headers())
        port_map = ports(backend.number) if callable(ports) else (ports or {})
        self.node.directory.put(Container(CONTAINER, PROJECT, "127.0.0.1", "running", port_map))
        return backend

    async def through_gateway(self, host: str, headers: dict | None = None):
        """GET / on ``host`` through the node's HTTPS port; (status, body bytes)."""
        response = await treq.get(f"https://{host}:{self.node.https_port}/", headers=headers or {},
                                  agent=https_agent(self, self.node, persistent=False))
        return response.code, await response.content()


class PatchCreatesTests(PlatformCallTestCase):
    """``PATCH .../proxy/permissions`` with a full body creates the set when there is none."""

    async def test_container_patch_creates_the_set(self):
        """The platform's exact container PATCH on a container with no set: 201, stored on disk."""
        status, answer = await self.api("PATCH", CONTAINER_PERMISSIONS, PLATFORM_BODY)
        self.assertEqual(status, 201, answer)
        self.assertEqual((answer["project"], answer["container"], answer["default"]),
                         (PROJECT, CONTAINER, "deny"))
        self.assertEqual(answer["permissions"], {"ci": {"terminal": True, "exec": True}})
        self.assertEqual([w["field"] for w in answer["warnings"]], ["groups.ci.value"])  # 15 characters
        stored = self.stored_on_disk("container", CONTAINER)
        self.assertEqual((stored.project, sorted(stored.groups), stored.default), (PROJECT, ["ci"], "deny"))

    async def test_second_patch_merges(self):
        """The same PATCH again, and one adding a group, merge into the stored set: 200."""
        await self.api("PATCH", CONTAINER_PERMISSIONS, PLATFORM_BODY)
        status, _ = await self.api("PATCH", CONTAINER_PERMISSIONS, PLATFORM_BODY)
        self.assertEqual(status, 200)
        status, answer = await self.api("PATCH", CONTAINER_PERMISSIONS, {
            "groups": {"office": {"type": "ip", "range": "203.0.113.0/24"}},
            "permissions": {"office": {"http": True}}})
        self.assertEqual(status, 200, answer)
        self.assertEqual(sorted(self.stored_on_disk("container", CONTAINER).groups), ["ci", "office"])

    async def test_project_patch_creates_the_set(self):
        """The project endpoint does the same: 201 on a project with no set, 200 after."""
        body = {key: value for key, value in PLATFORM_BODY.items() if key != "container"}
        status, answer = await self.api("PATCH", PROJECT_PERMISSIONS, body)
        self.assertEqual(status, 201, answer)
        self.assertEqual(sorted(self.stored_on_disk("project", PROJECT).groups), ["ci"])
        status, _ = await self.api("PATCH", PROJECT_PERMISSIONS, {"default": "allow"})
        self.assertEqual(status, 200)
        self.assertEqual(self.stored_on_disk("project", PROJECT).default, "allow")

    async def test_invalid_patch_creates_nothing(self):
        """A PATCH that is invalid as a whole set (no project at container level) is a 422, stores nothing."""
        body = {key: value for key, value in PLATFORM_BODY.items() if key != "project"}
        status, answer = await self.api("PATCH", CONTAINER_PERMISSIONS, body)
        self.assertEqual((status, answer["field"]), (422, "project"))
        self.assertIsNone(self.stored_on_disk("container", CONTAINER))

    async def test_created_set_governs_the_next_request(self):
        """After the 201, the container's terminal takes the platform's token and refuses others."""
        self.register(lambda port: {"terminal": port})
        await self.api("PATCH", CONTAINER_PERMISSIONS, PLATFORM_BODY)
        host = host_for("terminal", 1)
        status, _ = await self.through_gateway(host, {"Authorization": f"Bearer {CI_TOKEN}"})
        self.assertEqual(status, 200)
        self.assertEqual((await self.through_gateway(host))[0], 401)
        self.assertEqual((await self.through_gateway(host, {"Authorization": "Bearer not-the-token"}))[0], 403)

    async def test_cli_patch_creates_the_set(self):
        """``hoodyproxy containers proxy permissions patch`` with no set yet creates it: exit 0."""
        done = await self.cli("containers", "proxy", "permissions", "patch", "--container", CONTAINER,
                              "--project", PROJECT, "--groups", 'ci={"type":"token","value":"ci-secret-token"}',
                              "--permissions", 'ci={"terminal":true,"exec":true}', "--default", "deny")
        self.assertEqual(done.returncode, 0, done)
        self.assertEqual(json.loads(done.stdout)["permissions"], {"ci": {"terminal": True, "exec": True}})
        self.assertEqual(sorted(self.stored_on_disk("container", CONTAINER).groups), ["ci"])


class WeakTokenTests(PlatformCallTestCase):
    """A short or low-variety token is stored, with a warning naming its field."""

    def capture_log(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def test_platform_example_token_is_stored_with_a_warning(self):
        """The platform's 15-character token: 201, and ``warnings`` names ``groups.ci.value``."""
        status, answer = await self.api("PUT", CONTAINER_PERMISSIONS, PLATFORM_BODY)
        self.assertEqual(status, 201, answer)
        [warning] = answer["warnings"]
        self.assertEqual(warning["field"], "groups.ci.value")
        self.assertIn("15 characters", warning["message"])
        self.assertNotIn(CI_TOKEN, json.dumps(answer))
        self.assertEqual(sorted(self.stored_on_disk("container", CONTAINER).groups), ["ci"])

    async def test_warning_is_logged_once_without_the_token(self):
        """The node's log says it once, as a warning naming the field, and never holds the token."""
        events = self.capture_log()
        await self.api("PUT", CONTAINER_PERMISSIONS, PLATFORM_BODY)
        said = [e for e in events if e.get("field") == "groups.ci.value"]
        self.assertEqual(len(said), 1, [formatEvent(e) for e in said])
        self.assertEqual(said[0]["log_level"].name, "warn")
        self.assertFalse([e for e in events if CI_TOKEN in (formatEvent(e) or "")])

    async def test_low_variety_token_warns(self):
        """A long token of few distinct characters is stored with a warning too."""
        body = dict(PLATFORM_BODY, groups={"ci": {"type": "token", "value": "ab" * 20}})
        status, answer = await self.api("PUT", CONTAINER_PERMISSIONS, body)
        self.assertEqual(status, 201, answer)
        self.assertEqual([w["field"] for w in answer["warnings"]], ["groups.ci.value"])
        self.assertIn("distinct", answer["warnings"][0]["message"])

    async def test_random_token_has_no_warnings(self):
        """A long random token: no ``warnings`` key at all."""
        body = dict(PLATFORM_BODY, groups={"ci": {"type": "token", "value": "Zq3-x8Lw_e9Rt2Yu7Io4Pa1Sd6Fg0Hj5K"}})
        status, answer = await self.api("PUT", CONTAINER_PERMISSIONS, body)
        self.assertEqual(status, 201, answer)
        self.assertNotIn("warnings", answer)

    async def test_empty_token_is_refused(self):
        """An empty token is still a 422 naming ``groups.ci.value``; nothing is stored."""
        body = dict(PLATFORM_BODY, groups={"ci": {"type": "token", "value": ""}})
        status, answer = await self.api("PUT", CONTAINER_PERMISSIONS, body)
        self.assertEqual((status, answer["field"]), (422, "groups.ci.value"))
        self.assertIsNone(self.stored_on_disk("container", CONTAINER))

    async def test_cli_prints_the_warning_on_stderr(self):
        """The command stores the set (exit 0) and prints the warning, one line, on stderr."""
        done = await self.cli("containers", "proxy", "permissions", "replace", "--container", CONTAINER,
                              "--project", PROJECT, "--groups", 'ci={"type":"token","value":"ci-secret-token"}',
                              "--permissions", 'ci={"terminal":true,"exec":true}')
        self.assertEqual(done.returncode, 0, done)
        [line] = done.stderr.splitlines()
        self.assertTrue(line.startswith("hoodyproxy: warning: groups.ci.value: "), line)
        self.assertNotIn(CI_TOKEN, done.stderr + done.stdout)


class AliasIndexTests(PlatformCallTestCase):
    """``{"program": "http", "index": 1}``: the index of a port-indexed program is the port."""

    async def test_mapped_index_reaches_the_service(self):
        """With ``"ports": {"http-1": <port>}`` registered, the platform's alias reaches that port."""
        backend = Backend(self, backends.Headers())
        status, _ = await self.api("PUT", f"/api/v1/containers/{CONTAINER}", {
            "project": PROJECT, "address": "127.0.0.1", "state": "running",
            "ports": {"http-1": backend.number}})
        self.assertEqual(status, 201)
        status, answer = await self.api("POST", ALIASES, PLATFORM_ALIAS)
        self.assertEqual(status, 201, answer)
        self.assertNotIn("warnings", answer)
        status, body = await self.through_gateway("my-api.node-local.containers.localhost")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["uri"], "/")
        self.assertEqual(audit_lines(self.node)[-1]["route"]["index"], 1)  # the route, not the port
        status, _ = await self.through_gateway(host_for("http", 1))  # the long form maps alike
        self.assertEqual(status, 200)

    async def test_unmapped_index_warns_and_answers_502(self):
        """Without a mapping the alias is stored (201) with a warning saying how to map it,
        and a request goes to port 1, where nothing listens: 502."""
        self.register()
        status, answer = await self.api("POST", ALIASES, PLATFORM_ALIAS)
        self.assertEqual(status, 201, answer)
        [warning] = answer["warnings"]
        self.assertEqual(warning["field"], "index")
        self.assertIn('http-1 means port 1: register the container with "ports": {"http-1": <port>}',
                      warning["message"])
        status, _ = await self.through_gateway("my-api.node-local.containers.localhost")
        self.assertEqual(status, 502)

    async def test_program_level_mapping_counts(self):
        """``"ports": {"http": <port>}`` maps every http index: no warning."""
        self.register(lambda port: {"http": port})
        status, answer = await self.api("POST", ALIASES, PLATFORM_ALIAS)
        self.assertEqual(status, 201, answer)
        self.assertNotIn("warnings", answer)

    async def test_plausible_port_has_no_warning(self):
        """An index of 1024 or more is taken as the port it names: no warning."""
        self.register()
        status, answer = await self.api("POST", ALIASES, dict(PLATFORM_ALIAS, index=3000))
        self.assertEqual(status, 201, answer)
        self.assertNotIn("warnings", answer)

    async def test_instance_program_has_no_warning(self):
        """``terminal`` + 1 is instance 1 of the terminal program, not a port: no warning."""
        self.register()
        status, answer = await self.api("POST", ALIASES, dict(PLATFORM_ALIAS, program="terminal"))
        self.assertEqual(status, 201, answer)
        self.assertNotIn("warnings", answer)

    async def test_cli_prints_the_alias_warning(self):
        """``hoodyproxy proxy create ... --index 1`` stores the alias (exit 0), the warning on stderr."""
        self.register()
        done = await self.cli("proxy", "create", "--container-id", CONTAINER, "--alias", "my-api",
                              "--program", "http", "--index", "1")
        self.assertEqual(done.returncode, 0, done)
        [line] = done.stderr.splitlines()
        self.assertTrue(line.startswith("hoodyproxy: warning: index: http-1 means port 1"), line)
        self.assertEqual(self.node.stack.aliases.resolve_alias("my-api"), (CONTAINER, "http", 1))


class TargetAdviceTests(unittest.SynchronousTestCase):
    """:func:`hoodyproxy.aliases.target_advice`, the pure rule behind the alias warnings."""

    def test_container_not_in_the_live_map(self):
        """With no container to look at, a port-indexed target is advised on ``container_id``."""
        [(field, message)] = target_advice(None, DEFAULT_PROGRAMS["http"], 3000)
        self.assertEqual(field, "container_id")
        self.assertIn('"ports": {"http-3000": <port>}', message)

    def test_instance_programs_never(self):
        """Instance-indexed programs get no advice, known container or not."""
        self.assertEqual(target_advice(None, DEFAULT_PROGRAMS["terminal"], 1), [])

"""Specification of the rate-limit endpoints of the admin API and of their commands.

``/api/v1/projects/{id}/proxy/rate-limits`` and ``/api/v1/containers/{id}/proxy/rate-limits``
take ``PUT`` (replace), ``PATCH`` (merge), ``GET`` and ``DELETE``, like the permission
sets beside them.  Every test runs a real node (:func:`tests.support.start_node`) and
talks to its admin port over loopback; what an answer claims is checked through the
store, a second connection to the database, or the gateway's own behaviour.  Budgets at
the gateway are a few requests at one per minute, so nothing refills within a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from hoodyproxy.directory import open_database
from hoodyproxy.limits.store import RateLimitStore
from tests import backends
from tests.support import (CONTAINER, OTHER_PROJECT, PROJECT, Backend, audit_lines, host_for, register, start_node,
                           tls_exchange)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PATH = f"projects/{PROJECT}/proxy/rate-limits"
CONTAINER_PATH = f"containers/{CONTAINER}/proxy/rate-limits"
#: A container the live map does not hold.
UNKNOWN = "aaaaaaaaaaaaaaaaaaaaaaaa"

TWO_PER_MINUTE = {"rate": "1/min", "burst": 2}
TOKEN_A = "token-a-5f1e2d3c4b5a69788796a5b4c3d2e1f0"
TOKEN_B = "token-b-0f1e2d3c4b5a69788796a5b4c3d2e1f9"


def status_of(response: bytes) -> int:
    parts = response.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class NodeTestCase(unittest.TestCase):
    """A node with a backend registered as CONTAINER of PROJECT, and its admin API."""

    def setUp(self) -> None:
        self.node = start_node(self)
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.host = host_for(index=self.backend.number)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    async def api(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
        """Ask the admin API: (status, parsed body or None)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = await treq.request(method, f"http://127.0.0.1:{self.node.admin_port}/api/v1/{path}",
                                      agent=self.agent, data=data,
                                      headers={"Authorization": f"Bearer {self.node.token}"})
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    async def ok(self, method: str, path: str, body=None, status: int = 200):
        code, answer = await self.api(method, path, body)
        self.assertEqual(code, status, answer)
        return answer

    async def get(self, path: str, token: str | None = None) -> bytes:
        """One request through the gateway on a fresh connection; the raw response."""
        extra = f"Authorization: Bearer {token}\r\n" if token else ""
        payload = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}Connection: close\r\n\r\n".encode()
        return await deferToThread(tls_exchange, self.node, self.host, payload)

    async def statuses(self, name: str, count: int, token: str | None = None) -> list[int]:
        return [status_of(await self.get(f"/headers?{name}={n}", token)) for n in range(count)]

    def audit_for(self, path: str) -> dict:
        lines = [line for line in audit_lines(self.node) if line.get("path") == path]
        self.assertTrue(lines, f"no audit line for {path}")
        return lines[-1]

    @property
    def store(self) -> RateLimitStore:
        return self.node.stack.rate_limits


class ReplaceTests(NodeTestCase):
    """``PUT`` creates or replaces an entry whole; ``GET`` shows it; ``DELETE`` removes it."""

    async def test_put_creates_with_201_then_replaces_with_200(self):
        """The first PUT answers 201, the next 200; the second body replaces the first whole."""
        first = await self.ok("PUT", PROJECT_PATH, {"per_client": {"rate": "100/s", "burst": 200},
                                                    "per_project": {"rate": "50/s", "burst": 100}}, 201)
        self.assertEqual(first, {"scope": "project", "id": PROJECT, "project": PROJECT,
                                 "per_client": {"rate": "100/s", "burst": 200},
                                 "per_project": {"rate": "50/s", "burst": 100}, "dry_run": False})
        second = await self.ok("PUT", PROJECT_PATH, {"per_container": {"rate": "10/min", "burst": 5},
                                                     "dry_run": True})
        self.assertEqual(second, {"scope": "project", "id": PROJECT, "project": PROJECT,
                                  "per_container": {"rate": "10/min", "burst": 5}, "dry_run": True})
        self.assertEqual(await self.ok("GET", PROJECT_PATH), second)
        self.assertEqual(self.store.get("project", PROJECT).to_json(),
                         {"per_container": {"rate": "10/min", "burst": 5}, "dry_run": True})

    async def test_get_and_delete_without_an_entry_are_404(self):
        """No entry: GET and DELETE answer 404 naming the scope."""
        for method in ("GET", "DELETE"):
            code, answer = await self.api(method, CONTAINER_PATH)
            self.assertEqual((code, answer["error"]), (404, "not_found"))
            self.assertEqual(answer["message"], "no rate limits for this container")

    async def test_delete_removes_with_204(self):
        """DELETE answers 204 with no body, and the entry is gone from the store."""
        await self.ok("PUT", CONTAINER_PATH, {"per_container": TWO_PER_MINUTE}, 201)
        code, answer = await self.api("DELETE", CONTAINER_PATH)
        self.assertEqual((code, answer), (204, None))
        self.assertIsNone(self.store.get("container", CONTAINER))
        self.assertEqual((await self.api("GET", CONTAINER_PATH))[0], 404)

    async def test_put_back_what_get_shows(self):
        """GET's answer, scope, id and project included, is a body PUT accepts as it is."""
        shown = await self.ok("PUT", CONTAINER_PATH, {"per_program": {"terminal": {"rate": "10/s", "burst": 20}}},
                              201)
        self.assertEqual(await self.ok("PUT", CONTAINER_PATH, shown), shown)

    async def test_the_entry_is_durable(self):
        """After the 2xx, a second store on the database file (another process's view) has it."""
        await self.ok("PUT", CONTAINER_PATH, {"per_client": {"rate": "5/s", "burst": 10}}, 201)
        conn = open_database(os.path.join(self.node.data_dir, "hoodyproxy.db"))
        self.addCleanup(conn.close)
        other = RateLimitStore(conn)
        self.assertEqual(other.get("container", CONTAINER).to_json(),
                         {"per_client": {"rate": "5/s", "burst": 10}, "dry_run": False})
        self.assertEqual(other.project_of("container", CONTAINER), PROJECT)

    async def test_ids_methods_and_bodies(self):
        """An id that is not 24 hex digits is 404, POST is 405 with Allow, a body that is not
        JSON is 400, and JSON that is not an object is 422 ``rate_limits``."""
        code, _ = await self.api("GET", "projects/nothex/proxy/rate-limits")
        self.assertEqual(code, 404)
        response = await treq.request("POST", f"http://127.0.0.1:{self.node.admin_port}/api/v1/{PROJECT_PATH}",
                                      agent=self.agent, headers={"Authorization": f"Bearer {self.node.token}"})
        await response.content()
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, PUT, PATCH, DELETE"])
        code, answer = await self.api("PUT", PROJECT_PATH, raw=b"{not json")
        self.assertEqual((code, answer["error"]), (400, "bad_json"))
        code, answer = await self.api("PUT", PROJECT_PATH, [1, 2])
        self.assertEqual((code, answer["field"]), (422, "rate_limits"))

    async def test_no_token_is_401(self):
        """The endpoints need the admin token like every other."""
        response = await treq.get(f"http://127.0.0.1:{self.node.admin_port}/api/v1/{PROJECT_PATH}",
                                  agent=self.agent)
        await response.content()
        self.assertEqual(response.code, 401)


class ProjectOfContainerTests(NodeTestCase):
    """A container's entry is stored under its project, as a container's permission set is."""

    async def test_live_container_takes_its_project(self):
        """Without ``project``, a container in the live map is stored under its own project."""
        answer = await self.ok("PUT", CONTAINER_PATH, {"per_container": TWO_PER_MINUTE}, 201)
        self.assertEqual(answer["project"], PROJECT)
        self.assertEqual(self.store.project_of("container", CONTAINER), PROJECT)

    async def test_live_container_of_another_project_is_422(self):
        """Naming another project than the live map's is a 422 ``project``; nothing is stored."""
        for method in ("PUT", "PATCH"):
            code, answer = await self.api(method, CONTAINER_PATH, {"project": OTHER_PROJECT,
                                                                   "per_container": TWO_PER_MINUTE})
            self.assertEqual((code, answer["field"]), (422, "project"), answer)
            self.assertEqual(answer["message"], "project: is not the container's project")
        self.assertIsNone(self.store.get("container", CONTAINER))

    async def test_unknown_container_takes_the_body_project_or_none(self):
        """A container not in the live map: the body's project if any, else "" (kept by a
        later PATCH that names none)."""
        path = f"containers/{UNKNOWN}/proxy/rate-limits"
        self.assertEqual((await self.ok("PUT", path, {}, 201))["project"], "")
        self.assertEqual((await self.ok("PUT", path, {"project": OTHER_PROJECT}))["project"], OTHER_PROJECT)
        answer = await self.ok("PATCH", path, {"per_client": TWO_PER_MINUTE})
        self.assertEqual(answer["project"], OTHER_PROJECT)

    async def test_project_level_body_must_name_the_url_project(self):
        """At project level, ``project`` (optional) must be the URL's; a malformed one is 422 too."""
        code, answer = await self.api("PUT", PROJECT_PATH, {"project": OTHER_PROJECT})
        self.assertEqual((code, answer["field"], answer["message"]),
                         (422, "project", "project: does not match the URL"))
        code, answer = await self.api("PUT", PROJECT_PATH, {"project": "P"})
        self.assertEqual((code, answer["field"]), (422, "project"))
        code, answer = await self.api("PUT", PROJECT_PATH, {"scope": "container"})
        self.assertEqual((code, answer["field"]), (422, "scope"))


class PatchTests(NodeTestCase):
    """``PATCH`` merges: a key given replaces, ``null`` removes, ``per_program`` merges by program."""

    async def test_patch_with_nothing_stored_creates_with_201(self):
        """A PATCH where nothing is stored creates the entry (201), then merges into it (200)."""
        answer = await self.ok("PATCH", PROJECT_PATH, {"per_project": TWO_PER_MINUTE}, 201)
        self.assertEqual(answer["per_project"], TWO_PER_MINUTE)
        await self.ok("PATCH", PROJECT_PATH, {"dry_run": True}, 200)

    async def test_keys_given_replace_and_null_removes(self):
        """per_client is replaced, per_project removed, per_container kept as stored."""
        await self.ok("PUT", PROJECT_PATH, {"per_client": {"rate": "1/s", "burst": 1},
                                            "per_container": {"rate": "2/s", "burst": 2},
                                            "per_project": {"rate": "3/s", "burst": 3}, "dry_run": True}, 201)
        answer = await self.ok("PATCH", PROJECT_PATH, {"per_client": {"rate": "10/s", "burst": 10},
                                                       "per_project": None, "dry_run": None})
        self.assertEqual(answer, {"scope": "project", "id": PROJECT, "project": PROJECT,
                                  "per_client": {"rate": "10/s", "burst": 10},
                                  "per_container": {"rate": "2/s", "burst": 2}, "dry_run": False})
        self.assertEqual(self.store.get("project", PROJECT).to_json(),
                         {key: value for key, value in answer.items() if key not in ("scope", "id", "project")})

    async def test_per_program_merges_by_program(self):
        """A program given is set, a program given null removed, the others kept."""
        await self.ok("PUT", CONTAINER_PATH, {"per_program": {"terminal": {"rate": "1/s", "burst": 1},
                                                              "http-3000": {"rate": "2/s", "burst": 2}}}, 201)
        answer = await self.ok("PATCH", CONTAINER_PATH, {"per_program": {
            "http-3000": None, "files": {"rate": "3/s", "burst": 3}}})
        self.assertEqual(answer["per_program"], {"terminal": {"rate": "1/s", "burst": 1},
                                                 "files": {"rate": "3/s", "burst": 3}})
        answer = await self.ok("PATCH", CONTAINER_PATH, {"per_program": None})
        self.assertNotIn("per_program", answer)


class InvalidBodyTests(NodeTestCase):
    """A bad value is a 422 whose ``field`` is its dotted path; nothing is written."""

    async def assertInvalid(self, method: str, body, field: str) -> None:
        code, answer = await self.api(method, PROJECT_PATH, body)
        self.assertEqual((code, answer["error"], answer["field"]), (422, "invalid", field), answer)
        self.assertTrue(answer["message"].startswith(field + ": "), answer)

    async def test_bad_rate(self):
        """A rate that is not N/unit names ``rate_limits.per_client.rate``."""
        await self.assertInvalid("PUT", {"per_client": {"rate": "fast", "burst": 2}}, "rate_limits.per_client.rate")

    async def test_bad_burst(self):
        """A burst of 0 names ``rate_limits.per_container.burst``."""
        await self.assertInvalid("PUT", {"per_container": {"rate": "1/s", "burst": 0}},
                                 "rate_limits.per_container.burst")

    async def test_unknown_key(self):
        """An unknown key is named, in a PUT and in a PATCH (even with a null value)."""
        await self.assertInvalid("PUT", {"per_planet": TWO_PER_MINUTE}, "rate_limits.per_planet")
        await self.assertInvalid("PATCH", {"per_planet": None}, "rate_limits.per_planet")
        await self.assertInvalid("PUT", {"per_client": {"rate": "1/s", "burst": 1, "jitter": 2}},
                                 "rate_limits.per_client.jitter")

    async def test_bad_per_program_key(self):
        """A per_program key that is no program name names ``rate_limits.per_program``."""
        await self.assertInvalid("PUT", {"per_program": {"Terminal!": TWO_PER_MINUTE}}, "rate_limits.per_program")
        await self.assertInvalid("PATCH", {"per_program": {"Terminal!": None}}, "rate_limits.per_program")
        await self.assertInvalid("PUT", {"per_program": {"terminal": {"rate": "1/s"}}},
                                 "rate_limits.per_program.terminal.burst")

    async def test_invalid_patch_leaves_the_entry_as_it_was(self):
        """A PATCH refused with 422 changes nothing that was stored."""
        stored = await self.ok("PUT", PROJECT_PATH, {"per_client": TWO_PER_MINUTE}, 201)
        await self.assertInvalid("PATCH", {"per_client": None, "dry_run": "yes"}, "rate_limits.dry_run")
        self.assertEqual(await self.ok("GET", PROJECT_PATH), stored)


class GatewayEffectTests(NodeTestCase):
    """What the endpoints store governs the very next request through the gateway."""

    async def test_container_limit_refuses_the_third_request(self):
        """per_container 1/min, burst 2: the third request is a 429 audited ``container``."""
        await self.ok("PUT", CONTAINER_PATH, {"per_container": TWO_PER_MINUTE}, 201)
        self.assertEqual(await self.statuses("c", 3), [200, 200, 429])
        line = self.audit_for("/headers?c=2")
        self.assertEqual((line["status"], line["ratelimited"]), (429, "container"))

    async def test_project_limit_applies_to_a_container_without_an_entry(self):
        """A project's entry governs its containers that have none of their own."""
        await self.ok("PUT", PROJECT_PATH, {"per_project": TWO_PER_MINUTE}, 201)
        self.assertEqual(await self.statuses("p", 3), [200, 200, 429])
        self.assertEqual(self.audit_for("/headers?p=2")["ratelimited"], "project")

    async def test_container_entry_replaces_the_project_entry(self):
        """A container's entry replaces its project's whole: the project's burst of 1 no longer
        applies, the container's burst of 3 does."""
        await self.ok("PUT", PROJECT_PATH, {"per_container": {"rate": "1/min", "burst": 1}}, 201)
        await self.ok("PUT", CONTAINER_PATH, {"per_client": {"rate": "1/min", "burst": 3}}, 201)
        self.assertEqual(await self.statuses("r", 4), [200, 200, 200, 429])
        self.assertEqual(self.audit_for("/headers?r=3")["ratelimited"], "client")

    async def test_delete_lifts_the_limit_for_the_next_request(self):
        """Refused, then the entry is deleted: the next request passes."""
        await self.ok("PUT", CONTAINER_PATH, {"per_container": {"rate": "1/min", "burst": 1}}, 201)
        self.assertEqual(await self.statuses("d", 2), [200, 429])
        await self.ok("DELETE", CONTAINER_PATH, status=204)
        self.assertEqual(status_of(await self.get("/headers?after-delete")), 200)

    async def test_per_principal_limits_each_token_alone(self):
        """Two token groups, per_principal 1/min burst 2: token A is refused on its third
        request while token B still passes."""
        await self.ok("PUT", f"projects/{PROJECT}/proxy/permissions", {
            "groups": {"a": {"type": "token", "value": TOKEN_A}, "b": {"type": "token", "value": TOKEN_B}},
            "permissions": {"a": {"http": True}, "b": {"http": True}}, "default": "deny"}, 201)
        await self.ok("PUT", PROJECT_PATH, {"per_principal": TWO_PER_MINUTE}, 201)
        self.assertEqual(await self.statuses("a", 3, TOKEN_A), [200, 200, 429])
        self.assertEqual(self.audit_for("/headers?a=2")["ratelimited"], "principal")
        self.assertEqual(await self.statuses("b", 2, TOKEN_B), [200, 200])


class CommandTests(NodeTestCase):
    """``hoodyproxy {projects,containers} proxy rate-limits ...``, the real command in a subprocess."""

    async def invoke(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HOODYPROXY_") and k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        env["HOODYPROXY_DATA_DIR"] = self.node.data_dir
        argv = [sys.executable, "-m", "hoodyproxy.admin.cli",
                "--admin-url", f"http://127.0.0.1:{self.node.admin_port}", "--token", self.node.token, *args]
        return await deferToThread(subprocess.run, argv, capture_output=True, text=True, env=env, timeout=60)

    async def run_ok(self, *args: str):
        done = await self.invoke(*args)
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        return json.loads(done.stdout) if done.stdout else None

    async def test_replace_get_patch_delete(self):
        """replace stores what its options say, get shows it, patch merges, delete removes."""
        replaced = await self.run_ok("projects", "proxy", "rate-limits", "replace", "--project", PROJECT,
                                     "--per-client", "100/s:200", "--per-program", "terminal=10/s:20",
                                     "--per-program", "http-3000=5/min:3", "--dry-run")
        expected = {"scope": "project", "id": PROJECT, "project": PROJECT,
                    "per_client": {"rate": "100/s", "burst": 200},
                    "per_program": {"terminal": {"rate": "10/s", "burst": 20},
                                    "http-3000": {"rate": "5/min", "burst": 3}}, "dry_run": True}
        self.assertEqual(replaced, expected)
        self.assertEqual(self.store.get("project", PROJECT).to_json(),
                         {k: v for k, v in expected.items() if k not in ("scope", "id", "project")})
        self.assertEqual(await self.run_ok("projects", "proxy", "rate-limits", "get", "--project", PROJECT),
                         expected)
        patched = await self.run_ok("projects", "proxy", "rate-limits", "patch", "--project", PROJECT,
                                    "--per-project", "1000/s:2000", "--remove", "per-client",
                                    "--remove-program", "terminal", "--no-dry-run")
        self.assertEqual(patched, {"scope": "project", "id": PROJECT, "project": PROJECT,
                                   "per_project": {"rate": "1000/s", "burst": 2000},
                                   "per_program": {"http-3000": {"rate": "5/min", "burst": 3}}, "dry_run": False})
        done = await self.invoke("projects", "proxy", "rate-limits", "delete", "--project", PROJECT)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "", ""))
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_container_commands(self):
        """At container level the entry is the container's, stored under its live project."""
        answer = await self.run_ok("containers", "proxy", "rate-limits", "replace", "--container", CONTAINER,
                                   "--per-container", "1/min:2")
        self.assertEqual((answer["scope"], answer["id"], answer["project"]), ("container", CONTAINER, PROJECT))
        self.assertEqual(self.store.get("container", CONTAINER).to_json(),
                         {"per_container": TWO_PER_MINUTE, "dry_run": False})
        await self.run_ok("containers", "proxy", "rate-limits", "patch", "--container", CONTAINER,
                          "--per-principal", "10/s:20")
        self.assertEqual(self.store.get("container", CONTAINER).per_principal.burst, 20)

    async def test_an_invalid_value_prints_the_api_message_and_field(self):
        """The API's 422 is one line on stderr, starting with the field; exit status 1."""
        done = await self.invoke("projects", "proxy", "rate-limits", "replace", "--project", PROJECT,
                                 "--per-client", "fast:2")
        self.assertEqual((done.returncode, done.stdout), (1, ""), done)
        self.assertTrue(done.stderr.startswith("hoodyproxy: 422 rate_limits.per_client.rate: "), done.stderr)
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_usage_errors(self):
        """A limit that is not RATE:BURST, or a patch with nothing to change: exit 2, naming it."""
        done = await self.invoke("projects", "proxy", "rate-limits", "replace", "--project", PROJECT,
                                 "--per-client", "100/s")
        self.assertEqual(done.returncode, 2, done)
        self.assertIn("--per-client", done.stderr)
        self.assertIn("RATE:BURST", done.stderr)
        done = await self.invoke("projects", "proxy", "rate-limits", "patch", "--project", PROJECT)
        self.assertEqual(done.returncode, 2, done)
        self.assertIn("nothing to change", done.stderr)

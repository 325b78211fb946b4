"""Specification of the permission endpoints of the admin API, over real HTTP on loopback.

``/api/v1/projects/{id}/proxy/permissions`` and ``/api/v1/containers/{id}/proxy/permissions``
take ``PUT`` (replace), ``PATCH`` (merge), ``GET`` (redacted) and ``DELETE``.  Each test
starts a node (for its live map and data directory) and serves an :class:`AdminAPI` with a
:class:`PermissionStore` on the node's database on a loopback port of its own.
"""

from __future__ import annotations

import json
import os

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from hoodyproxy.access import PermissionStore
from hoodyproxy.admin.api import AdminAPI
from hoodyproxy.directory import Container, open_database
from tests.support import start_node
from tests.test_access_model import CONTAINER, OFFICE, OTHER_PROJECT, PROJECT, TEAM, registry

PROJECT_URL = f"/api/v1/projects/{PROJECT}/proxy/permissions"
CONTAINER_URL = f"/api/v1/containers/{CONTAINER}/proxy/permissions"

BODY = {"groups": {"office": OFFICE, "team": TEAM},
        "permissions": {"office": {"files": "read"}, "team": {"files": True, "terminal": True}},
        "default": "deny"}
REDACTED = {"project": PROJECT, "groups": {"office": OFFICE, "team": {"type": "token"}},
            "permissions": BODY["permissions"], "default": "deny"}


class PermissionsAPITestCase(unittest.TestCase):
    """A node, plus an AdminAPI with a permission store served on its own loopback port."""

    def setUp(self) -> None:
        self.node = start_node(self)
        self.db_path = os.path.join(self.node.data_dir, "hoodyproxy.db")
        self.registry = registry()
        self.store = PermissionStore(self.connect(), self.registry)
        self.base = self.serve(AdminAPI(self.node.directory, self.node.token,
                                        permissions=self.store, registry=self.registry))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    def connect(self):
        conn = open_database(self.db_path)
        self.addCleanup(conn.close)
        return conn

    def serve(self, api: AdminAPI) -> str:
        site = Site(api)
        site.log = lambda request: None
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def second_store(self) -> PermissionStore:
        """A store on a new connection to the same file: what another process would see."""
        return PermissionStore(self.connect(), self.registry)

    async def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                      authorized: bool = True, base: str | None = None):
        """Send one request; returns (response, parsed JSON body or None)."""
        headers = {b"Authorization": [b"Bearer " + self.node.token.encode()]} if authorized else {}
        data = raw if body is None else json.dumps(body).encode()
        response = await treq.request(method, (base or self.base) + path, data=data, headers=headers,
                                      agent=self.agent)
        content = await response.content()
        if response.code == 204:
            self.assertEqual(content, b"")
            return response, None
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response, json.loads(content)

    async def assertInvalid(self, method: str, path: str, body, field: str) -> dict:
        """The request is a 422 whose body names ``field`` (and its message starts with it)."""
        response, answer = await self.request(method, path, body)
        self.assertEqual(response.code, 422, answer)
        self.assertEqual(answer["error"], "invalid")
        self.assertEqual(answer["field"], field, answer)
        self.assertTrue(answer["message"].startswith(field + ": "), answer)
        return answer


class PutTests(PermissionsAPITestCase):
    async def test_put_creates(self):
        """PUT of a new project set answers 201 with the set, redacted."""
        response, answer = await self.request("PUT", PROJECT_URL, BODY)
        self.assertEqual(response.code, 201, answer)
        self.assertEqual(answer, REDACTED)

    async def test_put_replaces(self):
        """A second PUT answers 200 and replaces the whole set."""
        await self.request("PUT", PROJECT_URL, BODY)
        response, answer = await self.request("PUT", PROJECT_URL, {"default": "allow"})
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(answer, {"project": PROJECT, "groups": {}, "permissions": {}, "default": "allow"})

    async def test_put_applies_to_next_request(self):
        """After the 2xx the store the gateway reads already answers with the new set."""
        await self.request("PUT", PROJECT_URL, BODY)
        self.assertEqual(self.store.effective(PROJECT, CONTAINER).default, "deny")
        self.assertEqual(sorted(self.store.effective(PROJECT, CONTAINER).groups), ["office", "team"])

    async def test_put_durable(self):
        """Right after the 2xx, another connection to the database file sees the set."""
        await self.request("PUT", PROJECT_URL, BODY)
        pset = self.second_store().get("project", PROJECT)
        self.assertEqual(sorted(pset.permissions), ["office", "team"])

    async def test_put_stores_no_secret(self):
        """The token's secret is not in the database file's row (only its salted hash)."""
        await self.request("PUT", PROJECT_URL, BODY)
        conn = self.connect()
        (body,) = conn.execute("SELECT body FROM permission_sets").fetchone()
        self.assertNotIn(TEAM["token"], body)
        self.assertIn("sha256", body)

    async def test_container_put(self):
        """A container-level PUT naming its project answers 201 with project and container."""
        response, answer = await self.request("PUT", CONTAINER_URL, dict(BODY, project=PROJECT))
        self.assertEqual(response.code, 201, answer)
        self.assertEqual((answer["project"], answer["container"]), (PROJECT, CONTAINER))
        self.assertEqual(self.store.effective(PROJECT, CONTAINER).scope, "container")

    async def test_container_put_matching_live_map(self):
        """A container in the live map may get a set naming its own project."""
        self.node.directory.put(Container(CONTAINER, PROJECT, "10.0.0.1"))
        response, answer = await self.request("PUT", CONTAINER_URL, dict(BODY, project=PROJECT))
        self.assertEqual(response.code, 201, answer)

    async def test_container_put_other_project_than_live_map(self):
        """A container in the live map refuses a set naming another project: 422 ``project``."""
        self.node.directory.put(Container(CONTAINER, OTHER_PROJECT, "10.0.0.1"))
        await self.assertInvalid("PUT", CONTAINER_URL, dict(BODY, project=PROJECT), "project")
        self.assertIsNone(self.store.get("container", CONTAINER))

    async def test_scopes_are_separate(self):
        """A project set is not the container set of the same id, nor the reverse."""
        await self.request("PUT", PROJECT_URL, BODY)
        response, _ = await self.request("GET", f"/api/v1/containers/{PROJECT}/proxy/permissions")
        self.assertEqual(response.code, 404)


class InvalidBodyTests(PermissionsAPITestCase):
    """An invalid body is a 422 naming the bad field, and stores nothing."""

    async def test_error_body_shape(self):
        """The 422 body is ``{"error": "invalid", "message": "FIELD: problem", "field": FIELD}``."""
        body = dict(BODY, groups={"office": {"type": "ip", "range": "nope"}, "team": TEAM})
        answer = await self.assertInvalid("PUT", PROJECT_URL, body, "groups.office.range")
        self.assertEqual(set(answer), {"error", "message", "field"})
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_bad_level(self):
        """A level the capability does not have: 422 ``permissions.office.files``."""
        await self.assertInvalid("PUT", PROJECT_URL, dict(BODY, permissions={"office": {"files": "view"}}),
                                 "permissions.office.files")

    async def test_undefined_group(self):
        """Permissions for an undefined group: 422 ``permissions.ghost``."""
        await self.assertInvalid("PUT", PROJECT_URL, dict(BODY, permissions={"ghost": {"files": True}}),
                                 "permissions.ghost")

    async def test_unknown_group_type(self):
        """An unknown group type: 422 ``groups.office.type``."""
        await self.assertInvalid("PUT", PROJECT_URL, {"groups": {"office": {"type": "kerberos"}}},
                                 "groups.office.type")

    async def test_bad_default(self):
        """A bad ``default``: 422 ``default``."""
        await self.assertInvalid("PUT", PROJECT_URL, dict(BODY, default="maybe"), "default")

    async def test_container_without_project(self):
        """A container-level PUT without ``project``: 422 ``project``."""
        await self.assertInvalid("PUT", CONTAINER_URL, BODY, "project")

    async def test_container_mismatch(self):
        """A container-level body naming another container: 422 ``container``."""
        await self.assertInvalid("PUT", CONTAINER_URL, dict(BODY, project=PROJECT, container=OTHER_PROJECT),
                                 "container")

    async def test_project_mismatch(self):
        """A project-level body naming another project: 422 ``project``."""
        await self.assertInvalid("PUT", PROJECT_URL, dict(BODY, project=OTHER_PROJECT), "project")

    async def test_not_an_object(self):
        """A body that is not an object (or none): 422 ``body``."""
        await self.assertInvalid("PUT", PROJECT_URL, [1, 2], "body")
        await self.assertInvalid("PUT", PROJECT_URL, None, "body")

    async def test_bad_json(self):
        """A body that is not JSON: 400."""
        response, answer = await self.request("PUT", PROJECT_URL, raw=b"{nope")
        self.assertEqual((response.code, answer["error"]), (400, "bad_json"))


class GetDeleteTests(PermissionsAPITestCase):
    async def test_get_redacted(self):
        """GET shows the set with secrets and hashes redacted."""
        await self.request("PUT", PROJECT_URL, BODY)
        response, answer = await self.request("GET", PROJECT_URL)
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, REDACTED)
        self.assertNotIn("sha256", json.dumps(answer))

    async def test_get_missing(self):
        """GET of a project without a set: 404."""
        response, answer = await self.request("GET", PROJECT_URL)
        self.assertEqual((response.code, answer["error"]), (404, "not_found"))

    async def test_get_sees_other_writers(self):
        """GET answers what another process stored a moment ago."""
        await self.request("PUT", PROJECT_URL, BODY)
        from hoodyproxy.access import parse_permission_set
        self.second_store().put(parse_permission_set({"default": "allow"}, "project", PROJECT, self.registry))
        _, answer = await self.request("GET", PROJECT_URL)
        self.assertEqual(answer["default"], "allow")

    async def test_delete(self):
        """DELETE answers 204; the set is gone, for this store and on disk."""
        await self.request("PUT", CONTAINER_URL, dict(BODY, project=PROJECT))
        response, _ = await self.request("DELETE", CONTAINER_URL)
        self.assertEqual(response.code, 204)
        self.assertIsNone(self.store.effective(PROJECT, CONTAINER))
        self.assertIsNone(self.second_store().get("container", CONTAINER))
        response, _ = await self.request("GET", CONTAINER_URL)
        self.assertEqual(response.code, 404)

    async def test_delete_missing(self):
        """DELETE of a set that does not exist: 404."""
        response, answer = await self.request("DELETE", PROJECT_URL)
        self.assertEqual((response.code, answer["error"]), (404, "not_found"))


class PatchTests(PermissionsAPITestCase):
    async def test_patch_missing(self):
        """PATCH before any PUT creates the set (merged into empty): 201, stored."""
        response, answer = await self.request("PATCH", PROJECT_URL, {"default": "allow"})
        self.assertEqual((response.code, answer["default"], answer["groups"]), (201, "allow", {}))
        self.assertEqual(self.store.get("project", PROJECT).default, "allow")

    async def test_patch_merges(self):
        """PATCH adds groups and permissions by name and keeps the rest; answers 200 redacted."""
        await self.request("PUT", PROJECT_URL, BODY)
        lab = {"type": "ip", "range": "192.168.0.0/16"}
        response, answer = await self.request("PATCH", PROJECT_URL, {
            "groups": {"lab": lab}, "permissions": {"lab": {"display": "view"}}})
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(answer["groups"], dict(REDACTED["groups"], lab=lab))
        self.assertEqual(answer["permissions"], dict(BODY["permissions"], lab={"display": "view"}))

    async def test_patch_null_deletes(self):
        """``null`` deletes a group and its permissions."""
        await self.request("PUT", PROJECT_URL, BODY)
        _, answer = await self.request("PATCH", PROJECT_URL, {"groups": {"office": None},
                                                              "permissions": {"office": None}})
        self.assertEqual((list(answer["groups"]), list(answer["permissions"])), (["team"], ["team"]))

    async def test_patch_keeps_stored_hash(self):
        """Groups a PATCH does not name keep their stored hash (not hashed again)."""
        await self.request("PUT", PROJECT_URL, BODY)
        before = self.second_store().get("project", PROJECT).groups["team"]
        await self.request("PATCH", PROJECT_URL, {"default": "allow"})
        after = self.second_store().get("project", PROJECT)
        self.assertEqual((after.groups["team"], after.default), (before, "allow"))

    async def test_patch_invalid_result(self):
        """A PATCH leaving permissions for a deleted group: 422 ``permissions.office``, nothing changed."""
        await self.request("PUT", PROJECT_URL, BODY)
        await self.assertInvalid("PATCH", PROJECT_URL, {"groups": {"office": None}}, "permissions.office")
        self.assertIn("office", self.second_store().get("project", PROJECT).groups)

    async def test_patch_durable(self):
        """Right after a PATCH's 2xx, another connection sees the merged set."""
        await self.request("PUT", PROJECT_URL, BODY)
        await self.request("PATCH", PROJECT_URL, {"permissions": {"office": {"files": "write"}}})
        self.assertEqual(self.second_store().get("project", PROJECT).permissions["office"]["files"], "write")

    async def test_container_patch_checks_live_map(self):
        """A container-level PATCH is refused if the set's project is not the live container's."""
        await self.request("PUT", CONTAINER_URL, dict(BODY, project=PROJECT))
        self.node.directory.put(Container(CONTAINER, OTHER_PROJECT, "10.0.0.1"))
        await self.assertInvalid("PATCH", CONTAINER_URL, {"default": "allow"}, "project")


class EndpointTests(PermissionsAPITestCase):
    async def test_needs_admin_token(self):
        """Without the admin token: 401, and nothing is stored."""
        response, answer = await self.request("PUT", PROJECT_URL, BODY, authorized=False)
        self.assertEqual((response.code, answer["error"]), (401, "unauthorized"))
        self.assertIsNone(self.store.get("project", PROJECT))

    async def test_bad_id(self):
        """An id that is not 24 lowercase hex digits: 404."""
        for path in ("/api/v1/projects/xyz/proxy/permissions", f"/api/v1/containers/{CONTAINER.upper()}/proxy/permissions"):
            response, answer = await self.request("GET", path)
            self.assertEqual((response.code, answer["error"]), (404, "not_found"), path)

    async def test_method_not_allowed(self):
        """POST is not a permission method: 405 with ``Allow``."""
        response, answer = await self.request("POST", PROJECT_URL, BODY)
        self.assertEqual((response.code, answer["error"]), (405, "method_not_allowed"))
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, PUT, PATCH, DELETE"])

    async def test_other_proxy_paths_not_found(self):
        """Paths near the permission endpoints are 404."""
        for path in (f"/api/v1/projects/{PROJECT}", f"/api/v1/projects/{PROJECT}/proxy",
                     f"/api/v1/projects/{PROJECT}/proxy/permissions/x", f"/api/v1/nodes/{PROJECT}/proxy/permissions"):
            response, _ = await self.request("GET", path)
            self.assertEqual(response.code, 404, path)

    async def test_without_store(self):
        """An AdminAPI made the old way (directory, token) still serves containers; permissions are 404."""
        base = self.serve(AdminAPI(self.node.directory, self.node.token))
        response, _ = await self.request("GET", "/api/v1/containers", base=base)
        self.assertEqual(response.code, 200)
        response, answer = await self.request("PUT", PROJECT_URL, BODY, base=base)
        self.assertEqual((response.code, answer["error"]), (404, "not_found"))

    async def test_registry_from_store(self):
        """Without ``registry`` the API uses the store's registry."""
        base = self.serve(AdminAPI(self.node.directory, self.node.token, permissions=self.store))
        response, answer = await self.request("PUT", PROJECT_URL, BODY, base=base)
        self.assertEqual(response.code, 201, answer)
        self.assertEqual(answer, REDACTED)

    async def test_container_422_names_field(self):
        """Container 422s now carry ``field`` too (``address``)."""
        response, answer = await self.request("PUT", f"/api/v1/containers/{CONTAINER}",
                                              {"project": PROJECT, "address": "nope"})
        self.assertEqual((response.code, answer["field"]), (422, "address"))


class ShippedGroupTypesTests(PermissionsAPITestCase):
    """With neither ``registry`` nor a store registry, the API uses the shipped group types."""

    def setUp(self) -> None:
        super().setUp()
        try:
            import hoodyproxy.access.groups as groups
        except ImportError:
            groups = None
        if not hasattr(groups, "group_types"):
            raise unittest.SkipTest("hoodyproxy.access.groups.group_types is not available")
        self.base = self.serve(AdminAPI(self.node.directory, self.node.token,
                                        permissions=PermissionStore(self.connect())))

    async def test_put_and_get_with_shipped_types(self):
        """An ``ip`` and a ``token`` group are accepted; GET hides the token."""
        secret = "s3cret-token-0123456789"
        body = {"groups": {"office": {"type": "ip", "ranges": ["10.0.0.0/8"]},
                           "team": {"type": "token", "value": secret}},
                "permissions": {"team": {"files": "write"}}}
        response, answer = await self.request("PUT", PROJECT_URL, body)
        self.assertEqual(response.code, 201, answer)
        response, answer = await self.request("GET", PROJECT_URL)
        self.assertEqual(answer["groups"]["office"]["type"], "ip")
        self.assertNotIn(secret, json.dumps(answer))

    async def test_shipped_type_error_names_field(self):
        """A shipped group type's validation error is a 422 naming a field under the group."""
        answer = await self.assertInvalid("PUT", PROJECT_URL,
                                          {"groups": {"team": {"type": "token", "value": ""}}},
                                          "groups.team.value")
        self.assertIn("must not be empty", answer["message"])

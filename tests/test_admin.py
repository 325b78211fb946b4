"""Tests for :mod:`hoodyproxy.admin.api`, the admin REST API, over real HTTP on loopback.

Every test starts a whole node with :func:`tests.support.start_node` and talks to its
admin port with treq.  Connections are not kept alive (each test's pool is closed in a
cleanup), so nothing is left open when the node stops.
"""

from __future__ import annotations

import json
import os
import sqlite3

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import start_node

PROJECT = "67e89abc123def456789abcd"
OTHER_PROJECT = "0000000000000000000000aa"
CID = "890abcdef12345678901cdef"
CID2 = "890abcdef12345678901cd00"
CID3 = "111111111111111111111111"

BODY = {"project": PROJECT, "address": "10.1.2.3", "state": "running", "ports": {"http-80": 8080}}


def expected(container_id: str, body: dict) -> dict:
    """The JSON the API answers for a container stored from ``body``."""
    return {"id": container_id, "project": body["project"], "address": body["address"],
            "state": body.get("state", "running"), "ports": body.get("ports") or {}, "source": "admin"}


class AdminAPITestCase(unittest.TestCase):
    """Starts a node and offers helpers that speak to its admin API."""

    def setUp(self) -> None:
        self.node = start_node(self)
        self.base = f"http://127.0.0.1:{self.node.admin_port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    def auth(self, token: str | None = None) -> dict:
        return {b"Authorization": [b"Bearer " + (token or self.node.token).encode()]}

    async def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                      headers: dict | None = None, authorized: bool = True):
        """Send one request; returns (response, body bytes)."""
        hdrs = dict(self.auth()) if authorized else {}
        hdrs.update(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault(b"Content-Type", [b"application/json"])
        response = await treq.request(method, self.base + path, data=data, headers=hdrs,
                                      agent=self.agent)
        content = await response.content()
        return response, content

    async def put(self, container_id: str, body: dict):
        return await self.request("PUT", f"/api/v1/containers/{container_id}", body)

    def assertJSON(self, response, content: bytes):
        """The response is ``application/json`` and its body parses; returns the value."""
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return json.loads(content)

    def assertError(self, response, content: bytes, status: int, code: str) -> dict:
        self.assertEqual(response.code, status, content)
        body = self.assertJSON(response, content)
        self.assertEqual(body["error"], code, body)
        self.assertIsInstance(body["message"], str)
        return body

    def assertInvalidField(self, response, content: bytes, field: str) -> None:
        """422 whose message names ``field`` (``"<field>: <problem>"``)."""
        body = self.assertError(response, content, 422, "invalid")
        self.assertTrue(body["message"].startswith(field + ":"), body["message"])


class AuthenticationTests(AdminAPITestCase):
    async def test_missing_token(self):
        """No Authorization header: 401 JSON with a Bearer challenge."""
        response, content = await self.request("GET", "/api/v1/containers", authorized=False)
        self.assertError(response, content, 401, "unauthorized")
        challenge = response.headers.getRawHeaders(b"www-authenticate")
        self.assertEqual(len(challenge), 1)
        self.assertTrue(challenge[0].startswith(b"Bearer "), challenge)

    async def test_wrong_token(self):
        """A wrong bearer token: 401 JSON with a Bearer challenge."""
        response, content = await self.request(
            "GET", "/api/v1/containers", authorized=False, headers=self.auth("x" * 43))
        self.assertError(response, content, 401, "unauthorized")
        self.assertTrue(response.headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer "))

    async def test_token_with_other_scheme(self):
        """The right token under another scheme (Basic) is refused with 401."""
        response, content = await self.request(
            "GET", "/api/v1/containers", authorized=False,
            headers={b"Authorization": [b"Basic " + self.node.token.encode()]})
        self.assertError(response, content, 401, "unauthorized")

    async def test_token_prefix_refused(self):
        """A prefix of the right token is refused with 401."""
        response, content = await self.request(
            "GET", "/api/v1/containers", authorized=False, headers=self.auth(self.node.token[:-1]))
        self.assertError(response, content, 401, "unauthorized")

    async def test_scheme_is_case_insensitive(self):
        """``bearer`` in lower case is accepted (auth schemes are case-insensitive)."""
        response, content = await self.request(
            "GET", "/api/v1/containers", authorized=False,
            headers={b"Authorization": [b"bearer " + self.node.token.encode()]})
        self.assertEqual(response.code, 200, content)

    async def test_unauthenticated_write_changes_nothing(self):
        """A PUT without a token is refused and stores nothing."""
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", BODY, authorized=False)
        self.assertError(response, content, 401, "unauthorized")
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_token_file_is_used(self):
        """The token the node generated is the one in ``<data-dir>/admin-token``."""
        with open(os.path.join(self.node.data_dir, "admin-token")) as f:
            token = f.read().strip()
        response, content = await self.request("GET", "/api/v1/containers", authorized=False,
                                               headers=self.auth(token))
        self.assertEqual(response.code, 200, content)

    async def test_configured_token(self):
        """``[admin] token`` from the config is the token the API accepts."""
        node = start_node(self, {"admin": {"token": "configured-token-0123456789"}})
        response = await treq.get(f"http://127.0.0.1:{node.admin_port}/api/v1/containers",
                                  headers={b"Authorization": [b"Bearer configured-token-0123456789"]},
                                  agent=self.agent)
        await response.content()
        self.assertEqual(response.code, 200)

    async def test_healthz_needs_no_token(self):
        """``/healthz`` answers 200 JSON without a token."""
        response, content = await self.request("GET", "/healthz", authorized=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.assertJSON(response, content), {"status": "ok"})

    async def test_api_health_needs_no_token(self):
        """``/api/v1/health`` answers 200 JSON without a token."""
        response, content = await self.request("GET", "/api/v1/health", authorized=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.assertJSON(response, content), {"status": "ok"})


class ContainerTests(AdminAPITestCase):
    async def test_put_creates(self):
        """PUT of a new container answers 201 with the stored container."""
        response, content = await self.put(CID, BODY)
        self.assertEqual(response.code, 201, content)
        self.assertEqual(self.assertJSON(response, content), expected(CID, BODY))

    async def test_put_then_get(self):
        """GET returns what PUT stored."""
        await self.put(CID, BODY)
        response, content = await self.request("GET", f"/api/v1/containers/{CID}")
        self.assertEqual(response.code, 200, content)
        self.assertEqual(self.assertJSON(response, content), expected(CID, BODY))

    async def test_put_replaces(self):
        """A second PUT of the same id answers 200 and replaces the whole container."""
        await self.put(CID, BODY)
        replacement = {"project": OTHER_PROJECT, "address": "10.9.9.9", "state": "stopped"}
        response, content = await self.put(CID, replacement)
        self.assertEqual(response.code, 200, content)
        self.assertEqual(self.assertJSON(response, content), expected(CID, replacement))
        response, content = await self.request("GET", f"/api/v1/containers/{CID}")
        self.assertEqual(self.assertJSON(response, content), expected(CID, replacement))

    async def test_put_defaults(self):
        """``state`` defaults to running and ``ports`` to ``{}`` (``null`` too)."""
        response, content = await self.put(CID, {"project": PROJECT, "address": "10.1.2.3", "ports": None})
        self.assertEqual(response.code, 201, content)
        body = self.assertJSON(response, content)
        self.assertEqual((body["state"], body["ports"]), ("running", {}))

    async def test_put_with_matching_id(self):
        """A body may carry ``id`` when it matches the URL."""
        response, content = await self.put(CID, dict(BODY, id=CID))
        self.assertEqual(response.code, 201, content)

    async def test_put_ipv6_address_normalized(self):
        """An IPv6 address is accepted and stored in its compressed form."""
        response, content = await self.put(CID, dict(BODY, address="fd00:0:0:0:0:0:0:1"))
        self.assertEqual(response.code, 201, content)
        self.assertEqual(self.assertJSON(response, content)["address"], "fd00::1")

    async def test_put_visible_to_gateway(self):
        """After a 2xx PUT the gateway's directory sees the container at once."""
        await self.put(CID, BODY)
        container = self.node.directory.lookup(CID)
        self.assertIsNotNone(container)
        self.assertEqual(container.to_json(), expected(CID, BODY))
        self.assertIs(self.node.gateway.directory, self.node.directory)

    async def test_replace_visible_to_gateway(self):
        """A replacing PUT is what the gateway's directory answers at once."""
        await self.put(CID, BODY)
        await self.put(CID, dict(BODY, state="stopped"))
        self.assertEqual(self.node.directory.lookup(CID).state, "stopped")

    async def test_put_is_on_disk(self):
        """A 2xx PUT is committed: another connection to the database sees the row."""
        await self.put(CID, BODY)
        conn = sqlite3.connect(os.path.join(self.node.data_dir, "hoodyproxy.db"))
        self.addCleanup(conn.close)
        row = conn.execute("SELECT project, address, state, ports FROM containers WHERE id = ?",
                           (CID,)).fetchone()
        self.assertEqual(row[:3], (PROJECT, "10.1.2.3", "running"))
        self.assertEqual(json.loads(row[3]), {"http-80": 8080})

    async def test_delete(self):
        """DELETE answers 204 with no body; GET then answers 404."""
        await self.put(CID, BODY)
        response, content = await self.request("DELETE", f"/api/v1/containers/{CID}")
        self.assertEqual(response.code, 204)
        self.assertEqual(content, b"")
        response, content = await self.request("GET", f"/api/v1/containers/{CID}")
        self.assertError(response, content, 404, "not_found")

    async def test_delete_visible_to_gateway(self):
        """After DELETE the gateway's directory no longer knows the container."""
        await self.put(CID, BODY)
        await self.request("DELETE", f"/api/v1/containers/{CID}")
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_delete_unknown(self):
        """DELETE of a container that does not exist answers 404 JSON."""
        response, content = await self.request("DELETE", f"/api/v1/containers/{CID}")
        self.assertError(response, content, 404, "not_found")

    async def test_delete_twice(self):
        """The second DELETE of the same container answers 404."""
        await self.put(CID, BODY)
        await self.request("DELETE", f"/api/v1/containers/{CID}")
        response, content = await self.request("DELETE", f"/api/v1/containers/{CID}")
        self.assertError(response, content, 404, "not_found")

    async def test_get_unknown(self):
        """GET of a well-formed id that is not stored answers 404 JSON."""
        response, content = await self.request("GET", f"/api/v1/containers/{CID}")
        self.assertError(response, content, 404, "not_found")

    async def test_list_empty(self):
        """The list of a fresh node is empty."""
        response, content = await self.request("GET", "/api/v1/containers")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.assertJSON(response, content), {"containers": []})

    async def test_list_all(self):
        """GET /api/v1/containers lists every container, ordered by id."""
        a = dict(BODY)
        b = dict(BODY, project=OTHER_PROJECT, address="10.0.0.2")
        await self.put(CID, a)
        await self.put(CID3, b)
        response, content = await self.request("GET", "/api/v1/containers")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.assertJSON(response, content),
                         {"containers": [expected(CID3, b), expected(CID, a)]})

    async def test_list_filters_by_project(self):
        """``?project=`` lists only that project's containers."""
        await self.put(CID, BODY)
        await self.put(CID2, dict(BODY, address="10.0.0.2"))
        await self.put(CID3, dict(BODY, project=OTHER_PROJECT))
        response, content = await self.request("GET", f"/api/v1/containers?project={PROJECT}")
        self.assertEqual(response.code, 200)
        ids = [c["id"] for c in self.assertJSON(response, content)["containers"]]
        self.assertEqual(ids, [CID2, CID])
        response, content = await self.request("GET", f"/api/v1/containers?project={OTHER_PROJECT}")
        ids = [c["id"] for c in self.assertJSON(response, content)["containers"]]
        self.assertEqual(ids, [CID3])

    async def test_list_unknown_project(self):
        """``?project=`` of a project with no containers lists nothing."""
        await self.put(CID, BODY)
        response, content = await self.request("GET", "/api/v1/containers?project=" + "f" * 24)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.assertJSON(response, content), {"containers": []})

    async def test_list_invalid_project(self):
        """A ``?project=`` that is not a project id answers 422 naming ``project``."""
        response, content = await self.request("GET", "/api/v1/containers?project=nothex")
        self.assertInvalidField(response, content, "project")

    async def test_list_follows_replace(self):
        """A container moved to another project by PUT leaves the old project's list."""
        await self.put(CID, BODY)
        await self.put(CID, dict(BODY, project=OTHER_PROJECT))
        response, content = await self.request("GET", f"/api/v1/containers?project={PROJECT}")
        self.assertEqual(self.assertJSON(response, content), {"containers": []})

    async def test_cache_control(self):
        """Answers are not to be cached."""
        response, content = await self.request("GET", "/api/v1/containers")
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])


class OwnershipTests(AdminAPITestCase):
    """Entries a provider owns (``"source": "docker"``) are not the admin API's to change, unless forced."""

    def provided(self, container_id: str = CID):
        """An entry as the Docker provider writes it."""
        from hoodyproxy.directory import Container
        self.node.directory.put(Container(container_id, PROJECT, "10.9.9.9", "running", {"http-80": 80},
                                          source="docker"))

    async def test_source_shown(self):
        """Reads say who owns each entry: ``admin`` for a PUT, ``docker`` for the provider's."""
        await self.put(CID3, BODY)
        self.provided()
        response, content = await self.request("GET", "/api/v1/containers")
        sources = {c["id"]: c["source"] for c in self.assertJSON(response, content)["containers"]}
        self.assertEqual(sources, {CID: "docker", CID3: "admin"})

    async def test_put_over_provided_is_409(self):
        """A PUT over a provider-owned entry answers 409 naming ``source``, and changes nothing."""
        self.provided()
        response, content = await self.put(CID, BODY)
        body = self.assertError(response, content, 409, "conflict")
        self.assertEqual(body["field"], "source")
        self.assertIn("force=true", body["message"])
        self.assertEqual(self.node.directory.lookup(CID).address, "10.9.9.9")

    async def test_forced_put_takes_the_entry(self):
        """``?force=true`` replaces a provider-owned entry, which becomes the admin's."""
        self.provided()
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}?force=true", BODY)
        self.assertEqual(response.code, 200, content)
        self.assertEqual(self.assertJSON(response, content), expected(CID, BODY))
        self.assertEqual(self.node.directory.lookup(CID).source, "admin")

    async def test_delete_of_provided_is_409_unless_forced(self):
        """DELETE of a provider-owned entry: 409; with ``?force=true``: 204 (e.g. a stale entry
        while the daemon is away)."""
        self.provided()
        response, content = await self.request("DELETE", f"/api/v1/containers/{CID}")
        self.assertError(response, content, 409, "conflict")
        self.assertIsNotNone(self.node.directory.lookup(CID))
        response, content = await self.request("DELETE", f"/api/v1/containers/{CID}?force=true")
        self.assertEqual(response.code, 204, content)
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_manual_entries_need_no_force(self):
        """An admin-owned entry is replaced and deleted as always; ``force=false`` is the default."""
        await self.put(CID, BODY)
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}?force=false",
                                               dict(BODY, state="stopped"))
        self.assertEqual(response.code, 200, content)
        response, content = await self.request("DELETE", f"/api/v1/containers/{CID}")
        self.assertEqual(response.code, 204, content)

    async def test_bad_force_value(self):
        """``force`` is ``true`` or ``false``; anything else is 422 naming it."""
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}?force=yes", BODY)
        self.assertInvalidField(response, content, "force")
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_source_in_body_is_not_a_claim(self):
        """A body may send back the ``source`` a read showed, but a PUT is always the admin's."""
        response, content = await self.put(CID, dict(BODY, source="docker"))
        self.assertEqual(response.code, 201, content)
        self.assertEqual(self.node.directory.lookup(CID).source, "admin")
        response, content = await self.put(CID, dict(BODY, source="kubernetes"))
        self.assertInvalidField(response, content, "source")


class ValidationTests(AdminAPITestCase):
    async def assertRejected(self, body, field: str) -> None:
        response, content = await self.put(CID, body)
        self.assertInvalidField(response, content, field)
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_missing_project(self):
        """A body without ``project``: 422 naming ``project``."""
        await self.assertRejected({"address": "10.1.2.3"}, "project")

    async def test_bad_project(self):
        """A ``project`` that is not 24 lowercase hex digits: 422 naming ``project``."""
        await self.assertRejected(dict(BODY, project=PROJECT.upper()), "project")

    async def test_project_not_a_string(self):
        """A numeric ``project``: 422 naming ``project``."""
        await self.assertRejected(dict(BODY, project=123), "project")

    async def test_missing_address(self):
        """A body without ``address``: 422 naming ``address``."""
        await self.assertRejected({"project": PROJECT}, "address")

    async def test_bad_address(self):
        """An ``address`` that is a hostname: 422 naming ``address``."""
        await self.assertRejected(dict(BODY, address="example.com"), "address")

    async def test_bad_state(self):
        """A ``state`` other than running/stopped: 422 naming ``state``."""
        await self.assertRejected(dict(BODY, state="paused"), "state")

    async def test_ports_not_an_object(self):
        """``ports`` that is a list: 422 naming ``ports``."""
        await self.assertRejected(dict(BODY, ports=[8080]), "ports")

    async def test_ports_bad_key(self):
        """A ``ports`` key that is not program or program-index: 422 naming ``ports``."""
        await self.assertRejected(dict(BODY, ports={"HTTP": 80}), "ports")

    async def test_ports_value_out_of_range(self):
        """A port above 65535: 422 naming ``ports.<key>``."""
        await self.assertRejected(dict(BODY, ports={"http-80": 70000}), "ports.http-80")

    async def test_ports_value_boolean(self):
        """A boolean port: 422 naming ``ports.<key>``."""
        await self.assertRejected(dict(BODY, ports={"http": True}), "ports.http")

    async def test_unknown_field(self):
        """An unknown field: 422 naming that field."""
        await self.assertRejected(dict(BODY, colour="blue"), "colour")

    async def test_id_mismatch(self):
        """An ``id`` in the body different from the URL's: 422 naming ``id``."""
        await self.assertRejected(dict(BODY, id=CID2), "id")

    async def test_body_not_an_object(self):
        """A JSON array body: 422 naming ``body``."""
        await self.assertRejected([BODY], "body")

    async def test_empty_body(self):
        """A PUT with no body: 422 naming ``body``."""
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", raw=b"")
        self.assertInvalidField(response, content, "body")

    async def test_bad_json(self):
        """A body that is not JSON: 400."""
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", raw=b'{"project": ')
        self.assertError(response, content, 400, "bad_json")
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_non_utf8_body(self):
        """A body that is not UTF-8: 400."""
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", raw=b"\xff\xfe\x00{")
        self.assertError(response, content, 400, "bad_json")

    async def test_deeply_nested_json(self):
        """JSON nested too deep to decode (well under 1 MiB) is a bad body: 400, not 500."""
        raw = b"[" * 100_000 + b"]" * 100_000
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", raw=raw)
        self.assertError(response, content, 400, "bad_json")

    async def test_failed_replace_keeps_old(self):
        """An invalid PUT over an existing container leaves it as it was."""
        await self.put(CID, BODY)
        response, content = await self.put(CID, dict(BODY, state="paused"))
        self.assertEqual(response.code, 422)
        self.assertEqual(self.node.directory.lookup(CID).to_json(), expected(CID, BODY))

    async def test_body_too_large(self):
        """A body over 1 MiB: 413, nothing stored."""
        raw = json.dumps(BODY).encode()
        raw = raw[:-1] + b" " * (1024 * 1024 + 1 - len(raw)) + b"}"
        self.assertEqual(len(raw), 1024 * 1024 + 1)
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", raw=raw)
        self.assertError(response, content, 413, "payload_too_large")
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_body_of_exactly_1_mib(self):
        """A valid body of exactly 1 MiB is accepted."""
        raw = json.dumps(BODY).encode()
        raw = raw[:-1] + b" " * (1024 * 1024 - len(raw)) + b"}"
        self.assertEqual(len(raw), 1024 * 1024)
        response, content = await self.request("PUT", f"/api/v1/containers/{CID}", raw=raw)
        self.assertEqual(response.code, 201, content)


class RoutingTests(AdminAPITestCase):
    async def test_non_hex_id(self):
        """A container id that is not hex: 404 JSON."""
        response, content = await self.request("GET", "/api/v1/containers/" + "z" * 24)
        self.assertError(response, content, 404, "not_found")

    async def test_uppercase_id(self):
        """Container ids are lowercase: an uppercase id is 404, also for PUT."""
        response, content = await self.put(CID.upper(), BODY)
        self.assertError(response, content, 404, "not_found")
        self.assertEqual(self.node.directory.list(), [])

    async def test_short_id(self):
        """A 23-digit id: 404 JSON."""
        response, content = await self.request("DELETE", "/api/v1/containers/" + CID[:-1])
        self.assertError(response, content, 404, "not_found")

    async def test_unknown_endpoint(self):
        """An unknown path under the API: 404 JSON."""
        for path in ("/api/v1/nothing", "/api/v2/containers", "/", f"/api/v1/containers/{CID}/extra"):
            response, content = await self.request("GET", path)
            self.assertError(response, content, 404, "not_found")

    async def test_wrong_method_on_container(self):
        """POST to a container: 405 with ``Allow: GET, PUT, DELETE``."""
        response, content = await self.request("POST", f"/api/v1/containers/{CID}", BODY)
        self.assertError(response, content, 405, "method_not_allowed")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, PUT, DELETE"])

    async def test_wrong_method_on_list(self):
        """PUT to the list: 405 with ``Allow: GET``."""
        response, content = await self.request("PUT", "/api/v1/containers", BODY)
        self.assertError(response, content, 405, "method_not_allowed")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET"])

    async def test_success_is_json(self):
        """Successful answers (200, 201) are ``application/json``."""
        response, content = await self.put(CID, BODY)
        self.assertJSON(response, content)
        response, content = await self.request("GET", "/api/v1/containers")
        self.assertJSON(response, content)

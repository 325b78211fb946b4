"""Aliases and custom domains route through the gateway like the container's own URL."""

from __future__ import annotations

import json

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests import backends
from tests.support import CONTAINER, PROJECT, Backend, audit_lines, register, start_node, until
from tests.test_gateway import tls_client


class AliasRoutingTests(unittest.TestCase):

    def setUp(self):
        self.node = start_node(self)
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.admin = f"http://127.0.0.1:{self.node.admin_port}"
        self.auth = {"Authorization": f"Bearer {self.node.token}"}

    async def api(self, method, path, body=None):
        response = await treq.request(method, self.admin + path, headers=self.auth,
                                      data=json.dumps(body).encode() if body is not None else None,
                                      pool=HTTPConnectionPool(reactor, persistent=False))
        text = await response.content()
        return response.code, (json.loads(text) if text else None)

    async def get(self, host: str, path: str = "/headers") -> bytes:
        client = await tls_client(self, self.node)
        client.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await client.closed
        return client.received

    async def test_alias_reaches_its_container_program_and_index(self):
        """my-api.<node>.<zone> goes to the container's http-<port> like the long URL does."""
        code, body = await self.api("POST", "/api/v1/proxy/aliases", {
            "container_id": CONTAINER, "alias": "my-api", "program": "http", "index": self.backend.number})
        self.assertEqual(code, 201, body)
        self.assertTrue(body["url"].startswith("https://my-api.node-local.containers.localhost"))
        received = await self.get(f"my-api.node-local.containers.localhost:{self.node.https_port}")
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:60])
        route = audit_lines(self.node)[-1]["route"]
        self.assertEqual((route["project"], route["container"], route["index"]),
                         (PROJECT, CONTAINER, self.backend.number))

    async def test_custom_domain_reaches_the_alias_target(self):
        """A custom domain attached to an alias is routed to the alias's target."""
        await self.api("POST", "/api/v1/proxy/aliases", {
            "container_id": CONTAINER, "alias": "shop", "program": "http", "index": self.backend.number})
        code, body = await self.api("POST", "/api/v1/proxy/aliases/shop/domains", {"domain": "api.example.com"})
        self.assertIn(code, (200, 201), body)
        received = await self.get("api.example.com")
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:60])
        self.assertIn(b'"api.example.com"', received)

    async def test_unknown_alias_and_detached_domain_are_404(self):
        """An alias nobody created, or a domain detached again, is not served."""
        received = await self.get("nosuch.node-local.containers.localhost")
        self.assertIn(b" 404 ", received.split(b"\r\n")[0])
        await self.api("POST", "/api/v1/proxy/aliases", {
            "container_id": CONTAINER, "alias": "tmp", "program": "http", "index": self.backend.number})
        await self.api("POST", "/api/v1/proxy/aliases/tmp/domains", {"domain": "gone.example.com"})
        self.assertTrue((await self.get("gone.example.com")).startswith(b"HTTP/1.1 200"))
        code, _ = await self.api("DELETE", "/api/v1/proxy/aliases/tmp/domains/gone.example.com")
        self.assertEqual(code, 204)
        self.assertIn(b" 404 ", (await self.get("gone.example.com")).split(b"\r\n")[0])

    async def test_permissions_apply_to_an_alias(self):
        """A container's permission set guards its alias exactly as its own URL."""
        await self.api("POST", "/api/v1/proxy/aliases", {
            "container_id": CONTAINER, "alias": "guarded", "program": "http", "index": self.backend.number})
        code, body = await self.api("PUT", f"/api/v1/containers/{CONTAINER}/proxy/permissions", {
            "project": PROJECT, "groups": {"office": {"type": "ip", "range": "203.0.113.0/24"}},
            "permissions": {"office": {"http": True}}, "default": "deny"})
        self.assertIn(code, (200, 201), body)
        received = await self.get("guarded.node-local.containers.localhost")
        self.assertIn(b" 403 ", received.split(b"\r\n")[0])
        await until(lambda: any(line.get("decision") for line in audit_lines(self.node)))


class NodeACMETests(unittest.TestCase):
    """The whole node, configured with an ACME directory, gets and serves custom-domain certificates."""

    timeout = 120

    async def test_attached_domain_gets_a_certificate_through_the_admin_api(self):
        """[acme] directory set: attaching a domain through the admin API gets it a certificate
        from pebble (HTTP-01 on the node's plain port), served by SNI and routed to the alias."""
        from twisted.internet.threads import deferToThread

        from tests.pebble import Pebble, free_port, require_pebble
        from tests.test_acme import dns_names, handshake
        require_pebble()
        https_port, http_port = free_port(), free_port()
        pebble = await Pebble(self, http_port, https_port).start()
        self.node = start_node(self, {
            "listen": {"https": f"127.0.0.1:{https_port}", "http": f"127.0.0.1:{http_port}"},
            "acme": {"directory": pebble.directory_url, "ca_bundle": pebble.ca_bundle,
                     "email": "ops@example.com", "challenge": "http-01"}})
        backend = Backend(self, backends.app())
        register(self.node, backend.number)
        self.admin = f"http://127.0.0.1:{self.node.admin_port}"
        self.auth = {"Authorization": f"Bearer {self.node.token}"}
        await AliasRoutingTests.api(self, "POST", "/api/v1/proxy/aliases", {
            "container_id": CONTAINER, "alias": "shop", "program": "http", "index": backend.number})
        code, body = await AliasRoutingTests.api(self, "POST", "/api/v1/proxy/aliases/shop/domains",
                                                 {"domain": "shop.example.com"})
        self.assertIn(code, (200, 201), body)
        manager = self.node.certificate_manager
        await until(lambda: (manager.status("shop.example.com") or {}).get("status") == "valid", timeout=60)
        served, _ = await deferToThread(handshake, https_port, "shop.example.com", root_pem=pebble.root_pem())
        self.assertEqual(dns_names(served), ["shop.example.com"])
        received = await AliasRoutingTests.get(self, "shop.example.com")
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:60])

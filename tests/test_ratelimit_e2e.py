"""Rate limiting end to end: a real node, real clients from two loopback addresses.

Budgets are made small (a burst of a few requests at one per minute) so that a test
never depends on how fast the machine is: within a test nothing refills.  The clock is
the reactor's; nothing here mocks it.
"""

from __future__ import annotations

import base64
import json

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests import backends
from tests.h2client import h2_connect
from tests.h3client import connect as h3_connect, within
from tests.support import PROJECT, CONTAINER, Backend, audit_lines, host_for, register, start_node, tls_exchange

OTHER = "127.0.0.2"  # a second client address on loopback
USER, PASSWORD = "deploy", "correct horse battery staple"


def status_of(response: bytes) -> int:
    parts = response.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def headers_of(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head)}


class RateLimitTestCase(unittest.TestCase):

    ratelimit: dict = {}

    def setUp(self):
        self.node = start_node(self, {"ratelimit": self.ratelimit})
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.host = host_for(index=self.backend.number)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.admin_agent = Agent(reactor, pool=pool)

    async def get(self, path: str = "/headers", *, source: str | None = None, extra: str = "") -> bytes:
        payload = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}Connection: close\r\n\r\n".encode()
        return await deferToThread(tls_exchange, self.node, self.host, payload, source=source)

    async def admin(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        response = await treq.request(method, f"http://127.0.0.1:{self.node.admin_port}/api/v1/{path}",
                                      agent=self.admin_agent, data=json.dumps(body).encode() if body else None,
                                      headers={"Authorization": f"Bearer {self.node.token}"})
        return response.code, await response.content()


class PerAddressTests(RateLimitTestCase):
    """Before anything else, every request counts against its client address."""

    ratelimit = {"per_address_rate": "1/min", "per_address_burst": 3}

    async def test_client_over_the_limit_gets_429_with_the_fields(self):
        """Three requests pass, the fourth is a 429 with a JSON body, Retry-After and the
        IETF RateLimit fields; the audit line names the limiter."""
        for _ in range(3):
            self.assertEqual(status_of(await self.get()), 200)
        response = await self.get("/headers?x=over")
        self.assertEqual(status_of(response), 429, response)
        headers = headers_of(response)
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["error"], "rate_limited")
        retry_after = int(headers["retry-after"])
        self.assertTrue(1 <= retry_after <= 60, retry_after)
        self.assertTrue(headers["ratelimit-policy"].startswith('"address";q=3;w='), headers)
        self.assertEqual(headers["ratelimit"], f'"address";r=0;t={retry_after}')
        line = [entry for entry in audit_lines(self.node) if entry["path"] == "/headers?x=over"][-1]
        self.assertEqual((line["status"], line["ratelimited"]), (429, "address"))

    async def test_another_client_is_unaffected(self):
        """While 127.0.0.1 is refused, 127.0.0.2 is served."""
        for _ in range(4):
            await self.get()
        self.assertEqual(status_of(await self.get()), 429)
        self.assertEqual(status_of(await self.get(source=OTHER)), 200)

    async def test_spoofed_forwarding_headers_do_not_change_the_key(self):
        """A new X-Forwarded-For (or X-Real-IP) on each request does not make a new client."""
        codes = []
        for n in range(5):
            response = await self.get(extra=f"X-Forwarded-For: 203.0.113.{n}\r\nX-Real-IP: 198.51.100.{n}\r\n")
            codes.append(status_of(response))
        self.assertEqual(codes, [200, 200, 200, 429, 429])

    async def test_http2_streams_each_count(self):
        """On one HTTP/2 connection, each stream is a request: the fourth is refused."""
        client = await h2_connect(self, self.node, self.host)
        streams = [client.request(b"GET", b"/headers", self.host.encode()) for _ in range(5)]
        for stream in streams:
            await within(stream.done, 10)
        self.assertEqual(sorted(s.status for s in streams), [200, 200, 200, 429, 429])
        refused = [s for s in streams if s.status == 429][0]
        self.assertEqual(refused.header(b"ratelimit"), b'"address";r=0;t=' + refused.header(b"retry-after"))

    async def test_http3_streams_each_count(self):
        """Over HTTP/3 the same."""
        port = self.node.ports["http3"][0].getHost().port
        client = await h3_connect(self, reactor, port, server_name=self.host, ca_path=self.node.ca_path)
        statuses = []
        for _ in range(5):
            stream = client.request("GET", "/headers", self.host)
            await within(stream.done, 10)
            statuses.append(stream.status)
        self.assertEqual(statuses, [200, 200, 200, 429, 429])

    async def test_websocket_upgrades_count(self):
        """A WebSocket upgrade is a request like any other."""
        upgrade = ("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
        codes = []
        for _ in range(4):
            payload = f"GET /echo HTTP/1.1\r\nHost: {self.host}\r\n{upgrade}\r\n".encode()
            codes.append(status_of(await deferToThread(tls_exchange, self.node, self.host, payload, linger=0.5)))
        self.assertEqual(codes, [101, 101, 101, 429])


class FailedAuthenticationTests(RateLimitTestCase):
    """A password guesser is stopped; the right password from elsewhere still works."""

    ratelimit = {"failed_auth_rate": "1/min", "failed_auth_burst": 3}

    async def test_guesser_is_stopped_and_the_user_still_gets_in_from_elsewhere(self):
        """Three wrong passwords are 403s, then 429s (even the right password, from the
        guessing address); the right password from another address is served."""
        code, content = await self.admin("PUT", f"projects/{PROJECT}/proxy/permissions", {
            "groups": {"deployers": {"type": "password", "username": USER, "password": PASSWORD}},
            "permissions": {"deployers": {"http": True}}, "default": "deny"})
        self.assertIn(code, (200, 201), content)

        def basic(password: str) -> str:
            return "Authorization: Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode() + "\r\n"
        codes = [status_of(await self.get(extra=basic(f"guess-{n}"))) for n in range(5)]
        self.assertEqual(codes, [403, 403, 403, 429, 429])
        self.assertEqual(status_of(await self.get(extra=basic(PASSWORD))), 429)
        self.assertEqual(status_of(await self.get(extra=basic(PASSWORD), source=OTHER)), 200)
        limited = [line for line in audit_lines(self.node) if line.get("ratelimited")]
        self.assertEqual({line["ratelimited"] for line in limited}, {"auth-address"})


    async def test_short_token_guesser_is_stopped(self):
        """The platform's 15-character example token is accepted (with a warning), so a
        guesser must be stopped: three wrong bearer tokens are 403s, then 429s (even the
        right token from the guessing address); the right token from another address is
        served."""
        token = "ci-secret-token"
        code, content = await self.admin("PUT", f"projects/{PROJECT}/proxy/permissions", {
            "groups": {"ci": {"type": "token", "value": token}},
            "permissions": {"ci": {"http": True}}, "default": "deny"})
        self.assertIn(code, (200, 201), content)
        self.assertIn(b"warnings", content)

        def bearer(value: str) -> str:
            return f"Authorization: Bearer {value}\r\n"
        codes = [status_of(await self.get(extra=bearer(f"ci-secret-tok{n:02d}"))) for n in range(5)]
        self.assertEqual(codes, [403, 403, 403, 429, 429])
        self.assertEqual(status_of(await self.get(extra=bearer(token))), 429)
        self.assertEqual(status_of(await self.get(extra=bearer(token), source=OTHER)), 200)


class DryRunTests(RateLimitTestCase):
    """A dry run refuses nothing and says what it would have refused."""

    ratelimit = {"per_address_rate": "1/min", "per_address_burst": 1, "dry_run": True}

    async def test_dry_run_passes_and_audits(self):
        """Over the limit, the request is still served; its audit line names the limiter."""
        self.assertEqual(status_of(await self.get("/headers?x=1")), 200)
        self.assertEqual(status_of(await self.get("/headers?x=2")), 200)
        line = [entry for entry in audit_lines(self.node) if entry["path"] == "/headers?x=2"][-1]
        self.assertEqual((line["status"], line["ratelimited"], line["ratelimit_dry_run"]), (200, "address", True))


class ContainerLimitTests(RateLimitTestCase):
    """Per-container limits apply from the next request after the admin API wrote them."""

    async def test_per_container_limit_applies_live(self):
        """With no limit, requests pass; after a container limit of 2, the third is refused."""
        for _ in range(3):
            self.assertEqual(status_of(await self.get()), 200)
        code, content = await self.admin("PUT", f"containers/{CONTAINER}/proxy/rate-limits",
                                         {"per_container": {"rate": "1/min", "burst": 2}})
        self.assertEqual(code, 201, content)
        codes = [status_of(await self.get(source=src)) for src in (None, OTHER, None)]
        self.assertEqual(codes, [200, 200, 429])
        line = audit_lines(self.node)[-1]
        self.assertEqual(line["ratelimited"], "container")


class TableBoundTests(RateLimitTestCase):
    """A flood of distinct keys cannot grow the node's memory without bound, nor let a
    client through more than its budget."""

    ratelimit = {"per_address_rate": "1/min", "per_address_burst": 3, "table_size": 65536}

    async def test_a_million_distinct_addresses(self):
        """1,000,000 distinct IPv6 /64 networks through the running node's per-address
        limiter: the table stays at its 65,536 keys, the process grows by less than 64 MiB
        (its RSS, measured: about 14 MiB of entries are expected), and a real client
        afterwards still gets at most its burst of 3."""
        def rss_kib() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        limiters = self.node.gateway.limiters
        before = rss_kib()
        for i in range(1_000_000):
            limiters.check_client(f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1")
        grown = rss_kib() - before
        stats = {s.name: s for s in limiters.stats()}["address"]
        self.assertEqual(stats.size, 65536)
        self.assertLess(grown, 64 * 1024, f"RSS grew {grown} KiB")
        codes = [status_of(await self.get()) for _ in range(5)]
        self.assertLessEqual(codes.count(200), 3, codes)
        self.assertEqual(codes.count(200) + codes.count(429), 5, codes)

"""Metrics: GET /metrics on a real node moves by exactly what went through it.

Every test scrapes the admin listener with a real HTTP client and reads the answer with
prometheus_client's own parser; requests go through the node over real TLS (curl for
HTTP/1.1 and HTTP/2, the aioquic client for HTTP/3, autobahn for a WebSocket).  The
counting itself (labels, bounds, merging) is specified in the unit tests at the top.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hoodyproxy.directory import Container, SQLiteDirectory, open_database
from hoodyproxy.limits import Limiters
from hoodyproxy.limits._settings import RateLimitSettings
from hoodyproxy.observe.audit import RouteRecord
from hoodyproxy.observe.metrics import (MAX_SERIES, RequestMetrics, counters_only, decision_result, merge,
                                        process_snapshot, upstream_error)
from hoodyproxy.routing import Target
from tests import backends
from tests.h3client import connect, within
from tests.support import (CONTAINER, PROJECT, Backend, curl, host_for, https_agent, register, start_node, treq,
                           until, wait)
from tests.test_permissions_e2e import ws_connect

METRICS_TOKEN = "scraper-token-0123456789abcdef"
OTHER = "abcdefabcdefabcdefabcdef"


def parse(text: str) -> tuple[dict, dict]:
    """(samples: {(name, sorted labels): value}, types: {sample name: family type})."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            types[sample.name] = family.type
    return samples, types


def value(samples: dict, metric: str, /, **labels: str) -> float:
    """The sum of the samples named ``metric`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= set(ls))


def record(status=200, method="GET", http="1.1", route=None, bytes_in=0, bytes_out=12, **extra) -> dict:
    out = {"time": 0.0, "client": "192.0.2.7", "host": "h", "route": route, "method": method, "path": "/",
           "http": http, "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out, "duration_ms": 1.0}
    out.update(extra)
    return out


def samples_of(snapshot: dict, name: str) -> dict:
    metric = snapshot[name]
    return {tuple(s[0]): s[1:] if len(s) > 2 else s[1] for s in metric["samples"]}


def nonzero(snapshot: dict, name: str) -> dict:
    """The samples of a counter or gauge that are not 0 (every known label value is exported)."""
    return {k: v for k, v in samples_of(snapshot, name).items() if v}


class CountingTests(unittest.SynchronousTestCase):
    """RequestMetrics and its snapshot: what the request path counts, and under which labels."""

    def setUp(self):
        path = tempfile.mkdtemp(prefix="hoodyproxy-metrics-")
        self.addCleanup(shutil.rmtree, path, True)
        conn = open_database(os.path.join(path, "db"))
        self.addCleanup(conn.close)
        self.directory = SQLiteDirectory(conn)
        self.directory.put(Container(CONTAINER, PROJECT, "127.0.0.1", "running", {}))
        self.route = RouteRecord(Target(PROJECT, CONTAINER, "http", 8000, "h"))

    def snapshot(self, metrics: RequestMetrics, **kw) -> dict:
        return process_snapshot(metrics, kinds={"http": "http", "terminal": "terminal"}, **kw)

    def test_an_exchange_counts_under_its_class_method_protocol_kind_and_project(self):
        """One 200 GET over HTTP/2 to an http program: one request, its bytes, one duration."""
        metrics = RequestMetrics(self.directory)
        metrics.begun += 1
        metrics.observe(record(200, "GET", "2", self.route, bytes_in=5, bytes_out=12), 0.003)
        snap = self.snapshot(metrics)
        self.assertEqual(samples_of(snap, "hoodyproxy_requests_total"),
                         {("2xx", "GET", "h2", "http", PROJECT): 1})
        self.assertEqual(samples_of(snap, "hoodyproxy_received_bytes_total"), {("h2", PROJECT): 5})
        self.assertEqual(samples_of(snap, "hoodyproxy_sent_bytes_total"), {("h2", PROJECT): 12})
        buckets, total = samples_of(snap, "hoodyproxy_request_duration_seconds")[("h2", "http")]
        self.assertEqual(sum(buckets), 1)
        self.assertEqual(buckets.index(1), 2)  # (0.0025, 0.005]
        self.assertAlmostEqual(total, 0.003)
        self.assertEqual(samples_of(snap, "hoodyproxy_requests_in_flight"), {(): 0})

    def test_a_container_the_live_map_does_not_have_is_no_label(self):
        """A 503 for ids a client made up counts under project "", never under its ids."""
        metrics = RequestMetrics(self.directory)
        invented = RouteRecord(Target(OTHER, OTHER, "http", 8000, "h"))
        metrics.observe(record(503, route=invented, reason="container absent"), 0.001)
        elsewhere = RouteRecord(Target(OTHER, CONTAINER, "http", 8000, "h"))  # the right id, another project
        metrics.observe(record(503, route=elsewhere, reason="container belongs to another project"), 0.001)
        self.assertEqual(samples_of(self.snapshot(metrics), "hoodyproxy_requests_total"),
                         {("5xx", "GET", "h1", "http", ""): 2})

    def test_an_invented_container_in_a_known_project_is_still_no_label(self):
        """After a 503 counted under a project, one for an id the live map lacks in that
        project is still counted under "": 503s are checked every time."""
        metrics = RequestMetrics(self.directory)
        metrics.observe(record(503, route=self.route), 0.001)
        invented = RouteRecord(Target(PROJECT, OTHER, "http", 8000, "h"))
        metrics.observe(record(503, route=invented, reason="container absent"), 0.001)
        self.assertEqual(samples_of(self.snapshot(metrics), "hoodyproxy_requests_total"),
                         {("5xx", "GET", "h1", "http", PROJECT): 1, ("5xx", "GET", "h1", "http", ""): 1})

    def test_a_container_s_own_503_keeps_its_project(self):
        """A 503 the container answered (it is in the live map) is counted under its project."""
        metrics = RequestMetrics(self.directory)
        metrics.observe(record(503, route=self.route), 0.001)
        self.assertEqual(samples_of(self.snapshot(metrics), "hoodyproxy_requests_total"),
                         {("5xx", "GET", "h1", "http", PROJECT): 1})

    def test_methods_are_bounded(self):
        """A method outside the common ones is "other"; no route is kind "none", project ""."""
        metrics = RequestMetrics(self.directory)
        for method in ("BREW", "PROPFIND", None, "GET"):
            metrics.observe(record(400, method=method), 0.0)
        self.assertEqual(samples_of(self.snapshot(metrics), "hoodyproxy_requests_total"),
                         {("4xx", "other", "h1", "none", ""): 3, ("4xx", "GET", "h1", "none", ""): 1})

    def test_container_labels_only_when_asked(self):
        """With container labels the container is a label of the request and byte metrics."""
        metrics = RequestMetrics(self.directory, container_labels=True)
        metrics.observe(record(200, route=RouteRecord(Target(PROJECT, CONTAINER, "http", 8000, "h"), True)), 0.0)
        metrics.observe(record(404), 0.0)
        snap = self.snapshot(metrics)
        self.assertEqual(snap["hoodyproxy_requests_total"]["labels"][-2:], ["project", "container"])
        self.assertEqual(samples_of(snap, "hoodyproxy_requests_total"),
                         {("2xx", "GET", "h1", "http", PROJECT, CONTAINER): 1, ("4xx", "GET", "h1", "none", "", ""): 1})
        self.assertEqual(samples_of(snap, "hoodyproxy_sent_bytes_total"),
                         {("h1", PROJECT, CONTAINER): 12, ("h1", "", ""): 12})

    def test_series_past_the_bound_share_project_other(self):
        """Past MAX_SERIES keys, a new project counts as "other": memory stays bounded."""
        metrics = RequestMetrics(self.directory)
        for i in range(MAX_SERIES):
            metrics.exchanges[(200, "GET", "1.1", ("p%d" % i, "http"))] = [0] * 20
        metrics.observe(record(200, route=self.route), 0.0)
        metrics.observe(record(200, route=self.route), 0.0)
        self.assertEqual(len(metrics.exchanges), MAX_SERIES + 1)
        self.assertEqual(metrics.exchanges[(200, "GET", "1.1", ("other", "http"))][1], 24)  # (bytes out)
        self.assertNotIn((200, "GET", "1.1", (PROJECT, "http")), metrics.exchanges)

    def test_websockets_are_open_between_their_101_and_their_record(self):
        """A WebSocket is open from its establishment to its record; it is no request in flight."""
        metrics = RequestMetrics(self.directory)
        metrics.begun += 2
        metrics.websocket_started("1.1")
        snap = self.snapshot(metrics)
        self.assertEqual(samples_of(snap, "hoodyproxy_open_websockets"), {("h1",): 1, ("h2",): 0, ("h3",): 0})
        self.assertEqual(samples_of(snap, "hoodyproxy_requests_in_flight"), {(): 1})
        metrics.observe(record(101, route=self.route, bytes_in=7, bytes_out=9, closed_by="client"), 30.0)
        snap = self.snapshot(metrics)
        self.assertEqual(nonzero(snap, "hoodyproxy_open_websockets"), {})
        self.assertEqual(nonzero(snap, "hoodyproxy_websockets_total"), {("h1",): 1})
        self.assertEqual(samples_of(snap, "hoodyproxy_request_duration_seconds"), {})  # (not a request's time)
        self.assertEqual(samples_of(snap, "hoodyproxy_requests_total"), {("1xx", "GET", "h1", "http", PROJECT): 1})

    def test_upstream_error_reasons_are_a_bounded_set(self):
        """Whatever an error's text, its reason label is one of a few."""
        self.assertEqual(upstream_error("connect failed: Connection was refused by other side: 111"),
                         "connect_refused")
        self.assertEqual(upstream_error("connect failed: User timeout caused connection failure."),
                         "connect_timeout")
        self.assertEqual(upstream_error("connect failed: No route to host 10.1.2.3"), "connect_failed")
        self.assertEqual(upstream_error("no response headers in time"), "response_timeout")
        self.assertEqual(upstream_error("container closed"), "closed")
        self.assertEqual(upstream_error("container failed mid-response: closed"), "mid_response")
        self.assertEqual(upstream_error("container bad chunk size"), "bad_response")
        self.assertIsNone(upstream_error("rate limited (address)"))

    def test_upstream_errors_and_decisions_are_counted_from_the_record(self):
        """A 502 with a connect failure and a denied decision each add one, by reason and result."""
        metrics = RequestMetrics(self.directory)
        metrics.observe(record(502, route=self.route, reason="connect failed: Connection refused"), 0.0)
        metrics.observe(record(200, route=self.route, reason="container failed mid-response: closed"), 0.0)
        metrics.observe(record(502, route=self.route), 0.0)  # (the container's own 502: not ours)
        denied = {"allowed": False, "group": None, "read_only": False, "reason": "default deny"}
        metrics.observe(record(403, route=self.route, decision=denied), 0.0)
        snap = self.snapshot(metrics)
        self.assertEqual(nonzero(snap, "hoodyproxy_upstream_errors_total"),
                         {("connect_refused",): 1, ("mid_response",): 1})
        self.assertEqual(nonzero(snap, "hoodyproxy_permission_decisions_total"), {("denied",): 1})
        self.assertEqual(len(samples_of(snap, "hoodyproxy_upstream_errors_total")), 7)  # (each from 0)

    def test_decision_results(self):
        """allowed, read_only, unauthenticated, ambiguous, error, denied."""
        def d(allowed, read_only=False, reason="x"):
            return {"allowed": allowed, "group": None, "read_only": read_only, "reason": reason}
        self.assertEqual(decision_result(d(True), 200), "allowed")
        self.assertEqual(decision_result(d(True, True), 101), "read_only")
        self.assertEqual(decision_result(d(False), 401), "unauthenticated")
        self.assertEqual(decision_result(d(False), 400), "ambiguous")
        self.assertEqual(decision_result(d(False, reason="decision failed"), 500), "error")
        self.assertEqual(decision_result(d(False), 403), "denied")

    def test_rate_limit_counts_go_on_across_a_replaced_limiter(self):
        """Refusals read from the limiters' tables never go back when the limiters are replaced."""
        metrics = RequestMetrics(self.directory)
        settings = RateLimitSettings.from_mapping({"per_address_rate": "1/min", "per_address_burst": 1})
        limiters = Limiters(settings, clock=_Clock())
        for _ in range(3):
            limiters.check_client("192.0.2.7")
        self.assertEqual(samples_of(self.snapshot(metrics, limiters=limiters),
                                    "hoodyproxy_ratelimit_refusals_total")[("address",)], 2)
        fresh = Limiters(settings, clock=_Clock())
        fresh.check_client("192.0.2.7")
        fresh.check_client("192.0.2.7")
        self.assertEqual(samples_of(self.snapshot(metrics, limiters=fresh),
                                    "hoodyproxy_ratelimit_refusals_total")[("address",)], 3)

    def test_merge_adds_up_and_a_dead_worker_keeps_only_its_counters(self):
        """Snapshots add up sample by sample; counters_only drops the gauges."""
        metrics = RequestMetrics(self.directory)
        metrics.begun += 2
        metrics.observe(record(200, route=self.route), 0.02)
        one = self.snapshot(metrics, connections={"h1": 3})
        both = merge(one, one)
        self.assertEqual(samples_of(both, "hoodyproxy_requests_total"), {("2xx", "GET", "h1", "http", PROJECT): 2})
        self.assertEqual(samples_of(both, "hoodyproxy_open_connections"), {("h1",): 6})
        buckets, total = samples_of(both, "hoodyproxy_request_duration_seconds")[("h1", "http")]
        self.assertEqual((sum(buckets), round(total, 6)), (2, 0.04))
        dead = merge(one, counters_only(one))
        self.assertEqual(samples_of(dead, "hoodyproxy_open_connections"), {("h1",): 3})
        self.assertEqual(samples_of(dead, "hoodyproxy_requests_in_flight"), {(): 1})
        self.assertEqual(samples_of(dead, "hoodyproxy_requests_total"), {("2xx", "GET", "h1", "http", PROJECT): 2})


class CertificateMetricsTests(unittest.TestCase):
    """ACME orders by result and the expiry of every certificate the store serves, with the
    certificate manager on a fake clock and issuer (tests/test_acme.py's)."""

    def test_orders_and_a_domain_s_own_certificate(self):
        from twisted.internet.task import Clock

        from hoodyproxy.aliases import AliasStore
        from hoodyproxy.tls import CertificateStore, ensure_dev_certificates
        from hoodyproxy.tls.acme import IssuanceError
        from hoodyproxy.tls.manager import CertificateManager
        from tests import test_acme
        data_dir = tempfile.mkdtemp(prefix="hoodyproxy-metrics-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        dev = ensure_dev_certificates(os.path.join(data_dir, "tls"), test_acme.NODE, test_acme.ZONE)
        store = CertificateStore(dev.cert_path, dev.key_path)
        conn = open_database(os.path.join(data_dir, "db"))
        self.addCleanup(conn.close)
        aliases = AliasStore(conn, node=test_acme.NODE, zone=test_acme.ZONE)
        clock, issuer = Clock(), test_acme.FakeIssuer()
        manager = CertificateManager(store, aliases, issuer, data_dir, reactor=clock, jitter=lambda: 1.0)
        manager.startService()
        self.addCleanup(manager.stopService)
        aliases.create("my-api", test_acme.CID, "http", 3000)
        aliases.attach("my-api", test_acme.DOMAIN)
        clock.advance(0)
        issuer.calls[-1][1].errback(IssuanceError("server down"))
        self.assertEqual(manager.orders, {"issued": 0, "failed": 1})
        clock.advance(3600)
        now = time.time()
        # (write_certificate only needs a data_dir: a stand-in for its test case)
        paths = test_acme.ManagerTimingTests.write_certificate(
            type("Case", (), {"data_dir": data_dir})(), test_acme.DOMAIN, now - 60, now + 86400)
        issuer.calls[-1][1].callback(paths)
        self.assertEqual(manager.orders, {"issued": 1, "failed": 1})
        expiries = store.expiries()
        self.assertLess(abs(expiries[test_acme.DOMAIN] - (now + 86400)), 1)  # (whole seconds in X.509)
        self.assertIn(f"*.{test_acme.NODE}.{test_acme.ZONE}", expiries)


class DashboardTests(unittest.SynchronousTestCase):

    def test_the_dashboard_asks_only_for_metrics_a_node_exports(self):
        """Every query of docs/grafana-dashboard.json names metrics of METRICS (a histogram's
        _bucket, _count and _sum included), and every panel the issue asks for is there."""
        import json
        import re

        from hoodyproxy.observe.metrics import METRICS
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                            "grafana-dashboard.json")
        with open(path) as f:
            dashboard = json.load(f)
        asked = set()
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                asked.update(re.findall(r"hoodyproxy_[a-z0-9_]+", target["expr"]))
        for name in asked:
            self.assertIn(re.sub(r"_(bucket|count|sum)$", "", name) if name.startswith(
                "hoodyproxy_request_duration_seconds") else name, METRICS)
        for wanted in ("hoodyproxy_requests_total", "hoodyproxy_request_duration_seconds_bucket",
                       "hoodyproxy_requests_in_flight", "hoodyproxy_open_connections", "hoodyproxy_open_websockets",
                       "hoodyproxy_upstream_errors_total", "hoodyproxy_permission_decisions_total",
                       "hoodyproxy_ratelimit_refusals_total", "hoodyproxy_certificate_expiry_timestamp_seconds"):
            self.assertIn(wanted, asked)


class _Clock:
    def seconds(self) -> float:
        return 1000.0


class Held(Resource):
    """Answers only when the test says so (a request in flight meanwhile)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list = []

    def render(self, request):
        self.waiting.append(request)
        return NOT_DONE_YET


class ScrapeTestCase(unittest.TestCase):
    """A node with one backend registered as the container, scraped over its admin port."""

    config: dict = {}

    def setUp(self):
        self.node = start_node(self, self.config)
        self.root = backends.app()
        self.held = Held()
        self.root.putChild(b"held", self.held)
        self.backend = Backend(self, self.root)
        register(self.node, self.backend.number)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.admin_agent = Agent(reactor, pool=pool)

    def host(self, **kw) -> str:
        kw.setdefault("index", self.backend.number)
        return host_for(**kw)

    async def get_metrics(self, token: str | None = None, accept: str | None = None):
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if accept is not None:
            headers["Accept"] = accept
        response = await treq.get(f"http://127.0.0.1:{self.node.admin_port}/metrics", headers=headers,
                                  agent=self.admin_agent)
        return response, (await response.content()).decode()

    async def scrape(self, token: str | None = None) -> dict:
        response, text = await self.get_metrics(token)
        self.assertEqual(response.code, 200, text)
        return parse(text)[0]

    async def scrape_until(self, predicate, timeout: float = 10.0) -> dict:
        """Scrape until ``predicate(samples)`` holds (a connection's end takes a moment to
        reach the node); fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            samples = await self.scrape()
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError("the metrics never said so")
            await wait(0.05)

    async def curl(self, *args: str, path: str = "/headers", **host_kw) -> str:
        host = self.host(**host_kw)
        done = await curl(self.node, "-o", "/dev/null", "-w", "%{http_code}", *args,
                          f"https://{host}:{self.node.https_port}{path}", host=host)
        return done.stdout.decode()


class ScrapeTests(ScrapeTestCase):

    async def test_http1_requests_move_the_counters_by_what_was_sent(self):
        """Three GETs and a POST of 100 bytes over HTTP/1.1: requests, bytes and durations
        move by exactly that, under the project the live map gives."""
        before = await self.scrape()
        for _ in range(3):
            self.assertEqual(await self.curl("--http1.1"), "200")
        self.assertEqual(await self.curl("--http1.1", "-d", "x" * 100), "200")
        after = await self.scrape()

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)
        ours = dict(protocol="h1", kind="http", project=PROJECT)
        self.assertEqual(moved("hoodyproxy_requests_total", code_class="2xx", method="GET", **ours), 3)
        self.assertEqual(moved("hoodyproxy_requests_total", code_class="2xx", method="POST", **ours), 1)
        self.assertEqual(moved("hoodyproxy_requests_total"), 4)
        self.assertEqual(moved("hoodyproxy_received_bytes_total", protocol="h1", project=PROJECT), 100)
        self.assertGreater(moved("hoodyproxy_sent_bytes_total", protocol="h1", project=PROJECT), 0)
        self.assertEqual(moved("hoodyproxy_request_duration_seconds_count", protocol="h1", kind="http"), 4)
        self.assertEqual(moved("hoodyproxy_request_duration_seconds_bucket", protocol="h1", kind="http",
                               le="+Inf"), 4)
        self.assertGreater(moved("hoodyproxy_request_duration_seconds_sum", protocol="h1", kind="http"), 0)
        self.assertEqual(moved("hoodyproxy_tls_handshakes_total", result="ok", transport="tcp"), 4)
        self.assertEqual(value(after, "hoodyproxy_requests_in_flight"), 0)
        self.assertEqual(value(after, "hoodyproxy_worker_requests_total", worker="0"),
                         value(after, "hoodyproxy_requests_total"))

    async def test_http2_requests_count_as_h2(self):
        """Two requests on one HTTP/2 connection: two h2 requests, one handshake."""
        before = await self.scrape()
        host = self.host()
        url = f"https://{host}:{self.node.https_port}/headers"
        done = await curl(self.node, "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}\\n", url,
                          "-o", "/dev/null", url, host=host)
        self.assertEqual(done.stdout.decode().split(), ["200", "2", "200", "2"])
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_requests_total", protocol="h2", project=PROJECT, code_class="2xx")
                         - value(before, "hoodyproxy_requests_total", protocol="h2", project=PROJECT,
                                 code_class="2xx"), 2)
        self.assertEqual(value(after, "hoodyproxy_tls_handshakes_total", transport="tcp")
                         - value(before, "hoodyproxy_tls_handshakes_total", transport="tcp"), 1)

    async def test_http3_requests_and_connections_count_as_h3(self):
        """Two requests over HTTP/3: two h3 requests, one QUIC handshake, one h3 connection open."""
        before = await self.scrape()
        client = await connect(self, reactor, self.node.ports["http3"][0].getHost().port,
                               server_name=self.host(), ca_path=self.node.ca_path)
        for _ in range(2):
            stream = client.request("GET", "/headers", self.host())
            await within(stream.done)
            self.assertEqual(stream.status, 200)
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_requests_total", protocol="h3", project=PROJECT, kind="http")
                         - value(before, "hoodyproxy_requests_total", protocol="h3", project=PROJECT, kind="http"), 2)
        self.assertEqual(value(after, "hoodyproxy_tls_handshakes_total", result="ok", transport="quic",
                               version="TLSv1.3")
                         - value(before, "hoodyproxy_tls_handshakes_total", result="ok", transport="quic"), 1)
        self.assertEqual(value(after, "hoodyproxy_open_connections", protocol="h3"), 1)
        await client.close()

    async def test_no_label_comes_from_a_client_s_host(self):
        """Requests for ids the live map does not have (and for no route at all) count under
        project "", and no label anywhere holds what the client wrote in its Host."""
        self.assertEqual(await self.curl(project=OTHER, container=OTHER), "503")
        self.assertEqual(await self.curl(container=OTHER), "503")
        done = await curl(self.node, "-o", "/dev/null", "-w", "%{http_code}",
                          f"https://not-a-route.node-local.containers.localhost:{self.node.https_port}/",
                          host="not-a-route.node-local.containers.localhost")
        self.assertNotEqual(done.stdout.decode(), "200")
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_requests_total", code_class="5xx", project="", kind="http"), 2)
        self.assertEqual(value(after, "hoodyproxy_requests_total", code_class="4xx", project="", kind="none"), 1)
        for (name, labels), _ in after.items():
            for label, text in labels:
                self.assertNotIn(OTHER, text, f"{name} {label}")
                self.assertNotIn("not-a-route", text, f"{name} {label}")
                self.assertNotIn(CONTAINER, text, f"{name} {label}")  # (container labels are off)

    async def test_connections_and_requests_in_flight(self):
        """A request the container has not answered is in flight; a kept-alive HTTP/1.1
        connection is open; both drop to 0 when done."""
        agent = https_agent(self, self.node)
        url = f"https://{self.host()}:{self.node.https_port}/held".encode()
        pending = agent.request(b"GET", url)
        await until(lambda: self.held.waiting)
        during = await self.scrape()
        self.assertEqual(value(during, "hoodyproxy_requests_in_flight"), 1)
        self.assertEqual(value(during, "hoodyproxy_open_connections", protocol="h1"), 1)
        request = self.held.waiting.pop()
        request.write(b"done")
        request.finish()
        response = await pending
        await treq.content(response)
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_requests_in_flight"), 0)
        self.assertEqual(value(after, "hoodyproxy_open_connections", protocol="h1"), 1)  # (kept alive)
        await agent._pool.closeCachedConnections()
        await self.scrape_until(lambda s: value(s, "hoodyproxy_open_connections", protocol="h1") == 0)

    async def test_a_websocket_is_open_until_it_ends(self):
        """An open WebSocket is in hoodyproxy_open_websockets (not in flight); its end counts
        a 1xx request."""
        client, factory = await ws_connect(self, self.node, "/echo", program="http", index=self.backend.number)
        during = await self.scrape()
        self.assertEqual(value(during, "hoodyproxy_open_websockets", protocol="h1"), 1)
        self.assertEqual(value(during, "hoodyproxy_websockets_total", protocol="h1"), 1)
        self.assertEqual(value(during, "hoodyproxy_requests_in_flight"), 0)
        self.assertEqual(value(during, "hoodyproxy_open_connections", protocol="h1"), 1)
        client.sendClose(1000)
        await within(factory.closed)
        await until(lambda: any(key[0] == 101 for key in self.node.gateway.metrics.exchanges))
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_open_websockets", protocol="h1"), 0)
        self.assertEqual(value(after, "hoodyproxy_requests_total", code_class="1xx", protocol="h1",
                               project=PROJECT), 1)

    async def test_a_websocket_over_http2_counts_as_h2(self):
        """A WebSocket by extended CONNECT on an HTTP/2 connection: open under h2 while it
        lives; when the connection ends, one 1xx over h2 (a GET, as the request model and
        the audit line have it, whatever the protocol carrying it)."""
        from tests.h2client import h2_connect
        client = await h2_connect(self, self.node, self.host())
        stream = client.request(b"CONNECT", b"/echo", self.host().encode(), protocol=b"websocket",
                                headers=[(b"sec-websocket-version", b"13")], end_stream=False)
        await within(stream.head)
        self.assertEqual(stream.status, 200)
        during = await self.scrape()
        self.assertEqual(value(during, "hoodyproxy_open_websockets", protocol="h2"), 1)
        self.assertEqual(value(during, "hoodyproxy_open_connections", protocol="h2"), 1)
        client.transport.loseConnection()
        after = await self.scrape_until(lambda s: value(s, "hoodyproxy_open_websockets", protocol="h2") == 0)
        self.assertEqual(value(after, "hoodyproxy_requests_total", code_class="1xx", method="GET", protocol="h2",
                               project=PROJECT), 1)

    async def test_upstream_connect_failure(self):
        """A container whose port refuses connections: one 502, one connect_refused."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        self.assertEqual(await self.curl(index=closed_port), "502")
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_upstream_errors_total", reason="connect_refused"), 1)
        self.assertEqual(value(after, "hoodyproxy_requests_total", code_class="5xx", project=PROJECT), 1)

    async def test_permission_decisions(self):
        """A set that denies: one denied decision; one that allows: one allowed."""
        import json
        for default, expected in (("deny", "403"), ("allow", "200")):
            response = await treq.request(
                "PUT", f"http://127.0.0.1:{self.node.admin_port}/api/v1/projects/{PROJECT}/proxy/permissions",
                headers={"Authorization": f"Bearer {self.node.token}"}, agent=self.admin_agent,
                data=json.dumps({"groups": {}, "permissions": {}, "default": default}).encode())
            await treq.content(response)
            self.assertIn(response.code, (200, 201))
            self.assertEqual(await self.curl(), expected)
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_permission_decisions_total", result="denied"), 1)
        self.assertEqual(value(after, "hoodyproxy_permission_decisions_total", result="allowed"), 1)

    async def test_a_failed_tls_handshake(self):
        """A client that sends something else than a ClientHello: one failed handshake."""
        with socket.create_connection(("127.0.0.1", self.node.https_port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.settimeout(5)
            try:
                while raw.recv(4096):
                    pass
            except OSError:
                pass
        await self.scrape_until(
            lambda s: value(s, "hoodyproxy_tls_handshakes_total", result="failed", transport="tcp") == 1)

    async def test_node_facts(self):
        """Certificate expiry (the served wildcard's not-after), the live map, reloads (none),
        ACME orders (none) and the build's versions."""
        from cryptography import x509

        import hoodyproxy
        after = await self.scrape()
        with open(os.path.join(self.node.data_dir, "tls", "wildcard.pem"), "rb") as f:
            not_after = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
        self.assertEqual(value(after, "hoodyproxy_certificate_expiry_timestamp_seconds",
                               name="*.node-local.containers.localhost"), not_after)
        self.assertGreater(not_after, time.time())
        self.assertEqual(value(after, "hoodyproxy_live_map_containers", state="running"), 1)
        self.assertEqual(value(after, "hoodyproxy_live_map_containers", state="stopped"), 0)
        self.assertEqual(value(after, "hoodyproxy_config_reloads_total"), 0)
        self.assertEqual(value(after, "hoodyproxy_config_last_reload_success_timestamp_seconds"), 0)
        self.assertEqual(value(after, "hoodyproxy_acme_orders_total"), 0)
        self.assertEqual(value(after, "hoodyproxy_build_info", version=hoodyproxy.__version__), 1)
        self.assertEqual(value(after, "hoodyproxy_workers_reporting"), 1)

    async def test_reloads_are_read_from_the_node(self):
        """The node's reload counts (kept by the reload) are what the scrape says."""
        self.node.reloads = {"ok": 2, "failed": 1, "last_success": 1700000000.5}
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_config_reloads_total", result="ok"), 2)
        self.assertEqual(value(after, "hoodyproxy_config_reloads_total", result="failed"), 1)
        self.assertEqual(value(after, "hoodyproxy_config_last_reload_success_timestamp_seconds"), 1700000000.5)

    async def test_no_token_by_default_and_openmetrics_when_asked(self):
        """Without metrics_token a scrape needs nothing; Accept chooses OpenMetrics."""
        response, text = await self.get_metrics()
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertIn("# TYPE hoodyproxy_requests_total counter", text)
        response, text = await self.get_metrics(accept="application/openmetrics-text; version=1.0.0")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(
            b"application/openmetrics-text"))
        self.assertTrue(text.endswith("# EOF\n"))


class TokenTests(ScrapeTestCase):
    config = {"admin": {"metrics_token": METRICS_TOKEN}}

    async def test_metrics_token_is_required_when_set(self):
        """With [admin] metrics_token, no token and the admin token are refused 401; it is accepted."""
        response, _ = await self.get_metrics()
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="hoodyproxy-metrics"'])
        response, _ = await self.get_metrics(self.node.token)
        self.assertEqual(response.code, 401)
        response, text = await self.get_metrics(METRICS_TOKEN)
        self.assertEqual(response.code, 200)
        self.assertIn("hoodyproxy_build_info", text)


class RateLimitTests(ScrapeTestCase):
    config = {"ratelimit": {"per_address_rate": "1/min", "per_address_burst": 1}}

    async def test_refusals_by_limiter(self):
        """The second request from one address over a 1/min budget: one refusal by "address"."""
        self.assertEqual(await self.curl(), "200")
        self.assertEqual(await self.curl(), "429")
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_ratelimit_refusals_total", limiter="address"), 1)
        self.assertEqual(value(after, "hoodyproxy_requests_total", code_class="4xx"), 1)


class ContainerLabelTests(ScrapeTestCase):
    config = {"metrics": {"container_labels": True}}

    async def test_container_label_when_asked(self):
        """With [metrics] container_labels, requests carry the container the live map has."""
        self.assertEqual(await self.curl(), "200")
        after = await self.scrape()
        self.assertEqual(value(after, "hoodyproxy_requests_total", project=PROJECT, container=CONTAINER), 1)


class WorkersTests(unittest.SynchronousTestCase):
    """With two workers, a scrape adds up both; a worker killed and replaced takes nothing
    back from the counters."""

    def setUp(self):
        from bench.procs import Gateway, start_backend
        backend, port = start_backend()
        self.addCleanup(backend.stop)
        self.gateway = Gateway(["--workers", "2"])
        self.addCleanup(self.gateway.stop)
        self.host = self.gateway.register(port)
        self.sent = 0

    def scrape(self) -> tuple[dict, dict]:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.admin_port}/metrics", timeout=30) as r:
            return parse(r.read().decode())

    def scrape_until(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()[0]
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError("the metrics never said so")
            time.sleep(0.1)

    def requests(self, n: int) -> None:
        """``n`` GETs, each on a fresh connection (so the kernel spreads them over the workers)."""
        import subprocess
        url = f"https://{self.host}:{self.gateway.https_port}/"
        one = [*self.gateway.curl_args(self.host), "-s", "--http1.1", "-H", "Connection: close", "-o", "/dev/null",
               "-w", "%{http_code}\\n", url]
        args = ["curl", *one]
        for _ in range(n - 1):
            args += ["--next", *one]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout.split()
        self.assertEqual(out, ["200"] * n)
        self.sent += n

    def until_both_served(self) -> dict:
        """Requests until each worker has answered some; the scrape that shows it."""
        deadline = time.monotonic() + 60
        while True:
            self.requests(6)
            samples = self.scrape()[0]
            if all(value(samples, "hoodyproxy_worker_requests_total", worker=w) > 0 for w in ("0", "1")):
                return samples
            self.assertLess(time.monotonic(), deadline, "one worker served nothing")

    def ours(self, samples: dict) -> float:
        return value(samples, "hoodyproxy_requests_total", code_class="2xx", project=PROJECT)

    def test_both_workers_add_up_and_a_killed_one_takes_nothing_back(self):
        from tests.test_process import wait_until as _wait
        from tests.test_workers import _children
        self.scrape_until(lambda s: value(s, "hoodyproxy_workers_reporting") == 2)
        before = self.until_both_served()
        self.assertEqual(self.ours(before), self.sent)
        self.assertEqual(value(before, "hoodyproxy_request_duration_seconds_count"), self.sent)
        self.assertEqual(value(before, "hoodyproxy_tls_handshakes_total", result="ok"), self.sent)
        self.assertEqual(value(before, "hoodyproxy_worker_requests_total"), self.sent)
        counted, types = self.scrape()
        worker = _children(self.gateway.pid)[0]
        os.kill(worker, 9)
        self.assertTrue(_wait(lambda: _children(self.gateway.pid) and _children(self.gateway.pid)[0] != worker))
        after = self.scrape_until(lambda s: value(s, "hoodyproxy_workers_reporting") == 2)
        for (name, labels), was in counted.items():
            if types[name] in ("counter", "histogram") and name != "hoodyproxy_worker_restarts_total":
                self.assertGreaterEqual(after.get((name, labels), 0), was, f"{name} {dict(labels)} went back")
        self.assertEqual(self.ours(after), self.sent)
        self.assertEqual(value(after, "hoodyproxy_worker_restarts_total"), 1)
        again = self.until_both_served_since(after)
        self.assertEqual(self.ours(again), self.sent)
        self.assertEqual(value(again, "hoodyproxy_worker_requests_total"), self.sent)

    def until_both_served_since(self, earlier: dict) -> dict:
        """Requests until the new worker 1 has answered some too."""
        deadline = time.monotonic() + 60
        while True:
            self.requests(6)
            samples = self.scrape()[0]
            if all(value(samples, "hoodyproxy_worker_requests_total", worker=w)
                   > value(earlier, "hoodyproxy_worker_requests_total", worker=w) for w in ("0", "1")):
                return samples
            self.assertLess(time.monotonic(), deadline, "one worker served nothing")

"""Reload, log reopening and readiness, on a node in this process and in pure units.

What a reload changes is judged by the next requests through a real node (loopback,
real TLS, real backends), never by the settings object alone.  The node reads its
config from a file the test writes (:func:`reloadable`), with the test harness's ports
and data directory as command-line overrides, as twistd gives them.
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

from hoodyproxy.config import ConfigError, settings_from_mapping, settings_to_mapping
from hoodyproxy.limits import Limiters, RateLimitSettings
from hoodyproxy.observe.audit import AuditLog
from hoodyproxy.reload import ConfigSource, RESTART_KEYS, changed_keys, plan_reload
from tests import backends
from tests.support import Backend, audit_lines, host_for, raw_backend, register, start_node, tls_exchange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings(doc: dict | None = None):
    return settings_from_mapping({"node": {"data_dir": "/tmp/hoodyproxy-unused"}, **(doc or {})})


def status_of(response: bytes) -> int:
    parts = response.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


# -- the plan (pure) -----------------------------------------------------------------------

class PlanTests(unittest.SynchronousTestCase):

    def plan(self, old: dict, new: dict, *, rules: bool = False, cap: bool = False):
        return plan_reload(settings(old), settings(new), transparent_rules=rules, can_be_transparent=cap)

    def test_same_settings_change_nothing(self):
        """Reading the same file again changes nothing and names nothing."""
        plan = self.plan({}, {})
        self.assertEqual((plan.changed, plan.not_applied), ((), ()))

    def test_live_keys_are_named_and_applied(self):
        """A rate limit and a timeout that changed are both named and in the new settings."""
        plan = self.plan({}, {"ratelimit": {"per_address_burst": 5}, "upstream": {"response_timeout": 2}})
        self.assertEqual(plan.changed, ("[ratelimit] per_address_burst", "[upstream] response_timeout"))
        self.assertEqual(plan.not_applied, ())
        self.assertEqual((plan.settings.ratelimit.per_address.burst, plan.settings.response_timeout), (5, 2))

    def test_listen_address_needs_a_restart(self):
        """A new listen address is named as not applied and left as it was; the live key
        beside it still applies."""
        plan = self.plan({"listen": {"http": "127.0.0.1:8080"}},
                         {"listen": {"http": "127.0.0.1:9090"}, "client": {"idle_timeout": 5}})
        self.assertEqual(plan.changed, ("[client] idle_timeout",))
        self.assertEqual(plan.not_applied, ("[listen] http",))
        self.assertEqual(str(plan.settings.http[0]), "127.0.0.1:8080")
        self.assertEqual(plan.settings.client_idle_timeout, 5)

    def test_every_restart_key_is_one_the_config_has(self):
        """RESTART_KEYS names real keys (a typo there would let a key change live)."""
        every = set()
        for section, table in settings_to_mapping(settings()).items():
            if section != "programs":
                every |= {f"[{section}] {name}" for name in table}
        self.assertEqual(RESTART_KEYS - every, set())

    def test_program_added_is_one_key(self):
        """A program added is named once, as [programs.NAME]; a field changed by its own key."""
        plan = self.plan({}, {"programs": {"web": {"index": "instance", "port": 8000},
                                           "terminal": {"port": 7681}}})
        self.assertEqual(plan.changed, ("[programs.terminal] port", "[programs.web]"))
        self.assertEqual(plan.settings.programs["web"].port, 8000)

    def test_transparent_without_rules_needs_a_restart(self):
        """Switching to transparent mode needs netfilter rules the node did not install:
        not applied; headers to proxy-protocol needs none: applied."""
        plan = self.plan({"client_ip": {"mode": "headers"}}, {"client_ip": {"mode": "transparent"}})
        self.assertEqual(plan.not_applied, ("[client_ip] mode",))
        self.assertEqual(plan.settings.client_ip_mode, "headers")
        plan = self.plan({"client_ip": {"mode": "headers"}}, {"client_ip": {"mode": "proxy-protocol"}})
        self.assertEqual(plan.changed, ("[client_ip] mode",))

    def test_auto_without_rules_needs_a_restart_only_where_it_would_be_transparent(self):
        """``auto`` would be transparent with CAP_NET_ADMIN (restart), headers without (live)."""
        old, new = {"client_ip": {"mode": "headers"}}, {"client_ip": {"mode": "auto"}}
        self.assertEqual(self.plan(old, new, cap=True).not_applied, ("[client_ip] mode",))
        self.assertEqual(self.plan(old, new, cap=False).changed, ("[client_ip] mode",))

    def test_program_added_as_transparent_without_rules(self):
        """A new program asking for transparent mode is added, without that mode."""
        plan = self.plan({"client_ip": {"mode": "headers"}},
                         {"client_ip": {"mode": "headers"},
                          "programs": {"web": {"index": "port", "client_ip": "transparent"}}})
        self.assertEqual(plan.changed, ("[programs.web]",))
        self.assertEqual(plan.not_applied, ("[programs.web] client_ip",))
        self.assertIsNone(plan.settings.programs["web"].client_ip)

    def test_with_rules_installed_transparent_is_live(self):
        plan = self.plan({"client_ip": {"mode": "headers"}}, {"client_ip": {"mode": "transparent"}}, rules=True)
        self.assertEqual(plan.changed, ("[client_ip] mode",))

    def test_changed_keys_names_removed_program(self):
        old = settings({"programs": {"web": {"index": "port"}}})
        self.assertEqual(changed_keys(old, settings()), ["[programs.web]"])

    def test_config_source_reads_the_file_with_overrides_on_top(self):
        """As at start: the file, then the command-line options over it."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[node]\ndata_dir = "/tmp/x"\nname = "alpha"\n[upstream]\nconnect_timeout = 3\n')
        s = ConfigSource(path, {"node.name": "beta", "node.zone": None}).load()
        self.assertEqual((s.node, s.connect_timeout), ("beta", 3))

    def test_config_source_names_the_key_at_fault(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[upstream]\nconnect_timeout = -1\n')
        with self.assertRaises(ConfigError) as caught:
            ConfigSource(path).load()
        self.assertEqual(caught.exception.key, "[upstream] connect_timeout")


class LimitersReconfigureTests(unittest.SynchronousTestCase):

    def test_new_burst_applies_to_counts_kept(self):
        """A smaller burst refuses a client that already used it up; its count was kept."""
        now = [1000.0]
        limiters = Limiters(RateLimitSettings.from_mapping({"per_address_rate": "1/min", "per_address_burst": 10}),
                            clock=lambda: now[0])
        for _ in range(3):
            self.assertTrue(limiters.check_client("192.0.2.1").allowed)
        limiters.reconfigure(RateLimitSettings.from_mapping({"per_address_rate": "1/min", "per_address_burst": 2}))
        self.assertFalse(limiters.check_client("192.0.2.1").allowed)
        self.assertTrue(limiters.check_client("192.0.2.2").allowed)

    def test_new_table_size_starts_over(self):
        """A new table_size rebuilds the tables empty: the same client is allowed again."""
        now = [1000.0]
        base = {"per_address_rate": "1/min", "per_address_burst": 1}
        limiters = Limiters(RateLimitSettings.from_mapping(base), clock=lambda: now[0])
        limiters.check_client("192.0.2.1")
        self.assertFalse(limiters.check_client("192.0.2.1").allowed)
        limiters.reconfigure(RateLimitSettings.from_mapping({**base, "table_size": 1000}))
        self.assertTrue(limiters.check_client("192.0.2.1").allowed)


class AuditReopenTests(unittest.SynchronousTestCase):

    def test_reopen_after_rename_writes_to_the_path(self):
        """logrotate renames the file; after reopen the next line is in a new file at the
        original path, and the old one keeps only what came before."""
        path = self.mktemp()
        audit = AuditLog(path)
        self.addCleanup(audit.close)
        audit.record({"time": 1.0, "client": "192.0.2.1", "path": "/before"})
        os.rename(path, path + ".1")
        audit.reopen()
        audit.record({"time": 2.0, "client": "192.0.2.1", "path": "/after"})
        with open(path) as f:
            self.assertEqual([json.loads(line)["path"] for line in f], ["/after"])
        with open(path + ".1") as f:
            self.assertEqual([json.loads(line)["path"] for line in f], ["/before"])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class ControlLineTests(unittest.SynchronousTestCase):
    """A worker's stdin: the one-byte store notification still works beside JSON lines."""

    def control(self):
        from hoodyproxy.workers import _Control
        calls = []

        class Store:
            def __init__(self, name):
                self.refresh = lambda: calls.append(name)

        class Stack:
            directory, permissions, aliases = Store("directory"), Store("permissions"), Store("aliases")

            @staticmethod
            def apply_settings(s):
                calls.append(("settings", s.response_timeout))

            class audit:
                path = None
                reopen = staticmethod(lambda: calls.append("reopen"))
        return _Control(Stack, reactor), calls

    def test_empty_line_refreshes_once_per_read(self):
        control, calls = self.control()
        control.dataReceived(b"\n\n")
        self.assertEqual(calls, ["directory", "permissions", "aliases"])

    def test_settings_line_split_across_reads(self):
        """A settings line arriving in pieces is applied once, when whole."""
        control, calls = self.control()
        line = json.dumps({"settings": settings_to_mapping(settings({"upstream": {"response_timeout": 7}}))})
        control.dataReceived(line[:10].encode())
        self.assertEqual(calls, [])
        control.dataReceived(line[10:].encode() + b"\n" + b'{"reopen": "logs"}\n')
        self.assertEqual(calls, [("settings", 7), "reopen"])


class WorkerPoolReloadTests(unittest.SynchronousTestCase):

    def test_workers_started_later_get_the_new_settings(self):
        """After a reload, a worker (re)started gets the settings in force, and every
        running worker is sent them as one JSON line."""
        from hoodyproxy.config import ListenAddress
        from hoodyproxy.sockets import Listeners, bind_stream
        from hoodyproxy.workers import WorkerPool
        listeners = Listeners()
        listeners.add("https", bind_stream(ListenAddress("127.0.0.1", 0)))
        self.addCleanup(listeners.close)
        pool = WorkerPool(reactor, settings(), listeners, 2)
        written = []

        class Transport:
            write = staticmethod(written.append)

        class Process:
            transport = Transport
        pool.processes[1] = Process
        new = settings({"upstream": {"response_timeout": 9}})
        pool.reload(new)
        self.assertEqual(json.loads(pool.spec)["settings"]["upstream"]["response_timeout"], 9)
        self.assertEqual(len(written), 1)
        self.assertTrue(written[0].endswith(b"\n"))
        self.assertEqual(settings_from_mapping(json.loads(written[0])["settings"]), new)


# -- a node in this process ----------------------------------------------------------------

def reloadable(case, node, text: str) -> str:
    """Give ``node`` a config file holding ``text`` (TOML), read with the harness's ports,
    data directory, audit file and client IP mode as command-line overrides; its path."""
    path = os.path.join(node.data_dir, "node.toml")
    write(path, text)
    node.config_source = ConfigSource(path, {
        "node.data_dir": node.data_dir, "listen.https": "127.0.0.1:0", "listen.http": "127.0.0.1:0",
        "listen.admin": "127.0.0.1:0", "audit.path": os.path.join(node.data_dir, "audit.log"),
        "client_ip.mode": "headers"})
    return path


def write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class NodeTestCase(unittest.TestCase):
    config: dict = {}
    toml = ""

    def setUp(self):
        self.node = start_node(self, self.config)
        self.path = reloadable(self, self.node, self.toml)
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.host = host_for(index=self.backend.number)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    async def get(self, path: str = "/headers", host: str | None = None) -> int:
        host = host or self.host
        payload = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        return status_of(await deferToThread(tls_exchange, self.node, host, payload))

    async def admin(self, method: str, path: str, token: str | None = None) -> tuple[int, dict]:
        headers = {} if token == "" else {"Authorization": f"Bearer {token or self.node.token}"}
        response = await treq.request(method, f"http://127.0.0.1:{self.node.admin_port}{path}",
                                      agent=self.agent, headers=headers)
        return response.code, json.loads(await response.content() or b"null")


class ReloadAPITests(NodeTestCase):
    config = {"ratelimit": {"per_address_rate": "1/min", "per_address_burst": 1000}}
    toml = '[ratelimit]\nper_address_rate = "1/min"\nper_address_burst = 1000\n'

    async def test_post_reload_answers_what_changed_and_applies_it(self):
        """POST /api/v1/reload: 200 naming the keys changed and those needing a restart;
        the new per-address burst refuses this client's next requests."""
        self.assertEqual([await self.get() for _ in range(3)], [200] * 3)
        write(self.path, self.toml.replace("1000", "2") + '[listen]\nadmin = "127.0.0.1:1"\n'
              '[upstream]\nresponse_timeout = 30\n')
        self.node.config_source = ConfigSource(self.path, {
            k: v for k, v in self.node.config_source.overrides.items() if k != "listen.admin"})
        status, body = await self.admin("POST", "/api/v1/reload")
        self.assertEqual(status, 200, body)
        self.assertEqual(body, {"changed": ["[ratelimit] per_address_burst", "[upstream] response_timeout"],
                                "not_applied": ["[listen] admin"]})
        self.assertEqual(await self.get(), 429)
        self.assertEqual(self.node.reloads["ok"], 1)
        self.assertIsNotNone(self.node.reloads["last_success"])

    async def test_post_reload_with_an_invalid_config_is_422_and_changes_nothing(self):
        """The ConfigError's key is the field; the limits in force stay."""
        write(self.path, self.toml.replace("1000", "2") + '[upstream]\nconnect_timeout = -1\n')
        status, body = await self.admin("POST", "/api/v1/reload")
        self.assertEqual(status, 422)
        self.assertEqual(body, {"error": "invalid_config", "field": "[upstream] connect_timeout",
                                "message": "[upstream] connect_timeout: must be greater than 0"})
        self.assertEqual([await self.get() for _ in range(3)], [200] * 3)
        self.assertEqual((self.node.reloads["ok"], self.node.reloads["failed"]), (0, 1))

    async def test_post_reload_of_unreadable_toml_is_422(self):
        write(self.path, "[ratelimit\n")
        status, body = await self.admin("POST", "/api/v1/reload")
        self.assertEqual((status, body["error"], body["field"]), (422, "invalid_config", "--config"))

    async def test_post_reload_without_a_config_file_is_409(self):
        self.node.config_source = None
        status, body = await self.admin("POST", "/api/v1/reload")
        self.assertEqual((status, body["error"]), (409, "no_config"))
        self.assertIn("--config", body["message"])

    async def test_reload_needs_the_token_and_a_post(self):
        self.assertEqual((await self.admin("POST", "/api/v1/reload", token=""))[0], 401)
        self.assertEqual((await self.admin("GET", "/api/v1/reload"))[0], 405)

    async def test_hoodyproxy_reload_prints_what_changed(self):
        """The ``hoodyproxy reload`` command posts and prints the answer."""
        write(self.path, self.toml.replace("1000", "500"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOODYPROXY_")}
        env["PYTHONPATH"] = ROOT
        done = await deferToThread(subprocess.run, [
            sys.executable, "-m", "hoodyproxy.admin.cli", "--data-dir", self.node.data_dir, "reload"],
            capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout), {"changed": ["[ratelimit] per_address_burst"],
                                                   "not_applied": []})
        self.assertEqual(self.node.settings.ratelimit.per_address.burst, 500)


class ReloadAppliesTests(NodeTestCase):
    toml = ""

    async def test_response_timeout_applies_to_the_next_request(self):
        """After a reload to response_timeout = 0.5, a container that never answers costs
        the next request a 504 (before it, the timeout was 60 s)."""
        port, _ = raw_backend(self, lambda proto, data: None)  # reads, never answers
        register(self.node, port, container="fedcba9876543210fedcba98")
        host = host_for(index=port, container="fedcba9876543210fedcba98")
        self.assertEqual(self.node.gateway.settings.response_timeout, 60)
        write(self.path, "[upstream]\nresponse_timeout = 0.5\n")
        self.node.reload()
        self.assertEqual(await self.get("/slow", host=host), 504)

    async def test_program_added_routes_at_once(self):
        """A program added by a reload is routed by the next request; removed, it is not."""
        write(self.path, "[programs.api]\nindex = \"instance\"\nport = %d\nkind = \"http\"\n"
              % self.backend.number)
        self.node.reload()
        self.assertEqual(await self.get(host=host_for(program="api", index=1)), 200)
        write(self.path, "")
        self.node.reload()
        self.assertEqual(await self.get(host=host_for(program="api", index=1)), 404)

    async def test_audit_path_moves(self):
        """A new [audit] path: the next request's line is in the new file."""
        new = os.path.join(self.node.data_dir, "moved", "audit.log")
        self.node.config_source = ConfigSource(self.path, {
            k: v for k, v in self.node.config_source.overrides.items() if k != "audit.path"})
        write(self.path, f'[audit]\npath = "{new}"\n')
        plan = self.node.reload()
        self.assertIn("[audit] path", plan.changed)
        self.assertEqual(await self.get("/headers?to-the-new-file"), 200)
        self.node.audit.flush()
        with open(new) as f:
            self.assertIn("/headers?to-the-new-file", f.read())

    async def test_new_tls_certificate_is_served(self):
        """A reload naming other [tls] files serves them from the next handshake."""
        import ssl
        from hoodyproxy.tls import ensure_dev_certificates
        other = ensure_dev_certificates(os.path.join(self.node.data_dir, "other-tls"), "node-local",
                                        "containers.localhost")
        write(self.path, f'[tls]\ncertificate = "{other.cert_path}"\nkey = "{other.key_path}"\n')
        self.assertIn("[tls] certificate", self.node.reload().changed)

        def handshake(ca: str) -> bool:
            context = ssl.create_default_context(cafile=ca)
            import socket
            with socket.create_connection(("127.0.0.1", self.node.https_port), timeout=10) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname=self.host):
                        return True
                except ssl.SSLError:
                    return False
        self.assertTrue(await deferToThread(handshake, other.ca_path))
        self.assertFalse(await deferToThread(handshake, self.node.ca_path))


    async def test_admin_token_changes_for_the_next_request(self):
        """A new [admin] token: the old one is refused, the new one let in."""
        old = self.node.token
        write(self.path, '[admin]\ntoken = "a-new-admin-token-0123456789"\n')
        self.node.reload()
        self.assertEqual((await self.admin("GET", "/api/v1/containers", token=old))[0], 401)
        self.assertEqual((await self.admin("GET", "/api/v1/containers", token="a-new-admin-token-0123456789"))[0],
                         200)

    async def test_http2_off_is_offered_no_more(self):
        """[http2] enabled = false: the next handshake offers only HTTP/1.1 by ALPN."""
        import socket
        import ssl

        def negotiated() -> str | None:
            context = ssl.create_default_context(cafile=self.node.ca_path)
            context.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", self.node.https_port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=self.host) as tls:
                    return tls.selected_alpn_protocol()
        self.assertEqual(await deferToThread(negotiated), "h2")
        write(self.path, "[http2]\nenabled = false\n")
        self.assertEqual(self.node.reload().changed, ("[http2] enabled",))
        self.assertEqual(await deferToThread(negotiated), "http/1.1")


class LogReopenTests(NodeTestCase):

    async def test_reopen_after_rename(self):
        """logrotate renames the audit file; after reopen_logs the next request's line
        lands in a new file at the original path."""
        path = self.node.settings.audit_file
        self.assertEqual(await self.get("/headers?before"), 200)
        self.node.audit.flush()
        os.rename(path, path + ".1")
        self.node.reopen_logs()
        self.assertEqual(await self.get("/headers?after"), 200)
        self.assertEqual([line["path"] for line in audit_lines(self.node)], ["/headers?after"])
        with open(path + ".1") as f:
            self.assertNotIn("/headers?after", f.read())


class ReadinessTests(NodeTestCase):

    async def test_readyz_once_started(self):
        """A started node is ready; /readyz and /livez need no token."""
        self.assertEqual(await self.admin("GET", "/readyz", token=""), (200, {"status": "ok"}))
        self.assertEqual(await self.admin("GET", "/livez", token=""), (200, {"status": "ok"}))
        self.assertEqual(await self.admin("GET", "/healthz", token=""), (200, {"status": "ok"}))

    async def test_readyz_while_draining(self):
        """503 while the node drains (another part of the node sets ``draining``)."""
        self.node.draining = True
        self.assertEqual(await self.admin("GET", "/readyz", token=""), (503, {"status": "draining"}))
        self.assertEqual(await self.admin("GET", "/livez", token=""), (200, {"status": "ok"}))
        self.node.draining = False
        self.assertEqual((await self.admin("GET", "/readyz", token=""))[0], 200)

    async def test_readyz_before_started(self):
        """503 until the node has started (certificates and the live map loaded)."""
        self.node.ready = False
        self.assertEqual(await self.admin("GET", "/readyz", token=""), (503, {"status": "starting"}))

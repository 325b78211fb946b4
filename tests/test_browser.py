"""A real browser through the gateway: headless Chromium loads a page and opens a WebSocket,
over HTTP/2, and loads a page over HTTP/3 with its own QUIC stack.

Debian's ``chromium`` is started by the test with the route hostnames mapped to loopback
and the gateway's certificate pinned by its public key (no CA is installed anywhere).
The page's script opens ``wss://<same host>/ws``, sends a message, closes the socket on
the echo and then fetches ``/result?echo=<message>`` through the gateway; the container
records that request, which is what the test waits for.  Skipped when Chromium is absent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

from autobahn.twisted.resource import WebSocketResource
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.resource import Resource

from hoodyproxy.demo import make_echo_factory
from tests.support import Backend, audit_lines, host_for, register, start_node, wait

CHROMIUM = "/usr/bin/chromium"

#: How long the browser may take from launch to the container seeing the result request.
BROWSER_TIMEOUT = 60.0

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>browser test</title></head>
<body><p id="state">starting</p>
<script>
(function () {
  var message = %(message)s;
  var state = document.getElementById("state");
  function report(query) {
    fetch("/result?" + query, {cache: "no-store"});
  }
  var echo = null;
  var ws = new WebSocket("wss://" + location.host + "/ws");
  ws.onopen = function () { state.textContent = "open"; ws.send(message); };
  ws.onmessage = function (event) { echo = event.data; ws.close(1000); };
  ws.onclose = function (event) {
    if (echo !== null) {
      report("echo=" + encodeURIComponent(echo));
    } else {
      report("error=" + encodeURIComponent("closed before echo, code " + event.code));
    }
  };
})();
</script></body></html>
"""


class _Page(Resource):
    isLeaf = True

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return (_PAGE % {"message": json.dumps(self.message)}).encode()


class _Result(Resource):
    """Records the query of every ``GET /result`` the page makes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, str]] = []

    def render_GET(self, request):
        self.seen.append({k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items()})
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok"


class _Empty(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setResponseCode(204)
        return b""


def browser_app(message: str) -> tuple[Resource, _Result]:
    """The container: the page at ``/``, a WebSocket echo at ``/ws``, the result recorder."""
    root = Resource()
    result = _Result()
    root.putChild(b"", _Page(message))
    root.putChild(b"ws", WebSocketResource(make_echo_factory(reactor)))
    root.putChild(b"result", result)
    root.putChild(b"favicon.ico", _Empty())
    return root, result


def spki_sha256_base64(cert_path: str) -> str:
    """Base64 SHA-256 of the leaf certificate's SubjectPublicKeyInfo, as Chromium pins it."""
    with open(cert_path, "rb") as f:
        leaf = x509.load_pem_x509_certificates(f.read())[0]
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class Chromium:
    """A headless Chromium process in a session of its own, with a throwaway profile."""

    def __init__(self, case: unittest.TestCase, url: str, spki: str, resolve_to: str,
                 quic_origin: str | None = None) -> None:
        self.workdir = tempfile.mkdtemp(prefix="hoodyproxy-chromium-")
        case.addCleanup(shutil.rmtree, self.workdir, True)
        self.log_path = os.path.join(self.workdir, "chromium.log")
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--password-store=basic",
                # QUIC only where the test asks for it (``host:port``): Chromium then speaks
                # HTTP/3 to that origin at once, as it would after seeing Alt-Svc.
                *(["--enable-quic", f"--origin-to-force-quic-on={quic_origin}"] if quic_origin
                  else ["--disable-quic"]),
                f"--user-data-dir={os.path.join(self.workdir, 'profile')}",
                f"--host-resolver-rules=MAP *.containers.localhost {resolve_to}",
                f"--ignore-certificate-errors-spki-list={spki}",
                url]
        with open(self.log_path, "wb") as log:
            # TMPDIR: Chromium's singleton lock directory goes into the workdir, removed with it.
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True, env={**os.environ, "TMPDIR": self.workdir})
        # Registered after the rmtree, so it runs first: the profile is gone only once
        # every process of the browser is.
        case.addCleanup(self.kill)

    def kill(self) -> None:
        """Kill the browser's whole process group (renderers, zygotes, GPU process) and reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        # The children were killed with the leader; give the kernel a moment to reap them
        # before the profile directory they write into is removed.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def log(self) -> str:
        """The end of what Chromium printed, without its complaints about the missing D-Bus."""
        with open(self.log_path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(line for line in lines if "dbus" not in line)[-4000:]


class BrowserTests(unittest.TestCase):
    """Headless Chromium through the gateway: TLS, the page, and a WebSocket echo."""

    timeout = BROWSER_TIMEOUT + 30

    def setUp(self):
        if not os.access(CHROMIUM, os.X_OK):
            raise unittest.SkipTest(f"{CHROMIUM} is not installed (Debian package chromium)")
        self.node = start_node(self)
        self.message = "hello through the gateway " + secrets.token_hex(8) + " \u00e9\u2713"
        root, self.result = browser_app(self.message)
        self.backend = Backend(self, root)
        register(self.node, self.backend.number)
        cert_path = (self.node.settings.tls_certificate
                     or os.path.join(self.node.settings.data_dir, "tls", "wildcard.pem"))
        self.spki = spki_sha256_base64(cert_path)
        self.host = host_for(index=self.backend.number)

    async def wait_for_result(self, browser: Chromium) -> dict[str, str]:
        """The first result the page reported; fails early if the browser exits."""
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not self.result.seen:
            if browser.process.poll() is not None:
                self.fail(f"chromium exited with {browser.process.returncode}:\n{browser.log()}")
            if time.monotonic() > deadline:
                self.fail(f"no result from the page within {BROWSER_TIMEOUT} s; chromium said:\n{browser.log()}")
            await wait(0.05)
        return self.result.seen[0]

    async def wait_for_audit(self, predicate, what: str, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in audit_lines(self.node) if r.get("host", "").startswith(self.host)]
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                self.fail(f"audit log never showed {what}: {records}")
            await wait(0.05)

    async def test_page_and_websocket_echo_through_the_gateway(self):
        """Chromium loads the page over HTTPS, echoes a message over wss:// and reports it back.

        The container sees the exact message come back; the audit log shows the page (200)
        and the WebSocket (101), both over HTTP/2 (the WebSocket by RFC 8441 extended
        CONNECT, which Chromium uses because the gateway offers it).
        """
        url = f"https://{self.host}:{self.node.https_port}/"
        browser = Chromium(self, url, self.spki, "127.0.0.1")

        result = await self.wait_for_result(browser)
        if result != {"echo": self.message}:
            self.fail(f"the page reported {result}, not the echo of {self.message!r};\n"
                      f"audit: {audit_lines(self.node)}\nchromium said:\n{browser.log()}")

        def page_and_socket(records):
            return (any(r["path"] == "/" and r["method"] == "GET" for r in records)
                    and any(r["path"] == "/ws" for r in records))
        records = await self.wait_for_audit(page_and_socket, "the page and the WebSocket")
        page = [r for r in records if r["path"] == "/" and r["method"] == "GET"]
        socket = [r for r in records if r["path"] == "/ws"]
        self.assertEqual([r["status"] for r in page], [200])
        self.assertEqual([r["status"] for r in socket], [101])
        for record in page + socket:
            self.assertEqual(record["http"], "2", record)

    async def test_page_over_http3(self):
        """Chromium's own QUIC stack against the gateway's: the page and the fetch go over
        HTTP/3.  Chromium does not offer WebSocket over HTTP/3 (RFC 9220), so its socket
        goes over TCP and still echoes."""
        url = f"https://{self.host}:{self.node.https_port}/"
        browser = Chromium(self, url, self.spki, "127.0.0.1",
                           quic_origin=f"{self.host}:{self.node.https_port}")
        result = await self.wait_for_result(browser)
        if result != {"echo": self.message}:
            self.fail(f"the page reported {result}, not the echo of {self.message!r};\n"
                      f"audit: {audit_lines(self.node)}\nchromium said:\n{browser.log()}")

        def page_result_and_socket(records):
            return (any(r["path"] == "/" for r in records) and any(r["path"] == "/ws" for r in records)
                    and any(r["path"].startswith("/result") for r in records))
        records = await self.wait_for_audit(page_result_and_socket, "the page, the result and the WebSocket")
        page = [r for r in records if r["path"] == "/" and r["method"] == "GET"]
        fetched = [r for r in records if r["path"].startswith("/result")]
        socket = [r for r in records if r["path"] == "/ws"]
        self.assertEqual([(r["status"], r["http"]) for r in page], [(200, "3")])
        self.assertEqual([(r["status"], r["http"]) for r in fetched], [(200, "3")])
        self.assertEqual([r["status"] for r in socket], [101])

"""End to end: permission sets set through the real admin API, enforced by a real node.

Every test here starts a node on loopback with real TLS, points every program of one
container at a recording backend (a twisted.web service that remembers what it received,
plus a small autobahn WebSocket service), sets permission sets with ``PUT`` on the admin
API and talks to the gateway with treq or autobahn.  It asserts what the client got
(status, ``WWW-Authenticate``, JSON body), whether the container received the request
(and without the gateway's credentials), and what the audit line says.

The behaviour under test:

- A container-level set, if present, replaces the project-level set; with neither, the
  request passes.
- Denied with no credentials offered while a credential-based group exists: 401 with the
  matching challenges (Basic with a realm, Bearer); otherwise 403.  JSON body; it never
  reveals which group almost matched.
- Bearer credentials are also accepted from the ``hoody_token`` cookie and query
  parameter.  Credentials the gateway consumed are removed before forwarding.
- A WebSocket allowed only at a read-only level is forwarded read-only: the container's
  messages reach the client, the client's data frames are not forwarded, and a data frame
  closes the connection with 1008.
- Every decision is in the audit line; changes apply to the next request.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from urllib.parse import parse_qsl

import jwt
import treq
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (WebSocketClientFactory, WebSocketClientProtocol,
                                        WebSocketServerFactory, WebSocketServerProtocol)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from tests.ldap_server import GROUPS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD, USERS, start_slapd
from tests.support import (CONTAINER, PROJECT, Backend, audit_lines, host_for, https_agent,
                           register, start_node, until, url)

OTHER_CONTAINER = "aaaaaaaaaaaaaaaaaaaaaaaa"
#: What the node's audit and 401 challenges call the realm by default.
REALM = "hoodyproxy"
#: A ``files`` program (the default table has none): instance-indexed, port 8222.
CONFIG = {"programs": {"files": {"index": "instance", "port": 8222, "kind": "files"}},
          # The matrix offers hundreds of wrong credentials from one address on purpose;
          # the failed-authentication limit is tested in tests/test_ratelimit_e2e.py.
          "ratelimit": {"failed_auth_burst": 100000}}
INSTANCE_PROGRAMS = ("terminal", "display", "sqlite", "files")

TOKEN = "robot-token-0123456789abcdefghijklmnop"
OTHER_TOKEN = "robot-token-zyxwvutsrqponmlkjihgfedcba"
USERNAME, PASSWORD = "deploy", "correct horse battery staple"
ISSUER, AUDIENCE = "https://idp.example", "hoodyproxy"
STAFF = f"cn=staff,{GROUPS}"  # alice is a member, bob is not


# -- credentials ------------------------------------------------------------------------

def rsa_key(name: str = "main") -> rsa.RSAPrivateKey:
    """One RSA key per name, made once per test run."""
    return _rsa_key(name)


@functools.cache
def _rsa_key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_claims(**overrides) -> dict:
    """Claims the JWT group below accepts, with ``overrides`` (None removes a claim)."""
    now = int(time.time())
    payload = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300,
               "role": "admin"}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def signed(claims: dict | None = None, key_name: str = "main") -> str:
    return jwt.encode(claims if claims is not None else jwt_claims(), rsa_key(key_name),
                      algorithm="RS256")


def unsigned_input(header: dict, claims: dict) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())


def basic(username: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def jwt_group() -> dict:
    return {"type": "jwt", "public_key": public_pem(rsa_key()), "algorithms": ["RS256"],
            "issuer": ISSUER, "audience": AUDIENCE, "claims": {"role": "admin"}}


def ldap_group(server_url: str) -> dict:
    return {"type": "ldap", "url": server_url, "user_dn": f"uid={{username}},{PEOPLE}",
            "group_dn": STAFF, "timeout": 5}


# -- the container's side ---------------------------------------------------------------

class Recorder(Resource):
    """Answers every request with 200 and remembers what it received."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def render(self, request):
        body = request.content.read()
        self.seen.append({
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": {k.decode().lower(): [v.decode("latin-1") for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "body": body.decode("latin-1"),
        })
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"container": "answered"}\n'

    def find(self, marker: str) -> dict | None:
        """The request whose query carried ``m=<marker>``, if it arrived."""
        for seen in self.seen:
            query = seen["uri"].partition("?")[2]
            if ("m", marker) in parse_qsl(query, keep_blank_values=True):
                return seen
        return None


class GreetingProtocol(WebSocketServerProtocol):
    """Sends a greeting when opened, then echoes; tells the factory everything it saw."""

    def onConnect(self, request):
        self.factory.handshakes.append({"path": request.path, "params": request.params,
                                        "headers": dict(request.headers)})

    def onOpen(self):
        self.sendMessage(b"greeting from the container")

    def onMessage(self, payload, isBinary):
        self.factory.received.append(payload)
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closes.append(code)


def greeting_factory() -> WebSocketServerFactory:
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = GreetingProtocol
    factory.setProtocolOptions(allowedOrigins=["*"], allowNullOrigin=True, webStatus=False)
    factory.handshakes, factory.received, factory.closes = [], [], []
    return factory


class App(Resource):
    """``/ws`` is the WebSocket service; every other path is the recorder."""

    def __init__(self, recorder: Recorder, ws_factory: WebSocketServerFactory) -> None:
        super().__init__()
        self.recorder = recorder
        self.ws = WebSocketResource(ws_factory)

    def getChild(self, name, request):
        return self.ws if name == b"ws" else self.recorder


# -- the client's side: an autobahn WebSocket client -----------------------------------

class Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.messages.append(payload)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback((wasClean, code, reason))


async def ws_connect(case, node, path: str, headers: dict | None = None, program: str = "display",
                     index: int = 1):
    """An opened autobahn client (wss://, trusting the node's CA) and its factory."""
    host = host_for(program=program, index=index)
    factory = WebSocketClientFactory(f"wss://{host}:{node.https_port}{path}", headers=headers or {})
    factory.protocol = Client
    factory.opened, factory.closed, factory.messages = defer.Deferred(), defer.Deferred(), []
    with open(node.ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    endpoint = wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=ca),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", node.https_port))
    proto = await endpoint.connect(factory)

    def close():
        if not factory.closed.called:
            proto.dropConnection(abort=True)
            return factory.closed
    case.addCleanup(close)
    await factory.opened
    return proto, factory


class RawClient(Protocol):
    """A raw HTTP/1.1-over-TLS client: the test writes bytes and reads what comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False
        self.closed = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = True
        self.closed.callback(None)


async def raw_tls_client(case, node, hostname: str) -> RawClient:
    with open(node.ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    endpoint = wrapClientTLS(ssl.optionsForClientTLS(hostname, trustRoot=ca),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", node.https_port))
    client = await connectProtocol(endpoint, RawClient())

    def close():
        if not client.lost:
            client.transport.abortConnection()
            return client.closed
    case.addCleanup(close)
    return client


# -- the common fixture -----------------------------------------------------------------

class PermissionsE2ETestCase(unittest.TestCase):
    """A node with a ``files`` program; container CONTAINER's every program goes to one
    recording backend (instance programs through port overrides, ``http`` by its index)."""

    def setUp(self):
        self.node = start_node(self, CONFIG)
        self.recorder = Recorder()
        self.ws_factory = greeting_factory()
        self.backend = Backend(self, App(self.recorder, self.ws_factory))
        ports = {name: self.backend.number for name in INSTANCE_PROGRAMS}
        register(self.node, 0, ports=ports)
        register(self.node, 0, container=OTHER_CONTAINER, ports=ports)
        self.agent = https_agent(self, self.node)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.admin_agent = Agent(reactor, pool=pool)
        self.markers = 0

    # admin API

    def set_url(self, scope: str, set_id: str) -> str:
        return (f"http://127.0.0.1:{self.node.admin_port}/api/v1/"
                f"{'projects' if scope == 'project' else 'containers'}/{set_id}/proxy/permissions")

    async def admin(self, method: str, scope: str, set_id: str, body=None):
        response = await treq.request(method, self.set_url(scope, set_id), agent=self.admin_agent,
                                      headers={"Authorization": f"Bearer {self.node.token}"},
                                      data=json.dumps(body).encode() if body is not None else None)
        return response.code, await response.content()

    async def put_set(self, scope: str, body: dict, set_id: str | None = None) -> None:
        """PUT a set for PROJECT (``scope="project"``) or a container (CONTAINER by default)."""
        if scope == "project":
            set_id = set_id or PROJECT
        else:
            set_id = set_id or CONTAINER
            body = dict(body, project=PROJECT)
        code, content = await self.admin("PUT", scope, set_id, body)
        if code not in (200, 201):
            self.fail(f"PUT {scope} set answered {code}: {content!r}")

    async def delete_set(self, scope: str, set_id: str | None = None) -> None:
        set_id = set_id or (PROJECT if scope == "project" else CONTAINER)
        code, content = await self.admin("DELETE", scope, set_id)
        if code not in (204, 404):
            self.fail(f"DELETE {scope} set answered {code}: {content!r}")

    async def clear_sets(self) -> None:
        await self.delete_set("container")
        await self.delete_set("project")

    # the gateway

    def marker(self) -> str:
        self.markers += 1
        return f"r{self.markers:05d}"

    def gateway_url(self, program: str, path: str, container: str = CONTAINER) -> str:
        index = self.backend.number if program == "http" else 1
        return url(self.node, path, program=program, index=index, container=container)

    async def send(self, program: str, method: str, path: str, headers: dict | None = None,
                   body: bytes | None = None, container: str = CONTAINER):
        """Send one request with a fresh ``m=`` marker in its query.

        Returns (response, body bytes, what the container received or None).
        """
        marker = self.marker()
        path += ("&" if "?" in path else "?") + f"m={marker}"
        if body is None and method in ("POST", "PUT"):
            body = b"payload"
        response = await treq.request(method, self.gateway_url(program, path, container),
                                      agent=self.agent, headers=headers or {}, data=body)
        content = await response.content()
        return response, content, self.recorder.find(marker)

    async def get(self, headers: dict | None = None, path: str = "/", **kw):
        return await self.send("http", "GET", path, headers, **kw)

    def challenges(self, response) -> list[str]:
        return response.headers.getRawHeaders("www-authenticate") or []

    def assertDenial(self, response, content: bytes, status: int) -> None:
        """A denial: ``status``, a JSON ``{"error", "message"}`` body."""
        self.assertEqual(response.code, status, content)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        document = json.loads(content)
        self.assertEqual(set(document), {"error", "message"})
        self.assertEqual(document["error"], "unauthorized" if status == 401 else "forbidden")

    def last_audit(self) -> dict:
        return audit_lines(self.node)[-1]


# -- the matrix -------------------------------------------------------------------------

#: (why, program, method, path; allowed under profile A, B, C).  Each row is allowed under
#: at least one profile and denied under another, so every capability and level is seen
#: both allowed and denied while the group matched.
REQUESTS: list[tuple[str, str, str, str, bool, bool, bool]] = [
    ("terminal session (terminal)", "terminal", "GET", "/", True, False, False),
    ("command execution (exec)", "terminal", "POST", "/exec/run", False, True, False),
    ("files read (GET)", "files", "GET", "/notes.txt", True, True, False),
    ("files read (OPTIONS)", "files", "OPTIONS", "/notes.txt", True, True, False),
    ("files write (PUT)", "files", "PUT", "/notes.txt", False, True, False),
    ("files write (DELETE)", "files", "DELETE", "/notes.txt", False, True, False),
    ("display view (GET)", "display", "GET", "/screen", True, False, True),
    ("display control (POST)", "display", "POST", "/input", True, False, False),
    ("sqlite query (GET)", "sqlite", "GET", "/tables", False, True, True),
    ("sqlite query (POST /query)", "sqlite", "POST", "/query", False, True, True),
    ("sqlite modify (POST /execute)", "sqlite", "POST", "/execute", False, False, True),
    ("http (GET)", "http", "GET", "/", True, False, False),
    ("http (POST)", "http", "POST", "/form", True, False, False),
]

#: What one group is granted.  Together they use true, false, absent and every level.
PROFILES: dict[str, dict] = {
    "A": {"terminal": True, "exec": False, "files": "read", "display": "control",
          "sqlite": False, "http": True},
    "B": {"terminal": False, "exec": True, "files": True, "display": False, "sqlite": "query"},
    "C": {"files": False, "display": "view", "sqlite": "modify", "http": False},
}
ALL = {"terminal": True, "exec": True, "files": True, "display": True, "sqlite": True, "http": True}
#: At container level the project also has a set, one that would decide differently: if
#: the gateway consulted it, some rows would flip.
PROJECT_DECOY = {"A": "C", "B": "A", "C": "B"}


def group_kinds(ldap_url: str | None = None) -> dict[str, dict]:
    """Per group type: its group name, spec, matching / non-matching credentials, challenge.

    Without ``ldap_url``: ip, token, password and jwt; with it: only ldap.

    ``good`` and ``wrong`` are header dicts; ``wrong`` None means no credential can be
    wrong (ip: a range the client is not in stands for the non-matching case).
    """
    kinds = {
        "ip": {"name": "office", "spec": {"type": "ip", "range": "127.0.0.0/8"},
               "miss": {"type": "ip", "ranges": ["192.0.2.0/24", "2001:db8::/32"]},
               "good": {}, "wrong": None, "challenge": None},
        "token": {"name": "robots", "spec": {"type": "token", "value": TOKEN},
                  "good": bearer(TOKEN), "wrong": bearer(OTHER_TOKEN), "challenge": "Bearer"},
        "password": {"name": "deployers",
                     "spec": {"type": "password", "username": USERNAME, "password": PASSWORD},
                     "good": basic(USERNAME, PASSWORD), "wrong": basic(USERNAME, "wrong password"),
                     "challenge": "Basic"},
        "jwt": {"name": "sso", "spec": jwt_group(), "good": bearer(signed()),
                "wrong": bearer(signed(key_name="other")), "challenge": "Bearer"},
    }
    if ldap_url is not None:
        kinds = {"ldap": {"name": "corp", "spec": ldap_group(ldap_url),
                          "good": basic("alice", USERS["alice"]),
                          "wrong": basic("bob", USERS["bob"]),  # binds, but not in cn=staff
                          "challenge": "Basic"}}
    return kinds


class PermissionMatrixTests(PermissionsE2ETestCase):
    """Every group type, matching and not, at project and container level, for every
    capability and level: the status, and whether the container received the request."""

    def configurations(self, kinds: dict[str, dict]):
        """(label, scope, group type, set body, project decoy body or None, headers, expect).

        ``expect`` maps a REQUESTS row to "allow", 401 or 403.
        """
        for kind, g in kinds.items():
            name = g["name"]
            for scope in ("project", "container"):
                for profile in "ABC":
                    body = {"groups": {name: g["spec"]}, "permissions": {name: PROFILES[profile]},
                            "default": "deny"}
                    decoy = PROJECT_DECOY[profile]
                    decoy_body = {"groups": {name: g["spec"]}, "permissions": {name: PROFILES[decoy]},
                                  "default": "deny"}
                    column = 4 + "ABC".index(profile)
                    yield (f"{kind} matches, {scope} level, profile {profile}", scope, kind, body,
                           decoy_body if scope == "container" else None, g["good"],
                           lambda row, c=column: "allow" if row[c] else 403)
                # The group does not match: everything is denied, though it grants everything.
                allow_all = {"groups": {}, "permissions": {}, "default": "allow"}
                decoy = allow_all if scope == "container" else None
                if g["wrong"] is None:
                    body = {"groups": {name: g["miss"]}, "permissions": {name: ALL}, "default": "deny"}
                    yield (f"{kind} does not match, {scope} level", scope, kind, body, decoy, {},
                           lambda row: 403)
                else:
                    body = {"groups": {name: g["spec"]}, "permissions": {name: ALL}, "default": "deny"}
                    yield (f"{kind} wrong credentials, {scope} level", scope, kind, body, decoy,
                           g["wrong"], lambda row: 403)
                    yield (f"{kind} no credentials, {scope} level", scope, kind, body, decoy, {},
                           lambda row: 401)

    async def run_matrix(self, kinds: dict[str, dict]) -> int:
        failures: list[str] = []
        checks = []  # (where, marker, expected, group name)
        rows = 0
        for label, scope, kind, body, decoy, headers, expect in self.configurations(kinds):
            await self.clear_sets()
            if decoy is not None:
                await self.put_set("project", decoy)
            await self.put_set(scope, body)
            name = kinds[kind]["name"]
            for row in REQUESTS:
                rows += 1
                why, program, method, path = row[:4]
                expected = expect(row)
                where = f"[{label}] {why}: {method} {program} {path}"
                response, content, seen = await self.send(program, method, path, headers)
                marker = f"m=r{self.markers:05d}"
                checks.append((where, marker, expected, name))
                problems = []
                if expected == "allow":
                    if response.code != 200:
                        problems.append(f"status {response.code}, expected 200")
                    if seen is None:
                        problems.append("the container did not receive it")
                    elif headers and "authorization" in seen["headers"]:
                        problems.append("the container received the gateway's Authorization")
                else:
                    if response.code != expected:
                        problems.append(f"status {response.code}, expected {expected}")
                    if seen is not None:
                        problems.append("the container received a denied request")
                    try:
                        document = json.loads(content)
                        if set(document) != {"error", "message"}:
                            problems.append(f"body {content!r}")
                    except ValueError:
                        problems.append(f"body is not JSON: {content!r}")
                    if name.encode() in content:
                        problems.append("the body names the group")
                    got = self.challenges(response)
                    if expected == 401:
                        schemes = [c.split(" ", 1)[0] for c in got]
                        if schemes != [kinds[kind]["challenge"]]:
                            problems.append(f"challenges {got}, expected {kinds[kind]['challenge']}")
                        if any(c.startswith("Basic") and f'realm="{REALM}"' not in c for c in got):
                            problems.append(f"a Basic challenge without a realm: {got}")
                    elif got:
                        problems.append(f"a {expected} with challenges {got}")
                if problems:
                    failures.append(f"{where}: {'; '.join(problems)}")
        # Every decision is in the audit line.
        lines = {}
        for line in audit_lines(self.node):
            query = (line.get("path") or "").partition("?")[2]
            for key, value in parse_qsl(query):
                if key == "m":
                    lines[f"m={value}"] = line
        for where, marker, expected, name in checks:
            line = lines.get(marker)
            if line is None:
                failures.append(f"{where}: no audit line")
                continue
            decision = line.get("decision")
            if not isinstance(decision, dict):
                failures.append(f"{where}: audit line without a decision: {line}")
            elif expected == "allow" and (decision.get("allowed") is not True or decision.get("group") != name):
                failures.append(f"{where}: audit decision {decision}, expected allowed by {name}")
            elif expected != "allow" and (decision.get("allowed") is not False or not decision.get("reason")
                                          or decision.get("group") is not None):
                failures.append(f"{where}: audit decision {decision}, expected a denial with a reason")
            if line.get("status") != (200 if expected == "allow" else expected):
                failures.append(f"{where}: audit status {line.get('status')}")
        if failures:
            self.fail(f"{len(failures)} of {rows} rows failed:\n" + "\n".join(failures))
        return rows

    async def test_matrix(self):
        """ip, token, password and jwt groups: allowed and denied at both levels, per capability."""
        rows = await self.run_matrix(group_kinds())
        self.assertEqual(rows, len(REQUESTS) * (4 * 2 * 5 - 2))

    async def test_matrix_ldap(self):
        """The same matrix for an ldap group checked against a real slapd (alice in cn=staff)."""
        slapd = start_slapd(self)
        rows = await self.run_matrix(group_kinds(slapd.url))
        self.assertEqual(rows, len(REQUESTS) * 2 * 5)


# -- which set applies ------------------------------------------------------------------

def ip_set(permissions: dict | None = None, default: str = "deny", range_: str = "127.0.0.0/8") -> dict:
    return {"groups": {"office": {"type": "ip", "range": range_}},
            "permissions": {"office": permissions if permissions is not None else {"http": True}},
            "default": default}


class EffectiveSetTests(PermissionsE2ETestCase):

    async def test_no_set_passes(self):
        """With neither a project nor a container set, every request passes untouched."""
        response, content, seen = await self.send("terminal", "POST", "/exec/run",
                                                  {**bearer(TOKEN), "Cookie": "hoody_token=abc; a=1"})
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)
        self.assertEqual(seen["headers"]["authorization"], [f"Bearer {TOKEN}"])

    async def test_container_set_replaces_project_set(self):
        """The container's set alone decides for it; its neighbour still follows the project's."""
        await self.put_set("project", ip_set({"http": True}))
        await self.put_set("container", ip_set({"terminal": True}))
        response, _, seen = await self.get()
        self.assertEqual(response.code, 403)
        self.assertIsNone(seen)
        response, _, seen = await self.send("terminal", "GET", "/")
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)
        # The neighbour has no set of its own: the project's applies.
        response, _, seen = await self.get(container=OTHER_CONTAINER)
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)
        response, _, seen = await self.send("terminal", "GET", "/", container=OTHER_CONTAINER)
        self.assertEqual(response.code, 403)
        self.assertIsNone(seen)

    async def test_container_set_is_not_merged_with_project_set(self):
        """A project set allowing by default does not leak into a container's deny set."""
        await self.put_set("project", {"groups": {}, "permissions": {}, "default": "allow"})
        await self.put_set("container", {"groups": {}, "permissions": {}, "default": "deny"})
        response, content, seen = await self.get()
        self.assertDenial(response, content, 403)
        self.assertIsNone(seen)
        # And the other way round: a permissive container set under a denying project.
        await self.put_set("project", {"groups": {}, "permissions": {}, "default": "deny"})
        await self.put_set("container", {"groups": {}, "permissions": {}, "default": "allow"})
        response, _, seen = await self.get()
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)

    async def test_default_allow(self):
        """A set whose groups do not match but whose default is allow lets the request through."""
        await self.put_set("project", ip_set(default="allow", range_="192.0.2.0/24"))
        response, _, seen = await self.send("terminal", "POST", "/exec/run")
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)
        decision = self.last_audit()["decision"]
        self.assertEqual((decision["allowed"], decision["group"]), (True, None))

    async def test_changes_apply_to_the_next_request(self):
        """PUT, PATCH-free replacement and DELETE each decide the very next request, on one
        kept-alive connection."""
        response, _, _ = await self.get()
        self.assertEqual(response.code, 200)
        await self.put_set("project", ip_set({"terminal": True}))
        response, _, seen = await self.get()
        self.assertEqual(response.code, 403)
        self.assertIsNone(seen)
        await self.put_set("project", ip_set({"http": True}))
        response, _, seen = await self.get()
        self.assertEqual(response.code, 200)
        await self.put_set("container", {"groups": {}, "permissions": {}, "default": "deny"})
        response, _, seen = await self.get()
        self.assertEqual(response.code, 403)
        await self.delete_set("container")
        response, _, seen = await self.get()
        self.assertEqual(response.code, 200)
        await self.put_set("project", ip_set({"http": True}, range_="192.0.2.0/24"))
        response, _, seen = await self.get()
        self.assertEqual(response.code, 403)
        await self.delete_set("project")
        response, _, seen = await self.get()
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)
        lines = [line for line in audit_lines(self.node) if line["route"]]
        self.assertEqual([line["status"] for line in lines], [200, 403, 200, 403, 200, 403, 200])

    async def test_audit_names_the_group_or_the_reason(self):
        """Allowed: the group that allowed it.  Denied: why, and no group."""
        await self.put_set("project", {
            "groups": {"office": {"type": "ip", "range": "127.0.0.0/8"},
                       "robots": {"type": "token", "value": TOKEN}},
            "permissions": {"office": {"files": "read"}, "robots": {"files": "write"}},
            "default": "deny"})
        response, _, _ = await self.send("files", "GET", "/a")
        self.assertEqual(response.code, 200)
        decision = self.last_audit()["decision"]
        self.assertEqual((decision["allowed"], decision["group"]), (True, "office"))
        response, _, _ = await self.send("files", "PUT", "/a", bearer(TOKEN))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.last_audit()["decision"]["group"], "robots")
        response, _, _ = await self.send("files", "PUT", "/a", bearer(OTHER_TOKEN))
        self.assertEqual(response.code, 403)
        line = self.last_audit()
        self.assertEqual(line["status"], 403)
        self.assertEqual((line["decision"]["allowed"], line["decision"]["group"]), (False, None))
        self.assertIn("files:write", line["decision"]["reason"])
        response, _, _ = await self.send("files", "PUT", "/a")
        self.assertEqual(response.code, 401)
        self.assertIn("credentials", self.last_audit()["decision"]["reason"])


# -- denials ----------------------------------------------------------------------------

class DenialTests(PermissionsE2ETestCase):

    async def test_401_carries_every_matching_challenge(self):
        """Basic and Bearer groups, no credentials: 401 with Basic (with a realm) then Bearer."""
        await self.put_set("project", {
            "groups": {"robots": {"type": "token", "value": TOKEN},
                       "deployers": {"type": "password", "username": USERNAME, "password": PASSWORD},
                       "office": {"type": "ip", "range": "192.0.2.0/24"}},
            "permissions": {"robots": {"http": True}, "deployers": {"http": True},
                            "office": {"http": True}},
            "default": "deny"})
        response, content, seen = await self.get()
        self.assertDenial(response, content, 401)
        self.assertIsNone(seen)
        challenges = self.challenges(response)
        self.assertEqual([c.split(" ", 1)[0] for c in challenges], ["Basic", "Bearer"])
        self.assertEqual(challenges[0], f'Basic realm="{REALM}"')
        # Credentials offered (wrong ones, of either kind): 403 without challenges.
        for headers in (basic(USERNAME, "nope"), bearer(OTHER_TOKEN), {"Cookie": "hoody_token=nope"},
                        basic("someone-else", PASSWORD)):
            response, content, seen = await self.get(headers)
            self.assertDenial(response, content, 403)
            self.assertEqual(self.challenges(response), [])
            self.assertIsNone(seen)

    async def test_403_without_credential_groups(self):
        """Only an ip group: a denial is 403 without challenges, credentials or not."""
        await self.put_set("project", ip_set(range_="192.0.2.0/24"))
        for headers in ({}, bearer(TOKEN)):
            response, content, seen = await self.get(headers)
            self.assertDenial(response, content, 403)
            self.assertEqual(self.challenges(response), [])
            self.assertIsNone(seen)

    async def test_body_never_reveals_which_group_almost_matched(self):
        """Denials of one status have the same body whatever came close."""
        await self.put_set("project", {
            "groups": {"office": {"type": "ip", "range": "127.0.0.0/8"},
                       "robots": {"type": "token", "value": TOKEN},
                       "deployers": {"type": "password", "username": USERNAME, "password": PASSWORD}},
            "permissions": {"office": {"files": "read"}, "robots": {"files": "read"},
                            "deployers": {"terminal": True}},
            "default": "deny"})
        bodies: dict[int, set] = {401: set(), 403: set()}
        for headers in ({}, bearer(TOKEN), bearer(OTHER_TOKEN), basic(USERNAME, PASSWORD),
                        basic(USERNAME, "wrong"), {"Cookie": f"hoody_token={TOKEN}"}):
            response, content, seen = await self.send("files", "PUT", "/x", headers)
            self.assertEqual(response.code, 401 if not headers else 403, headers)
            self.assertIsNone(seen)
            bodies[response.code].add(content)
            for word in (b"office", b"robots", b"deployers", b"files", b"write", b"terminal",
                         USERNAME.encode(), TOKEN.encode()):
                self.assertNotIn(word, content)
        self.assertEqual({code: len(b) for code, b in bodies.items()}, {401: 1, 403: 1}, bodies)

    async def test_denied_upload_is_answered_and_the_connection_closed(self):
        """A request denied while its body is still arriving: 403 with ``Connection: close``,
        the body never reaches the container, and once the body is in the gateway closes
        the connection, as it said it would.

        Regression: the connection used to stay open until the client idle timeout (75 s
        by default) when the denial came after the gateway had made the request's
        exchange (the old twisted.web request finished such an answer only from a path
        that then never ran).  The same request to a stopped container (a 503 raised
        before an exchange exists) was closed at once; both must be.
        """
        await self.put_set("project", ip_set({"files": "read"}))
        host = host_for(program="files", index=1)
        client = await raw_tls_client(self, self.node, host)
        client.transport.write(f"PUT /upload HTTP/1.1\r\nHost: {host}\r\n"
                               "Content-Length: 10\r\n\r\n12345".encode())
        await until(lambda: client.received.endswith(b"}\n"))
        head, _, body = client.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertEqual(json.loads(body)["error"], "forbidden")
        client.transport.write(b"67890")
        try:
            await until(lambda: client.lost, timeout=2)
        except AssertionError:
            self.fail("the gateway sent 'Connection: close' but kept the connection open "
                      "after the denied request's body had arrived")
        finally:
            self.assertEqual(self.recorder.seen, [])


# -- credentials: where they come from, and that they stop at the gateway ---------------

class CredentialTests(PermissionsE2ETestCase):

    async def setUp(self):
        super().setUp()
        await self.put_set("project", {
            "groups": {"robots": {"type": "token", "value": TOKEN}, "sso": jwt_group()},
            "permissions": {"robots": {"http": True}, "sso": {"http": True}},
            "default": "deny"})

    async def test_bearer_from_header_cookie_and_query(self):
        """A static token and a JWT are each accepted from the header, the cookie and the query."""
        for token in (TOKEN, signed()):
            for headers, path in ((bearer(token), "/"), ({"Cookie": f"hoody_token={token}"}, "/"),
                                  ({}, f"/?hoody_token={token}")):
                response, content, seen = await self.get(headers, path=path)
                self.assertEqual(response.code, 200, (headers, path, content))
                self.assertIsNotNone(seen)
                self.assertNotIn(token, json.dumps(seen))

    async def test_authorization_header_is_removed(self):
        """The Authorization header the gateway used does not reach the container."""
        response, _, seen = await self.get({**bearer(TOKEN), "X-Other": "kept"})
        self.assertEqual(response.code, 200)
        self.assertNotIn("authorization", seen["headers"])
        self.assertEqual(seen["headers"]["x-other"], ["kept"])

    async def test_token_cookie_is_removed_and_other_cookies_kept(self):
        """``hoody_token`` leaves the Cookie header; the other cookies arrive, in order."""
        response, _, seen = await self.get({"Cookie": f"a=1; hoody_token={TOKEN}; b=2"})
        self.assertEqual(response.code, 200)
        self.assertEqual(seen["headers"]["cookie"], ["a=1; b=2"])
        # Only the token cookie: no Cookie header at all, or an empty one, but never the token.
        response, _, seen = await self.get({"Cookie": f"hoody_token={TOKEN}"})
        self.assertEqual(response.code, 200)
        self.assertIn(seen["headers"].get("cookie", [""]), ([""], []))
        self.assertNotIn(TOKEN, json.dumps(seen))

    async def test_token_query_parameter_is_removed_and_others_kept_in_order(self):
        """``hoody_token`` leaves the query; the other parameters arrive as sent, in order."""
        response, _, seen = await self.get(path=f"/p/a?z=1&hoody_token={TOKEN}&a=2&z=3&e=")
        self.assertEqual(response.code, 200)
        path, _, query = seen["uri"].partition("?")
        self.assertEqual(path, "/p/a")
        self.assertEqual(query.rsplit("&m=", 1)[0], "z=1&a=2&z=3&e=")
        self.assertNotIn(TOKEN, seen["uri"])

    async def test_only_token_query_parameter_leaves_no_dangling_question_mark(self):
        """``/p?hoody_token=T`` is forwarded as ``/p``."""
        response = await treq.get(self.gateway_url("http", f"/p?hoody_token={TOKEN}"), agent=self.agent)
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.recorder.seen[-1]["uri"], "/p")

    async def test_every_copy_of_the_token_is_removed(self):
        """A token in the header, the cookie and the query at once: none reaches the container."""
        other = "decoy-value-that-is-not-a-token"
        response, _, seen = await self.get(
            {**bearer(TOKEN), "Cookie": f"hoody_token={other}; keep=1"},
            path=f"/?hoody_token={other}&keep=2&hoody_token={other}")
        self.assertEqual(response.code, 200)
        text = json.dumps(seen)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(other, text)
        self.assertEqual(seen["headers"]["cookie"], ["keep=1"])
        self.assertTrue(seen["uri"].startswith("/?keep=2&m="), seen["uri"])

    async def test_percent_encoded_token_value_in_query(self):
        """A query token is URL-decoded (``+`` and ``/`` in a b64 token travel encoded)."""
        token = "abc+def/ghijklmnopqrstuv=="
        await self.put_set("project", {"groups": {"robots": {"type": "token", "value": token}},
                                       "permissions": {"robots": {"http": True}}, "default": "deny"})
        response, _, seen = await self.get(path="/?hoody_token=abc%2Bdef%2Fghijklmnopqrstuv%3D%3D")
        self.assertEqual(response.code, 200)
        self.assertNotIn("hoody_token", seen["uri"])

    async def test_percent_encoded_parameter_name_is_the_same_parameter(self):
        """``hoody%5Ftoken`` is the parameter ``hoody_token`` once decoded, as the container
        decodes it: the gateway must treat it as the credential and strip it.

        ``hoodyproxy/access/policy.py`` ``_strip_query_token`` decodes each parameter name
        (``unquote_to_bytes``) but first returns early when the raw query does not contain
        the bytes ``hoody_token``, so an encoded name alone is neither accepted (401) nor
        removed (it reaches the container); next to a plain one it is both.
        """
        response, _, seen = await self.get(path=f"/?hoody%5Ftoken={TOKEN}&x=1")
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(seen)
        self.assertNotIn(TOKEN, seen["uri"])

    async def test_authorization_kept_when_only_ip_groups(self):
        """An Authorization header the gateway had no use for (ip groups only) is the container's."""
        await self.put_set("project", ip_set())
        response, _, seen = await self.get(basic("app-user", "app-password"))
        self.assertEqual(response.code, 200)
        self.assertEqual(seen["headers"]["authorization"], [basic("app-user", "app-password")["Authorization"]])


# -- JWT attacks through the gateway ----------------------------------------------------

def jwt_attacks() -> list[tuple[str, str]]:
    """(why, token): each must be refused by a group that accepts ``signed()``."""
    now = int(time.time())
    pem = public_pem(rsa_key()).encode()
    hs_input = unsigned_input({"alg": "HS256", "typ": "JWT"}, jwt_claims())
    hs_with_public_key = hs_input + "." + b64url(hmac.new(pem, hs_input.encode(), hashlib.sha256).digest())
    guest = signed(jwt_claims(role="guest"))
    head, _, signature = guest.split(".")
    tampered = f"{head}.{b64url(json.dumps(jwt_claims(role='admin')).encode())}.{signature}"
    return [
        ("alg none", unsigned_input({"alg": "none", "typ": "JWT"}, jwt_claims()) + "."),
        ("alg None", unsigned_input({"alg": "None", "typ": "JWT"}, jwt_claims()) + "."),
        ("HS256 signed with the RSA public key", hs_with_public_key),
        ("signed by another key", signed(key_name="other")),
        ("expired", signed(jwt_claims(iat=now - 600, exp=now - 60))),
        ("not yet valid", signed(jwt_claims(nbf=now + 600))),
        ("no exp", signed(jwt_claims(exp=None))),
        ("wrong issuer", signed(jwt_claims(iss="https://evil.example"))),
        ("no issuer", signed(jwt_claims(iss=None))),
        ("wrong audience", signed(jwt_claims(aud="someone-else"))),
        ("no audience", signed(jwt_claims(aud=None))),
        ("missing claim", signed(jwt_claims(role=None))),
        ("wrong claim", signed(jwt_claims(role="guest"))),
        ("claim of the wrong type", signed(jwt_claims(role=["guest", 1]))),
        ("tampered payload", tampered),
        ("signature stripped", signed().rsplit(".", 1)[0] + "."),
        ("not a JWT", "a.b.c"),
    ]


class JWTAttackTests(PermissionsE2ETestCase):

    async def setUp(self):
        super().setUp()
        await self.put_set("project", {"groups": {"sso": jwt_group()},
                                       "permissions": {"sso": {"http": True}}, "default": "deny"})

    async def test_valid_token_passes(self):
        """The control: a valid token is allowed by group sso, via header, cookie and query."""
        for headers, path in ((bearer(signed()), "/"), ({"Cookie": f"hoody_token={signed()}"}, "/"),
                              ({}, f"/?hoody_token={signed()}")):
            response, _, seen = await self.get(headers, path=path)
            self.assertEqual(response.code, 200)
            self.assertIsNotNone(seen)
            self.assertEqual(self.last_audit()["decision"]["group"], "sso")

    async def test_attacks_are_refused(self):
        """Each forged, stale or mismatched token is a 403, from header, cookie or query,
        and the container never sees the request."""
        failures = []
        for why, token in jwt_attacks():
            for carrier, headers, path in (("header", bearer(token), "/"),
                                           ("cookie", {"Cookie": f"hoody_token={token}"}, "/"),
                                           ("query", {}, f"/?hoody_token={token}")):
                response, content, seen = await self.get(headers, path=path)
                problems = []
                if response.code != 403:
                    problems.append(f"status {response.code}")
                if seen is not None:
                    problems.append("the container received it")
                if self.challenges(response):
                    problems.append("challenges on a 403")
                if content != b'{"error": "forbidden", "message": "access denied"}\n':
                    problems.append(f"body {content!r}")
                decision = self.last_audit().get("decision") or {}
                if decision.get("allowed") is not False:
                    problems.append(f"audit decision {decision}")
                if problems:
                    failures.append(f"[{why} via {carrier}] " + "; ".join(problems))
        if failures:
            self.fail("\n".join(failures))


# -- LDAP against a real slapd ------------------------------------------------------------

class LDAPTests(PermissionsE2ETestCase):

    async def test_ldap_groups(self):
        """DN template with group membership, and search-then-bind, against a real slapd."""
        slapd = start_slapd(self)
        await self.put_set("project", {
            "groups": {"staff": ldap_group(slapd.url),
                       "people": {"type": "ldap", "url": slapd.url, "search_base": PEOPLE,
                                  "search_filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
                                  "bind_dn": SERVICE_DN, "bind_password": SERVICE_PASSWORD}},
            "permissions": {"staff": {"terminal": True, "http": True}, "people": {"http": True}},
            "default": "deny"})
        cases = [
            # (why, headers, program, expected status, group in the audit line)
            ("alice, in cn=staff, terminal", basic("alice", USERS["alice"]), "terminal", 200, "staff"),
            ("bob, not in cn=staff, terminal", basic("bob", USERS["bob"]), "terminal", 403, None),
            ("bob via the search group, http", basic("bob", USERS["bob"]), "http", 200, "people"),
            ("alice, wrong password", basic("alice", "not-her-password"), "http", 403, None),
            ("empty password (an anonymous bind)", basic("alice", ""), "http", 403, None),
            ("no such user", basic("mallory", "whatever-1"), "http", 403, None),
            ("filter injection", basic("*", USERS["alice"]), "http", 403, None),
            ("filter injection 2", basic("alice)(uid=*", USERS["alice"]), "http", 403, None),
            ("DN metacharacter user", basic("carol,admin", USERS["carol,admin"]), "http", 200, "people"),
            ("no credentials", {}, "http", 401, None),
        ]
        failures = []
        for why, headers, program, status, group in cases:
            response, content, seen = await self.send(program, "GET", "/", headers)
            problems = []
            if response.code != status:
                problems.append(f"status {response.code}, expected {status}")
            if (seen is not None) != (status == 200):
                problems.append(f"container received: {seen is not None}")
            if seen is not None and "authorization" in seen["headers"]:
                problems.append("Authorization reached the container")
            if status == 401 and self.challenges(response) != [f'Basic realm="{REALM}"']:
                problems.append(f"challenges {self.challenges(response)}")
            decision = self.last_audit().get("decision") or {}
            if decision.get("group") != group or decision.get("allowed") is not (status == 200):
                problems.append(f"audit decision {decision}")
            if problems:
                failures.append(f"[{why}] " + "; ".join(problems))
        if failures:
            self.fail("\n".join(failures))

    async def test_unreachable_ldap_denies(self):
        """An LDAP server that is not there: no match, a 403, and the request is not forwarded."""
        await self.put_set("project", {
            "groups": {"staff": {"type": "ldap", "url": "ldap://127.0.0.1:1",
                                 "user_dn": f"uid={{username}},{PEOPLE}", "timeout": 2}},
            "permissions": {"staff": {"http": True}}, "default": "deny"})
        response, content, seen = await self.get(basic("alice", USERS["alice"]))
        self.assertDenial(response, content, 403)
        self.assertIsNone(seen)


# -- read-only WebSockets ----------------------------------------------------------------

class ReadOnlyWebSocketTests(PermissionsE2ETestCase):

    async def setUp(self):
        super().setUp()
        await self.put_set("project", {
            "groups": {"viewers": {"type": "token", "value": TOKEN},
                       "operators": {"type": "token", "value": OTHER_TOKEN}},
            "permissions": {"viewers": {"display": "view", "files": "read"},
                            "operators": {"display": "control"}},
            "default": "deny"})

    async def test_view_level_websocket_is_read_only(self):
        """Allowed at ``view``: the greeting arrives, the client's message is not forwarded,
        the connection closes with 1008; the token in the query never reaches the container."""
        proto, factory = await ws_connect(self, self.node, f"/ws?x=1&hoody_token={TOKEN}&y=2")
        await until(lambda: factory.messages == [b"greeting from the container"])
        handshake = self.ws_factory.handshakes[-1]
        self.assertEqual(handshake["params"], {"x": ["1"], "y": ["2"]})
        self.assertNotIn("hoody_token", json.dumps(handshake))
        self.assertNotIn(TOKEN, json.dumps(handshake))
        proto.sendMessage(b"let me type")
        was_clean, code, reason = await factory.closed
        self.assertEqual(code, 1008)
        self.assertEqual(factory.messages, [b"greeting from the container"])
        self.assertEqual(self.ws_factory.received, [])
        await until(lambda: any(line.get("status") == 101 for line in audit_lines(self.node)))
        line = [line for line in audit_lines(self.node) if line.get("status") == 101][-1]
        self.assertEqual(line["decision"]["read_only"], True)
        self.assertEqual(line["decision"]["group"], "viewers")

    async def test_read_only_websocket_passes_pings(self):
        """Control frames still flow on a read-only WebSocket: a ping gets the container's pong."""
        proto, factory = await ws_connect(self, self.node, "/ws", headers=bearer(TOKEN))
        await until(lambda: len(factory.messages) == 1)
        pongs = []
        proto.onPong = pongs.append
        proto.sendPing(b"are you there")
        await until(lambda: pongs == [b"are you there"])
        self.assertEqual(self.ws_factory.received, [])

    async def test_view_level_websocket_over_http2_is_read_only(self):
        """The same over HTTP/2 (RFC 8441): the greeting arrives, the client's data frame
        closes the stream with 1008 and never reaches the container; no token, no tunnel."""
        from wsproto.frame_protocol import FrameProtocol, Opcode

        from tests.h2client import h2_connect
        host = host_for(program="display", index=1)
        client = await h2_connect(self, self.node, host)
        fields = [(b"sec-websocket-version", b"13")]
        denied = client.request(b"CONNECT", b"/ws", host.encode(), protocol=b"websocket", headers=fields,
                                end_stream=False)
        await denied.done
        self.assertEqual(denied.status, 401)
        stream = client.request(b"CONNECT", b"/ws", host.encode(), protocol=b"websocket", end_stream=False,
                                headers=fields + [(b"authorization", b"Bearer " + TOKEN.encode())])
        await stream.head
        self.assertEqual(stream.status, 200)
        frames = FrameProtocol(client=True, extensions=[])
        got = []

        def on_data(data):
            frames.receive_bytes(data)
            got.extend(frames.received_frames())
        stream.on_data = on_data
        on_data(stream.body)
        await until(lambda: any(f.opcode == Opcode.TEXT for f in got))
        self.assertEqual([f.payload for f in got if f.opcode == Opcode.TEXT], ["greeting from the container"])
        client.send(stream.id, frames.send_data("let me type", fin=True))
        await until(lambda: any(f.opcode == Opcode.CLOSE for f in got))
        close = [f for f in got if f.opcode == Opcode.CLOSE][0]
        self.assertEqual(close.payload[0], 1008)
        await stream.done
        self.assertEqual(self.ws_factory.received, [])
        await until(lambda: any(line.get("status") == 101 for line in audit_lines(self.node)))
        line = [line for line in audit_lines(self.node) if line.get("status") == 101][-1]
        self.assertEqual((line["http"], line["decision"]["read_only"]), ("2", True))

    async def test_binary_frame_also_closes(self):
        """A binary data frame is a violation too."""
        proto, factory = await ws_connect(self, self.node, "/ws", headers=bearer(TOKEN))
        await until(lambda: len(factory.messages) == 1)
        proto.sendMessage(b"\x00\x01", isBinary=True)
        self.assertEqual((await factory.closed)[1], 1008)
        self.assertEqual(self.ws_factory.received, [])

    async def test_files_read_websocket_is_read_only(self):
        """``files: read`` also gives a read-only WebSocket (files program)."""
        proto, factory = await ws_connect(self, self.node, "/ws", headers={"Cookie": f"hoody_token={TOKEN}"},
                                          program="files")
        await until(lambda: len(factory.messages) == 1)
        self.assertNotIn(TOKEN, json.dumps(self.ws_factory.handshakes[-1]))
        proto.sendMessage(b"write")
        self.assertEqual((await factory.closed)[1], 1008)
        self.assertEqual(self.ws_factory.received, [])

    async def test_control_level_websocket_is_two_way(self):
        """Allowed at ``control``: an ordinary WebSocket, the echo comes back."""
        proto, factory = await ws_connect(self, self.node, "/ws", headers=bearer(OTHER_TOKEN))
        await until(lambda: len(factory.messages) == 1)
        proto.sendMessage(b"typed")
        await until(lambda: factory.messages[1:] == [b"typed"])
        self.assertEqual(self.ws_factory.received, [b"typed"])
        self.assertNotIn("authorization", {k.lower() for k in self.ws_factory.handshakes[-1]["headers"]})
        proto.sendClose(1000)
        self.assertEqual((await factory.closed)[1], 1000)

    async def test_denied_websocket_is_never_upgraded(self):
        """No credentials: 401 and no upgrade; a token that grants nothing here: 403."""
        for headers, status in (({}, 401), (bearer(OTHER_TOKEN), 403)):
            try:
                await ws_connect(self, self.node, "/ws", headers=headers, program="files")
            except ConnectionError:
                pass
            else:
                self.fail(f"the WebSocket opened ({headers})")
            self.assertEqual(self.ws_factory.handshakes, [])
            line = self.last_audit()
            self.assertEqual(line["status"], status)
            self.assertEqual(line["decision"]["allowed"], False)

    async def test_client_close_reaches_the_container(self):
        """A read-only client may still close: the close frame passes and both sides agree."""
        proto, factory = await ws_connect(self, self.node, "/ws", headers=bearer(TOKEN))
        await until(lambda: len(factory.messages) == 1)
        proto.sendClose(1000, "bye")
        self.assertEqual((await factory.closed)[1], 1000)
        await until(lambda: self.ws_factory.closes == [1000])

"""Specification of the hostname grammar: which Host names which Target, and which errors.

``<project: 24 hex>-<container: 24 hex>-<program>-<index>.<node>.<zone>``, case-insensitive,
a trailing dot allowed, a port ignored, the label at most 63 characters.  Anything that is
not a route of this node is a 404 whose JSON body never echoes the Host; no Host is a 400.
"""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hoodyproxy import errors
from hoodyproxy.config import DEFAULT_PROGRAMS, Program, settings_from_mapping
from hoodyproxy.routing import Router, Target

NODE, ZONE = "node-local", "containers.localhost"
SUFFIX = f".{NODE}.{ZONE}"
P = "67e89abc123def456789abcd"
C = "890abcdef12345678901cdef"

#: The default programs plus one operator program whose 8-letter name lets a label reach
#: exactly 63 characters: 24 + 1 + 24 + 1 + len("abcdefgh") + 1 + len("1234") == 63.
PROGRAMS = dict(DEFAULT_PROGRAMS, abcdefgh=Program("abcdefgh", "port", None, "http"))
ROUTER = Router(NODE, ZONE, PROGRAMS)


def label(program: str = "http", index: str | int = 8000, project: str = P,
          container: str = C) -> str:
    return f"{project}-{container}-{program}-{index}"


def host(program: str = "http", index: str | int = 8000, project: str = P,
         container: str = C, suffix: str = SUFFIX) -> str:
    return label(program, index, project, container) + suffix


def target(program: str = "http", index: int = 8000, project: str = P, container: str = C) -> Target:
    return Target(project, container, program, index, host(program, index, project, container))


LABEL_63 = label("abcdefgh", 1234)
LABEL_64 = label("abcdefgh", 12345)
assert len(LABEL_63) == 63 and len(LABEL_64) == 64

#: (why, Host as the client sent it, the Target or the exact error class expected)
TABLE: list[tuple[str, object, object]] = [
    # -- routes
    ("canonical http route", host(), target()),
    ("uppercase host is lowercased", host().upper(), target()),
    ("mixed-case ids", host(project=P.upper(), container=C.title()), target()),
    ("trailing dot is dropped", host() + ".", target()),
    ("port is ignored", host() + ":8443", target()),
    ("trailing dot and port", host() + ".:8443", target()),
    ("bytes input", host().encode("ascii"), target()),
    ("uppercase bytes input", host().upper().encode("ascii"), target()),
    ("http-1 is the lowest port", host("http", 1), target("http", 1)),
    ("http-3000", host("http", 3000), target("http", 3000)),
    ("http-65535 is the highest port", host("http", 65535), target("http", 65535)),
    ("terminal-1 is the first instance", host("terminal", 1), target("terminal", 1)),
    ("terminal-999 is the last default instance", host("terminal", 999), target("terminal", 999)),
    ("display-2", host("display", 2), target("display", 2)),
    ("sqlite-1", host("sqlite", 1), target("sqlite", 1)),
    ("a 63-character label routes", LABEL_63 + SUFFIX, target("abcdefgh", 1234)),
    # -- no Host at all: 400
    ("no Host header", None, errors.MissingHost),
    ("empty str host", "", errors.MissingHost),
    ("empty bytes host", b"", errors.MissingHost),
    ("blank host", "   ", errors.MissingHost),
    ("only a port", ":8443", errors.MissingHost),
    ("only a dot", ".", errors.MissingHost),
    # -- not a host of this node: 404
    ("IPv6 literal with port", "[::1]:8443", errors.UnknownHost),
    ("IPv6 literal", "[2001:db8::1]", errors.UnknownHost),
    ("IPv4 literal", "127.0.0.1:8443", errors.UnknownHost),
    ("non-numeric port", host() + ":https", errors.UnknownHost),
    ("the node name itself", NODE + "." + ZONE, errors.UnknownHost),
    ("empty label under the node", SUFFIX, errors.UnknownHost),
    ("another node of the zone", host(suffix=".node-other." + ZONE), errors.WrongNode),
    ("a node whose name ends like ours", host(suffix=".xnode-local." + ZONE), errors.WrongNode),
    ("another zone", host(suffix=f".{NODE}.example.com"), errors.UnknownHost),
    ("our suffix inside another domain", host(suffix=SUFFIX + ".evil.example"), errors.UnknownHost),
    ("a deeper subdomain", "www." + host(), errors.UnknownHost),
    ("a dot inside the label", f"{P}-{C}.http-8000{SUFFIX}", errors.UnknownHost),
    ("non-ASCII bytes", host().encode("ascii") + b"\xff", errors.UnknownHost),
    ("UTF-8 bytes", host(suffix=".nöde-local." + ZONE).encode("utf-8"), errors.UnknownHost),
    ("non-ASCII text in another zone", host(suffix=f".{NODE}.exämple.com"), errors.UnknownHost),
    # -- a label of this node that is not a route: 404
    ("a 64-character label", LABEL_64 + SUFFIX, errors.BadLabel),
    ("non-hex project", host(project="g" + P[1:]), errors.BadLabel),
    ("non-hex container", host(container=C[:-1] + "z"), errors.BadLabel),
    ("23-character project", host(project=P[:-1]), errors.BadLabel),
    ("25-character project", host(project=P + "a"), errors.BadLabel),
    ("23-character container", host(container=C[:-1]), errors.BadLabel),
    ("25-character container", host(container=C + "a"), errors.BadLabel),
    ("missing index", f"{P}-{C}-http{SUFFIX}", errors.BadLabel),
    ("negative index", host("http", "-1"), errors.BadLabel),
    ("six-digit index", host("http", 100000), errors.BadLabel),
    ("http with a leading zero", host("http", "08000"), errors.BadLabel),
    ("terminal-01 has a leading zero", host("terminal", "01"), errors.BadLabel),
    ("non-ASCII text is refused like non-ASCII bytes", host("h\u0163tp"), errors.UnknownHost),
    ("unknown program", host("nosuch", 1), errors.UnknownProgram),
    ("http-0 is below the port range", host("http", 0), errors.IndexOutOfRange),
    ("http-65536 is above the port range", host("http", 65536), errors.IndexOutOfRange),
    ("terminal-0 is below the instance range", host("terminal", 0), errors.IndexOutOfRange),
    ("terminal-1000 is above max_instance", host("terminal", 1000), errors.IndexOutOfRange),
]


def outcome(router: Router, raw: object) -> object:
    """The Target ``raw`` resolves to, or the GatewayError it raises."""
    try:
        return router.resolve_target(raw)  # type: ignore[arg-type]
    except errors.GatewayError as e:
        return e


def recomposed(t: Target) -> str:
    """The canonical host a Target stands for."""
    return f"{t.project}-{t.container}-{t.program}-{t.index}{SUFFIX}"


class GrammarTableTests(SynchronousTestCase):
    """Every grammar rule, one row each."""

    def check_rows(self, rows) -> None:
        failures = []
        for why, raw, expected in rows:
            got = outcome(ROUTER, raw)
            if isinstance(expected, Target):
                ok = got == expected
            else:
                ok = type(got) is expected
            if not ok:
                shown = type(got).__name__ if isinstance(got, Exception) else got
                failures.append(f"[{why}] {raw!r}: expected {getattr(expected, '__name__', expected)}, got {shown}")
        if failures:
            self.fail("\n".join(failures))

    def test_routes(self) -> None:
        """Hosts that follow the grammar resolve to the Target they name, lowercased."""
        self.check_rows([row for row in TABLE if isinstance(row[2], Target)])

    def test_rejections(self) -> None:
        """Hosts that break a grammar rule raise the error class for that rule."""
        self.check_rows([row for row in TABLE if not isinstance(row[2], Target)])

    def test_statuses(self) -> None:
        """A missing Host is a 400; every other rejection is a 404."""
        for why, raw, expected in TABLE:
            if isinstance(expected, Target):
                continue
            got = outcome(ROUTER, raw)
            self.assertIsInstance(got, errors.GatewayError, why)
            wanted = 400 if expected is errors.MissingHost else 404
            self.assertEqual(got.status, wanted, why)
            self.assertIsInstance(got, errors.BadRequest if wanted == 400 else errors.NotFound, why)

    def test_error_bodies_never_echo_the_host(self) -> None:
        """Error bodies are JSON ``{"error", "message"}`` and never contain the Host or its label."""
        for why, raw, expected in TABLE:
            if isinstance(expected, Target) or raw is None:
                continue
            got = outcome(ROUTER, raw)
            body = got.body()
            document = json.loads(body)
            self.assertEqual(set(document), {"error", "message"}, why)
            self.assertEqual(document["error"], got.code, why)
            self.assertIsInstance(document["message"], str, why)
            text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            for fragment in {text.strip(), text.strip().lower(), P, C, "nosuch"}:
                if len(fragment) >= 6:
                    self.assertNotIn(fragment.encode("utf-8"), body, f"{why}: body {body!r}")
                    self.assertNotIn(fragment, str(got), f"{why}: message {got}")

    def test_target_service(self) -> None:
        """``Target.service`` is ``program-index``, the key of per-container port overrides."""
        self.assertEqual(ROUTER.resolve_target(host("terminal", 3)).service, "terminal-3")

    def test_label_length_counts_only_the_label(self) -> None:
        """The 63-character limit applies to the route label, not to the whole hostname."""
        long_zone = "a" * 60 + ".example"
        router = Router(NODE, long_zone, PROGRAMS)
        t = router.resolve_target(LABEL_63 + f".{NODE}.{long_zone}")
        self.assertEqual(t.program, "abcdefgh")


class GrammarBugTests(SynchronousTestCase):
    """Inputs found to route although they break the grammar."""

    def test_newline_in_label_is_rejected(self) -> None:
        """A label ending in a newline is not a route.

        ``_LABEL`` ends with ``$``, which also matches just before a final newline, so
        ``...-http-80\\n.<node>.<zone>`` resolves to http-80 with the newline kept in
        ``Target.host``.
        """
        for raw in (f"{label('http', 80)}\n{SUFFIX}", f"{label('http', 80)}\n{SUFFIX}".encode()):
            self.assertRaises(errors.BadLabel, ROUTER.resolve_target, raw)

    def test_non_ascii_text_is_rejected_like_non_ascii_bytes(self) -> None:
        """A str Host with non-ASCII characters is a 404 even when it lowercases to ASCII.

        Non-ASCII bytes are refused; the same host as text must be too.  U+212A KELVIN
        SIGN lowercases to ``k``, so on a node named ``node-uk`` the text host
        ``...node-u\\u212a...`` currently routes.
        """
        router = Router("node-uk", ZONE, PROGRAMS)
        raw = host(suffix=".node-u\u212a." + ZONE)
        self.assertRaises(errors.UnknownHost, router.resolve_target, raw.encode("utf-8"))
        self.assertRaises(errors.NotFound, router.resolve_target, raw)


class OperatorProgramTests(SynchronousTestCase):
    """Programs an operator adds in the config are routable like the defaults."""

    def router(self) -> Router:
        s = settings_from_mapping({"programs": {
            "files": {"index": "instance", "port": 8222, "kind": "files", "max_instance": 3},
            "api": {"index": "port", "kind": "http"},
        }})
        return Router(s.node, s.zone, s.programs)

    def test_instance_program_routes(self) -> None:
        """An operator's instance program routes within 1..max_instance."""
        self.assertEqual(self.router().resolve_target(host("files", 3)), target("files", 3))

    def test_instance_program_honours_max_instance(self) -> None:
        """An operator's ``max_instance`` bounds the index."""
        self.assertRaises(errors.IndexOutOfRange, self.router().resolve_target, host("files", 4))

    def test_port_program_routes(self) -> None:
        """An operator's ``index = "port"`` program takes a port as its index."""
        self.assertEqual(self.router().resolve_target(host("api", 9000)), target("api", 9000))

    def test_defaults_remain(self) -> None:
        """Adding programs keeps the default ones routable."""
        self.assertEqual(self.router().resolve_target(host("terminal", 1)), target("terminal", 1))

    def test_unconfigured_program_is_unknown(self) -> None:
        """A program name that no config defines is a 404."""
        self.assertRaises(errors.UnknownProgram, ROUTER.resolve_target, host("files", 1))

    def test_router_is_not_changed_by_its_input_mapping(self) -> None:
        """The Router copies its programs: changing the mapping afterwards changes nothing."""
        programs = dict(DEFAULT_PROGRAMS)
        router = Router(NODE, ZONE, programs)
        programs["files"] = Program("files", "instance", 8222, "files")
        self.assertRaises(errors.UnknownProgram, router.resolve_target, host("files", 1))

    def test_node_and_zone_are_case_insensitive(self) -> None:
        """A Router built from mixed-case node and zone names matches lowercase hosts."""
        router = Router("Node-Local", "Containers.LOCALHOST", PROGRAMS)
        self.assertEqual(router.resolve_target(host()), target())


# -- properties --------------------------------------------------------------------------

GOOD_PROJECT = st.sampled_from([P, P.upper()])
BAD_PROJECT = st.sampled_from([P[:-1], P + "0", "g" * 24, "", P[:12] + "-" + P[13:], P + "\n"])
GOOD_CONTAINER = st.sampled_from([C, C.upper()])
BAD_CONTAINER = st.sampled_from([C[:-1], C + "f", "z" * 24, "", C + "\n"])
GOOD_PROGRAM = st.sampled_from(["http", "HTTP", "terminal", "display", "sqlite", "abcdefgh", "Terminal"])
BAD_PROGRAM = st.sampled_from(["nosuch", "", "http1", "1http", "ht-tp", "http\n"])
GOOD_INDEX = st.integers(min_value=1, max_value=999).map(str)
BAD_INDEX = st.one_of(
    st.integers(min_value=-2, max_value=100001).map(str),
    st.sampled_from(["01", "007", "", " 1", "1 ", "1\n", "\n", "1e3", "+1", "\u0663", "\uff11",
                     "0x10", "1.0"]),
)
GOOD_SEPARATOR = st.just("-")
BAD_SEPARATOR = st.sampled_from(["", "--", "_", ".", "\n", " "])
GOOD_SUFFIX = st.sampled_from([SUFFIX, SUFFIX.upper(), SUFFIX + ".", SUFFIX + ":8443", SUFFIX + ".:443",
                               SUFFIX + "\n"])
BAD_SUFFIX = st.sampled_from([
    SUFFIX + ":", SUFFIX + ":x", "\n" + SUFFIX, ".node-other." + ZONE, f".{NODE}.example.com",
    "", ".", SUFFIX + ".evil", "." + ZONE, SUFFIX + "\n.",
])
GOOD_PREFIX = st.sampled_from(["", " "])
BAD_PREFIX = st.sampled_from(["www.", "[", "\n", ".", "-"])

#: (good, bad) strategies for each piece of a host, in order
PIECES = [
    (GOOD_PREFIX, BAD_PREFIX), (GOOD_PROJECT, BAD_PROJECT), (GOOD_SEPARATOR, BAD_SEPARATOR),
    (GOOD_CONTAINER, BAD_CONTAINER), (GOOD_SEPARATOR, BAD_SEPARATOR), (GOOD_PROGRAM, BAD_PROGRAM),
    (GOOD_SEPARATOR, BAD_SEPARATOR), (GOOD_INDEX, BAD_INDEX), (GOOD_SUFFIX, BAD_SUFFIX),
]


@st.composite
def built_hosts(draw) -> tuple[str, str]:
    """A host built from pieces, each drawn good or broken; returns (label, host).

    Mostly one piece is broken (the rest valid), so every rule is exercised on its own;
    sometimes every piece is drawn freely.
    """
    if draw(st.booleans()):
        broken = {draw(st.integers(min_value=-1, max_value=len(PIECES) - 1))}
    else:
        broken = {i for i in range(len(PIECES)) if draw(st.booleans())}
    parts = [draw(bad if i in broken else good) for i, (good, bad) in enumerate(PIECES)]
    return "".join(parts[1:-1]), "".join(parts)


class RoutingPropertyTests(SynchronousTestCase):
    """Whatever the input, resolve_target returns a consistent Target or a 400/404."""

    def check(self, raw: object, expected_label: str | None = None) -> None:
        try:
            t = ROUTER.resolve_target(raw)  # type: ignore[arg-type]
        except errors.GatewayError as e:
            self.assertIn(e.status, (400, 404), f"{raw!r} -> {e!r}")
            self.assertIsInstance(e, (errors.MissingHost, errors.NotFound), f"{raw!r} -> {e!r}")
            json.loads(e.body())
            return
        # Any other exception propagates and fails the test.
        self.assertIsInstance(t, Target)
        self.assertEqual(t.host, recomposed(t), f"{raw!r} -> {t!r}")
        self.assertIn(t.program, PROGRAMS)
        program = PROGRAMS[t.program]
        upper = 65535 if program.index == "port" else program.max_instance
        self.assertTrue(1 <= t.index <= upper, f"{raw!r} -> {t!r}")
        self.assertLessEqual(len(t.host) - len(SUFFIX), 63)
        text = raw.decode("ascii") if isinstance(raw, bytes) else raw
        self.assertIn(t.host, text.lower())
        if expected_label is not None:
            self.assertEqual(t.host, expected_label.lower() + SUFFIX, f"{raw!r} -> {t!r}")

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def test_arbitrary_text(self, raw: str) -> None:
        """Arbitrary text never raises anything but a 400/404 GatewayError."""
        self.check(raw)

    @settings(max_examples=300, deadline=None)
    @given(st.binary())
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        """Arbitrary bytes never raise anything but a 400/404 GatewayError."""
        self.check(raw)

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="0123456789abcdefABCDEF-.:[]tpehmrinalx \n", max_size=90))
    def test_arbitrary_text_near_the_grammar(self, raw: str) -> None:
        """Text drawn from the grammar's own characters obeys the same property."""
        self.check(raw + SUFFIX)

    @settings(max_examples=300, deadline=None)
    @given(built_hosts(), st.booleans())
    def test_labels_built_from_pieces(self, built: tuple[str, str], as_bytes: bool) -> None:
        """A Target from a built host re-composes into exactly the built label, lowercased."""
        built_label, raw = built
        self.check(raw.encode("utf-8") if as_bytes else raw, built_label)

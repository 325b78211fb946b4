"""Specification of the permission decision and of capability classification (both pure).

The decision: with no set a request passes; else it passes if some matched group grants
the capability at the needed level (``true`` every level, ``false`` none, a level itself
and below; a level-less capability needs ``true``), a WebSocket granted only the lowest
level passing read-only; else the default decides, a deny being 401 with challenges
(no credentials offered, a credential-based group exists) or 403.
"""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hoodyproxy.access import Decision, PermissionSet, decide
from hoodyproxy.access.capabilities import (
    BUILTIN_KINDS,
    LEVELS,
    UNCLASSIFIED,
    FilesKind,
    ServiceKind,
    SQLiteKind,
    TerminalKind,
    classify,
    level_orders,
    normalize_path,
    service_kinds,
)
from hoodyproxy.access.decision import challenges_for

PROJECT = "67e89abc123def456789abcd"


def pset(permissions: dict, default: str = "deny", groups: tuple[str, ...] | None = None) -> PermissionSet:
    """A project set whose groups are the names in ``permissions`` (plus ``groups``)."""
    names = set(permissions) | set(groups or ())
    return PermissionSet("project", PROJECT, None, {n: {"type": "ip", "range": "10.0.0.0/8"} for n in names},
                         permissions, default)


def run(p, matched=(), capability="files", level="read", *, websocket=False, offered=False,
        challenges=frozenset(), realm="hoodyproxy") -> Decision:
    return decide(p, set(matched), capability, level, websocket=websocket, credentials_offered=offered,
                  challenge_kinds=set(challenges), realm=realm)


class NoSetTests(SynchronousTestCase):
    def test_no_set_passes(self) -> None:
        """Without a permission set every request passes: the URL is the credential."""
        d = run(None, (), "terminal", None, offered=False, challenges={"basic"})
        self.assertEqual(d, Decision(True, 200, None, False, (), "no permissions set"))

    def test_no_set_websocket_not_read_only(self) -> None:
        """Without a set a WebSocket is forwarded in full."""
        self.assertFalse(run(None, (), "display", "view", websocket=True).read_only)


class GrantTableTests(SynchronousTestCase):
    """One row per (grant, needed level): allowed or not."""

    TABLE = [
        # capability, grant, needed level, allowed
        ("files", True, "read", True),
        ("files", True, "write", True),
        ("files", False, "read", False),
        ("files", False, "write", False),
        ("files", "read", "read", True),
        ("files", "read", "write", False),
        ("files", "write", "read", True),
        ("files", "write", "write", True),
        ("display", "view", "view", True),
        ("display", "view", "control", False),
        ("display", "control", "view", True),
        ("display", "control", "control", True),
        ("sqlite", "query", "query", True),
        ("sqlite", "query", "modify", False),
        ("sqlite", "modify", "query", True),
        ("sqlite", "modify", "modify", True),
        ("terminal", True, None, True),
        ("terminal", False, None, False),
        ("exec", True, None, True),
        ("exec", False, None, False),
        ("http", True, None, True),
        ("http", False, None, False),
        ("gpu_jobs", True, None, True),
        # a leveled capability with no level, or a level it does not have: only true
        ("files", True, None, True),
        ("files", "write", None, False),
        ("files", "write", "delete", False),
        ("files", True, "delete", True),
        # a level grant on a level-less capability never allows
        ("terminal", "read", None, False),
    ]

    def test_table(self) -> None:
        """Each row's grant allows exactly the needed levels the row says."""
        for capability, grant, level, allowed in self.TABLE:
            d = run(pset({"office": {capability: grant}}), {"office"}, capability, level)
            self.assertEqual(d.allowed, allowed, (capability, grant, level, d))
            self.assertEqual(d.status, 200 if allowed else 403)
            self.assertEqual(d.group, "office" if allowed else None)

    def test_missing_capability_grants_nothing(self) -> None:
        """A matched group without an entry for the capability does not allow it."""
        d = run(pset({"office": {"display": True}}), {"office"}, "files", "read")
        self.assertFalse(d.allowed)

    def test_group_without_permissions_grants_nothing(self) -> None:
        """A matched group with no permissions at all does not allow anything."""
        d = run(pset({}, groups=("office",)), {"office"}, "files", "read")
        self.assertFalse(d.allowed)


class GroupTests(SynchronousTestCase):
    def test_unmatched_group_does_not_allow(self) -> None:
        """A group the request does not satisfy grants nothing, however generous."""
        d = run(pset({"team": {"files": True}}), set(), "files", "read")
        self.assertFalse(d.allowed)

    def test_any_matched_group_may_allow(self) -> None:
        """Every matched group is considered: one that allows is enough."""
        d = run(pset({"a": {"files": False}, "b": {"files": "write"}}), {"a", "b"}, "files", "write")
        self.assertEqual((d.allowed, d.group), (True, "b"))

    def test_false_does_not_veto(self) -> None:
        """A matched group's ``false`` does not override another matched group's grant."""
        d = run(pset({"a": {"terminal": False}, "b": {"terminal": True}}), {"a", "b"}, "terminal", None)
        self.assertTrue(d.allowed)

    def test_ties_go_to_first_name(self) -> None:
        """Of matched groups granting equally, the first in sorted order is named."""
        d = run(pset({"zeta": {"terminal": True}, "alpha": {"terminal": True}}), {"zeta", "alpha"},
                "terminal", None)
        self.assertEqual(d.group, "alpha")

    def test_strongest_grant_is_named(self) -> None:
        """The group with the strongest grant is the one named (``true`` over a level)."""
        d = run(pset({"alpha": {"files": "write"}, "beta": {"files": True}}), {"alpha", "beta"}, "files", "read")
        self.assertEqual(d.group, "beta")

    def test_undefined_matched_names_ignored(self) -> None:
        """Names in ``matched_groups`` that the set does not define are ignored."""
        d = run(pset({}, groups=("office",)), {"ghost", "office"}, "files", "read")
        self.assertFalse(d.allowed)
        self.assertNotIn("ghost", d.reason)

    def test_allowed_reason_names_group(self) -> None:
        """The audit reason of an allowed request names the group that allowed it."""
        d = run(pset({"office": {"files": True}}), {"office"}, "files", "write")
        self.assertEqual(d.reason, "allowed by group office")


class WebSocketTests(SynchronousTestCase):
    def test_lowest_level_websocket_read_only(self) -> None:
        """A WebSocket granted exactly the lowest level (read, view, query) is read-only."""
        for capability, lowest in (("files", "read"), ("display", "view"), ("sqlite", "query")):
            d = run(pset({"o": {capability: lowest}}), {"o"}, capability, lowest, websocket=True)
            self.assertEqual((d.allowed, d.read_only), (True, True), capability)
            self.assertIn("read-only", d.reason)

    def test_higher_level_websocket_full(self) -> None:
        """A WebSocket granted a higher level is forwarded in full."""
        d = run(pset({"o": {"display": "control"}}), {"o"}, "display", "view", websocket=True)
        self.assertEqual((d.allowed, d.read_only), (True, False))

    def test_true_websocket_full(self) -> None:
        """A WebSocket granted ``true`` is forwarded in full."""
        d = run(pset({"o": {"display": True}}), {"o"}, "display", "view", websocket=True)
        self.assertFalse(d.read_only)

    def test_best_grant_decides_read_only(self) -> None:
        """With one group at the lowest level and another higher, the higher wins: not read-only."""
        d = run(pset({"a": {"files": "read"}, "b": {"files": "write"}}), {"a", "b"}, "files", "read",
                websocket=True)
        self.assertEqual((d.read_only, d.group), (False, "b"))

    def test_plain_request_never_read_only(self) -> None:
        """A request that is not a WebSocket is never marked read-only."""
        d = run(pset({"o": {"files": "read"}}), {"o"}, "files", "read", websocket=False)
        self.assertEqual((d.allowed, d.read_only), (True, False))

    def test_level_less_websocket_full(self) -> None:
        """A WebSocket to a level-less capability (terminal) is forwarded in full."""
        d = run(pset({"o": {"terminal": True}}), {"o"}, "terminal", None, websocket=True)
        self.assertFalse(d.read_only)

    def test_default_allow_websocket_full(self) -> None:
        """A WebSocket let through by ``default: allow`` is forwarded in full."""
        d = run(pset({"o": {"display": "view"}}, "allow"), set(), "display", "view", websocket=True)
        self.assertEqual((d.allowed, d.read_only, d.group), (True, False, None))


class DefaultTests(SynchronousTestCase):
    def test_default_allow(self) -> None:
        """Not allowed by any group, ``default: allow`` lets the request through."""
        d = run(pset({"o": {"files": "read"}}, "allow"), {"o"}, "files", "write")
        self.assertEqual(d, Decision(True, 200, None, False, (), "default allow"))

    def test_default_deny_no_credentials_no_credential_groups(self) -> None:
        """Denied with only address groups (no challenge kinds): 403, whatever was offered."""
        d = run(pset({"o": {"files": True}}), set(), offered=False, challenges=set())
        self.assertEqual((d.allowed, d.status, d.challenges), (False, 403, ()))

    def test_401_with_challenges(self) -> None:
        """No credentials offered and credential groups exist: 401 with Basic then Bearer."""
        d = run(pset({"o": {"files": True}}), set(), offered=False, challenges={"bearer", "basic"})
        self.assertEqual(d.status, 401)
        self.assertEqual(d.challenges, ('Basic realm="hoodyproxy"', 'Bearer realm="hoodyproxy"'))

    def test_401_only_present_challenges(self) -> None:
        """Only the challenge kinds present are sent."""
        self.assertEqual(run(pset({}), challenges={"bearer"}).challenges, ('Bearer realm="hoodyproxy"',))
        self.assertEqual(run(pset({}), challenges={"basic"}).challenges, ('Basic realm="hoodyproxy"',))

    def test_unknown_challenge_kinds_ignored(self) -> None:
        """Challenge kinds other than basic and bearer give no header; with none left, 403."""
        d = run(pset({}), challenges={"negotiate"})
        self.assertEqual((d.status, d.challenges), (403, ()))

    def test_credentials_offered_403(self) -> None:
        """Credentials offered but not good enough: 403, no challenge."""
        d = run(pset({"o": {"files": True}}), set(), offered=True, challenges={"basic", "bearer"})
        self.assertEqual((d.status, d.challenges), (403, ()))

    def test_matched_but_lacking_403(self) -> None:
        """A matched group lacking the capability (credentials offered): 403."""
        d = run(pset({"o": {"files": "read"}}), {"o"}, "files", "write", offered=True, challenges={"bearer"})
        self.assertEqual(d.status, 403)

    def test_realm(self) -> None:
        """The realm is configurable and quoted safely."""
        d = run(pset({}), challenges={"basic"}, realm='my "node"')
        self.assertEqual(d.challenges, ('Basic realm="my \\"node\\""',))

    def test_reason_no_group_matched(self) -> None:
        """The audit reason says when no group matched, and what was needed."""
        d = run(pset({"o": {"files": True}}), set(), "files", "write")
        self.assertIn("no group matched", d.reason)
        self.assertIn("files:write", d.reason)

    def test_reason_matched_groups_lack(self) -> None:
        """The audit reason names the matched groups that lack the capability."""
        d = run(pset({"o": {"files": "read"}}), {"o"}, "files", "write", offered=True)
        self.assertIn("groups o do not grant files:write", d.reason)

    def test_reason_never_names_unmatched_groups(self) -> None:
        """The audit reason never names a group the request did not match."""
        d = run(pset({"almost": {"files": True}, "office": {"display": True}}), {"office"}, "files", "read")
        self.assertNotIn("almost", d.reason)

    def test_denial_body_reveals_nothing(self) -> None:
        """The client's body is the same for every denial with a status: no group, no reason."""
        d = run(pset({"secretgroup": {"files": "read"}}), {"secretgroup"}, "files", "write", offered=True)
        self.assertEqual(json.loads(d.body()), {"error": "forbidden", "message": "access denied"})
        d = run(pset({"secretgroup": {"files": True}}), set(), challenges={"bearer"})
        self.assertEqual(json.loads(d.body()), {"error": "unauthorized", "message": "credentials are required"})

    def test_audit_fields(self) -> None:
        """``audit()`` gives the fields of the audit record."""
        d = run(pset({"o": {"files": True}}), {"o"})
        self.assertEqual(d.audit(), {"allowed": True, "group": "o", "read_only": False,
                                     "reason": "allowed by group o"})

    def test_unclassified_never_granted(self) -> None:
        """The capability of a request its kind failed to classify is granted by no group."""
        d = run(pset({"o": {"files": True, "http": True}}), {"o"}, UNCLASSIFIED, None)
        self.assertFalse(d.allowed)

    def test_challenges_for(self) -> None:
        """``challenges_for`` orders Basic before Bearer."""
        self.assertEqual(challenges_for({"bearer", "basic"}, "r"), ('Basic realm="r"', 'Bearer realm="r"'))


# -- the decision as a property -------------------------------------------------------------

GROUP_NAMES = ("a", "b", "c", "d")
CAPABILITIES = ("terminal", "exec", "files", "display", "sqlite", "http", "gpu_jobs")
ALL_LEVELS = tuple(level for levels in LEVELS.values() for level in levels)


def grants_for(capability: str):
    choices = [st.just(True), st.just(False), *(st.just(level) for level in LEVELS.get(capability, ()))]
    return st.one_of(choices)


@st.composite
def permission_sets(draw):
    defined = draw(st.sets(st.sampled_from(GROUP_NAMES)))
    permissions = {}
    for name in sorted(defined):
        if draw(st.booleans()):
            capabilities = draw(st.sets(st.sampled_from(CAPABILITIES)))
            permissions[name] = {c: draw(grants_for(c)) for c in sorted(capabilities)}
    default = draw(st.sampled_from(["allow", "deny"]))
    return pset(permissions, default, tuple(defined))


def oracle_grants(grant, capability: str, level) -> bool:
    """Independent restatement of the rule: does ``grant`` allow ``level`` of ``capability``?"""
    if grant is True:
        return True
    if not isinstance(grant, str) or capability not in LEVELS or level not in LEVELS[capability]:
        return False
    order = LEVELS[capability]
    return order.index(grant) >= order.index(level)


class DecisionPropertyTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(permission_sets(), st.sets(st.sampled_from(GROUP_NAMES + ("ghost",))),
           st.sampled_from(CAPABILITIES), st.sampled_from((None,) + ALL_LEVELS),
           st.booleans(), st.booleans(), st.sets(st.sampled_from(["basic", "bearer", "negotiate"])))
    def test_decision_matches_rule(self, p, matched, capability, level, websocket, offered, kinds) -> None:
        """Allowed iff a matched group grants the needed level or the default allows; the
        status, group, read-only flag and challenges are consistent with that."""
        d = decide(p, matched, capability, level, websocket=websocket, credentials_offered=offered,
                   challenge_kinds=kinds)
        granting = [g for g in matched if g in p.groups
                    and oracle_grants(p.permissions.get(g, {}).get(capability), capability, level)]
        self.assertEqual(d.allowed, bool(granting) or p.default == "allow")
        self.assertEqual(d.status == 200, d.allowed)
        if granting:
            self.assertIn(d.group, granting)
        else:
            self.assertIsNone(d.group)
        if d.read_only:
            self.assertTrue(websocket and d.allowed and d.group is not None)
            self.assertEqual(p.permissions[d.group][capability], LEVELS[capability][0])
        if not d.allowed:
            expect_401 = not offered and bool(kinds & {"basic", "bearer"})
            self.assertEqual(d.status, 401 if expect_401 else 403)
            self.assertEqual(bool(d.challenges), expect_401)
            for name in set(p.groups) - set(matched):
                self.assertNotIn(f" {name} ", f" {d.reason.replace(',', ' ')} ")
        else:
            self.assertEqual(d.challenges, ())
        self.assertTrue(d.reason)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.none(), permission_sets()), st.sets(st.text(max_size=5)), st.text(max_size=10),
           st.one_of(st.none(), st.text(max_size=8)), st.booleans(), st.booleans(),
           st.sets(st.text(max_size=8)), st.text(max_size=20))
    def test_never_raises(self, p, matched, capability, level, websocket, offered, kinds, realm) -> None:
        """Any strings at all give a Decision, never an exception; only WebSockets are read-only."""
        d = decide(p, matched, capability, level, websocket=websocket, credentials_offered=offered,
                   challenge_kinds=kinds, realm=realm)
        self.assertIsInstance(d, Decision)
        self.assertIn(d.status, (200, 401, 403))
        if d.read_only:
            self.assertTrue(websocket)


# -- classification ---------------------------------------------------------------------------


class ClassificationTableTests(SynchronousTestCase):
    TABLE = [
        # kind, method, path, websocket, expected
        ("terminal", b"GET", b"/", False, ("terminal", None)),
        ("terminal", b"GET", b"/", True, ("terminal", None)),
        ("terminal", b"POST", b"/input", False, ("terminal", None)),
        ("terminal", b"POST", b"/exec", False, ("exec", None)),
        ("terminal", b"POST", b"/exec/run?x=1", False, ("exec", None)),
        ("terminal", b"PUT", b"/exec/", False, ("exec", None)),
        ("terminal", b"DELETE", b"/exec/job/1", False, ("exec", None)),
        ("terminal", b"GET", b"/exec", False, ("terminal", None)),
        ("terminal", b"POST", b"/executor", False, ("terminal", None)),
        ("terminal", b"POST", b"//exec", False, ("exec", None)),
        ("terminal", b"POST", b"/%65xec", False, ("exec", None)),
        ("terminal", b"POST", b"/a/../exec", False, ("exec", None)),
        ("terminal", b"POST", b"/./exec/./x", False, ("exec", None)),
        ("files", b"GET", b"/a.txt", False, ("files", "read")),
        ("files", b"HEAD", b"/a.txt", False, ("files", "read")),
        ("files", b"OPTIONS", b"/", False, ("files", "read")),
        ("files", b"PROPFIND", b"/", False, ("files", "read")),
        ("files", b"PUT", b"/a.txt", False, ("files", "write")),
        ("files", b"POST", b"/", False, ("files", "write")),
        ("files", b"DELETE", b"/a.txt", False, ("files", "write")),
        ("files", b"MKCOL", b"/d", False, ("files", "write")),
        ("files", b"MOVE", b"/d", False, ("files", "write")),
        ("files", b"PROPPATCH", b"/d", False, ("files", "write")),
        ("files", b"get", b"/", False, ("files", "write")),
        ("files", b"GET", b"/watch", True, ("files", "read")),
        ("display", b"GET", b"/", False, ("display", "view")),
        ("display", b"HEAD", b"/", False, ("display", "view")),
        ("display", b"OPTIONS", b"/", False, ("display", "view")),
        ("display", b"GET", b"/websockify", True, ("display", "view")),
        ("display", b"POST", b"/input", False, ("display", "control")),
        ("display", b"PUT", b"/clipboard", False, ("display", "control")),
        ("sqlite", b"GET", b"/tables", False, ("sqlite", "query")),
        ("sqlite", b"HEAD", b"/", False, ("sqlite", "query")),
        ("sqlite", b"OPTIONS", b"/query", False, ("sqlite", "query")),
        ("sqlite", b"POST", b"/query", False, ("sqlite", "query")),
        ("sqlite", b"POST", b"/query/", False, ("sqlite", "query")),
        ("sqlite", b"POST", b"/query?db=main", False, ("sqlite", "query")),
        ("sqlite", b"POST", b"/execute", False, ("sqlite", "modify")),
        ("sqlite", b"POST", b"/query/more", False, ("sqlite", "modify")),
        ("sqlite", b"PUT", b"/query", False, ("sqlite", "modify")),
        ("sqlite", b"DELETE", b"/", False, ("sqlite", "modify")),
        ("http", b"GET", b"/", False, ("http", None)),
        ("http", b"POST", b"/exec", True, ("http", None)),
        ("generic", b"DELETE", b"/", False, ("http", None)),
        ("no-such-kind", b"GET", b"/", False, ("http", None)),
    ]

    def test_table(self) -> None:
        """Each row's request is classified as the row says."""
        for kind, method, path, websocket, expected in self.TABLE:
            self.assertEqual(classify(kind, method, path, websocket), expected, (kind, method, path, websocket))

    def test_levels_are_ordered_lowest_first(self) -> None:
        """read < write, view < control, query < modify."""
        self.assertEqual(dict(LEVELS), {"files": ("read", "write"), "display": ("view", "control"),
                                        "sqlite": ("query", "modify")})

    def test_builtin_kinds_cover_config_kinds(self) -> None:
        """Every service kind the config accepts has a built-in classifier."""
        from hoodyproxy.config import SERVICE_KINDS
        self.assertEqual(set(BUILTIN_KINDS), set(SERVICE_KINDS))

    def test_builtin_kinds_follow_protocol(self) -> None:
        """The built-in kinds are ServiceKinds (name, levels, classify)."""
        for name, kind in BUILTIN_KINDS.items():
            self.assertIsInstance(kind, ServiceKind)
            self.assertEqual(kind.name, name)

    def test_configurable_exec_prefixes(self) -> None:
        """A terminal kind can be given other command-execution paths."""
        kinds = dict(BUILTIN_KINDS, terminal=TerminalKind(exec_prefixes=(b"/run", b"/api/exec")))
        self.assertEqual(classify("terminal", b"POST", b"/api/exec/1", False, kinds), ("exec", None))
        self.assertEqual(classify("terminal", b"POST", b"/exec", False, kinds), ("terminal", None))

    def test_configurable_read_methods(self) -> None:
        """A files kind can be given other read methods."""
        kinds = dict(BUILTIN_KINDS, files=FilesKind(read_methods=frozenset({b"GET", b"REPORT"})))
        self.assertEqual(classify("files", b"REPORT", b"/", False, kinds), ("files", "read"))
        self.assertEqual(classify("files", b"PROPFIND", b"/", False, kinds), ("files", "write"))

    def test_configurable_query_paths(self) -> None:
        """An sqlite kind can be given other query endpoints."""
        kinds = dict(BUILTIN_KINDS, sqlite=SQLiteKind(query_paths=(b"/api/query",)))
        self.assertEqual(classify("sqlite", b"POST", b"/api/query", False, kinds), ("sqlite", "query"))
        self.assertEqual(classify("sqlite", b"POST", b"/query", False, kinds), ("sqlite", "modify"))

    def test_plugin_kind_used(self) -> None:
        """A third-party kind in the mapping classifies requests to its programs."""

        class Queue:
            name = "queue"
            levels = {"queue": ("peek", "push")}

            def classify(self, method, path, websocket):
                return ("queue", "peek" if method == b"GET" else "push")

        kinds = dict(BUILTIN_KINDS, queue=Queue())
        self.assertEqual(classify("queue", b"POST", b"/", False, kinds), ("queue", "push"))
        self.assertEqual(dict(level_orders(kinds))["queue"], ("peek", "push"))

    def test_raising_kind_fails_closed(self) -> None:
        """A kind whose classify raises or answers nonsense needs a capability no set can grant."""

        class Broken:
            name = "broken"
            levels = {}

            def classify(self, method, path, websocket):
                raise RuntimeError("bug")

        class Nonsense(Broken):
            def classify(self, method, path, websocket):
                return (1, 2)

        for kind in (Broken(), Nonsense()):
            self.assertEqual(classify("broken", b"GET", b"/", False, {"broken": kind}), (UNCLASSIFIED, None))

    def test_service_kinds_includes_builtins(self) -> None:
        """``service_kinds()`` (builtins plus plugins found) has every built-in kind."""
        self.assertTrue(set(BUILTIN_KINDS) <= set(service_kinds()))

    def test_normalize_path(self) -> None:
        """Paths are normalized as an upstream would resolve them."""
        for raw, normal in ((b"", b"/"), (b"/", b"/"), (b"/a//b", b"/a/b"), (b"/a/./b/../c", b"/a/c"),
                            (b"/../../x", b"/x"), (b"/a/", b"/a/"), (b"/%2e%2e/exec", b"/exec"),
                            (b"/a?b/../c", b"/a"), (b"/a#frag", b"/a")):
            self.assertEqual(normalize_path(raw), normal, raw)


class ClassificationPropertyTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from(sorted(BUILTIN_KINDS) + ["other"]), st.binary(max_size=10), st.binary(max_size=40),
           st.booleans())
    def test_classification_total(self, kind, method, path, websocket) -> None:
        """Any method and path bytes are classified, with a level exactly when the capability has levels."""
        capability, level = classify(kind, method, path, websocket)
        if capability in LEVELS:
            self.assertIn(level, LEVELS[capability])
        else:
            self.assertIsNone(level)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["files", "display", "sqlite"]), st.binary(max_size=10), st.binary(max_size=40))
    def test_websocket_lowest_level(self, kind, method, path) -> None:
        """A WebSocket to files or display needs the lowest level (it may go read-only)."""
        capability, level = classify(kind, b"GET" if kind == "sqlite" else method, path, True)
        self.assertEqual(level, LEVELS[capability][0])

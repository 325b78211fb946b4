"""The pure rules that refuse ambiguous requests under restricted grants, and the per-program
method and path sets they read (``[programs.NAME] exec_paths`` ...)."""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.trial import unittest

from hoodyproxy.access.ambiguity import refusal, strictest_of
from hoodyproxy.access.capabilities import BUILTIN_KINDS, TerminalKind, classify, configured_kind
from hoodyproxy.config import ConfigError, settings_from_mapping, settings_to_mapping

TERMINAL = BUILTIN_KINDS["terminal"]


def why(method: bytes, target: bytes, *, kind=TERMINAL, body: bool = False, headers=()) -> str | None:
    path = target.partition(b"?")[0]
    return refusal(kind, method, target, False, body, headers, classify(kind, method, path, False))


class RefusalTests(unittest.TestCase):

    def test_spellings_of_exec_are_ambiguous(self) -> None:
        """Each spelling the attack used is refused, with a reason naming what was wrong."""
        cases = {
            b"/EXEC/run": "case", b"/Exec": "case", b"/exec./run": "trailing dots",
            b"/exec;x/run": "';'", b"/exec%5Crun": "'\\'", b"/exec%00/run": "control byte",
            b"/%2565xec/run": "encoded twice", b"/exec#x": "'#'",
        }
        for target, fragment in cases.items():
            reason = why(b"POST", target)
            self.assertIsNotNone(reason, target)
            self.assertIn(fragment, reason, target)

    def test_plain_paths_are_not_ambiguous(self) -> None:
        """Ordinary paths, and any path of a GET (which the path cannot make exec), pass."""
        for method, target in ((b"POST", b"/input"), (b"POST", b"/a/%41?q=1"), (b"GET", b"/exec;x"),
                               (b"GET", b"/EXEC/run"), (b"PUT", b"/session")):
            self.assertIsNone(why(method, target), (method, target))

    def test_bodies_on_bodiless_methods(self) -> None:
        """A body on GET, HEAD, OPTIONS, TRACE or the kind's low methods is refused."""
        for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE"):
            self.assertEqual(why(method, b"/", body=True), f"a body on a {method.decode()} request")
        files = BUILTIN_KINDS["files"]
        self.assertIsNotNone(why(b"PROPFIND", b"/", kind=files, body=True))
        self.assertIsNone(why(b"POST", b"/", body=True))

    def test_method_overrides(self) -> None:
        """Override headers in any spelling and a ``_method`` parameter are refused."""
        for name in (b"X-HTTP-Method-Override", b"x_http_method", b"X-Method-Override"):
            self.assertEqual(why(b"GET", b"/exec", headers=[name]), "a method override header")
        for target in (b"/exec?_method=POST", b"/exec?a=1&%5Fmethod=PUT", b"/?_METHOD=x"):
            self.assertEqual(why(b"GET", target), "a _method parameter")

    def test_sqlite_query_path_spellings(self) -> None:
        """sqlite: ``POST /query`` decides by path, so its spellings are checked too."""
        sqlite = BUILTIN_KINDS["sqlite"]
        self.assertIsNotNone(why(b"POST", b"/query;x", kind=sqlite))
        self.assertIsNone(why(b"POST", b"/query", kind=sqlite))

    def test_kinds_without_strictest(self) -> None:
        """http and generic decide by neither method nor path: nothing to refuse."""
        self.assertIsNone(strictest_of(BUILTIN_KINDS["http"]))
        self.assertEqual(strictest_of(TERMINAL), ("exec", None))
        self.assertIsNone(strictest_of(object()))

    @given(st.binary(max_size=40), st.sampled_from([b"GET", b"POST", b"HEAD", b"DELETE"]), st.booleans())
    def test_never_raises(self, path: bytes, method: bytes, body: bool) -> None:
        """Any bytes as a path: a reason or None, never an exception."""
        for kind in BUILTIN_KINDS.values():
            target = b"/" + path
            result = refusal(kind, method, target, False, body, [b"x"], classify(kind, method, target, False))
            self.assertTrue(result is None or isinstance(result, str))


class ExecutePathTests(unittest.TestCase):

    def test_platform_execute_api_is_exec(self) -> None:
        """The platform's ``POST /api/v1/terminal/execute`` needs exec; GET does not."""
        self.assertEqual(classify("terminal", b"POST", b"/api/v1/terminal/execute", False), ("exec", None))
        self.assertEqual(classify("terminal", b"PUT", b"/api/v1/terminal/execute/1", False), ("exec", None))
        self.assertEqual(classify("terminal", b"GET", b"/api/v1/terminal/execute", False), ("terminal", None))
        self.assertEqual(classify("terminal", b"POST", b"/api/v1/terminal/executex", False), ("terminal", None))


class ProgramKindOptionTests(unittest.TestCase):

    def test_options_reach_the_kind(self) -> None:
        """``exec_paths``, ``read_methods``, ``view_methods``, ``query_*`` set the kind's sets."""
        s = settings_from_mapping({"programs": {
            "terminal": {"exec_paths": ["/run"]},
            "files": {"kind": "files", "port": 8222, "read_methods": ["GET"]},
            "sqlite": {"query_methods": ["GET"], "query_paths": ["/q"]}}})
        terminal = configured_kind("terminal", s.programs["terminal"].kind_options)
        self.assertEqual(terminal, TerminalKind(exec_prefixes=(b"/run",)))
        self.assertEqual(classify(terminal, b"POST", b"/run/1", False), ("exec", None))
        self.assertEqual(classify(terminal, b"POST", b"/exec", False), ("terminal", None))
        files = configured_kind("files", s.programs["files"].kind_options)
        self.assertEqual(classify(files, b"HEAD", b"/", False), ("files", "write"))
        sqlite = configured_kind("sqlite", s.programs["sqlite"].kind_options)
        self.assertEqual(classify(sqlite, b"POST", b"/q", False), ("sqlite", "query"))
        self.assertEqual(settings_from_mapping(settings_to_mapping(s)), s)

    def test_bad_options_name_the_key(self) -> None:
        """An option of another kind, a non-list, a bad method or path: ConfigError naming it."""
        for table, key in (({"read_methods": ["GET"]}, "[programs.terminal] read_methods"),
                           ({"exec_paths": "/exec"}, "[programs.terminal] exec_paths"),
                           ({"exec_paths": ["exec"]}, "[programs.terminal] exec_paths"),
                           ({"exec_paths": ["/a/../b"]}, "[programs.terminal] exec_paths")):
            with self.assertRaises(ConfigError) as caught:
                settings_from_mapping({"programs": {"terminal": table}})
            self.assertEqual(caught.exception.key, key)
        with self.assertRaises(ConfigError) as caught:
            settings_from_mapping({"programs": {"display": {"view_methods": ["get"]}}})
        self.assertEqual(caught.exception.key, "[programs.display] view_methods")

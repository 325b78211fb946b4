"""The audit line's formatter: the same bytes as before, without ``json.dumps`` per request.

``format_record`` used to build the line with ``%`` formatting plus ``json.dumps`` for
``duration_ms`` and for every field outside its fixed list (``http`` among them, so every
record took the slow path).  The reference below is that implementation, copied as it was;
the new one must give the same text for every record (key order and escaping included),
since the audit file's consumers read it as it is.

The cost per record, measured with ``PYTHONPATH=. python tests/test_audit_format.py``
(timeit, best of 5 runs of 100 000 records, thread CPU time, a typical gateway record:
route, decision, ``http``), on the 2-core development machine shared with other work
(an empty lambda call costs 47 ns there, some 2-3 times a quiet desktop's):

    before: format_record 11.3-13.4 us, AuditLog.record (format + write) 13.2 us
    after:  format_record  4.2-4.6 us,  AuditLog.record (format + batched write) 6.0-7.2 us

of which about 1.2 us was the twisted.logger event and publisher: with no observer but the
file (the usual case) the line now goes straight to the file's batch (AuditLog.record 6.15 us
with format_record at 4.99 us in a run where the machine was busy: about 1.2 us apart).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import timeit
from json.encoder import encode_basestring_ascii as _q

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from hoodyproxy.observe import audit
from hoodyproxy.observe.audit import AuditLog, format_record
from hoodyproxy.routing import Target

# -- the reference: format_record as it was before (verbatim but for the names) ----------

_OLD_KNOWN = frozenset({"time", "client", "host", "route", "method", "path", "status", "bytes_in",
                        "bytes_out", "duration_ms", "reason"})
_old_second_cache: list = [-1, ""]


def _old_iso_time(ts: float) -> str:
    second = int(ts)
    if second != _old_second_cache[0]:
        _old_second_cache[0] = second
        _old_second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return "%s.%03dZ" % (_old_second_cache[1], int((ts - second) * 1000))


def _old_s(value) -> str:
    return "null" if value is None else _q(value)


def old_format_record(r: dict) -> str:
    route = r.get("route")
    if route is None:
        route_text = "null"
    else:
        route_text = '{"project":"%s","container":"%s","program":"%s","index":%d}' % (
            route["project"], route["container"], route["program"], route["index"])
    t = r["time"]
    line = ('{"time":%s,"client":%s,"host":%s,"route":%s,"method":%s,"path":%s,"status":%d,'
            '"bytes_in":%d,"bytes_out":%d,"duration_ms":%s' % (
                _q(_old_iso_time(t) if isinstance(t, (int, float)) else t), _old_s(r.get("client")),
                _old_s(r.get("host")), route_text, _old_s(r.get("method")), _old_s(r.get("path")),
                r.get("status", 0), r.get("bytes_in", 0), r.get("bytes_out", 0),
                json.dumps(r.get("duration_ms", 0))))
    reason = r.get("reason")
    if reason is not None:
        line += ',"reason":' + _q(reason)
    for key, value in r.items():
        if key not in _OLD_KNOWN:
            line += "," + _q(key) + ":" + json.dumps(value, separators=(",", ":"))
    return line + "}"


# -- records -----------------------------------------------------------------------------

def typical_record() -> dict:
    """A record as the gateway makes it for an allowed, forwarded request."""
    record = {"time": 1765071514.123456, "client": "203.0.113.7", "host": "web-1.example.test",
              "route": None, "method": "GET", "path": "/api/items?page=2", "http": "1.1"}
    record["route"] = {"project": "demo", "container": "c0ffee", "program": "web", "index": 1}
    record["decision"] = {"allowed": True, "group": "staff", "read_only": False,
                          "reason": "group staff"}
    record.update(status=200, bytes_in=312, bytes_out=5120, duration_ms=3.142)
    return record


# Any string: ASCII, quotes, backslashes, control characters, non-ASCII, astral, lone surrogates.
_tricky = st.sampled_from(['"', "\\", "\n", "\r", "\t", "\x00", "\x1f", "\x7f", "é", "\u2028",
                           "\U0001f600", "\ud800", "\udfff", "'", "/"])
texts = st.one_of(
    st.text(),
    st.sampled_from(["", "</script>", '"quoted"', "back\\slash", "tab\tnew\nline",
                     "\u00e9t\u00e9"]),
    st.text(alphabet=st.one_of(st.characters(), _tricky)),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._/?=&", max_size=40),
)
opt_texts = st.one_of(st.none(), texts)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(), st.floats(), st.booleans())
times = st.one_of(
    st.floats(min_value=-1e9, max_value=4e9, allow_nan=False),
    st.integers(min_value=-10**9, max_value=4 * 10**9),
    # the same second over and over, as in a busy gateway (the per-second cache)
    st.floats(min_value=1765071514.0, max_value=1765071516.0),
    texts,
)
_route_dicts = st.fixed_dictionaries(
    {"project": names, "container": names, "program": names,
     "index": st.one_of(st.integers(), st.booleans())})
#: Routes as the gateway keeps them (a RouteRecord per target, its text made once:
#: format_record's short way takes only those).
_route_records = st.builds(
    lambda project, container, program, index: audit.RouteRecord(Target(project, container, program, index, "h")),
    names, names, names, st.integers(0, 65535))
routes = st.one_of(st.none(), _route_dicts, _route_records)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(texts, inner, max_size=4)),
    max_leaves=8)
decisions = st.one_of(
    st.fixed_dictionaries({"allowed": st.booleans(), "group": opt_texts,
                           "read_only": st.booleans(), "reason": texts}),
    # the decision's shape, with values of other types (0/1 for False/True, floats ...)
    st.fixed_dictionaries({"allowed": st.one_of(st.booleans(), st.integers(0, 1), st.none()),
                           "group": st.one_of(opt_texts, st.integers()),
                           "read_only": st.one_of(st.booleans(), st.integers(0, 1)),
                           "reason": st.one_of(opt_texts, finite_floats)}),
    st.dictionaries(texts, json_values, max_size=5),
)

_FIELDS = {
    "client": opt_texts, "host": opt_texts, "route": routes, "method": opt_texts,
    "path": opt_texts, "http": st.one_of(st.sampled_from(["1.0", "1.1", "2", "3"]), texts),
    "status": st.one_of(st.integers(0, 999), st.booleans()),
    "bytes_in": st.integers(min_value=0), "bytes_out": st.integers(min_value=0),
    "duration_ms": st.one_of(finite_floats, st.floats(), st.integers(), st.none(), st.booleans(),
                             st.floats(0, 60000).map(lambda v: round(v, 3))),
    "reason": opt_texts, "decision": decisions, "ratelimited": opt_texts,
    "ratelimit_dry_run": st.one_of(st.booleans(), json_values), "closed_by": opt_texts,
}


@st.composite
def records(draw) -> dict:
    """A record with ``time``, any subset of the other fields, in any order, and extras."""
    fields = draw(st.lists(st.sampled_from(sorted(_FIELDS)), unique=True))
    extras = draw(st.dictionaries(texts.filter(lambda k: k not in _FIELDS and k != "time"),
                                  json_values, max_size=3))
    items = [("time", draw(times))] + [(name, draw(_FIELDS[name])) for name in fields]
    items += list(extras.items())
    order = draw(st.permutations(range(len(items))))
    return {items[i][0]: items[i][1] for i in order}


@st.composite
def gateway_records(draw) -> dict:
    """A record shaped as the gateway makes it (the keys in its order)."""
    record = {"time": draw(times.filter(lambda t: not isinstance(t, str))),
              "client": draw(texts), "host": draw(opt_texts), "route": draw(routes),
              "method": draw(texts), "path": draw(texts),
              "http": draw(st.sampled_from(["1.0", "1.1", "2", "3"]))}
    for name in draw(st.lists(st.sampled_from(["ratelimited", "ratelimit_dry_run", "decision",
                                               "status", "reason", "closed_by"]), unique=True)):
        record[name] = draw(_FIELDS[name])
    record.setdefault("status", 200)
    record["bytes_in"] = draw(st.integers(min_value=0))
    record["bytes_out"] = draw(st.integers(min_value=0))
    record["duration_ms"] = draw(st.floats(0, 60000).map(lambda v: round(v, 3)))
    return record


def outcome(function, record):
    try:
        return function(record)
    except Exception as error:  # the same records fail, with the same kind of error
        return type(error)


class FormatTests(unittest.TestCase):
    def check(self, record: dict) -> None:
        old = outcome(old_format_record, record)
        new = outcome(format_record, record)
        self.assertEqual(new, old, record)
        if isinstance(new, str):
            parsed = json.loads(new)
            self.assertEqual(list(parsed), list(json.loads(old)))
            self.assertEqual(new, new.encode("ascii").decode())  # ASCII only, one line
            self.assertNotIn("\n", new)

    def test_typical(self):
        record = typical_record()
        line = format_record(record)
        self.assertEqual(line, old_format_record(record))
        self.assertEqual(list(json.loads(line)), [
            "time", "client", "host", "route", "method", "path", "status", "bytes_in",
            "bytes_out", "duration_ms", "http", "decision"])

    def test_route_rendered_once_reads_the_same(self):
        """The gateway's RouteRecord (its JSON rendered once per target) gives the line a
        plain route dict gives, and is itself that dict."""
        from hoodyproxy.observe.audit import RouteRecord
        from hoodyproxy.routing import Target
        target = Target("67e89abc123def456789abcd", "890abcdef12345678901cdef", "http", 3000, "h")
        plain = dict(typical_record(), route={"project": target.project, "container": target.container,
                                              "program": target.program, "index": target.index})
        cached = dict(plain, route=RouteRecord(target))
        self.assertEqual(cached["route"], plain["route"])
        self.assertEqual(format_record(cached), old_format_record(plain))

    def test_refusal_shapes(self):
        """The records of the gateway's other paths: refused, limited, dry run, tunnel."""
        base = {"time": 1765071514.5, "client": "2001:db8::1", "host": None, "route": None,
                "method": "GET", "path": "/", "http": "2"}
        shapes = [
            dict(base, status=400, reason="bad host", bytes_in=0, bytes_out=120, duration_ms=0.05),
            dict(base, status=429, reason="rate limited", ratelimited="client", bytes_in=0,
                 bytes_out=80, duration_ms=0.0),
            dict(base, ratelimited="group", ratelimit_dry_run=True,
                 decision={"allowed": True, "group": None, "read_only": True, "reason": "x"},
                 status=200, bytes_in=1, bytes_out=2, duration_ms=12),
            dict(base, decision={"allowed": False, "group": None, "read_only": False,
                                 "reason": "decision failed"},
                 status=500, reason="decision failed"),
            dict(base, status=101, bytes_in=5, bytes_out=6, closed_by="container",
                 duration_ms=1234.5),
            {"time": "2025-01-01T00:00:00.000Z"},
            {"time": 0},
            {"time": 1e9, "duration_ms": float("nan")},
            {"time": 1e9, "duration_ms": float("-inf"), "decision": [1, 2]},
            {"time": 1e9, "decision": {"allowed": 1, "group": None, "read_only": 0, "reason": "r"}},
            {"time": 1e9, "decision": {"group": None, "allowed": True, "read_only": False,
                                       "reason": "out of order"}},
            {"time": 1e9, "decision": {"allowed": True, "group": None, "read_only": False,
                                       "reason": "r", "more": {"a": [None]}}},
            {"time": 1765071514.9999999999, "status": True},
            {"time": 0.9999999999999999}, {"time": -0.5}, {"time": -1.25}, {"time": -1},
            {"time": True}, {"time": 1e9, "http": None, "closed_by": None, "reason": None},
            {"time": 1e9, "x": float("inf"), "y": 1.5, "z": 10**30, "w": [], "v": {}},
            {"client": "no time"},
        ]
        for record in shapes:
            self.check(record)

    def test_decision_cache(self):
        """A cached decision text is only ever the one its values give."""
        for allowed in (True, False, 1, 0):
            for read_only in (False, True, 0, 1):
                for group in (None, "g", "é"):
                    self.check({"time": 1.0, "decision": {"allowed": allowed, "group": group,
                                                          "read_only": read_only, "reason": "r"}})

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(records())
    def test_any_record(self, record):
        self.check(record)

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(gateway_records())
    def test_gateway_records(self, record):
        self.check(record)

    def test_no_json_dumps(self):
        """The gateway's records are formatted without a ``json.dumps`` call."""
        calls = []
        original = audit.json.dumps

        def counting(*args, **kw):
            calls.append(args)
            return original(*args, **kw)

        self.patch(audit.json, "dumps", counting)
        record = typical_record()
        for extra in ({}, {"reason": "r", "ratelimited": "client"}, {"ratelimit_dry_run": True},
                      {"closed_by": "client"}, {"duration_ms": 7}):
            format_record(dict(record, **extra))
        self.assertEqual(calls, [])

    def test_short_way_for_the_gateways_records(self):
        """A record as the gateway makes it (a RouteRecord, ASCII text) is serialized by
        orjson; one with text orjson would write otherwise (non-ASCII, DEL) or a value of
        another type goes the general way: the same line in every case."""
        from hoodyproxy.observe.audit import RouteRecord
        calls = []
        original = audit._dumps

        def counting(value, *args):
            calls.append(value)
            return original(value, *args)

        self.patch(audit, "_dumps", counting)
        target = Target("67e89abc123def456789abcd", "890abcdef12345678901cdef", "http", 3000, "h")
        usual = dict(typical_record(), route=RouteRecord(target))
        plain = dict(usual, route=dict(usual["route"]))
        for record, short in [(usual, True), (dict(usual, reason="r", ratelimited="client"), True),
                              (dict(usual, route=None, host=None, status=404), True),
                              (dict(usual, path="/\x7f"), True), (dict(usual, path="/caf\u00e9"), True),
                              (dict(usual, closed_by=1), False), (dict(usual, duration_ms=7), False),
                              (dict(usual, decision=dict(usual["decision"], allowed=1)), False)]:
            del calls[:]
            expected = old_format_record(dict(record, route=plain["route"]) if record["route"] else record)
            self.assertEqual(format_record(record), expected, record)
            self.assertEqual(len(calls), 1 if short else 0, record)


class BatchedWriteTests(unittest.TestCase):
    def path(self) -> str:
        directory = self.mktemp()  # (under Trial's temporary directory: nothing left in /tmp)
        os.makedirs(directory)
        return os.path.join(directory, "audit.log")

    def read(self, path: str) -> list[str]:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_batched_until_flush(self):
        clock = Clock()
        path = self.path()
        log = AuditLog(path, clock=clock)
        records = [dict(typical_record(), path="/%d/é" % i) for i in range(5)]
        for record in records:
            log.record(record)
        self.assertEqual(self.read(path), [])
        clock.advance(log.flush_interval)
        self.assertEqual(self.read(path), [old_format_record(r) for r in records])
        log.record(records[0])
        log.close()
        self.assertEqual(self.read(path), [old_format_record(r) for r in records + records[:1]])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_batch_written_when_full(self):
        clock = Clock()
        path = self.path()
        log = AuditLog(path, clock=clock)
        self.patch(log._observer, "batch_lines", 3)
        for i in range(7):
            log.record(dict(typical_record(), status=i))
        self.assertEqual(len(log._observer.pending), 1)
        log.flush()
        self.assertEqual([json.loads(line)["status"] for line in self.read(path)], list(range(7)))
        log.close()

    def test_without_clock_at_once(self):
        path = self.path()
        log = AuditLog(path)
        self.addCleanup(log.close)
        log.record(typical_record())
        self.assertEqual(self.read(path), [old_format_record(typical_record())])

    def test_an_added_observer_sees_every_line_and_the_file_still_gets_them(self):
        """Another observer (a tap, say) added to the audit log receives each record's
        line as a twisted.logger event; the file keeps getting every line; once it is
        removed, lines go straight to the file again."""
        path = self.path()
        log = AuditLog(path)
        self.addCleanup(log.close)
        seen = []
        observer = seen.append
        log.record(dict(typical_record(), status=1))
        log.add_observer(observer)
        log.record(dict(typical_record(), status=2))
        log.remove_observer(observer)
        log.record(dict(typical_record(), status=3))
        self.assertEqual([json.loads(event["audit_line"])["status"] for event in seen], [2])
        self.assertEqual(seen[0]["log_namespace"], "hoodyproxy.audit")
        self.assertEqual([json.loads(line)["status"] for line in self.read(path)], [1, 2, 3])

# -- the measurement (a script, never a test: speed is not asserted in tests) ----------------

class _NoClock:
    """A clock whose flush never comes (the measurement's file is written as the batch fills)."""

    def callLater(self, delay, f):
        return self

    def active(self):
        return False


def measure(number: int = 100_000, repeat: int = 5) -> dict[str, float]:
    """Microseconds per record (best of ``repeat`` runs of ``number``), before and after."""
    record = typical_record()
    timer = time.thread_time
    result = {}
    for name, function in (("before", old_format_record), ("after", format_record)):
        best = min(timeit.Timer(lambda: function(record), timer=timer).repeat(repeat, number))
        result[name + " format_record"] = best / number * 1e6
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "audit.log")
    log = AuditLog(path, clock=_NoClock())
    try:
        best = min(timeit.Timer(lambda: log.record(record), timer=timer).repeat(repeat, number))
        result["after AuditLog.record"] = best / number * 1e6
    finally:
        log.close()
        os.unlink(path)
        os.rmdir(directory)
    return result


if __name__ == "__main__":
    for key, value in measure().items():
        print("%-24s %.2f us per record" % (key, value))

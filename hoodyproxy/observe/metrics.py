"""A process's metrics: plain counters the request path bumps, given labels at scrape time.

The request path pays for a few dict and list operations per exchange, never for
prometheus_client's locks, label lookups and objects: :meth:`RequestMetrics.observe` is
called with the audit record when it is emitted (:meth:`hoodyproxy.gateway.Gateway.emit_record`,
which sees every exchange once, refusals included) and adds it to a dict keyed by the
record's raw values (status, method, HTTP version, route), each entry a flat list: its
bytes both ways, its duration sum and a fixed array of histogram buckets (whose sum is its
count).  TLS handshakes and WebSockets are counted once each, where they happen; open
connections are not counted at all but read from the listeners' own tables at scrape time
(:meth:`hoodyproxy.service.GatewayStack.open_connections`), rate-limit refusals from the
limiters' own counters.  :func:`process_snapshot` turns all of it into labelled samples (code class,
method, protocol, program kind, project) when a scrape asks: a JSON-able
:data:`Snapshot` that worker 0 adds up across workers (:func:`merge`) and
:mod:`hoodyproxy.observe.exposition` writes in Prometheus's format.  This module imports
nothing of prometheus_client: workers never load it.

Labels are bounded.  A method outside :data:`METHODS` counts as ``other``; a project (and,
with ``[metrics] container_labels``, a container) comes from the route only once the live
map had that container in that project: a request refused because its container is not
there (503) counts under project ``""``, so a client cannot make series by inventing ids
in its Host.  Past :data:`MAX_SERIES` keys a process counts new ones under project and
container ``"other"``.  Nothing is ever taken from a client's Host, path or address.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable, Mapping

#: Upper bounds of the request duration histogram's buckets, in seconds (``+Inf`` follows).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Methods counted by name; any other is ``other``.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT"))
#: The audit record's ``http`` value -> the ``protocol`` label.
PROTOCOLS = {"1.0": "h1", "1.1": "h1", "2": "h2", "3": "h3"}
#: Keys of the request table past which new ones share the project ``other``.
MAX_SERIES = 20000
#: Fields of an audit record that has none of the optional ones (reason, decision...).
_PLAIN_RECORD = 11
#: An entry of the request table: bytes in, bytes out, seconds, then one count per bucket
#: of BUCKETS and +Inf (``_B`` is where they start; the exchanges counted are their sum).
_B = 3
_ENTRY = [0, 0, 0.0] + [0] * (len(BUCKETS) + 1)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

#: Every metric a node exports: name -> (type, help, label names).  ``container`` is
#: added to the request metrics' labels when ``[metrics] container_labels`` is on.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "hoodyproxy_requests_total": (
        COUNTER, "Requests answered (WebSockets when they end), by status code class, method, protocol, "
                 "program kind and project", ("code_class", "method", "protocol", "kind", "project")),
    "hoodyproxy_request_duration_seconds": (
        HISTOGRAM, "Seconds from a request's head to the end of its answer (WebSockets not included)",
        ("protocol", "kind")),
    "hoodyproxy_received_bytes_total": (
        COUNTER, "Request body bytes (and WebSocket bytes) received from clients, counted when the "
                 "exchange ends", ("protocol", "project")),
    "hoodyproxy_sent_bytes_total": (
        COUNTER, "Response body bytes (and WebSocket bytes) sent to clients, counted when the exchange "
                 "ends", ("protocol", "project")),
    "hoodyproxy_requests_in_flight": (
        GAUGE, "Requests begun and not yet answered (open WebSockets are in hoodyproxy_open_websockets)", ()),
    "hoodyproxy_open_connections": (
        GAUGE, "Client connections open, by protocol (a connection still in its TLS handshake is "
               "protocol tls)", ("protocol",)),
    "hoodyproxy_open_websockets": (GAUGE, "WebSockets open, by the protocol that carries them", ("protocol",)),
    "hoodyproxy_websockets_total": (
        COUNTER, "WebSockets established (the container answered the handshake)", ("protocol",)),
    "hoodyproxy_upstream_errors_total": (
        COUNTER, "Exchanges a container failed: could not connect, or did not answer well", ("reason",)),
    "hoodyproxy_permission_decisions_total": (
        COUNTER, "Permission decisions (requests to a container with a permission set), by result",
        ("result",)),
    "hoodyproxy_tls_handshakes_total": (
        COUNTER, "TLS handshakes on the HTTPS port (tcp) and of HTTP/3 (quic), by result and version",
        ("result", "version", "transport")),
    "hoodyproxy_ratelimit_refusals_total": (COUNTER, "Requests refused (429) by a rate limit, by limiter",
                                            ("limiter",)),
    "hoodyproxy_ratelimit_dry_run_total": (
        COUNTER, "Requests a rate limit in dry run would have refused, by limiter", ("limiter",)),
    "hoodyproxy_ratelimit_keys": (GAUGE, "Keys a rate limiter's table holds, by limiter", ("limiter",)),
    # Node-wide (worker 0 says these once; see hoodyproxy.admin.metrics)
    "hoodyproxy_certificate_expiry_timestamp_seconds": (
        GAUGE, "When a certificate the node serves expires (its not-after), in Unix seconds, by name",
        ("name",)),
    "hoodyproxy_acme_orders_total": (COUNTER, "ACME certificate orders finished, by result", ("result",)),
    "hoodyproxy_live_map_containers": (GAUGE, "Containers in the live map, by state", ("state",)),
    "hoodyproxy_config_reloads_total": (COUNTER, "Config reloads (SIGHUP or the admin API), by result",
                                        ("result",)),
    "hoodyproxy_config_last_reload_success_timestamp_seconds": (
        GAUGE, "When the config was last reloaded successfully, in Unix seconds (0: never)", ()),
    "hoodyproxy_build_info": (GAUGE, "Always 1; the versions running", ("version", "python", "twisted")),
    # The shared store ([store] backend = "etcd"; absent with SQLite)
    "hoodyproxy_store_connected": (GAUGE, "1 while the node's watch on the shared store runs, else 0", ()),
    "hoodyproxy_store_snapshot_loaded": (
        GAUGE, "1 once this run has loaded a snapshot of the shared store (readyz waits for it)", ()),
    "hoodyproxy_store_snapshot_age_seconds": (
        GAUGE, "Seconds since the node last read the shared store whole (-1: never in this run)", ()),
    "hoodyproxy_store_watch_restarts_total": (COUNTER, "Times the watch on the shared store started again", ()),
    "hoodyproxy_store_resyncs_total": (
        COUNTER, "Full re-reads of the shared store after its history was compacted", ()),
    "hoodyproxy_worker_requests_total": (COUNTER, "Requests answered, by worker process", ("worker",)),
    "hoodyproxy_worker_restarts_total": (COUNTER, "Worker processes that exited and were started again", ()),
    "hoodyproxy_workers_reporting": (
        GAUGE, "Worker processes (worker 0 included) whose numbers this scrape has fresh", ()),
}

#: name -> {"labels": [...], "samples": [[[label values], value], ...]} for counters and
#: gauges; a histogram's samples are ``[[label values], [bucket counts], sum]``, the
#: counts per bucket of :data:`BUCKETS` and ``+Inf``, not cumulative.
Snapshot = dict


#: Every ``reason`` of hoodyproxy_upstream_errors_total and ``result`` of
#: hoodyproxy_permission_decisions_total (each exported from 0, so that a first error is
#: an increase to a query, not a series appearing).
UPSTREAM_ERRORS = ("connect_refused", "connect_timeout", "connect_failed", "response_timeout", "closed",
                   "bad_response", "mid_response")
DECISION_RESULTS = ("allowed", "read_only", "denied", "unauthenticated", "ambiguous", "error")


def upstream_error(reason: str) -> str | None:
    """The ``reason`` label of an upstream error, from an audit record's reason (None: the
    reason is not an upstream error).  A bounded set, whatever the error's text."""
    if reason.startswith("connect failed"):
        text = reason.lower()
        if "refused" in text:
            return "connect_refused"
        if "timeout" in text or "timed out" in text:
            return "connect_timeout"
        return "connect_failed"
    if reason == "no response headers in time":
        return "response_timeout"
    if reason.startswith("container failed mid-response"):
        return "mid_response"
    if reason == "container closed":
        return "closed"
    if reason.startswith("container "):
        return "bad_response"
    return None


def decision_result(decision: Mapping[str, Any], status: int) -> str:
    """The ``result`` label of a permission decision (its audit form) and the exchange's status."""
    if decision.get("allowed"):
        return "read_only" if decision.get("read_only") else "allowed"
    if decision.get("reason") == "decision failed":
        return "error"
    if status == 401:
        return "unauthenticated"
    if status == 400:
        return "ambiguous"
    return "denied"


class RequestMetrics:
    """The counters of one process's gateway, bumped by the request path.

    The request table is keyed by the record's raw values (status, method, HTTP version,
    the route's :attr:`~hoodyproxy.observe.audit.RouteRecord.metrics_key`), so that an
    exchange like one seen before costs a tuple, a lookup and four additions.  Only keys
    that passed :meth:`_entry` are ever stored: a method outside :data:`METHODS`, a
    project the live map does not have, or a key past :data:`MAX_SERIES` never is, and such
    an exchange takes the slow path each time, counted under the bounded key it maps to.
    """

    def __init__(self, directory, *, container_labels: bool = False) -> None:
        #: The live map, asked only for a new key of a request refused 503 (see the module's doc).
        self.directory = directory
        #: Whether route keys hold the container (RouteRecords are made to match).
        self.container_labels = container_labels
        #: (status, method, http, route key or None) -> [bytes in, bytes out, seconds, buckets...]
        self.exchanges: dict[tuple, list] = {}
        #: The same for the 503s of routed requests (looked up only after a check).
        self.unavailable: dict[tuple, list] = {}
        #: Requests the gateway began (``begin``), or that a frontend refused before.
        self.begun = 0
        #: WebSockets established, by the record's ``http`` (their end is their 101 record).
        self.websockets_started: dict[str, int] = {}
        self.decisions: dict[str, int] = {}
        self.upstream_errors: dict[str, int] = {}
        #: (result, version, transport) -> handshakes
        self.tls_handshakes: dict[tuple[str, str, str], int] = {}
        self._limiters = None
        self._limiter_last: dict[str, tuple[int, int]] = {}
        self._limiter_base: dict[str, tuple[int, int]] = {}

    # -- the request path ---------------------------------------------------------------

    def observe(self, record: dict, elapsed: float) -> None:
        """Count one finished exchange (its audit record; ``elapsed`` seconds)."""
        route = record["route"]
        try:
            key = (record["status"], record["method"], record["http"],
                   route.metrics_key if route is not None else None)
        except AttributeError:  # (a plain dict: not a record the gateway made)
            key = (record["status"], record["method"], record["http"], self._route_key(route))
        entry = self.exchanges.get(key)
        if entry is None:
            entry = self._entry(key, route)
        entry[0] += record["bytes_in"]
        entry[1] += record["bytes_out"]
        entry[2] += elapsed
        entry[_B + bisect_left(BUCKETS, elapsed)] += 1
        if len(record) > _PLAIN_RECORD:
            self._optional_fields(record)

    def websocket_started(self, http: str) -> None:
        """A WebSocket was established (the container answered 101); its record comes at its end."""
        self.websockets_started[http] = self.websockets_started.get(http, 0) + 1

    def tls_handshake(self, result: str, version: str, transport: str = "tcp") -> None:
        """A TLS handshake ended: ``result`` ok, failed or timeout."""
        key = (result, version, transport)
        self.tls_handshakes[key] = self.tls_handshakes.get(key, 0) + 1

    def _route_key(self, route: Mapping[str, Any]) -> tuple:
        project, program = route.get("project") or "", route.get("program") or ""
        return (project, program, route.get("container") or "") if self.container_labels else (project, program)

    def _located(self, route: Mapping[str, Any]) -> bool:
        """Whether the live map has the route's container, in the route's project."""
        container = self.directory.lookup(route.get("container"))
        return container is not None and container.project == route.get("project")

    def _entry(self, key: tuple, route) -> list:
        """The entry an exchange with a key not stored yet counts in: its own, made now, or
        that of the bounded key it maps to."""
        status, method, http, where = key
        if method not in METHODS:
            method = "other"
        table = self.exchanges
        if where is not None and status == 503:
            # Refused because the container is not in the live map, maybe: such keys are
            # checked every time (a table of their own), since a client's invented ids
            # are never a label, even in a project the live map has.
            table = self.unavailable
            if not self._located(route):
                where = ("", where[1], "") if self.container_labels else ("", where[1])
        key = (status, method, http, where)
        entry = table.get(key)
        if entry is None:
            if len(table) >= MAX_SERIES and where is not None:
                key = (status, method, http, ("other", where[1], "other")[:len(where)])
                entry = table.get(key)
            if entry is None:
                entry = table[key] = list(_ENTRY)
        return entry

    def _optional_fields(self, record: dict) -> None:
        status = record["status"]
        decision = record.get("decision")
        if decision is not None:
            result = decision_result(decision, status)
            self.decisions[result] = self.decisions.get(result, 0) + 1
        reason = record.get("reason")
        if reason is not None and (status == 502 or status == 504 or (
                status != 101 and reason.startswith("container failed mid-response"))):
            kind = upstream_error(reason)
            if kind is not None:
                self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    # -- at scrape time -------------------------------------------------------------------

    def limiter_totals(self, limiters) -> dict[str, tuple[int, int, int]]:
        """Each limiter's (refused, dry run, keys), counting on across a replaced
        :class:`~hoodyproxy.limits.Limiters` (a reload), so that no counter goes back."""
        if limiters is None:
            return {}
        if limiters is not self._limiters:
            if self._limiters is not None:
                for name, (refused, dry) in self._limiter_last.items():
                    base = self._limiter_base.get(name, (0, 0))
                    self._limiter_base[name] = (base[0] + refused, base[1] + dry)
            self._limiters = limiters
            self._limiter_last = {}
        totals = {}
        for stats in limiters.stats():
            refused, dry = stats.refusals - stats.dry_run, stats.dry_run
            self._limiter_last[stats.name] = (refused, dry)
            base = self._limiter_base.get(stats.name, (0, 0))
            totals[stats.name] = (base[0] + refused, base[1] + dry, stats.size)
        return totals


def _class(status: int) -> str:
    return "%dxx" % (status // 100) if 100 <= status < 600 else "other"


class _Samples:
    """Samples being gathered for one metric: label values -> value."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = list(labels)
        self.values: dict[tuple, Any] = {}

    def add(self, key: tuple, value) -> None:
        self.values[key] = self.values.get(key, 0) + value

    def to_json(self) -> dict:
        return {"labels": self.labels, "samples": [[list(k), v] for k, v in self.values.items()]}


def process_snapshot(metrics: RequestMetrics, *, kinds: Mapping[str, str], limiters=None,
                     connections: Mapping[str, int] | None = None) -> Snapshot:
    """This process's numbers as labelled samples.

    ``kinds``: each program's service kind (the ``kind`` label; a program not there is
    ``other``, no route ``none``); ``limiters``: the gateway's
    :class:`~hoodyproxy.limits.Limiters`; ``connections``: client connections open now, by
    protocol.
    """
    extra = ("container",) if metrics.container_labels else ()
    requests = _Samples(METRICS["hoodyproxy_requests_total"][2] + extra)
    received = _Samples(METRICS["hoodyproxy_received_bytes_total"][2] + extra)
    sent = _Samples(METRICS["hoodyproxy_sent_bytes_total"][2] + extra)
    durations: dict[tuple, list] = {}
    finished = 0
    nowhere = ("", "", "") if metrics.container_labels else ("", "")
    websockets_ended: dict[str, int] = {}
    for (status, method, http, where), entry in [*metrics.exchanges.items(), *metrics.unavailable.items()]:
        protocol = PROTOCOLS.get(http, "other")
        if where is None:
            where = nowhere
        kind = kinds.get(where[1], "other") if where[1] else "none"
        count = sum(entry[_B:])
        project_labels = (where[0],) + tuple(where[2:])
        if status == 101:  # (a WebSocket's record comes at its end)
            websockets_ended[http] = websockets_ended.get(http, 0) + count
        requests.add((_class(status), method, protocol, kind) + project_labels, count)
        received.add((protocol,) + project_labels, entry[0])
        sent.add((protocol,) + project_labels, entry[1])
        finished += count
        if status != 101:
            histogram = durations.get((protocol, kind))
            if histogram is None:
                histogram = durations[(protocol, kind)] = [0] * (len(BUCKETS) + 1) + [0.0]
            for i in range(len(BUCKETS) + 1):
                histogram[i] += entry[_B + i]
            histogram[-1] += entry[2]
    websockets = _Samples(("protocol",))
    open_websockets = _Samples(("protocol",))
    for protocol in ("h1", "h2", "h3"):
        websockets.add((protocol,), 0)
        open_websockets.add((protocol,), 0)
    open_count = 0
    for http, started in metrics.websockets_started.items():
        protocol = PROTOCOLS.get(http, "other")
        websockets.add((protocol,), started)
        still_open = max(0, started - websockets_ended.get(http, 0))
        open_websockets.add((protocol,), still_open)
        open_count += still_open
    snapshot: Snapshot = {
        "hoodyproxy_requests_total": requests.to_json(),
        "hoodyproxy_received_bytes_total": received.to_json(),
        "hoodyproxy_sent_bytes_total": sent.to_json(),
        "hoodyproxy_request_duration_seconds": {
            "labels": ["protocol", "kind"],
            "samples": [[list(k), v[:-1], v[-1]] for k, v in durations.items()]},
        "hoodyproxy_requests_in_flight": unlabelled(max(0, metrics.begun - finished - open_count)),
        "hoodyproxy_websockets_total": websockets.to_json(),
        "hoodyproxy_open_websockets": open_websockets.to_json(),
        "hoodyproxy_upstream_errors_total": one_label("reason", {**dict.fromkeys(UPSTREAM_ERRORS, 0),
                                                                  **metrics.upstream_errors}),
        "hoodyproxy_permission_decisions_total": one_label("result", {**dict.fromkeys(DECISION_RESULTS, 0),
                                                                       **metrics.decisions}),
        "hoodyproxy_tls_handshakes_total": {"labels": ["result", "version", "transport"], "samples": [
            [list(k), v] for k, v in metrics.tls_handshakes.items()]},
        "hoodyproxy_open_connections": one_label("protocol", connections or {}),
    }
    totals = metrics.limiter_totals(limiters)
    snapshot["hoodyproxy_ratelimit_refusals_total"] = one_label("limiter", {n: t[0] for n, t in totals.items()})
    snapshot["hoodyproxy_ratelimit_dry_run_total"] = one_label("limiter", {n: t[1] for n, t in totals.items()})
    snapshot["hoodyproxy_ratelimit_keys"] = one_label("limiter", {n: t[2] for n, t in totals.items()})
    return snapshot


def one_label(label: str, values: Mapping[str, Any]) -> dict:
    """A snapshot's metric with one label, from ``{label value: value}``."""
    return {"labels": [label], "samples": [[[k], v] for k, v in values.items()]}


def unlabelled(value: float) -> dict:
    """A snapshot's metric with no label and one value."""
    return {"labels": [], "samples": [[[], value]]}


def merge(*snapshots: Snapshot) -> Snapshot:
    """The sum of ``snapshots``: samples with the same name and label values add up
    (counters, gauges and histogram buckets alike)."""
    out: dict[str, tuple[list, dict]] = {}
    for snapshot in snapshots:
        for name, metric in snapshot.items():
            labels, values = out.setdefault(name, (list(metric.get("labels", ())), {}))
            for sample in metric.get("samples", ()):
                key = tuple(sample[0])
                if len(sample) == 3:  # a histogram's: buckets and sum
                    have = values.get(key)
                    if have is None:
                        values[key] = [list(sample[1]), sample[2]]
                    else:
                        have[0] = [a + b for a, b in zip(have[0], sample[1])]
                        have[1] += sample[2]
                else:
                    values[key] = values.get(key, 0) + sample[1]
    merged: Snapshot = {}
    for name, (labels, values) in out.items():
        merged[name] = {"labels": labels, "samples": [
            [list(k), *v] if isinstance(v, list) else [list(k), v] for k, v in values.items()]}
    return merged


def counters_only(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` without its gauges (what a dead worker still adds to the totals)."""
    return {name: metric for name, metric in snapshot.items() if METRICS.get(name, (GAUGE,))[0] != GAUGE}


def total(snapshot: Snapshot, name: str) -> float:
    """The sum of a counter or gauge's samples in ``snapshot``."""
    return sum(sample[1] for sample in snapshot.get(name, {}).get("samples", ()))

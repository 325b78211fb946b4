"""``GET /metrics`` on the admin listener: the node's numbers in Prometheus's text format.

No token is asked by default: the admin listener is on loopback unless configured
otherwise, and what a scrape shows is counts by project id (container ids too, with
``[metrics] container_labels``: together they make a container's hostname, which is its
credential where no permission set applies).  With ``[admin] metrics_token`` set, a scrape
needs ``Authorization: Bearer <metrics_token>``, and the admin token is not accepted for
it (a scraper is given the one that can only read numbers).  The answer is written when the numbers are in: this
process's (:meth:`hoodyproxy.service.GatewayStack.metrics_snapshot`), every other
worker's (:class:`hoodyproxy.observe.gather.MetricsHub`, which never makes a scrape wait
more than a second), and the node's own facts, which only worker 0 knows: the
certificates it serves, its ACME orders, the live map, config reloads, build versions
(:meth:`NodeMetrics.node_snapshot`).  See docs/metrics.rst for every metric.
"""

from __future__ import annotations

import hmac
import platform

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from hoodyproxy.admin.api import ApiError
from hoodyproxy.frontend.http1 import SERVER
from hoodyproxy.observe.metrics import Snapshot, merge, one_label, total, unlabelled

log = Logger()

class NodeMetrics:
    """What a scrape of this node says, gathered from its processes and its stores."""

    def __init__(self, node) -> None:
        #: The NodeService (its stack, certificates, workers, reloads...).
        self.node = node
        self.reactor = node.reactor

    def collect(self) -> defer.Deferred:
        """Fires with the snapshots whose sum is the node's numbers: this process's, every
        other worker's, and the node's own (:func:`hoodyproxy.observe.metrics.merge` adds
        them up)."""
        node = self.node
        hub = getattr(node.workers, "metrics_hub", None) if node.workers is not None else None
        gathered = hub.gather() if hub is not None else defer.succeed(([], {}, 0))

        def parts(result):
            workers, requests, fresh = result
            own = node.stack.metrics_snapshot()
            requests = dict(requests)
            requests[0] = requests.get(0, 0) + total(own, "hoodyproxy_requests_total")
            facts = self.node_snapshot()
            facts["hoodyproxy_worker_requests_total"] = one_label("worker", {str(n): v for n, v in
                                                                         sorted(requests.items())})
            facts["hoodyproxy_workers_reporting"] = unlabelled(1 + fresh)
            return [own, *workers, facts]
        return gathered.addCallback(parts)

    def node_snapshot(self) -> Snapshot:
        """The numbers only worker 0 has: certificates, ACME, the live map, reloads, versions."""
        node = self.node
        import twisted

        import hoodyproxy
        states: dict[str, int] = {"running": 0, "stopped": 0}
        for container in node.directory.list():
            states[container.state] = states.get(container.state, 0) + 1
        manager = getattr(node, "certificate_manager", None)
        orders = dict(getattr(manager, "orders", None) or {"issued": 0, "failed": 0})
        reloads = getattr(node, "reloads", None) or {}
        workers = node.workers
        store = self.store_snapshot()
        return {
            **store,
            "hoodyproxy_certificate_expiry_timestamp_seconds": one_label("name", node.certificates.expiries()),
            "hoodyproxy_acme_orders_total": one_label("result", orders),
            "hoodyproxy_live_map_containers": one_label("state", states),
            "hoodyproxy_config_reloads_total": one_label("result", {"ok": reloads.get("ok", 0),
                                                                "failed": reloads.get("failed", 0)}),
            "hoodyproxy_config_last_reload_success_timestamp_seconds": unlabelled(reloads.get("last_success") or 0),
            "hoodyproxy_build_info": {"labels": ["version", "python", "twisted"], "samples": [
                [[hoodyproxy.__version__, platform.python_version(), twisted.__version__], 1]]},
            "hoodyproxy_worker_restarts_total": unlabelled(getattr(workers, "restarts", 0) if workers else 0),
        }


    def store_snapshot(self) -> Snapshot:
        """The shared store's state (``[store] backend = "etcd"``); nothing with SQLite."""
        shared = getattr(self.node, "shared_store", None)
        if shared is None:
            return {}
        state = shared.state
        age = state.snapshot_age()
        return {
            "hoodyproxy_store_connected": unlabelled(1 if state.connected else 0),
            "hoodyproxy_store_snapshot_loaded": unlabelled(1 if state.ready else 0),
            "hoodyproxy_store_snapshot_age_seconds": unlabelled(-1 if age is None else age),
            "hoodyproxy_store_watch_restarts_total": unlabelled(state.watch_restarts),
            "hoodyproxy_store_resyncs_total": unlabelled(state.resyncs),
        }


def exposition(parts: list[Snapshot], accept: str | None) -> tuple[bytes, str]:
    """The sum of ``parts`` in the format ``accept`` asks for: (body, Content-Type)."""
    from hoodyproxy.observe.exposition import render
    return render(merge(*parts), accept)


class MetricsEndpoint:
    """``GET /metrics``: the token check and the answer, given when the numbers are in."""

    def __init__(self, source: NodeMetrics, token: str | None = None) -> None:
        self.source = source
        self.token = token.encode() if token else None

    def refusal(self, request) -> ApiError | None:
        """What the head alone earns: 405 for another method, 401 without the token."""
        if request.method not in (b"GET", b"HEAD"):
            return ApiError(405, "method_not_allowed", "method not allowed here", {b"Allow": b"GET, HEAD"})
        if self.token is not None:
            scheme, _, value = (request.getHeader(b"authorization") or b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                return ApiError(401, "unauthorized", "a valid metrics bearer token is required",
                                {b"WWW-Authenticate": b'Bearer realm="hoodyproxy-metrics"'})
        return None

    def render(self, api, request):
        """Answer ``request`` (``api``: the AdminAPI, for its error answers)."""
        refused = self.refusal(request)
        if refused is not None:
            return api.error_response(request, refused)
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        accept = request.getHeader(b"accept")
        reactor = self.source.reactor
        # Adding up and writing thousands of samples takes tens of milliseconds: in a
        # thread, so that the reactor serves requests meanwhile.
        d = self.source.collect().addCallback(
            lambda parts: threads.deferToThreadPool(reactor, reactor.getThreadPool(), exposition, parts,
                                                    accept.decode("latin-1") if accept else None))

        def answer(result):
            if gone:
                return
            body, content_type = result
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", content_type.encode())
            request.setHeader(b"Server", SERVER)
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        def failed(failure):
            log.failure("metrics: a scrape failed", failure)
            if not gone:
                request.write(api.error_response(request, ApiError(500, "internal_error", "internal error")))
                request.finish()
        d.addCallback(answer).addErrback(failed)
        return NOT_DONE_YET

"""A node's metrics in Prometheus's formats: a snapshot through prometheus_client's writer.

The numbers are counted elsewhere, in plain Python (:mod:`hoodyproxy.observe.metrics`);
here a :class:`SnapshotCollector` hands a merged snapshot to prometheus_client as metric
families, once per scrape, and prometheus_client writes the text (the Prometheus text
format, or OpenMetrics when the scraper's ``Accept`` asks for it).  Every metric of
:data:`~hoodyproxy.observe.metrics.METRICS` is written, with no samples when it has none
(an unlabelled one as 0), so that dashboards and alerts find each name on every node.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            Metric)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from hoodyproxy.observe.metrics import BUCKETS, COUNTER, GAUGE, METRICS, Snapshot

_BOUNDS = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]


class SnapshotCollector(Collector):
    """prometheus_client's view of one snapshot (made per scrape, collected once)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for name, (kind, documentation, labels) in METRICS.items():
            metric = self.snapshot.get(name)
            names = metric["labels"] if metric is not None else labels
            samples = metric["samples"] if metric is not None else []
            if kind == COUNTER:
                family = CounterMetricFamily(name, documentation, labels=names)
            elif kind == GAUGE:
                family = GaugeMetricFamily(name, documentation, labels=names)
            else:
                family = HistogramMetricFamily(name, documentation, labels=names)
                for values, buckets, total in samples:
                    cumulative, running = [], 0
                    for bound, count in zip(_BOUNDS, buckets):
                        running += count
                        cumulative.append((bound, running))
                    family.add_metric([str(v) for v in values], cumulative, total)
                yield family
                continue
            for values, value in samples:
                family.add_metric([str(v) for v in values], value)
            if not samples and not names:
                family.add_metric([], 0)
            yield family


def render(snapshot: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
    """``snapshot`` as the scraper's ``accept`` header asks: (body, Content-Type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type

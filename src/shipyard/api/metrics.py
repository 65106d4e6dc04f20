"""``GET /metrics``: the pipeline and the routers in the Prometheus text format (0.0.4), rendered
by prometheus-client.

``api.app.create_app`` makes one :class:`MetricsEndpoint` per app. It owns a
``CollectorRegistry`` of its own, never the process-global one, so two apps in one process (the
API tests run many) never share or duplicate series; the registry holds one
:class:`ShipyardCollector`. A scrape reads the store and every region's data plane (the agent is
an HTTP call away, so that part is async), hands the :class:`Scrape` to the collector and renders
the registry with ``generate_latest``, which writes values as Go does (``repr``: every digit of a
float; the hand-written renderer this replaced used ``%g`` and cut a latency sum to six
significant digits).

What is exposed (label ``{rev}`` = ``service``, ``region``, ``revision``)::

    shipyard_deployments{kind,status}                    gauge      deployments in the store
    shipyard_router_requests_total{rev}                  counter    finished requests
    shipyard_router_responses_total{rev,code}            counter    by class: 2xx 3xx 4xx 5xx
    shipyard_router_upstream_errors_total{rev}           counter    router-made 502/504
    shipyard_router_inflight{rev}                        gauge      requests in flight
    shipyard_router_request_duration_seconds{rev}        histogram  time to the full response
    shipyard_router_weight_ratio{rev}                    gauge      share routed, 0..1
    shipyard_scrape_errors{region}                       gauge      1: the data plane was unreadable

and, derived from the deployment records (api/metrics_history.py), the ADR section 8 histograms
``shipyard_deployment_duration_seconds``, ``shipyard_build_duration_seconds``,
``shipyard_health_check_duration_seconds``, ``shipyard_rollback_duration_seconds`` and the gauge
``shipyard_deployments_by_strategy{kind,status,strategy}``. docs/metrics.md is the public
reference: names, labels and types there are an interface (renaming one breaks dashboards).

``shipyard_router_weight_ratio`` was ``shipyard_router_weight_percent`` (0..100): Prometheus
names a share ``_ratio`` with values 0..1 (prometheus.io/docs/practices/naming, base units).

The counters live in the agent (routing/metrics.py ``RevisionCounters``), so a control-plane
restart neither resets nor double-counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from shipyard.api.metrics_history import DeploymentHistory
from shipyard.errors import ShipyardError
from shipyard.runtime.base import Runtime
from shipyard.store.db import AsyncStore

#: The exposition format ``generate_latest`` writes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_REVISION_LABELS = ("service", "region", "revision")
#: prometheus-client's float formatting (Go's), as its own histograms write ``le``; typed here.
_go_float: Callable[[float], str] = floatToGoString
_STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")


@dataclass(frozen=True)
class RevisionTraffic:
    """One revision's router counters, as the agent reports them (``RevisionMetrics.to_dict``)."""

    service: str
    region: str
    revision: str
    counters: Mapping[str, Any]

    @property
    def labels(self) -> list[str]:
        return [self.service, self.region, self.revision]


@dataclass(frozen=True)
class Scrape:
    """Everything one scrape exposes, read before rendering."""

    #: (kind, status) -> number of deployments.
    deployments: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: (service, region, revision, percent) for every revision in a routing table.
    weights: Sequence[tuple[str, str, str, int]] = ()
    traffic: Sequence[RevisionTraffic] = ()
    #: region -> whether its data plane could not be read (what was read before stays).
    unreadable: Mapping[str, bool] = field(default_factory=dict)
    #: The families derived from the records (``DeploymentHistory.refresh``).
    history: Sequence[Metric] = ()


async def read(
    store: AsyncStore, runtimes: Mapping[str, Runtime], history: DeploymentHistory | None = None
) -> Scrape:
    """Read the store and every region's router; a region that fails is marked, not fatal.
    ``history``: also the figures derived from the deployment records."""
    weights: list[tuple[str, str, str, int]] = []
    traffic: list[RevisionTraffic] = []
    unreadable: dict[str, bool] = {}
    for region, runtime in list(runtimes.items()):
        unreadable[region] = False
        try:
            for service in await runtime.list_services():
                state = await runtime.service_state(service)
                for revision, percent in (state.weights if state else {}).items():
                    weights.append((service, region, revision, percent))
                per_revision = await runtime.router.metrics(service)
                for revision, counters in per_revision.items():
                    traffic.append(RevisionTraffic(service, region, revision, counters))
        except ShipyardError:
            unreadable[region] = True
    families = await history.refresh(store) if history is not None else []
    return Scrape(await store.count_deployments(), weights, traffic, unreadable, families)


class ShipyardCollector(Collector):
    """Turns the latest :class:`Scrape` into metric families (prometheus-client's ``Collector``).

    ``collect`` is synchronous, as the registry calls it; the async reading happens before, in
    :meth:`MetricsEndpoint.render`.
    """

    def __init__(self) -> None:
        self.scrape = Scrape()

    def collect(self) -> Iterator[Metric]:
        s = self.scrape
        deployments = GaugeMetricFamily(
            "shipyard_deployments", "Deployments by kind and status.", labels=["kind", "status"]
        )
        for (kind, status), n in sorted(s.deployments.items()):
            deployments.add_metric([kind, status], n)
        yield deployments
        yield from s.history
        yield from self._traffic(s.traffic)
        weight = GaugeMetricFamily(
            "shipyard_router_weight_ratio",
            "Share of new requests routed to the revision (0..1).",
            labels=_REVISION_LABELS,
        )
        for service, region, revision, percent in s.weights:
            weight.add_metric([service, region, revision], percent / 100)
        yield weight
        errors = GaugeMetricFamily(
            "shipyard_scrape_errors",
            "1 when the region's data plane could not be read during this scrape.",
            labels=["region"],
        )
        for region, failed in s.unreadable.items():
            errors.add_metric([region], 1 if failed else 0)
        yield errors

    @staticmethod
    def _traffic(traffic: Iterable[RevisionTraffic]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "shipyard_router_requests", "Requests routed, per revision.", labels=_REVISION_LABELS
        )
        responses = CounterMetricFamily(
            "shipyard_router_responses",
            "Responses by status class.",
            labels=[*_REVISION_LABELS, "code"],
        )
        upstream = CounterMetricFamily(
            "shipyard_router_upstream_errors",
            "Router-generated 502/504 answers.",
            labels=_REVISION_LABELS,
        )
        inflight = GaugeMetricFamily(
            "shipyard_router_inflight", "Requests in flight, per revision.", labels=_REVISION_LABELS
        )
        latency = HistogramMetricFamily(
            "shipyard_router_request_duration_seconds",
            "Time to the full response.",
            labels=_REVISION_LABELS,
        )
        for t in traffic:
            c = t.counters
            requests.add_metric(t.labels, c["requests"])
            for cls in _STATUS_CLASSES:
                responses.add_metric([*t.labels, cls], c[f"status_{cls}"])
            upstream.add_metric(t.labels, c["upstream_errors"])
            inflight.add_metric(t.labels, c["inflight"])
            histogram = c["latency_ms"]
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, count in histogram["buckets"].items():  # per bucket, in bound order
                cumulative += count
                le = "+Inf" if bound == "+Inf" else _go_float(float(bound) / 1000)
                buckets.append((le, cumulative))
            latency.add_metric(t.labels, buckets, histogram["sum"] / 1000)
        yield from (requests, responses, upstream, inflight, latency)


class MetricsEndpoint:
    """The app's registry and collector; :meth:`render` answers one scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ShipyardCollector()
        self.registry.register(self.collector)
        self.history = DeploymentHistory()

    async def render(self, store: AsyncStore, runtimes: Mapping[str, Runtime]) -> bytes:
        scrape = await read(store, runtimes, self.history)
        # No await from here on: a concurrent scrape cannot swap the data while this one renders.
        self.collector.scrape = scrape
        return generate_latest(self.registry)

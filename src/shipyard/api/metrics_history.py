"""The ADR section 8 figures as Prometheus histograms, derived from the store's deployment records
at scrape time, and the deployments by kind, status and strategy.

``api.metrics.MetricsEndpoint`` keeps one :class:`DeploymentHistory` and calls
:meth:`DeploymentHistory.refresh` on every scrape. The numbers come from the records, never from
counters in this process, so every control-plane replica answers the same and a restart loses
nothing (the way kube-state-metrics derives its series from the API server's objects).

A scrape must not re-read history: a record is fetched once when first seen, and once more when
it has become final. What a final record contributes is fixed then (its duration, its stages,
``result.status`` — the status it finished with, which a later manual rollback of it does not
change, ``status`` does), so it is added to the histograms once and only its id is remembered. Per
scrape the store answers ``(id, status)`` for every deployment (two short columns) and the
documents of the ids that are new or newly final.

What each record adds (label values: ``strategy`` is ``BlueGreen``/``Canary``/``Rolling``, or
``Rollback`` for a manual rollback; ``region`` is the record's first region)::

    shipyard_deployment_duration_seconds{service,region,strategy,status}
        created -> finished, by the status it finished with (Success, Failed, RolledBack)
    shipyard_build_duration_seconds{service,region,outcome}
        each ``build`` stage (succeeded / failed)
    shipyard_health_check_duration_seconds{service,region,strategy,outcome}
        each ``health_check`` stage, i.e. every health gate (succeeded / failed)
    shipyard_rollback_duration_seconds{service,region,strategy,trigger}
        ``metrics.rollback_duration_ms``: trigger ``automatic`` (a failed deployment put
        stable back) or ``manual`` (POST /rollback: from the request to stable serving)
    shipyard_deployments_by_strategy{kind,status,strategy}   gauge: deployments in the store now
    shipyard_active_deployment_created_timestamp_seconds{kind,service,region,strategy,status}
        gauge, one per deployment not finished: when it was created (Unix seconds), so
        ``time() - ...`` is how long it has been going (the "deployment stuck" alert)

A record's label values are exposed at zero as soon as it is seen (``_init``), so ``increase()``
sees its first observation. Every bucket layout has the ADR target among its bounds (build 240 s,
health check 5 s, rollback 30 s), so ``_bucket{le="30.0"}`` counts the rollbacks within it.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from pydantic import ValidationError

from shipyard.domain.models import (
    BUILD_TIME_TARGET_MS,
    HEALTH_CHECK_TIMEOUT_MS,
    ROLLBACK_TIME_TARGET_MS,
    TERMINAL_STATUSES,
)
from shipyard.errors import ShipyardError
from shipyard.orchestrator.record import DeploymentRecord, Record, load_record
from shipyard.store.db import AsyncStore

#: prometheus-client's float formatting (Go's), as its own histograms write ``le``; typed here.
_go_float: Callable[[float], str] = floatToGoString
_FINAL = frozenset(s.value for s in TERMINAL_STATUSES)

#: Bucket upper bounds in seconds (``+Inf`` is added). Each holds its ADR target.
BUILD_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, BUILD_TIME_TARGET_MS / 1000, 480.0, 900.0)
DEPLOYMENT_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
HEALTH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, HEALTH_CHECK_TIMEOUT_MS / 1000, 10.0, 30.0, 60.0, 120.0)
ROLLBACK_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    ROLLBACK_TIME_TARGET_MS / 1000,
    60.0,
    120.0,
)


@dataclass
class Histogram:
    """One histogram family accumulated in memory: per label values, counts per bucket (not
    cumulative), the sum and the count."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    series: dict[tuple[str, ...], tuple[list[int], float]] = field(default_factory=dict)

    def touch(self, values: Sequence[str]) -> None:
        """Expose ``values``' series at zero until its first observation (see ``_init``)."""
        self.series.setdefault(tuple(values), ([0] * (len(self.buckets) + 1), 0.0))

    def observe(self, values: Sequence[str], seconds: float) -> None:
        key = tuple(values)
        counts, total = self.series.get(key) or ([0] * (len(self.buckets) + 1), 0.0)
        # bisect_left: a value equal to a bound belongs in that bound's bucket (le = "<=").
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.series[key] = (counts, total + seconds)

    def family(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        bounds = [*(_go_float(b) for b in self.buckets), "+Inf"]
        for key, (counts, total) in sorted(self.series.items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            h.add_metric(list(key), cumulative, total)
        return h


@dataclass(frozen=True)
class _Seen:
    """What never changes about a deployment once recorded, and whether it was counted final."""

    kind: str
    strategy: str
    final: bool
    service: str = ""
    region: str = ""
    created_ts: float = 0.0


def strategy_of(record: Record) -> str:
    return record.strategy.kind if isinstance(record, DeploymentRecord) else "Rollback"


class DeploymentHistory:
    """The histograms and the per-strategy gauge over the store's records (module docstring)."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._lock = asyncio.Lock()
        self.deployment = Histogram(
            "shipyard_deployment_duration_seconds",
            "Deployment duration, created to finished, by the status it finished with.",
            ("service", "region", "strategy", "status"),
            DEPLOYMENT_BUCKETS,
        )
        self.build = Histogram(
            "shipyard_build_duration_seconds",
            "Build stage duration (ADR target 240 s).",
            ("service", "region", "outcome"),
            BUILD_BUCKETS,
        )
        self.health = Histogram(
            "shipyard_health_check_duration_seconds",
            "Health gate duration, every gate of every finished deployment (ADR target 5 s).",
            ("service", "region", "strategy", "outcome"),
            HEALTH_BUCKETS,
        )
        self.rollback = Histogram(
            "shipyard_rollback_duration_seconds",
            "Time to put the previous revision back at 100% (ADR target 30 s).",
            ("service", "region", "strategy", "trigger"),
            ROLLBACK_BUCKETS,
        )
        #: (kind, status, strategy) -> deployments now, as of the last refresh.
        self.by_strategy: Mapping[tuple[str, str, str], int] = {}
        #: (kind, service, region, strategy, status) -> created_ts of each unfinished one.
        self.active: Mapping[tuple[str, str, str, str, str], float] = {}

    async def refresh(self, store: AsyncStore) -> list[Metric]:
        """Read what changed since the last scrape; the families to expose now."""
        async with self._lock:  # two concurrent scrapes must not count a record twice
            rows = await store.deployment_statuses()
            wanted = [
                i
                for i, status in rows
                if (seen := self._seen.get(i)) is None or (status in _FINAL and not seen.final)
            ]
            for doc in await store.get_deployments(wanted) if wanted else []:
                try:
                    record = load_record(doc)
                except (ShipyardError, ValidationError):
                    # Unreadable here (a newer Shipyard's schema): counted, never re-read.
                    self._seen[str(doc["id"])] = _Seen(str(doc.get("kind")), "unknown", True)
                    continue
                self._add(record)
            counts: Counter[tuple[str, str, str]] = Counter()
            active: dict[tuple[str, str, str, str, str], float] = {}
            for i, status in rows:
                if (seen := self._seen.get(i)) is None:
                    continue
                counts[(seen.kind, status, seen.strategy)] += 1
                if status not in _FINAL:
                    key = (seen.kind, seen.service, seen.region, seen.strategy, status)
                    active[key] = min(active.get(key, seen.created_ts), seen.created_ts)
            self.by_strategy = dict(counts)
            self.active = active
            return list(self._families())

    def _add(self, record: Record) -> None:
        if record.id not in self._seen:
            self._init(record)
        final = record.status.terminal
        self._seen[record.id] = _Seen(
            record.kind,
            strategy_of(record),
            final,
            record.service,
            record.region,
            record.created_ts,
        )
        if final:
            self._observe(record)

    def _init(self, record: Record) -> None:
        """The series a record can add to, at zero, from the moment it is seen (usually while
        it runs): ``increase()`` over a series that first appears with its first observation
        sees no increase, so without this the first rollback of a service would not alert
        (Prometheus's advice: initialise the label values you know)."""
        where = (record.service, record.region)
        for status in ("Success", "Failed"):
            self.deployment.touch([*where, "Rollback", status])
        self.rollback.touch([*where, "Rollback", "manual"])
        if not isinstance(record, DeploymentRecord):
            return
        strategy = strategy_of(record)
        for status in ("Success", "Failed", "RolledBack"):
            self.deployment.touch([*where, strategy, status])
        for outcome in ("succeeded", "failed"):
            self.build.touch([*where, outcome])
            self.health.touch([*where, strategy, outcome])
        self.rollback.touch([*where, strategy, "automatic"])

    def _observe(self, record: Record) -> None:
        """Add a final record's figures (once: ``_seen`` remembers it as final)."""
        strategy = strategy_of(record)
        where = (record.service, record.region)
        result = record.result
        metrics = result.metrics if result is not None else record.metrics
        status = result.status.value if result is not None else record.status.value
        if metrics.total_duration_ms is not None:
            seconds = metrics.total_duration_ms / 1000
        elif record.finished_at is not None:  # records from before the metrics existed
            seconds = (record.finished_at - record.created_at).total_seconds()
        else:
            seconds = None
        if seconds is not None:
            self.deployment.observe([*where, strategy, status], seconds)
        for stage in record.stages:
            if stage.duration_ms is None or stage.status not in ("succeeded", "failed"):
                continue
            if stage.name == "build":
                self.build.observe([*where, stage.status], stage.duration_ms / 1000)
            elif stage.name == "health_check":
                self.health.observe([*where, strategy, stage.status], stage.duration_ms / 1000)
        if metrics.rollback_duration_ms is not None:
            trigger = "automatic" if isinstance(record, DeploymentRecord) else "manual"
            self.rollback.observe([*where, strategy, trigger], metrics.rollback_duration_ms / 1000)

    def _families(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "shipyard_deployments_by_strategy",
            "Deployments in the store by kind, status and strategy.",
            labels=["kind", "status", "strategy"],
        )
        for (kind, status, strategy), n in sorted(self.by_strategy.items()):
            gauge.add_metric([kind, status, strategy], n)
        yield gauge
        started = GaugeMetricFamily(
            "shipyard_active_deployment_created_timestamp_seconds",
            "When each unfinished deployment was created (Unix time).",
            labels=["kind", "service", "region", "strategy", "status"],
        )
        for labels, ts in sorted(self.active.items()):
            started.add_metric(list(labels), ts)
        yield started
        for h in (self.deployment, self.build, self.health, self.rollback):
            yield h.family()

"""Resolved canary-analysis thresholds: built-in defaults < the manifest's ``[analysis]`` < a
stage's ``analysis``. A stage's ``metrics`` list replaces the manifest's whole (lists do not
merge); each metric's own limits override the stage's (``AnalysisPolicy.for_metric``).

``AnalysisPolicy`` is a frozen value carried inside the canary plan's ``Analyse`` steps (so a
resumed deployment judges with exactly the thresholds it started with). Built by
``strategies.canary.plan``; read by ``analysis.verdicts`` and the orchestrator's Analyse executor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shipyard.domain.models import AnalysisSettings, InsufficientDataPolicy, MetricProvider

#: How long one prometheus/web request may take unless a metric says otherwise.
DEFAULT_METRIC_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class LoadPolicy:
    """The built-in load step of a stage: ``GET path`` at ``rps`` to the canary only (validated
    at the edge by ``domain.models.LoadSettings``)."""

    rps: float
    path: str = "/"


@dataclass(frozen=True)
class MetricPolicy:
    """One ``[[analysis.metrics]]`` entry as the plan carries it (validated at the edge by
    ``domain.models.MetricSettings``); None fields take the stage's ``AnalysisPolicy`` values."""

    name: str
    provider: MetricProvider
    address: str | None = None
    query: str | None = None
    url: str | None = None
    json_path: str | None = None
    success_condition: str | None = None
    failure_condition: str | None = None
    interval_seconds: float | None = None
    count: int = 0
    failure_limit: int | None = None
    consecutive_error_limit: int | None = None
    inconclusive_limit: int | None = None
    timeout_seconds: float = DEFAULT_METRIC_TIMEOUT_SECONDS

    def templates(self) -> tuple[str, ...]:
        """The texts placeholders are substituted in (address, query, url)."""
        return tuple(t for t in (self.address, self.query, self.url) if t is not None)


@dataclass(frozen=True)
class AnalysisPolicy:
    """Thresholds of one canary stage's analysis; the defaults are Argo Rollouts' where it has
    one (``failure_limit`` 0, ``consecutive_error_limit`` 4, ``inconclusive_limit`` 0)."""

    enabled: bool = True
    #: Non-5xx / all responses in a window must be at least this (None: not judged).
    min_success_rate: float | None = 0.99
    #: p99 latency of a window must be at most this (None: not judged, still reported).
    max_p99_latency_ms: float | None = None
    #: Fewer responses in a window: the measurement is ``insufficient_data``.
    min_requests: int = 20
    interval_seconds: float = 10.0
    #: The analysis fails when failed measurements *exceed* this.
    failure_limit: int = 0
    #: ... or when consecutive measurement errors (metrics unavailable) exceed this.
    consecutive_error_limit: int = 4
    #: Inconclusive measurements beyond this pause the deployment for a human.
    inconclusive_limit: int = 0
    insufficient_data: InsufficientDataPolicy = "extend"
    #: ``extend``: at most this many extra intervals at the end of a stage, then fail.
    max_extensions: int = 6
    #: Also judge the canary against stable over the same window.
    compare_with_stable: bool = False
    #: compare: canary success rate may be at most this much below stable's.
    max_success_rate_drop: float = 0.01
    #: compare: canary p99 may be at most this many times stable's (plus ``P99_SLACK_MS``).
    max_p99_latency_ratio: float = 1.5
    #: Built-in load during the stage's analysis (None: only real traffic is measured).
    load: LoadPolicy | None = None
    #: ``[[analysis.metrics]]``: when not empty, these are the analysis (the router check runs
    #: only as a ``provider = "router"`` metric); empty: the router check alone, as before.
    metrics: tuple[MetricPolicy, ...] = ()

    def for_metric(self, metric: MetricPolicy) -> AnalysisPolicy:
        """The thresholds one metric is tallied with: its own limits and interval over the
        stage's (an ``analysis.verdicts.AnalysisRun`` per metric)."""

        def own(value: Any, inherited: Any) -> Any:
            return inherited if value is None else value

        return dataclasses.replace(
            self,
            metrics=(),
            interval_seconds=own(metric.interval_seconds, self.interval_seconds),
            failure_limit=own(metric.failure_limit, self.failure_limit),
            consecutive_error_limit=own(
                metric.consecutive_error_limit, self.consecutive_error_limit
            ),
            inconclusive_limit=own(metric.inconclusive_limit, self.inconclusive_limit),
        )

    @classmethod
    def resolve(cls, *layers: AnalysisSettings | None) -> AnalysisPolicy:
        """Defaults overridden by each layer in turn (later layers win; None fields inherit)."""
        values: dict[str, Any] = {}
        for layer in layers:
            if layer is not None:
                values.update(layer.model_dump(exclude_none=True))
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AnalysisPolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if isinstance(values.get("load"), Mapping):
            values["load"] = LoadPolicy(**values["load"])
        metrics = values.get("metrics")
        if metrics is not None:
            values["metrics"] = tuple(
                m if isinstance(m, MetricPolicy) else _metric(m) for m in metrics
            )
        return cls(**values)


def _metric(d: Mapping[str, Any]) -> MetricPolicy:
    known = {f.name for f in dataclasses.fields(MetricPolicy)}
    return MetricPolicy(**{k: v for k, v in d.items() if k in known and v is not None})


#: Latency comparisons against stable ignore differences below this (histogram resolution).
P99_SLACK_MS = 10.0

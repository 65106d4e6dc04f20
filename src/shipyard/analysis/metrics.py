"""``[[analysis.metrics]]``, pure: a provider's reading judged by the metric's conditions
(``judge_reading``), and each metric's tallies and schedule within a stage (``MetricRun``).

Argo Rollouts' measurement semantics (``judge_reading``): the failure condition is evaluated
first (true: ``fail``); then the success condition (true: ``pass``); neither true is
``inconclusive`` when a failure condition is given, ``fail`` when only a success condition is; a
condition that cannot be evaluated for this result (an index out of range, a list compared with a
number) is an ``error``, like a provider that did not answer. No data at all (an empty vector, a
JSONPath that matched nothing, NaN: 0/0 when the canary served nothing) is ``insufficient_data``,
never a pass. ``verdicts.AnalysisRun`` tallies each metric with its own limits
(``AnalysisPolicy.for_metric``).

A stage with metrics ends when every ``MetricRun`` is done: a metric without ``count`` is
measured every interval until the stage's deadline (its last measurement is taken at the
deadline, and the extend policy may move its deadline on); a metric with ``count = N`` is done
after N measurements (plus extensions), even past the stage's duration.

Called by the orchestrator's Analyse executor (``orchestrator/steps/analysis.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shipyard.analysis.policy import AnalysisPolicy, MetricPolicy
from shipyard.analysis.verdicts import AnalysisRun, Measurement, Verdict
from shipyard.domain import expressions, placeholders
from shipyard.domain.expressions import Value


@dataclass(frozen=True)
class Reading:
    """What a provider answered: ``value`` (None: no data) and what it sent (``sent``: the
    query or the URL after substitution)."""

    value: Value | None
    sent: str


@functools.lru_cache(maxsize=256)
def _condition(source: str) -> expressions.Condition:
    return expressions.compile_condition(source)


def judge_reading(metric: MetricPolicy, reading: Reading, region: str | None = None) -> Measurement:
    """The verdict on one reading of ``metric`` (see the module docstring)."""
    value = reading.value
    base = Measurement(
        Verdict.PASS,
        metric=metric.name,
        provider=metric.provider,
        query=reading.sent,
        region=region,
        value=json_safe(value),
    )
    if value is None or (isinstance(value, list | tuple) and not value):
        return dataclasses.replace(
            base, verdict=Verdict.INSUFFICIENT_DATA, reasons=("the query returned no data",)
        )
    if _has_nan(value):
        return dataclasses.replace(
            base,
            verdict=Verdict.INSUFFICIENT_DATA,
            reasons=("the result is NaN (nothing to divide by: no traffic in the window?)",),
        )
    assert metric.success_condition is not None  # validated with the manifest
    shown = _shown(value)
    try:
        failure = metric.failure_condition
        if failure is not None and _condition(failure).evaluate(value):
            return dataclasses.replace(
                base,
                verdict=Verdict.FAIL,
                reasons=(f"failure_condition `{metric.failure_condition}` holds for {shown}",),
            )
        succeeded = _condition(metric.success_condition).evaluate(value)
    except expressions.EvaluationError as exc:
        return dataclasses.replace(
            base,
            verdict=Verdict.ERROR,
            reasons=(f"cannot evaluate the conditions for {shown}: {exc}",),
        )
    if succeeded:
        return base
    if metric.failure_condition is not None:
        return dataclasses.replace(
            base,
            verdict=Verdict.INCONCLUSIVE,
            reasons=(
                f"neither success_condition `{metric.success_condition}` nor failure_condition "
                f"`{metric.failure_condition}` holds for {shown}",
            ),
        )
    return dataclasses.replace(
        base,
        verdict=Verdict.FAIL,
        reasons=(f"success_condition `{metric.success_condition}` does not hold for {shown}",),
    )


def _has_nan(value: Value) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list | tuple):
        return any(_has_nan(v) for v in value)
    return False


def _shown(value: Value) -> str:
    text = f"result = {json_safe(value)!r}"
    return text if len(text) <= 200 else text[:197] + "..."


def json_safe(value: object) -> object:
    """``value`` as JSON can hold it: NaN and infinities as Prometheus writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass
class MetricRun:
    """One metric of a stage's analysis (for a fleet, one per region when its query or URL
    uses ``{{region}}``): its tallies and schedule, persisted in the record's analysis state
    after every measurement."""

    metric: str
    run: AnalysisRun
    #: When its last measurement was read (the next is one interval later).
    last_at: float
    #: Time-based: its last measurement is due then (the extend policy moves it). None: the
    #: metric has a ``count``.
    deadline: float | None
    count: int = 0
    region: str | None = None
    done: bool = False

    @property
    def interval(self) -> float:
        return self.run.policy.interval_seconds

    def due(self, stage_seconds: float) -> float:
        """When its next measurement is taken: one interval after the last, cut short by its
        deadline but never to less than half an interval (as the router check's windows)."""
        if self.deadline is None:
            return self.last_at + self.interval
        shortest = min(self.interval, stage_seconds) / 2
        return max(min(self.last_at + self.interval, self.deadline), self.last_at + shortest)

    def at_deadline(self, now: float) -> bool:
        """Whether the measurement about to be recorded is its last (unless extended)."""
        if self.deadline is None:
            return self.run.measurements + 1 >= self.count + self.run.extensions
        return now >= self.deadline

    def extend(self) -> None:
        if self.deadline is not None:
            self.deadline += self.interval

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["run"] = self.run.to_dict()
        return d


def start_runs(
    policy: AnalysisPolicy, *, now: float, deadline: float, regions: Sequence[str] | None
) -> dict[str, MetricRun]:
    """A ``MetricRun`` per metric of ``policy``, keyed ``name`` (or ``name@region``: a fleet's
    metric whose query or URL names ``{{region}}``, measured in each of ``regions``)."""
    runs: dict[str, MetricRun] = {}
    for m in policy.metrics:
        per_region = regions is not None and any(
            "region" in placeholders.names(t) for t in m.templates()
        )
        where: Sequence[str | None] = list(regions or ()) if per_region else [None]
        for region in where:
            key = m.name if region is None else f"{m.name}@{region}"
            runs[key] = MetricRun(
                metric=m.name,
                run=AnalysisRun(policy.for_metric(m)),
                last_at=now,
                deadline=None if m.count else deadline,
                count=m.count,
                region=region,
            )
    return runs


def metric_named(policy: AnalysisPolicy, name: str) -> MetricPolicy:
    return next(m for m in policy.metrics if m.name == name)


def template_values(
    *,
    service: str,
    canary: str,
    stable: str | None,
    region: str,
    interval_seconds: float,
) -> Mapping[str, str | None]:
    """The placeholders' values for one measurement (``stable`` None: nothing served before)."""
    return {
        "service": service,
        "canary": canary,
        "stable": stable,
        "region": region,
        "window": placeholders.promql_duration(interval_seconds),
    }

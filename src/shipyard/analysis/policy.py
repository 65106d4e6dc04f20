"""Resolved canary-analysis thresholds: built-in defaults < the manifest's ``[analysis]`` < a
stage's ``analysis``.

``AnalysisPolicy`` is a frozen value carried inside the canary plan's ``Analyse`` steps (so a
resumed deployment judges with exactly the thresholds it started with). Built by
``strategies.canary.plan``; read by ``analysis.verdicts`` and the orchestrator's Analyse executor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shipyard.domain.models import AnalysisSettings, InsufficientDataPolicy


@dataclass(frozen=True)
class LoadPolicy:
    """The built-in load step of a stage: ``GET path`` at ``rps`` to the canary only (validated
    at the edge by ``domain.models.LoadSettings``)."""

    rps: float
    path: str = "/"


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
        return cls(**values)


#: Latency comparisons against stable ignore differences below this (histogram resolution).
P99_SLACK_MS = 10.0

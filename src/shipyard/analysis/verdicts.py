"""Measurement verdicts and failure limits with Argo Rollouts' semantics, as pure functions.

The executor snapshots the router's per-revision metrics, and every ``interval_seconds`` takes
the window since the previous snapshot (``later.minus(earlier)``) for the canary and for stable.
``judge`` turns a window into a ``Measurement`` whose verdict is explicit:

- ``pass`` / ``fail``: the thresholds held / did not (each failed threshold is a reason);
- ``inconclusive``: the canary met its own thresholds but the comparison with stable could not
  be made (stable served too little in the window);
- ``insufficient_data``: the canary served fewer than ``min_requests`` responses: never a pass;
- ``error``: the metrics could not be read at all (counted apart, like Argo's Error phase).

``AnalysisRun.record`` tallies measurements and answers a ``Decision``: keep measuring, the stage
passed, fail (failed measurements exceed ``failure_limit``; consecutive errors exceed
``consecutive_error_limit``), pause for a human (inconclusive beyond ``inconclusive_limit``, or
the ``pause`` insufficient-data policy), or extend the stage by one interval (the ``extend``
policy, bounded by ``max_extensions``). Called by the orchestrator's Analyse executor
(``orchestrator/steps/analysis.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shipyard.analysis.policy import P99_SLACK_MS, AnalysisPolicy
from shipyard.routing.metrics import RevisionMetrics


class Verdict(StrEnum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    INSUFFICIENT_DATA = "insufficient_data"
    ERROR = "error"  # metrics unavailable: not a verdict on the canary, counted separately


class Outcome(StrEnum):
    CONTINUE = "continue"  # keep measuring
    PASSED = "passed"  # the stage's analysis passed
    FAILED = "failed"  # abort: canary weight to 0, roll back
    PAUSED = "paused"  # wait for a human: promote (accept) or abort
    EXTENDED = "extended"  # measure one more interval past the stage's deadline


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True)
class Measurement:
    verdict: Verdict
    reasons: tuple[str, ...] = ()
    requests: int = 0
    success_rate: float | None = None
    p99_ms: float | None = None
    stable_requests: int | None = None
    stable_success_rate: float | None = None
    stable_p99_ms: float | None = None
    #: How many responses a window needs to be judged at all (the policy's ``min_requests``).
    needed: int | None = None
    #: A ``[[analysis.metrics]]`` measurement: the metric's name, its provider, what was sent
    #: (the query or URL after substitution: a manifest holds no secrets), where (a fleet's
    #: region) and what came back (``value``: a JSON value; NaN and infinities as strings).
    metric: str | None = None
    provider: str | None = None
    query: str | None = None
    region: str | None = None
    value: object = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict.value
        d["reasons"] = list(self.reasons)
        if not self.from_router:
            del d["requests"]  # a provider's reading counts no requests of ours
        return {k: v for k, v in d.items() if v is not None}

    @property
    def from_router(self) -> bool:
        """Whether it judged the router's counters (min_requests and built-in load apply)."""
        return self.provider in (None, "router")


def measurement_error(reason: str) -> Measurement:
    return Measurement(Verdict.ERROR, (reason,))


def judge(
    canary: RevisionMetrics | None, stable: RevisionMetrics | None, policy: AnalysisPolicy
) -> Measurement:
    """The verdict on one window of traffic (``stable`` None: no stable to compare with)."""
    if canary is None:
        return measurement_error("the router reports no metrics for the canary revision")
    sr, p99 = canary.success_rate, canary.quantile(0.99)
    base = Measurement(Verdict.PASS, (), canary.responses, sr, p99, needed=policy.min_requests)
    if canary.responses < policy.min_requests:
        return dataclasses.replace(
            base,
            verdict=Verdict.INSUFFICIENT_DATA,
            reasons=(
                f"{canary.responses} requests seen, {policy.min_requests} needed (min_requests)",
            ),
        )
    assert sr is not None and p99 is not None  # responses >= min_requests >= 1
    failures: list[str] = []
    if policy.min_success_rate is not None and sr < policy.min_success_rate:
        failures.append(f"success rate {sr:.4f} < min_success_rate {policy.min_success_rate}")
    if policy.max_p99_latency_ms is not None and p99 > policy.max_p99_latency_ms:
        failures.append(f"p99 {p99:.1f} ms > max_p99_latency_ms {policy.max_p99_latency_ms:g}")
    inconclusive: list[str] = []
    if policy.compare_with_stable:
        if stable is None or stable.responses < policy.min_requests:
            n = 0 if stable is None else stable.responses
            inconclusive.append(
                f"cannot compare with stable: {n} stable responses < min_requests "
                f"{policy.min_requests}"
            )
        else:
            ssr, sp99 = stable.success_rate, stable.quantile(0.99)
            assert ssr is not None and sp99 is not None
            base = dataclasses.replace(
                base, stable_requests=stable.responses, stable_success_rate=ssr, stable_p99_ms=sp99
            )
            if sr < ssr - policy.max_success_rate_drop:
                failures.append(
                    f"success rate {sr:.4f} is more than {policy.max_success_rate_drop} below "
                    f"stable's {ssr:.4f}"
                )
            if p99 > sp99 * policy.max_p99_latency_ratio + P99_SLACK_MS:
                failures.append(
                    f"p99 {p99:.1f} ms > {policy.max_p99_latency_ratio:g} x stable's "
                    f"{sp99:.1f} ms (+{P99_SLACK_MS:g} ms)"
                )
    if failures:
        return dataclasses.replace(base, verdict=Verdict.FAIL, reasons=tuple(failures))
    if inconclusive:
        return dataclasses.replace(base, verdict=Verdict.INCONCLUSIVE, reasons=tuple(inconclusive))
    return base


@dataclass
class AnalysisRun:
    """Tallies of one stage's measurements (persisted between measurements, so resumable)."""

    policy: AnalysisPolicy
    measurements: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    insufficient: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    extensions: int = 0

    def record(self, m: Measurement, *, at_deadline: bool) -> Decision:
        """Count ``m``; ``at_deadline``: it was taken when the stage's time was up."""
        p = self.policy
        self.measurements += 1
        if m.verdict is Verdict.ERROR:
            self.errors += 1
            self.consecutive_errors += 1
            if self.consecutive_errors > p.consecutive_error_limit:
                return Decision(
                    Outcome.FAILED,
                    f"{self.consecutive_errors} consecutive measurement errors exceed "
                    f"consecutive_error_limit {p.consecutive_error_limit}: {'; '.join(m.reasons)}",
                )
            return self._extend_or_continue(at_deadline, "the last measurement was an error")
        self.consecutive_errors = 0
        match m.verdict:
            case Verdict.FAIL:
                self.failed += 1
                if self.failed > p.failure_limit:
                    return Decision(
                        Outcome.FAILED,
                        f"{self.failed} failed measurement(s) exceed failure_limit "
                        f"{p.failure_limit}: {'; '.join(m.reasons)}",
                    )
            case Verdict.INCONCLUSIVE:
                self.inconclusive += 1
                if self.inconclusive > p.inconclusive_limit:
                    return Decision(
                        Outcome.PAUSED,
                        f"{self.inconclusive} inconclusive measurement(s) exceed "
                        f"inconclusive_limit {p.inconclusive_limit}: {'; '.join(m.reasons)}",
                    )
            case Verdict.INSUFFICIENT_DATA:
                self.insufficient += 1
                why = f"insufficient data: {'; '.join(m.reasons)}"
                hint = too_little_traffic(p) if m.from_router else NO_DATA_HINT
                if p.insufficient_data == "fail":
                    return Decision(Outcome.FAILED, f"{why} (policy: fail); {hint}")
                if p.insufficient_data == "pause":
                    return Decision(Outcome.PAUSED, f"{why} (policy: pause); {hint}")
                decision = self._extend_or_continue(at_deadline, why)
                if decision.outcome is Outcome.FAILED:
                    return Decision(Outcome.FAILED, f"{decision.reason}; {hint}")
                return decision
            case _:
                self.passed += 1
        if at_deadline:
            return Decision(
                Outcome.PASSED,
                f"{self.passed} passed, {self.failed} failed (limit {p.failure_limit}), "
                f"{self.inconclusive} inconclusive, {self.insufficient} insufficient, "
                f"{self.errors} errors",
            )
        return Decision(Outcome.CONTINUE)

    def _extend_or_continue(self, at_deadline: bool, why: str) -> Decision:
        if not at_deadline:
            return Decision(Outcome.CONTINUE, why)
        self.extensions += 1
        if self.extensions > self.policy.max_extensions:
            return Decision(
                Outcome.FAILED,
                f"{why}, still after {self.policy.max_extensions} extension(s) of "
                f"{self.policy.interval_seconds:g} s (max_extensions)",
            )
        return Decision(
            Outcome.EXTENDED, f"{why}; stage extended by {self.policy.interval_seconds:g} s"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["policy"] = self.policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AnalysisRun:
        fields = dict(d)
        policy = AnalysisPolicy.from_dict(fields.pop("policy"))
        return cls(policy=policy, **fields)


#: The tail of an insufficient-data verdict on a prometheus/web metric.
NO_DATA_HINT = (
    "the query returned no data: does it select the canary's series (its labels, "
    "{{canary}}), and does the canary get traffic in the window?"
)


def too_little_traffic(policy: AnalysisPolicy) -> str:
    """What to do when a canary keeps getting too little traffic to be judged: the tail of an
    insufficient-data verdict (and the README's advice), with a load that would suffice."""
    if policy.load is not None:
        return (
            f"the built-in load ({policy.load.rps:g} rps to {policy.load.path}) did not get "
            f"{policy.min_requests} answers per {policy.interval_seconds:g} s window: is the "
            "canary answering?"
        )
    # Twice the bare minimum, so a slow start or one lost second does not leave a window short.
    rps = max(1, math.ceil(2 * policy.min_requests / policy.interval_seconds))
    return (
        f"needs {policy.min_requests} requests per {policy.interval_seconds:g} s window: send "
        f"more traffic, add a built-in load ([analysis] load = {{ rps = {rps} }}), lower "
        'min_requests, or choose insufficient_data = "pause" / "fail"'
    )


class CountersReset(ValueError):
    """A later snapshot counts less than an earlier one: the router restarted in between."""


def metrics_from_dict(d: Mapping[str, Any]) -> RevisionMetrics:
    """Inverse of ``RevisionMetrics.to_dict`` (what the agent's metrics endpoint answers)."""
    return RevisionMetrics.from_dict(d)


def window(
    later: Mapping[str, Any], earlier: Mapping[str, Any], revision: str | None
) -> RevisionMetrics | None:
    """The traffic of ``revision`` between two snapshots (``{revision: to_dict()}`` each).

    None when there is no such revision (or no revision asked for). A revision absent from the
    earlier snapshot had served nothing then. Raises ``CountersReset`` if counters went down.
    """
    if revision is None or revision not in later:
        return None
    now = metrics_from_dict(later[revision])
    before = (
        metrics_from_dict(earlier[revision])
        if revision in earlier
        else RevisionMetrics(revision=revision)
    )
    w = now.minus(before)
    if w.requests < 0 or any(b < 0 for b in w.latency_buckets):
        raise CountersReset(f"the router's counters for {revision} went down (router restarted)")
    return w

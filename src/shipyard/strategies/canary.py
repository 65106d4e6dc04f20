"""Canary, as a pure planner (Argo Rollouts' canary steps, with analysis per stage).

Start the canary with no traffic, gate on health, then for each stage: set the canary's weight
(sticky when the stage asks), hold it for ``duration_seconds`` while analysis measures it, and
wait for a human when the stage has ``pause``. Passing the last stage promotes to 100% and keeps
stable warm for ``scale_down_delay_seconds``. A first deployment has no stable to compare with or
fall back to: it skips the stages (health gate, then 100%). ``rollout`` is what
``strategies.plan`` calls.
"""

from __future__ import annotations

from shipyard.analysis.policy import AnalysisPolicy
from shipyard.domain.models import AnalysisSettings, CanaryParams
from shipyard.strategies.steps import (
    Analyse,
    AwaitHealthy,
    AwaitPromotion,
    KeepWarm,
    Plan,
    SetWeight,
    StartCandidate,
    Step,
)


def plan(
    params: CanaryParams,
    *,
    has_stable: bool,
    analysis_defaults: AnalysisSettings | None = None,
    **_: object,
) -> list[Step]:
    if not has_stable:
        return [StartCandidate(), AwaitHealthy(), SetWeight(100)]
    steps: list[Step] = [StartCandidate(), AwaitHealthy()]
    for i, stage in enumerate(params.stages, start=1):
        steps.append(SetWeight(stage.weight, name=f"canary_{i}", sticky=stage.sticky))
        policy = AnalysisPolicy.resolve(analysis_defaults, stage.analysis)
        steps.append(Analyse(stage.duration_seconds, i, stage.weight, policy, name=f"analysis_{i}"))
        if stage.pause:
            steps.append(AwaitPromotion(i, name=f"gate_{i}"))
    steps.append(SetWeight(100, name="promote"))
    steps.append(KeepWarm(params.scale_down_delay_seconds))
    return steps


def rollout(
    params: CanaryParams,
    *,
    has_stable: bool,
    analysis_defaults: AnalysisSettings | None = None,
    **_: object,
) -> Plan:
    return Plan(tuple(plan(params, has_stable=has_stable, analysis_defaults=analysis_defaults)))


def weight_sequence(steps: list[Step]) -> list[int]:
    """The canary weights a plan sets, in order (for tests and the demo)."""
    return [s.candidate for s in steps if isinstance(s, SetWeight)]

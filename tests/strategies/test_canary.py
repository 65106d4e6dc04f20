"""The canary planner: step sequences and weight sequences, table-driven and property-based."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shipyard.analysis.policy import AnalysisPolicy
from shipyard.domain.models import AnalysisSettings, BlueGreenParams, CanaryParams, CanaryStage
from shipyard.strategies import blue_green, canary
from shipyard.strategies.steps import (
    Analyse,
    AwaitHealthy,
    AwaitPromotion,
    KeepWarm,
    SetWeight,
    StartCandidate,
)


def params(*stages: dict[str, object], **kw: object) -> CanaryParams:
    return CanaryParams.model_validate({"stages": list(stages), **kw})


def test_first_deployment_skips_the_stages() -> None:
    plan = canary.plan(params({"weight": 10, "duration_seconds": 60}), has_stable=False)
    assert plan == [StartCandidate(), AwaitHealthy(), SetWeight(100)]


def test_stages_become_weight_analysis_and_gate_steps() -> None:
    plan = canary.plan(
        params(
            {"weight": 10, "duration_seconds": 60, "sticky": True},
            {"weight": 50, "duration_seconds": 120, "pause": True},
            scale_down_delay_seconds=15,
        ),
        has_stable=True,
    )
    assert [type(s) for s in plan] == [
        StartCandidate,
        AwaitHealthy,
        SetWeight,
        Analyse,
        SetWeight,
        Analyse,
        AwaitPromotion,
        SetWeight,
        KeepWarm,
    ]
    assert canary.weight_sequence(plan) == [10, 50, 100]
    assert plan[2] == SetWeight(10, name="canary_1", sticky=True)
    assert plan[5] == Analyse(120, 2, 50, AnalysisPolicy(), name="analysis_2")
    assert plan[-1] == KeepWarm(15)


def test_stage_analysis_overrides_service_defaults_which_override_built_ins() -> None:
    defaults = AnalysisSettings(min_success_rate=0.95, min_requests=5, interval_seconds=2)
    plan = canary.plan(
        params({"weight": 5, "analysis": {"min_requests": 100, "failure_limit": 2}}),
        has_stable=True,
        analysis_defaults=defaults,
    )
    step = next(s for s in plan if isinstance(s, Analyse))
    assert step.policy == AnalysisPolicy(
        min_success_rate=0.95, min_requests=100, interval_seconds=2, failure_limit=2
    )


@given(st.lists(st.integers(0, 100), min_size=1, max_size=20))
def test_weight_sequence_is_the_stages_then_full_promotion(weights: list[int]) -> None:
    stages = CanaryParams(stages=[CanaryStage(weight=w) for w in weights])
    plan = canary.plan(stages, has_stable=True)
    seq = canary.weight_sequence(plan)
    assert seq == [*weights, 100]
    assert all(0 <= w <= 100 for w in seq)
    # Every weight is held by exactly one analysis step before the next change.
    analyses = [s for s in plan if isinstance(s, Analyse)]
    assert [a.weight for a in analyses] == weights
    assert [a.stage for a in analyses] == list(range(1, len(weights) + 1))


def test_blue_green_plans_are_not_announced_canary_plans_are() -> None:
    stages = params({"weight": 10, "duration_seconds": 60})
    assert canary.rollout(stages, has_stable=True).announce is True
    bg = BlueGreenParams(switch_delay_seconds=0)
    assert blue_green.rollout(bg, has_stable=True).announce is False

"""The step executors' registry: one executor per step type, found by the step's type."""

from __future__ import annotations

import typing

import pytest

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator import steps
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import (
    Analyse,
    AwaitHealthy,
    AwaitPromotion,
    Bake,
    CallGate,
    KeepWarm,
    Pause,
    RunHook,
    ScaleCandidate,
    ScaleStable,
    SetWeight,
    StartCandidate,
    Step,
)

#: The status a deployment shows while each step runs (the API and the CLI show it).
STATUS = {
    StartCandidate: DeploymentStatus.DEPLOYING,
    AwaitHealthy: DeploymentStatus.DEPLOYING,
    Pause: DeploymentStatus.AWAITING_SWITCH,
    SetWeight: DeploymentStatus.SWITCHING,
    Bake: DeploymentStatus.BAKING,
    KeepWarm: DeploymentStatus.BAKING,
    Analyse: DeploymentStatus.ANALYSING,
    AwaitPromotion: DeploymentStatus.PAUSED,
    ScaleCandidate: DeploymentStatus.DEPLOYING,
    ScaleStable: DeploymentStatus.DEPLOYING,
    RunHook: DeploymentStatus.DEPLOYING,
    CallGate: DeploymentStatus.AWAITING_SWITCH,
}


def test_every_step_type_has_an_executor_and_its_status() -> None:
    assert set(steps.REGISTRY) == set(typing.get_args(Step))
    assert {t: e.status for t, e in steps.REGISTRY.items()} == STATUS


def test_a_step_type_has_one_executor() -> None:
    async def another(ctx: DeploymentContext, step: Bake) -> None: ...

    with pytest.raises(ValueError, match="Bake has an executor already"):
        executes(Bake, status=DeploymentStatus.BAKING)(another)


async def test_an_executor_runs_only_its_own_step_type() -> None:
    bake = steps.REGISTRY[Bake]
    with pytest.raises(TypeError, match="runs Bake"):
        await bake.run(typing.cast(DeploymentContext, None), Pause(1))

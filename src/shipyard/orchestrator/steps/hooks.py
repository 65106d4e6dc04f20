"""``RunHook``: placeholder until issue 16's branch lands (it raises, so no plan may hold one)."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import DeploymentError
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import RunHook


@executes(RunHook, status=DeploymentStatus.DEPLOYING)
async def run(ctx: DeploymentContext, step: RunHook) -> None:
    raise DeploymentError(f"{step!r} is not carried out yet")

"""``CallGate``: placeholder until issue 16's branch lands (it raises, so no plan may hold one)."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import DeploymentError
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import CallGate


@executes(CallGate, status=DeploymentStatus.AWAITING_SWITCH)
async def run(ctx: DeploymentContext, step: CallGate) -> None:
    raise DeploymentError(f"{step!r} is not carried out yet")

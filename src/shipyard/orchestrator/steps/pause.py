"""``Pause``: wait until ``seconds`` after the step began (blue-green's switch delay). The
deadline comes from the persisted start of the step, so a restart does not wait again."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import Pause


@executes(Pause, status=DeploymentStatus.AWAITING_SWITCH)
async def pause(ctx: DeploymentContext, step: Pause) -> None:
    async with stage(ctx, step.name, seconds=step.seconds):
        await ctx.clock.sleep(ctx.step_started_at + step.seconds - ctx.clock.now())

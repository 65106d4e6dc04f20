"""``SetWeight``: route the candidate's share (the rest to stable), verified on the router; at
100% the candidate becomes the service's serving revision (``serving.mark_serving``)."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator import serving
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import SetWeight


@executes(SetWeight, status=DeploymentStatus.SWITCHING)
async def set_weight(ctx: DeploymentContext, step: SetWeight) -> None:
    candidate, stable = ctx.candidate, ctx.stable
    async with stage(ctx, step.name, candidate_weight=step.candidate) as st:
        weights = {candidate: step.candidate}  # canary first: sticky ranges follow it
        if stable and step.candidate < 100:
            weights[stable] = 100 - step.candidate
        await serving.switch(ctx, weights, sticky=step.sticky)
        if step.candidate == 100:
            await serving.mark_serving(ctx, candidate)
        st.done(weights=weights)
    await ctx.audit("traffic.switched", weights=weights)

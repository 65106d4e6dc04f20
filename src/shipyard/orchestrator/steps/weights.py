"""``SetWeight``: route the candidate's share (the rest to stable), verified on the router; at
100% the candidate becomes the service's serving revision (``serving.mark_serving``). Its span
carries the weights (``shipyard.weight.candidate``, ``shipyard.weight.stable``)."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator import fleet, serving
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
            fleet.set_state(ctx, "switched")
        st.annotate(
            {
                "shipyard.weight.candidate": step.candidate,
                "shipyard.weight.stable": weights.get(stable, 0) if stable else 0,
                "shipyard.revision": candidate,
                **({"shipyard.stable_revision": stable} if stable else {}),
            }
        )
        st.done(weights=weights)
    await ctx.audit("traffic.switched", weights=weights)

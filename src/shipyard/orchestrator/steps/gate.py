"""``AwaitPromotion``: a canary stage's gate, Paused until a human promotes it (``abort`` rolls
back instead). ``await_promotion`` is also how a paused analysis waits (``analysis.py``).

A promotion is durable: ``Pipeline.promote`` writes who promoted into the record
(``progress.promoted_by``) before it answers, and wakes the waiting task. A control plane
restarted in between resumes this step, finds the promotion and goes on. It is cleared when the
step ends (``steps.run``), so it never lets a later gate through.
"""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import AwaitPromotion


@executes(AwaitPromotion, status=DeploymentStatus.PAUSED)
async def gate(ctx: DeploymentContext, step: AwaitPromotion) -> None:
    async with stage(ctx, step.name, stage=step.stage) as st:
        by = await await_promotion(ctx, f"stage {step.stage} gate")
        st.done(promoted_by=by)


async def await_promotion(ctx: DeploymentContext, reason: str) -> str:
    """Paused until promoted (``abort`` cancels this task); returns who promoted."""
    progress = ctx.record.progress
    previous = ctx.record.status
    if progress.promoted_by is None:
        progress.paused = reason
        await ctx.set_status(DeploymentStatus.PAUSED)
        await ctx.audit("deployment.paused", reason=reason)
        while progress.promoted_by is None:
            await ctx.promoted.wait()
            ctx.promoted.clear()
    by = progress.promoted_by
    progress.paused = None
    await ctx.set_status(
        previous if previous is not DeploymentStatus.PAUSED else DeploymentStatus.ANALYSING
    )
    await ctx.audit("deployment.promoted", by=by, reason=reason)
    return by

"""``Bake``: watch the candidate's health while it serves, until ``seconds`` after the step
began; the first unhealthy verdict (failure threshold, or a crash) rolls back, and rollback
latency is measured from that verdict."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import HealthCheckFailed
from shipyard.health.probing import watch_until_unhealthy
from shipyard.orchestrator import crash_report
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import Rollback, stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import Bake


@executes(Bake, status=DeploymentStatus.BAKING)
async def bake(ctx: DeploymentContext, step: Bake) -> None:
    candidate = ctx.candidate
    async with stage(ctx, step.name, audit="bake", seconds=step.seconds) as st:
        replicas = await ctx.replicas_of(candidate)
        verdict = await watch_until_unhealthy(
            replicas,
            await ctx.health_check(candidate),
            ctx.deps.prober,
            ctx.clock,
            ctx.replica_states(),
            until=ctx.step_started_at + step.seconds,
        )
        if verdict is not None:
            exc = await crash_report.with_output(
                ctx,
                HealthCheckFailed(
                    f"{candidate} became unhealthy during the bake window: {verdict.reason}",
                    attempts=verdict.attempts,
                    replica=verdict.replica_id,
                ),
            )
            st.fail(verdict.reason, audit={"error": verdict.reason, "replica": verdict.replica_id})
            raise Rollback(exc, detected_at=verdict.at)

"""``AwaitHealthy``: the candidate's health gate. Every replica must pass its health check (a
crash fails at once) before it is made routable, still at weight 0; a failure rolls back, its
error carrying the replica's exit code and last lines of output (``crash_report``)."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import HealthCheckFailed
from shipyard.health.probing import wait_healthy
from shipyard.orchestrator import crash_report, fleet
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import Rollback, stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import AwaitHealthy


@executes(AwaitHealthy, status=DeploymentStatus.DEPLOYING)
async def await_healthy(ctx: DeploymentContext, step: AwaitHealthy) -> None:
    candidate = ctx.candidate
    async with stage(ctx, step.name, audit="health_check") as st:
        check = await ctx.health_check(candidate)
        replicas = await ctx.replicas_of(candidate)
        try:
            report = await wait_healthy(
                replicas, check, ctx.deps.prober, ctx.clock, ctx.replica_states()
            )
        except HealthCheckFailed as failed:
            exc = await crash_report.with_output(ctx, failed)
            fleet.name_region(ctx, exc)
            # The stage says why in one line; the output goes with the deployment's error only
            # (`shipyard deploy` would print it twice).
            headline = exc.message.partition("\n")[0]
            st.annotate({"shipyard.revision": candidate, "shipyard.health.replicas": len(replicas)})
            st.fail(headline, attempts=exc.attempts, audit=_audit(failed, exc))
            raise Rollback(exc) from failed
        await ctx.runtime.set_routable(ctx.service, [r.replica_id for r in replicas], True)
        ctx.record.metrics.health_check_duration_ms = report.duration_ms
        st.annotate(
            {
                "shipyard.revision": candidate,
                "shipyard.health.replicas": len(replicas),
                "shipyard.health.duration_ms": report.duration_ms,
            }
        )
        st.done(attempts=report.attempts)
    await ctx.audit("health_check.passed", duration_ms=report.duration_ms, attempts=report.attempts)


def _audit(failed: HealthCheckFailed, reported: HealthCheckFailed) -> dict[str, object]:
    """The audit event's detail: the short reason and exit code, never the app's output."""
    return {
        "error": failed.message,
        "attempts": failed.attempts,
        "replica": reported.detail.get("replica"),
        "exit_code": reported.detail.get("exit_code"),
    }

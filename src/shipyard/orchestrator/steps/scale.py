"""``ScaleCandidate`` / ``ScaleStable``: a rolling update's batches.

``scale_up`` brings a revision up to a replica count: it starts what is missing, health-gates the
new replicas (a failure rolls back), makes them routable, and re-weights both revisions by their
ready replicas. ``scale_down`` re-weights first, then drains and stops the replicas beyond the
count (those taking no traffic first). Both are idempotent, and the rolling rollback
(``rollback.restore_replicas``) runs them with the roles swapped.
"""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import HealthCheckFailed
from shipyard.health.probing import wait_healthy
from shipyard.orchestrator import artifacts, crash_report, serving
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import Rollback, stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies import rolling
from shipyard.strategies.steps import ScaleCandidate, ScaleStable


@executes(ScaleCandidate, status=DeploymentStatus.DEPLOYING)
async def scale_candidate(ctx: DeploymentContext, step: ScaleCandidate) -> None:
    candidate = ctx.candidate
    async with stage(ctx, step.name, replicas=step.replicas) as st:
        ctx.record.url = await ctx.runtime.ensure_service(ctx.service)
        try:
            weights = await scale_up(ctx, candidate, step.replicas, ctx.stable)
        except Rollback as rollback:
            # One line for the stage; a failed replica's output goes with the error only.
            st.fail(rollback.cause.message.partition("\n")[0])
            raise
        st.done(weights=weights)
    await ctx.audit("replicas.scaled", revision=candidate, replicas=step.replicas, weights=weights)


@executes(ScaleStable, status=DeploymentStatus.DEPLOYING)
async def scale_stable(ctx: DeploymentContext, step: ScaleStable) -> None:
    stable = ctx.stable
    async with stage(ctx, step.name, replicas=step.replicas) as st:
        weights = await scale_down(ctx, stable, step.replicas, ctx.candidate)
        st.done(weights=weights)
    await ctx.audit("replicas.scaled", revision=stable, replicas=step.replicas, weights=weights)


async def scale_up(
    ctx: DeploymentContext, revision: str, replicas: int, other: str | None
) -> dict[str, int]:
    """``revision`` up to ``replicas``: start, health-gate the new ones, route to them, and
    re-weight both revisions by ready replicas. Idempotent."""
    runtime = ctx.runtime
    stored = await ctx.records.revision(revision)
    alive = await ctx.alive()
    if not alive.get(revision) and await artifacts.verify(ctx.deps.gate, stored):
        await ctx.audit("artifact.verified", digest=stored.artifact_digest)
    started = await runtime.start_revision(
        await artifacts.spec(stored, ctx.deps.secrets, replicas=replicas)
    )
    fresh = [r for r in started if not r.routable]
    if fresh:
        try:
            await wait_healthy(
                fresh, stored.health_check(), ctx.deps.prober, ctx.clock, ctx.replica_states()
            )
        except HealthCheckFailed as failed:
            exc = await crash_report.with_output(ctx, failed)
            await ctx.audit(
                "health_check.failed",
                revision=revision,
                error=failed.message,
                attempts=exc.attempts,
                exit_code=exc.detail.get("exit_code"),
            )
            raise Rollback(exc) from failed
        await runtime.set_routable(ctx.service, [r.replica_id for r in fresh], True)
    return await rebalance(ctx, revision, other)


async def scale_down(
    ctx: DeploymentContext, revision: str | None, replicas: int, other: str
) -> dict[str, int]:
    """``revision`` down to ``replicas``: re-weight first, then drain and stop the rest."""
    if revision is None:
        return {}
    alive = (await ctx.alive()).get(revision, [])
    # Stop replicas that take no traffic first, then the newest.
    order = sorted(alive, key=lambda r: (r.routable, r.replica_id))
    stop = order[: max(0, len(alive) - replicas)]
    ready_after = sum(1 for r in alive if r.routable and r not in stop)
    ready_other = sum(1 for r in (await ctx.alive()).get(other, []) if r.routable)
    weights = rolling.weights_for(other, ready_other, revision, ready_after)
    await serving.switch(ctx, weights)
    await serving.note_serving(ctx, weights)
    if stop:
        await ctx.runtime.stop_replicas(
            ctx.service, [r.replica_id for r in stop], drain_timeout=ctx.deps.drain_timeout
        )
    return weights


async def rebalance(ctx: DeploymentContext, first: str, other: str | None) -> dict[str, int]:
    """Weights proportional to each revision's ready replicas, ``first`` first."""
    alive = await ctx.alive()
    ready_first = sum(1 for r in alive.get(first, []) if r.routable)
    ready_other = sum(1 for r in alive.get(other, []) if r.routable) if other else 0
    weights = rolling.weights_for(first, ready_first, other, ready_other)
    await serving.switch(ctx, weights)
    await serving.note_serving(ctx, weights)
    return weights

"""``KeepWarm``: the deployment succeeded; the revision it replaced stays warm for ``seconds``
(instant rollback) and takes over the window of the one kept warm before, which stops now.

A fleet keeps the same window in every region (the service record is per region).

Only a deployment that got this far ends the previous window: one that fails or is rolled back
leaves it as it was, so the service can still go back instantly. The janitor stops a warm
revision when its window ends.
"""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator import serving
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import KeepWarm


@executes(KeepWarm, status=DeploymentStatus.BAKING)
async def keep_warm(ctx: DeploymentContext, step: KeepWarm) -> None:
    stable, store = ctx.stable, ctx.store
    previous: str | None = None
    for region in ctx.regions:
        svc = await store.get_service(ctx.service, region)
        previous = previous or (svc.warm_revision if svc else None)
        if stable and step.seconds > 0:
            await store.upsert_service(
                ctx.service,
                region,
                warm_revision=stable,
                warm_until=ctx.clock.now() + step.seconds,
            )
        elif svc is not None and svc.warm_revision is not None:
            await store.upsert_service(ctx.service, region, warm_revision=None, warm_until=None)
    if stable and step.seconds <= 0:
        await serving.stop(ctx, stable)
    if previous is not None and previous not in (stable, ctx.record.green_revision):
        await serving.stop(ctx, previous)
        await ctx.audit("revision.retired", revision=previous, reason="superseded")

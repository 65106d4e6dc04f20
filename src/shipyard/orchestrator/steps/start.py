"""``StartCandidate``: start the candidate's replicas with no traffic, once its artifact is
verified (signature and digest). Idempotent: the runtime starts only what is missing."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator import artifacts, fleet
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import StartCandidate


@executes(StartCandidate, status=DeploymentStatus.DEPLOYING)
async def start_candidate(ctx: DeploymentContext, step: StartCandidate) -> None:
    candidate = ctx.candidate
    async with stage(ctx, step.name) as st:
        stored = await ctx.records.revision(candidate)
        ctx.record.url = await ctx.runtime.ensure_service(ctx.service)
        if await artifacts.verify(ctx.deps.gate, stored):
            await ctx.audit("artifact.verified", digest=stored.artifact_digest)
        replicas = await ctx.runtime.start_revision(await artifacts.spec(stored, ctx.deps.secrets))
        if stored.entry and stored.entry.get("port"):  # moved to its [service] port
            ctx.record.url = await ctx.runtime.ensure_service(ctx.service)
        fleet.note_urls(ctx)
        ids = [r.replica_id for r in replicas]
        ctx.record.progress.candidate_replicas = ids
        st.done(revision=candidate, replicas=ids)
    await ctx.audit("revision.started", revision=candidate, replicas=len(replicas))

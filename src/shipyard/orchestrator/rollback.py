"""Rolling back: a deployment that failed (or was aborted) puts its stable revision back, and a
manual rollback serves again the revision that served before an earlier deployment.

``roll_back`` is idempotent and resumable (the record says ``rolling_back`` before anything is
done): a rolling update first restores stable's replicas batch by batch under its own limits
(``restore_replicas``, the rollout's arithmetic with the roles swapped, read from the plan's
``RollingLimits``), then stable takes 100% (verified on the router) and becomes the serving
revision, then the candidate is drained and stopped. Latencies are measured on the clock:
``detection_to_rollback_ms`` from the verdict (or the abort request) to stable at 100%,
``abort_latency_ms`` the same for a failed analysis or an abort, ``rollback_duration_ms`` the
switch itself.

A fleet rolls back every region at once through its ``FleetRuntime``. A region that does not
answer within ``[fleet] region_timeout_seconds`` (at a step, or during the rollback itself) is
marked ``unreachable`` in the record and left out, and the rollback goes on with every region it
can reach; the store's service record of every region (the silent one too) says stable serves,
so the reconciler brings that region back once it answers (``fleet.note_converged``).

A failure before the plan touched the data plane (``nothing_started``: a fatal ``pre_deploy``
hook, a ``pre_rollout`` gate) is no rollback at all: the deployment ends Failed with the cause,
stable untouched, no rollback stage (with ``[deploy] on_failure = "freeze"`` too: there is
nothing to freeze). After a rollback put stable back (and stopped the candidate), the
candidate's ``post_rollback`` hook runs once (``progress.post_rollback_ran``, persisted after
it); its failure is recorded and audited, and the deployment still ends RolledBack -- with
``on_failure = "fail"`` the hook's failure becomes the record's error.

``request`` checks and builds a manual rollback (``RollbackRecord``): any successful deployment
can be rolled back, the latest or an earlier one. It is instant while the revision to restore is
still warm (running and routable); otherwise that revision is started again from its signed
artifact and health-gated first (a cold rollback). Called by the pipeline.
"""

from __future__ import annotations

import uuid

from shipyard import strategies
from shipyard.domain.models import DeploymentStatus
from shipyard.errors import (
    AnalysisFailed,
    Conflict,
    DeploymentAborted,
    HookFailed,
    LeaseLost,
    RegionUnreachable,
    RollbackFailed,
    ShipyardError,
)
from shipyard.orchestrator import fleet, hooks, outcome, serving
from shipyard.orchestrator.context import DeploymentContext, Deps
from shipyard.orchestrator.record import (
    DeploymentRecord,
    FleetState,
    PlanRecord,
    Progress,
    Record,
    RecordedError,
    RollbackParams,
    RollbackRecord,
    RollbackStrategy,
    utc,
)
from shipyard.orchestrator.stage import Rollback, end, stage
from shipyard.orchestrator.steps.scale import scale_down, scale_up
from shipyard.strategies import rolling
from shipyard.strategies.steps import (
    RollingLimits,
    ScaleCandidate,
    ScaleStable,
    SetWeight,
    StartCandidate,
)

#: The steps that act on the data plane (start replicas, move traffic): before the first of
#: them, a failure has changed nothing.
_DATA_PLANE_STEPS = (StartCandidate, ScaleCandidate, ScaleStable, SetWeight)


def nothing_started(record: Record) -> bool:
    """Whether a deployment failing now has changed nothing on the data plane: a deployment
    (not a manual rollback) in its steps phase whose persisted step is before the plan's first
    step that starts replicas or moves traffic. Then it ends Failed, with no rollback and no
    freeze (``roll_back`` checks it first; the freeze branch must too)."""
    plan = record.progress.plan
    if not isinstance(record, DeploymentRecord) or plan is None:
        return False
    if record.progress.phase != "steps":
        return False
    first = next((i for i, s in enumerate(plan.steps) if isinstance(s, _DATA_PLANE_STEPS)), None)
    return first is not None and record.progress.step < first


async def roll_back(
    ctx: DeploymentContext, cause: ShipyardError, detected_at: float | None
) -> None:
    """Stable back to 100%, candidate drained and stopped; the deployment ends RolledBack
    (Failed when there was no stable to go back to, or the rollback itself failed; Failed at
    once, with nothing touched, when ``nothing_started``)."""
    record = ctx.record
    if nothing_started(record):
        for interrupted in [s for s in record.stages if s.status == "running"]:
            await end(ctx, interrupted, "failed", error=cause.message)  # an abort cut it short
        await outcome.finish(ctx, DeploymentStatus.FAILED, cause)
        return
    record.progress.rolling_back = True
    record.error = RecordedError.of(cause)
    await ctx.set_status(DeploymentStatus.ROLLING_BACK)  # the decision, persisted first
    await fleet.note_unreachable(ctx, cause)
    stable = record.blue_revision
    try:
        async with stage(ctx, "rollback") as st:
            st.annotate(
                {
                    "shipyard.rollback.cause": cause.code,
                    **({"shipyard.stable_revision": stable} if stable else {}),
                    **(
                        {"shipyard.revision": record.green_revision}
                        if record.green_revision
                        else {}
                    ),
                }
            )
            while True:
                try:
                    await _restore(ctx, cause, detected_at)
                    break
                except RegionUnreachable as silent:  # leave it out, go on with the others
                    if not await fleet.note_unreachable(ctx, silent):
                        raise
            fleet.set_state(ctx, "rolled_back")
            if stable:
                st.annotate({"shipyard.weight.stable": 100, "shipyard.weight.candidate": 0})
            unreachable = record.fleet.unreachable() if record.fleet is not None else []
            st.done(restored=stable, **({"unreachable": unreachable} if unreachable else {}))
    except (ShipyardError, Rollback) as exc:
        failed = exc.cause if isinstance(exc, Rollback) else exc
        await outcome.finish(
            ctx,
            DeploymentStatus.FAILED,
            RollbackFailed(f"{failed.message} (while rolling back: {cause.message})"),
        )
        return
    status = DeploymentStatus.ROLLED_BACK if stable else DeploymentStatus.FAILED
    failed_hook = await _post_rollback(ctx, cause)
    if status is DeploymentStatus.ROLLED_BACK:
        record.rollback_count += 1
    await outcome.finish(ctx, status, failed_hook or cause)


async def _post_rollback(ctx: DeploymentContext, cause: ShipyardError) -> HookFailed | None:
    """The candidate's ``post_rollback`` hook, once (see the module docstring): its failure
    when ``on_failure = "fail"`` made it the deployment's error, else None."""
    record = ctx.record
    if not isinstance(record, DeploymentRecord) or record.green_revision is None:
        return None
    if record.progress.post_rollback_ran:
        return None
    revision = await ctx.records.revision(record.green_revision)
    if revision.hooks.post_rollback is None:
        return None
    try:
        await hooks.run(ctx, "post_rollback", revision)
        failed: ShipyardError | None = None
    except ShipyardError as exc:  # fatal: the deployment still rolled back
        if isinstance(exc, LeaseLost):
            raise
        failed = exc
    record.progress.post_rollback_ran = True
    await ctx.save()
    if failed is None:
        return None
    return HookFailed(
        f"{failed.message}\n(after rolling back for: {cause.message})",
        **{**failed.detail, "point": "post_rollback", "rolled_back_for": cause.code},
    )


async def _restore(ctx: DeploymentContext, cause: ShipyardError, detected_at: float | None) -> None:
    """The rollback's actions (idempotent: run again after a region was left out)."""
    record = ctx.record
    stable, candidate = record.blue_revision, record.green_revision
    plan = record.progress.plan
    limits = plan.rolling if plan is not None else None
    t0 = ctx.clock.monotonic()
    if stable and candidate and limits is not None:
        await restore_replicas(ctx, stable, candidate, limits)
    if stable:
        await serving.switch(ctx, {stable: 100})
        switched = ctx.clock.monotonic()
        await serving.mark_serving(ctx, stable)
        if detected_at is not None:
            latency = int((switched - detected_at) * 1000)
            record.metrics.detection_to_rollback_ms = latency
            if isinstance(cause, AnalysisFailed | DeploymentAborted):
                record.metrics.abort_latency_ms = latency
                await ctx.audit(
                    "canary.weight_zero",
                    weights={stable: 100},
                    abort_latency_ms=latency,
                )
        record.metrics.rollback_duration_ms = int((switched - t0) * 1000)
    else:
        for region in ctx.regions:
            svc = await ctx.store.get_service(ctx.service, region)
            if svc and svc.serving_revision == candidate:
                await ctx.store.upsert_service(ctx.service, region, serving_revision=None)
    if candidate:
        await serving.stop(ctx, candidate)


async def restore_replicas(
    ctx: DeploymentContext, stable: str, candidate: str, limits: RollingLimits
) -> None:
    """Rolling rollback: stable back to its own replica count under the same surge and
    availability limits (the rollout's arithmetic with the roles swapped), candidate replicas
    that never took traffic stopped first."""
    desired = limits.stable_replicas or limits.replicas
    alive = await ctx.alive()
    unready = [r.replica_id for r in alive.get(candidate, []) if not r.routable]
    if unready:
        await ctx.runtime.stop_replicas(ctx.service, unready, drain_timeout=ctx.deps.drain_timeout)
    alive = await ctx.alive()
    ready_candidate = sum(1 for r in alive.get(candidate, []) if r.routable)
    ready_stable = sum(1 for r in alive.get(stable, []) if r.routable)
    steps = rolling.batches(
        desired, limits.max_surge, limits.max_unavailable, old=ready_candidate, new=ready_stable
    )
    for step in steps:
        if isinstance(step, ScaleCandidate):  # roles swapped: scale *stable* up
            weights = await scale_up(ctx, stable, step.replicas, candidate)
        else:
            assert isinstance(step, ScaleStable)
            weights = await scale_down(ctx, candidate, step.replicas, stable)
        await ctx.audit("rollback.batch", step=step.name, weights=weights)


async def request(deps: Deps, deployment_id: str, user: str) -> RollbackRecord:
    """The manual rollback of ``deployment_id`` (see the module docstring), not yet stored;
    ``Conflict`` when there is nothing to roll back."""
    target = await deps.records.get(deployment_id)
    if not isinstance(target, DeploymentRecord):
        raise Conflict("only deployments can be rolled back, not rollbacks")
    if target.status is not DeploymentStatus.SUCCESS:
        raise Conflict(
            f"deployment {deployment_id} is {target.status.value}; only a successful deployment "
            "can be rolled back (a failed one never took traffic, a rolled-back one is undone)"
        )
    restore = target.blue_revision
    if not restore:
        raise Conflict(
            f"deployment {deployment_id} was the service's first; there is no earlier revision"
        )
    regions = target.all_regions
    serving: dict[str, str | None] = {}
    for region in regions:
        svc = await deps.store.get_service(target.service, region)
        serving[region] = svc.serving_revision if svc else None
    serving_now = serving[target.region]
    if len(set(serving.values())) > 1:
        seen = ", ".join(f"{r}: {rev or 'nothing'}" for r, rev in serving.items())
        raise Conflict(
            f"the regions of deployment {deployment_id} serve different revisions of "
            f"{target.service} ({seen}); wait until every region converged, then roll back"
        )
    if serving_now == restore:
        raise Conflict(
            f"service {target.service} already serves {restore}, the revision before "
            f"deployment {deployment_id}; nothing to roll back"
        )
    warm = True
    for region in regions:  # instant only if the revision is warm in every region
        state = await deps.runtime(region).service_state(target.service)
        warm = warm and bool(
            state and any(r.revision == restore and r.alive and r.routable for r in state.replicas)
        )
    now = deps.clock.now()
    plan = strategies.blue_green.plan_instant_switch(warm=warm)
    return RollbackRecord(
        id=str(uuid.uuid4()),
        service=target.service,
        region=target.region,
        regions=regions,
        fleet=(
            FleetState.of(regions).model_copy(
                update={"region_timeout_seconds": target.fleet.region_timeout_seconds}
            )
            if target.fleet is not None
            else None
        ),
        strategy=RollbackStrategy(Rollback=RollbackParams(instant=warm)),
        source=target.source,
        triggered_by=user,
        created_ts=now,
        created_at=utc(now),
        updated_at=utc(now),
        rollback_of=deployment_id,
        # The revision serving now is this rollback's "blue" (what a failed rollback keeps);
        # the restored one is its "green". For the latest deployment they are its green and
        # blue swapped; for an earlier one, whatever serves now.
        blue_revision=serving_now,
        green_revision=restore,
        first_deploy=serving_now is None,
        stable_at_submit=serving_now,
        artifact_digest=(await deps.records.revision(restore)).artifact_digest,
        progress=Progress(phase="steps", plan=PlanRecord(steps=plan)),
    )

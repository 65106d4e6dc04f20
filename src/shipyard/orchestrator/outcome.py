"""How a deployment ends: ``succeed`` and ``finish`` (ADR section 8's metrics and validation, and
the result ``?wait=true`` answers with).

``succeed`` is the end of a plan carried out; for a manual rollback it also marks the deployment
it undid as RolledBack. ``finish`` writes the terminal status, the error if any, the metrics with
their validation against the targets, and the result (what serves now, at which URL), then audits
``deployment.<status>`` and asks for an audit checkpoint to be published to the witnesses.
The deployment's root span is emitted there, once the final status is saved (``spans.py``).
Called by the pipeline's driver, pre-flight's failures and the rollback.
"""

from __future__ import annotations

import uuid

from shipyard.domain.models import DeploymentResult, DeploymentStatus, validate_performance
from shipyard.errors import ShipyardError
from shipyard.orchestrator import fleet, spans
from shipyard.orchestrator.context import DeploymentContext, audit_event
from shipyard.orchestrator.record import DeploymentRecord, RecordedError, RollbackRecord, utc


async def succeed(ctx: DeploymentContext) -> None:
    record = ctx.record
    if isinstance(record, RollbackRecord):
        target = await ctx.records.get(record.rollback_of)
        target.status = DeploymentStatus.ROLLED_BACK
        if isinstance(target, DeploymentRecord):
            target.rolled_back_by = record.id
        target.rollback_count += 1
        record.metrics.rollback_duration_ms = _since_requested_ms(ctx)
        await ctx.records.save(target)
        await ctx.deps.audit.append(
            audit_event(target, "deployment.rolled_back", {"rolled_back_by": record.id})
        )
    await finish(ctx, DeploymentStatus.SUCCESS, None)


def _since_requested_ms(ctx: DeploymentContext) -> int:
    """From the request to now: on the monotonic clock when this process took the request,
    else (resumed after a restart) on the wall clock since the record was made."""
    if ctx.requested_at is not None:
        return int((ctx.clock.monotonic() - ctx.requested_at) * 1000)
    return int((ctx.clock.now() - ctx.record.created_ts) * 1000)


async def finish(
    ctx: DeploymentContext, status: DeploymentStatus, error: ShipyardError | None
) -> None:
    """Write the deployment's end (see the module docstring) and wake whoever waits for it."""
    record = ctx.record
    now = ctx.clock.now()
    if status is DeploymentStatus.SUCCESS:
        fleet.set_state(ctx, "switched")
    record.status = status
    record.finished_at = utc(now)
    if error is not None:
        record.error = RecordedError.of(error)
    metrics = record.metrics
    metrics.total_duration_ms = int((now - record.created_ts) * 1000)
    metrics.validation = validate_performance(metrics)
    svc = await ctx.store.get_service(ctx.service, ctx.region)
    record.result = DeploymentResult(
        deployment_id=uuid.UUID(record.id),
        status=status,
        service=record.service,
        region=record.region,
        revision=svc.serving_revision if svc else None,
        previous_revision=record.blue_revision,
        url=(svc.url if svc else None) or record.url,
        duration_ms=metrics.total_duration_ms,
        metrics=metrics.model_copy(deep=True),
        regions=(
            {name: r.state for name, r in record.fleet.regions.items()}
            if record.fleet is not None
            else None
        ),
        switch_skew_ms=record.fleet.max_skew_ms if record.fleet is not None else None,
    )
    await ctx.save()
    spans.emit_root(ctx)  # once, by the replica that finished it (the save was fenced)
    await ctx.audit(
        f"deployment.{status.value.lower()}",
        duration_ms=metrics.total_duration_ms,
        error=error.message if error else None,
    )
    if ctx.deps.checkpoints is not None:  # only wakes the publisher: a witness cannot fail this
        ctx.deps.checkpoints.request()
    ctx.on_finished()

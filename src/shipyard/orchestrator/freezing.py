"""Freeze instead of rollback (``[deploy] on_failure = "freeze"``, kept in the persisted plan).

For releases whose migration cannot be undone: a failure in the plan's steps (a step's
``Rollback`` verdict or a ``ShipyardError``: a health gate, bake, analysis, a fatal hook, a
refused webhook gate) does not roll back. ``freeze`` leaves traffic exactly where it is, records
``progress.frozen`` (the cause, the failed step's index, when), persists status ``Frozen`` and
audits ``deployment.frozen`` (the cause's code and message: the notifications pick it up).
``hold`` then waits for a human, as long as it takes, on whichever replica drives the deployment:

- ``promote`` (``Pipeline.promote`` with a reason, audited ``deployment.unfrozen`` with
  ``action: promote`` when asked): the plan goes on at the step after the failed one;
- ``abort`` (with a reason, audited ``deployment.unfrozen`` with ``action: abort``): rolled back
  as any abort is (the pipeline cancels ``hold`` and persists the rollback).

A control plane restarted (or a replica taking over) while Frozen finds ``progress.frozen`` and
holds again: nothing re-runs. Failures in the build phase, and failures before any step touched
the data plane (``rollback.nothing_started``, the one rule for hooks, gates and freeze), are
not frozen: there is nothing to hold, the deployment
ends ``Failed``. Called by ``pipeline.Pipeline`` (``_carry_out``, ``promote``, ``abort``,
``rollback``).
"""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import Conflict, ReasonRequired, ShipyardError
from shipyard.orchestrator import rollback
from shipyard.orchestrator.context import DeploymentContext, Deps
from shipyard.orchestrator.record import FrozenState, Record, RecordedError, utc


def applies(record: Record) -> bool:
    """Whether a failure at the persisted step freezes the deployment (else: roll back)."""
    plan = record.progress.plan
    return plan is not None and plan.on_failure == "freeze" and not rollback.nothing_started(record)


async def freeze(ctx: DeploymentContext, cause: ShipyardError) -> None:
    """Traffic stays; Frozen, persisted (``hold`` audits it, then waits)."""
    progress = ctx.record.progress
    progress.frozen = FrozenState(
        cause=RecordedError.of(cause), step=progress.step, at=utc(ctx.clock.now())
    )
    progress.paused = None
    progress.promoted_by = None  # only a promotion given while Frozen lets it go on
    await ctx.set_status(DeploymentStatus.FROZEN)  # persisted first; ``hold`` announces it


async def hold(ctx: DeploymentContext) -> None:
    """Until a human promotes the Frozen deployment (``abort`` cancels this task); then the
    plan's next step is the one after the failed one."""
    record = ctx.record
    progress = record.progress
    frozen = progress.frozen
    assert frozen is not None  # the caller looked
    if record.status is not DeploymentStatus.FROZEN:  # a promotion raced the freeze's save
        await ctx.set_status(DeploymentStatus.FROZEN)
    # Audited here, after the save: a control plane that died in between announces it when it
    # resumes; one that died after it skips it (a resumed step records nothing twice).
    await _announce(ctx)
    while progress.promoted_by is None:
        await ctx.promoted.wait()
        ctx.promoted.clear()
    by = progress.promoted_by
    progress.frozen = None
    progress.step = frozen.step + 1
    progress.step_started_at = None
    progress.promoted_by = None
    record.status = DeploymentStatus.DEPLOYING
    await ctx.save()  # one write: the plan goes on after the failed step, or not at all
    await ctx.audit(
        "deployment.promoted", by=by, frozen_at_step=frozen.step, cause=frozen.cause.code
    )


async def _announce(ctx: DeploymentContext) -> None:
    frozen = ctx.record.progress.frozen
    assert frozen is not None
    plan = ctx.record.progress.plan
    steps = plan.steps if plan is not None else []
    await ctx.audit(
        "deployment.frozen",
        code=frozen.cause.code,
        error=frozen.cause.message,
        step=frozen.step,
        step_name=steps[frozen.step].name if frozen.step < len(steps) else None,
        frozen_at=frozen.at.isoformat(),
    )


def require_reason(record: Record, command: str, reason: str | None) -> None:
    """A Frozen deployment is promoted or aborted (``command``) only with a reason."""
    if record.status is DeploymentStatus.FROZEN and not (reason and reason.strip()):
        raise ReasonRequired(
            f"deployment {record.id} is Frozen: a {command} needs a reason, which is audited: "
            f"`shipyard {command} {record.id} --reason TEXT`",
            deployment_id=record.id,
        )


async def refuse_rollback_while_frozen(deps: Deps, deployment_id: str) -> None:
    """A manual rollback of a service whose deployment is Frozen is refused (409): the frozen
    deployment decides, through promote or abort."""
    target = await deps.records.get(deployment_id)
    for region in target.all_regions:
        active = await deps.records.active_for(target.service, region)
        if active is not None and active.status is DeploymentStatus.FROZEN:
            raise Conflict(
                f"deployment {active.id} is frozen: promote or abort it "
                f"(`shipyard promote {active.id} --reason TEXT` or "
                f"`shipyard abort {active.id} --reason TEXT`)",
                deployment_id=active.id,
            )

"""``RunHook``: the manifest's ``[hooks]`` command at ``pre_deploy``, ``pre_switch`` or
``post_switch``, run once in the candidate's artifact (``orchestrator/hooks.py``). A fatal
failure raises ``HookFailed``: at ``pre_deploy`` nothing has started and the deployment ends
Failed (``rollback.nothing_started``); later it rolls back (or freezes). A reported one is in
the stage and the audit trail, and the plan goes on."""

from __future__ import annotations

from shipyard.domain.models import DeploymentStatus
from shipyard.domain.release import HOOK_POINTS
from shipyard.errors import InvariantViolation
from shipyard.orchestrator import hooks
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import RunHook


@executes(RunHook, status=DeploymentStatus.DEPLOYING)
async def run(ctx: DeploymentContext, step: RunHook) -> None:
    if step.point not in HOOK_POINTS:
        raise InvariantViolation(f"deployment {ctx.id}'s plan names no hook point {step.point!r}")
    revision = await ctx.records.revision(ctx.candidate)
    await hooks.run(ctx, step.point, revision)

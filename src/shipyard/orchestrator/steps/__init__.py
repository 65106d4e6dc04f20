"""The plan's steps: one executor module per step type, and the loop that runs them.

``run`` executes a deployment's plan from its persisted step index: before each step it records
the step's start time and the status its executor declares (persisted before acting), and after
it the next index. Every step is idempotent, so a control plane restarted at any moment runs the
interrupted step again. A step that fails raises (``stage.Rollback`` for a verdict, a
``ShipyardError`` otherwise); the caller rolls back.

Executors (each registered by step type in its module, see ``registry.py``): ``start``
(StartCandidate), ``health`` (AwaitHealthy), ``pause`` (Pause), ``weights`` (SetWeight),
``bake`` (Bake), ``warm`` (KeepWarm), ``analysis`` (Analyse), ``gate`` (AwaitPromotion),
``scale`` (ScaleCandidate, ScaleStable). Every module of this package is imported here, so a new
step type's executor only has to exist; a step type without one fails at import.
"""

from __future__ import annotations

import importlib
import pkgutil
import typing

from shipyard.domain.models import DeploymentStatus
from shipyard.errors import InvariantViolation
from shipyard.orchestrator import fleet
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.steps.registry import REGISTRY, executor_for
from shipyard.strategies.steps import Step

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

_missing = sorted(cls.__name__ for cls in typing.get_args(Step) if cls not in REGISTRY)
if _missing:
    raise ImportError(f"no executor for step type(s) {', '.join(_missing)} in {__name__}")


async def run(ctx: DeploymentContext) -> None:
    """Carry out the plan from the persisted step on (see the module docstring)."""
    progress = ctx.record.progress
    if progress.plan is None:
        raise InvariantViolation(f"deployment {ctx.id} has no plan to carry out")
    steps = progress.plan.steps
    fleet.set_state(ctx, "deploying", unless=("unreachable", "converged", "switched"))
    while progress.step < len(steps):
        step = steps[progress.step]
        executor = executor_for(step)
        if progress.step_started_at is None:
            progress.step_started_at = ctx.clock.now()
        if executor.status is DeploymentStatus.PAUSED:
            await ctx.save()  # the step says Paused itself, with why (gate.await_promotion)
        else:
            await ctx.set_status(executor.status)  # persisted before acting
        await executor.run(ctx, step)
        progress.step += 1
        progress.step_started_at = None
        progress.promoted_by = None  # a promotion lets one step go on, not the next
        await ctx.save()


__all__ = ["REGISTRY", "executor_for", "run"]

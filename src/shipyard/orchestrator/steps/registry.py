"""The step executors, registered by step type.

An executor module declares what it runs with ``@executes(StepType, status=...)``: the step type
(a dataclass of ``strategies/steps.py``) and the status a deployment shows while such a step runs.
``steps/__init__.py`` imports every module of this package and checks that each step type has
one executor; the plan's loop asks ``executor_for(step)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from shipyard.domain.models import DeploymentStatus
from shipyard.orchestrator.context import DeploymentContext
from shipyard.strategies.steps import Step

S = TypeVar("S", bound=Step)
Run = Callable[[DeploymentContext, S], Awaitable[None]]


@dataclass(frozen=True)
class Executor:
    """How one step type runs, and the status the deployment shows meanwhile."""

    step_type: type[object]
    status: DeploymentStatus
    run: Callable[[DeploymentContext, Step], Awaitable[None]]


#: Step type -> its executor (keyed by ``type(step)``).
REGISTRY: dict[type[object], Executor] = {}


def executes(step_type: type[S], *, status: DeploymentStatus) -> Callable[[Run[S]], Run[S]]:
    """Register the decorated coroutine as the executor of ``step_type``."""

    def register(fn: Run[S]) -> Run[S]:
        if step_type in REGISTRY:
            raise ValueError(f"{step_type.__name__} has an executor already")

        async def run(ctx: DeploymentContext, step: Step) -> None:
            if not isinstance(step, step_type):
                raise TypeError(f"{fn.__name__} runs {step_type.__name__}, not {step!r}")
            await fn(ctx, step)

        REGISTRY[step_type] = Executor(step_type, status, run)
        return fn

    return register


def executor_for(step: Step) -> Executor:
    return REGISTRY[type(step)]

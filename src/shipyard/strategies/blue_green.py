"""Blue-green, as a pure planner (ADR section 5).

Start green with no traffic, gate on health, wait ``switch_delay_seconds``, switch 100%, verify,
monitor for ``bake_seconds``, keep blue warm for ``scale_down_delay_seconds``. The first
deployment of a service has no blue: health-gate and route 100% (no bake: there is nothing to roll
back to). ``rollout`` is what ``strategies.plan`` calls; ``plan_instant_switch`` is a manual
rollback's plan.
"""

from __future__ import annotations

from shipyard.domain.models import BlueGreenParams
from shipyard.strategies.steps import (
    AwaitHealthy,
    Bake,
    KeepWarm,
    Pause,
    Plan,
    SetWeight,
    StartCandidate,
    Step,
)


def plan(params: BlueGreenParams, *, has_stable: bool, **_: object) -> list[Step]:
    if not has_stable:
        return [StartCandidate(), AwaitHealthy(), SetWeight(100)]
    steps: list[Step] = [StartCandidate(), AwaitHealthy()]
    if params.switch_delay_seconds:
        steps.append(Pause(params.switch_delay_seconds))
    steps.append(SetWeight(100))
    if params.bake_seconds:
        steps.append(Bake(params.bake_seconds))
    steps.append(KeepWarm(params.scale_down_delay_seconds))
    return steps


def rollout(params: BlueGreenParams, *, has_stable: bool, **_: object) -> Plan:
    """The plan, unannounced: blue-green's steps are always the same."""
    return Plan(tuple(plan(params, has_stable=has_stable)), announce=False)


def plan_instant_switch(*, warm: bool) -> list[Step]:
    """A manual rollback to a previous revision: instant while it is warm, else restart it first."""
    if warm:
        return [SetWeight(100), KeepWarm(0)]
    return [StartCandidate(), AwaitHealthy(), SetWeight(100), KeepWarm(0)]

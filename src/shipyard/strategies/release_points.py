"""Where a plan's hooks and webhook gates go: ``place`` adds a ``RunHook`` step for each
``[hooks]`` command and a ``CallGate`` step for each ``[[gates]]`` entry at its point of the
strategy's plan. Pure; called by ``orchestrator/preflight.calculate_plan`` after the strategy
planned.

The points, for every strategy:

- ``pre_deploy`` hook, then ``pre_rollout`` gates: before the plan's first step (no replica of
  the candidate has started);
- ``pre_switch`` hook, then ``pre_switch`` gates: before the first step that gives the candidate
  traffic (a ``SetWeight`` above 0; for a rolling update its first ``ScaleCandidate``, which
  routes to each batch once it is healthy: a rolling update has no moment when the candidate is
  healthy and unrouted);
- ``confirm_promotion`` gates: before the step that takes the candidate to 100% (``SetWeight(100)``;
  a rolling update's last ``ScaleCandidate``);
- ``post_switch`` hook: after the last step that changes traffic (the candidate serves 100%).

``post_rollback`` is not a plan step: ``orchestrator/rollback.py`` runs it after a rollback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from shipyard.domain.release import GateSpec, HookPoint, HooksSection, gate_names
from shipyard.strategies.steps import (
    CallGate,
    Plan,
    RunHook,
    ScaleCandidate,
    ScaleStable,
    SetWeight,
    Step,
)


def place(plan: Plan, hooks: HooksSection, gates: list[GateSpec]) -> Plan:
    """``plan`` with the hook and gate steps at their points (unchanged without any)."""
    if not gates and all(hooks.at(p) is None for p in ("pre_deploy", "pre_switch", "post_switch")):
        return plan
    steps = list(plan.steps)
    named = list(zip(gate_names(gates), gates, strict=True))

    def gate_steps(at: str) -> list[Step]:
        return [CallGate(at=at, gate=name) for name, gate in named if gate.at == at]

    def hook_steps(point: HookPoint) -> list[Step]:
        # Named as its stage (``hook_<point>``): the CLI matches a planned step to its stage.
        return [RunHook(point=point, name=f"hook_{point}")] if hooks.at(point) is not None else []

    first_traffic = _first(steps, lambda s: isinstance(s, ScaleCandidate) or _routes(s))
    full = _last(steps, lambda s: isinstance(s, ScaleCandidate) or _full(s))
    last_change = _last(steps, lambda s: isinstance(s, ScaleCandidate | ScaleStable | SetWeight))
    # Insert from the back, so the earlier positions stay valid.
    inserts: list[tuple[int, list[Step]]] = []
    if last_change is not None:
        inserts.append((last_change + 1, hook_steps("post_switch")))
    if full is not None:
        inserts.append((full, gate_steps("confirm_promotion")))
    if first_traffic is not None:
        inserts.append((first_traffic, hook_steps("pre_switch") + gate_steps("pre_switch")))
    inserts.append((0, hook_steps("pre_deploy") + gate_steps("pre_rollout")))
    # Same position: the earlier point's steps go first (pre_switch before confirm_promotion).
    for index, extra in sorted(inserts, key=lambda p: p[0], reverse=True):
        steps[index:index] = extra
    return dataclasses.replace(plan, steps=tuple(steps), announce=plan.announce or bool(gates))


def _routes(step: Step) -> bool:
    return isinstance(step, SetWeight) and step.candidate > 0


def _full(step: Step) -> bool:
    return isinstance(step, SetWeight) and step.candidate == 100


def _first(steps: list[Step], match: Callable[[Step], bool]) -> int | None:
    return next((i for i, s in enumerate(steps) if match(s)), None)


def _last(steps: list[Step], match: Callable[[Step], bool]) -> int | None:
    return next((i for i in range(len(steps) - 1, -1, -1) if match(steps[i])), None)

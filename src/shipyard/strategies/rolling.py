"""Rolling update, as a pure planner (Kubernetes' Deployment rollout, batch by batch).

``max_surge`` / ``max_unavailable`` resolve against the desired replica count with Kubernetes'
rounding (surge up, unavailable down); both resolving to zero is refused (``InvalidPlan``).
``batches`` simulates the rollout: alternately bring the candidate up as far as surge allows
(each new replica health-gated before it takes traffic) and shrink stable as far as availability
allows, so that at every moment

    running <= desired + max_surge    and    ready >= desired - max_unavailable.

The same arithmetic with the roles swapped rolls a failed update back (``batches`` from the
candidate's side), so the service gets its full replica count back under the same invariants;
``rollout`` keeps the resolved limits and stable's own replica count in the plan
(``RollingLimits``) for that. ``rollout`` is what ``strategies.plan`` calls; ``batches`` and
``weights_for`` are also called by the orchestrator's rollback and scale executors.
"""

from __future__ import annotations

import math

from shipyard.domain.models import RollingParams
from shipyard.strategies.steps import (
    AwaitHealthy,
    Plan,
    RollingLimits,
    ScaleCandidate,
    ScaleStable,
    SetWeight,
    StartCandidate,
    Step,
)


class InvalidPlan(ValueError):
    """The parameters cannot be planned for this service (e.g. surge and unavailable both 0)."""


def resolve(value: int | str, desired: int, *, round_up: bool) -> int:
    """An int, or "P%" of ``desired`` rounded up (surge) or down (unavailable)."""
    if isinstance(value, int):
        return value
    exact = int(value.rstrip("%")) * desired
    return -(-exact // 100) if round_up else exact // 100


def limits(params: RollingParams, desired: int) -> tuple[int, int]:
    """(max_surge, max_unavailable) as replica counts; InvalidPlan when both are zero."""
    surge = resolve(params.max_surge, desired, round_up=True)
    unavailable = resolve(params.max_unavailable, desired, round_up=False)
    if surge == 0 and unavailable == 0:
        raise InvalidPlan(
            f"max_surge {params.max_surge!r} and max_unavailable {params.max_unavailable!r} both "
            f"resolve to 0 replicas for {desired} replica(s): nothing could ever be replaced; "
            "allow at least one (e.g. max_surge 1)"
        )
    return surge, unavailable


def batches(desired: int, surge: int, unavailable: int, old: int, new: int = 0) -> list[Step]:
    """ScaleCandidate/ScaleStable steps taking (old, new) replicas to (0, desired).

    Assumes each ScaleCandidate ends with all its replicas ready (else the rollout stops).
    """
    if surge == 0 and unavailable == 0:
        raise InvalidPlan("max_surge and max_unavailable cannot both be 0")
    steps: list[Step] = []
    for _ in range(4 * (desired + old) + 4):  # each pass makes progress; this bounds it
        if old == 0 and new >= desired:
            return steps
        up = min(desired, desired + surge - old)
        if up > new:
            new = up
            steps.append(ScaleCandidate(new, name=f"scale_up_{new}"))
        target = 0 if new >= desired else max(0, min(old, desired - unavailable - new))
        if target < old:
            old = target
            steps.append(ScaleStable(old, name=f"scale_down_{old}"))
    raise AssertionError("rolling plan did not converge")  # unreachable: see module docstring


def plan(
    params: RollingParams,
    *,
    has_stable: bool,
    replicas: int = 1,
    stable_replicas: int | None = None,
    **_: object,
) -> list[Step]:
    if not has_stable:
        return [StartCandidate(), AwaitHealthy(), SetWeight(100)]
    surge, unavailable = limits(params, replicas)
    old = replicas if stable_replicas is None else stable_replicas
    return batches(replicas, surge, unavailable, old)


def rollout(
    params: RollingParams,
    *,
    has_stable: bool,
    replicas: int = 1,
    stable_replicas: int | None = None,
    stable_desired: int = 0,
    **_: object,
) -> Plan:
    """The batches, and the limits the rollback needs. ``stable_replicas``: stable's ready
    replicas now (where the rollout starts from); ``stable_desired``: stable's own replica count
    (what a rollback restores); ``replicas``: the candidate's."""
    surge, unavailable = limits(params, replicas)
    steps = plan(params, has_stable=has_stable, replicas=replicas, stable_replicas=stable_replicas)
    return Plan(
        tuple(steps),
        rolling=RollingLimits(
            replicas=replicas,
            stable_replicas=stable_desired if has_stable else 0,
            max_surge=surge,
            max_unavailable=unavailable,
        ),
    )


def weights_for(
    candidate: str, ready_new: int, stable: str | None, ready_old: int
) -> dict[str, int]:
    """Percent per revision proportional to its ready replicas, candidate first (integers
    summing to 100; a revision with no ready replica gets 0)."""
    total = ready_new + (ready_old if stable else 0)
    if total == 0 or stable is None or ready_old == 0:
        return {candidate: 100}
    if ready_new == 0:
        return {stable: 100}
    share = math.floor(100 * ready_new / total + 0.5)
    share = min(99, max(1, share))
    return {candidate: share, stable: 100 - share}

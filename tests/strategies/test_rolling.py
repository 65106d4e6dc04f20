"""The rolling planner: Kubernetes' rounding, and the invariants at every step (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shipyard.domain.models import RollingParams
from shipyard.strategies import rolling
from shipyard.strategies.steps import RollingLimits, ScaleCandidate, ScaleStable, SetWeight


@pytest.mark.parametrize(
    ("surge", "unavailable", "desired", "expected"),
    [
        (1, 0, 4, (1, 0)),
        ("25%", "25%", 4, (1, 1)),
        ("25%", "25%", 10, (3, 2)),  # surge rounds up, unavailable down
        ("1%", "99%", 3, (1, 2)),
        ("100%", 0, 3, (3, 0)),
        (0, "50%", 3, (0, 1)),
    ],
    ids=["ints", "25%-of-4", "25%-of-10", "1%-99%-of-3", "100%-surge", "50%-unavailable-of-3"],
)
def test_limits_round_like_kubernetes(
    surge: int | str, unavailable: int | str, desired: int, expected: tuple[int, int]
) -> None:
    params = RollingParams(max_surge=surge, max_unavailable=unavailable)
    assert rolling.limits(params, desired) == expected


def test_both_zero_is_refused_at_validation_and_after_rounding() -> None:
    with pytest.raises(ValidationError, match="both be zero"):
        RollingParams(max_surge=0, max_unavailable="0%")
    with pytest.raises(rolling.InvalidPlan, match="both resolve to 0"):
        rolling.limits(RollingParams(max_surge=0, max_unavailable="20%"), 4)


def test_first_deployment_starts_everything() -> None:
    plan = rolling.plan(RollingParams(max_surge=1, max_unavailable=0), has_stable=False)
    assert isinstance(plan[-1], SetWeight) and plan[-1].candidate == 100


def test_batches_for_one_surge() -> None:
    plan = rolling.plan(RollingParams(max_surge=1, max_unavailable=0), has_stable=True, replicas=4)
    assert [(type(s).__name__, s.replicas) for s in plan if hasattr(s, "replicas")] == [
        ("ScaleCandidate", 1),
        ("ScaleStable", 3),
        ("ScaleCandidate", 2),
        ("ScaleStable", 2),
        ("ScaleCandidate", 3),
        ("ScaleStable", 1),
        ("ScaleCandidate", 4),
        ("ScaleStable", 0),
    ]


@given(
    desired=st.integers(1, 30),
    old=st.integers(0, 40),
    surge=st.integers(0, 10),
    unavailable=st.integers(0, 10),
)
def test_invariants_hold_at_every_observation(
    desired: int, old: int, surge: int, unavailable: int
) -> None:
    """Simulate the plan replica by replica: new ones start unready and become ready at the end
    of their step; old ones stop one by one. Kubernetes' checkRollingUpdateStatus, as a test."""
    if surge == 0 and unavailable == 0:
        return
    plan = rolling.batches(desired, surge, unavailable, old)
    running_old, new_ready = old, 0
    # Only the starting state may break the bounds (e.g. shrinking from more replicas).
    floor = min(desired - unavailable, old)
    for step in plan:
        if isinstance(step, ScaleCandidate):
            assert step.replicas > new_ready
            for starting in range(new_ready + 1, step.replicas + 1):
                assert running_old + starting <= max(desired + surge, old)
                assert running_old + new_ready >= floor
            new_ready = step.replicas
        else:
            assert isinstance(step, ScaleStable)
            assert step.replicas < running_old
            running_old = step.replicas
            assert running_old + new_ready >= floor
    assert (running_old, new_ready) == (0, desired)
    assert len(plan) <= 2 * (desired + old) + 2


@given(st.integers(0, 64), st.integers(0, 64))
def test_weights_follow_ready_replicas(new: int, old: int) -> None:
    w = rolling.weights_for("new", new, "old", old)
    assert sum(w.values()) == 100
    assert next(iter(w)) in ("new", "old")
    if new and old:
        assert abs(w["new"] - 100 * new / (new + old)) <= 1
        assert 0 < w["new"] < 100
    if old == 0:
        assert w == {"new": 100}


def test_the_plan_keeps_the_limits_and_stables_own_count_for_the_rollback() -> None:
    params = RollingParams(max_surge="25%", max_unavailable="25%")
    plan = rolling.rollout(params, has_stable=True, replicas=4, stable_replicas=2, stable_desired=6)
    assert plan.rolling == RollingLimits(
        replicas=4, stable_replicas=6, max_surge=1, max_unavailable=1
    )
    assert list(plan.steps) == rolling.plan(params, has_stable=True, replicas=4, stable_replicas=2)

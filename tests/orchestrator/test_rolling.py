"""Rolling updates through the executor on fakes: the invariants are asserted on every replica
change the fake runtime observed (running <= desired + surge, ready >= desired - unavailable)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.orchestrator.world import PipelineWorld

DESIRED = 4


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=DESIRED, rps=100.0)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def rolling_strategy(surge: int | str, unavailable: int | str) -> dict[str, Any]:
    return {"Rolling": {"max_surge": surge, "max_unavailable": unavailable}}


def assert_invariants(world: PipelineWorld, since: int, surge: int, unavailable: int) -> None:
    for _, running, ready in world.runtime.observations[since:]:
        assert running <= DESIRED + surge, world.runtime.observations[since:]
        assert ready >= DESIRED - unavailable, world.runtime.observations[since:]


def replicas_by_revision(world: PipelineWorld) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in world.runtime.services["api"].replicas.values():
        if r.alive and r.routable:
            out[r.revision] = out.get(r.revision, 0) + 1
    return out


@pytest.mark.parametrize(
    ("surge", "unavailable", "surge_n", "unavailable_n"),
    [(1, 0, 1, 0), (0, 1, 0, 1), (2, 1, 2, 1), ("25%", "25%", 1, 1), ("50%", 0, 2, 0)],
    ids=["surge-1", "unavailable-1", "surge-2-unavailable-1", "25%-25%", "50%-surge"],
)
async def test_rolling_update_keeps_the_invariants_and_ends_on_the_new_revision(
    world: PipelineWorld, surge: Any, unavailable: Any, surge_n: int, unavailable_n: int
) -> None:
    old = await world.first()
    assert replicas_by_revision(world) == {old: DESIRED}
    mark = len(world.runtime.observations)
    doc = await world.deploy("bbbb2222", rolling_strategy(surge, unavailable))
    assert doc["status"] == "Success", doc.get("error")
    new = doc["green_revision"]
    assert_invariants(world, mark, surge_n, unavailable_n)
    assert replicas_by_revision(world) == {new: DESIRED}
    assert world.weights() == {new: 100}
    assert world.runtime.running_revisions("api") == {new}
    # Weights followed the ready replicas: the candidate's share only grew.
    shares = [w.get(new, 0) for w in world.history()[-20:] if new in w or old in w]
    assert shares == sorted(shares)
    svc = world.store.get_service("api", "local")
    assert svc is not None and svc.serving_revision == new


async def test_weights_are_proportional_to_ready_replicas(world: PipelineWorld) -> None:
    old = await world.first()
    doc = await world.deploy("cccc3333", rolling_strategy(1, 0))
    new = doc["green_revision"]
    split = [w for w in world.history() if len(w) == 2]
    assert split == [
        {new: 20, old: 80},  # 1 new + 4 old (surge)
        {new: 25, old: 75},  # 1 + 3
        {new: 40, old: 60},  # 2 + 3
        {new: 50, old: 50},
        {new: 60, old: 40},
        {new: 75, old: 25},
        {new: 80, old: 20},
    ]


async def test_a_new_replica_that_never_gets_healthy_rolls_back_to_full_strength(
    world: PipelineWorld,
) -> None:
    old = await world.first()
    mark = len(world.runtime.observations)
    doc = await world.submit("dddd4444", rolling_strategy(1, 1))
    new = world.revision("dddd4444", doc)
    # The first batch (2 replicas) gets healthy; the second batch never does.
    healthy: set[str] = set()

    def script(replica: Any, n: int) -> bool:
        if len(healthy) < 2 or replica.replica_id in healthy:
            healthy.add(replica.replica_id)
            return True
        return False

    world.prober.scripts[new] = script
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack", final.get("error")
    assert final["error"]["type"] == "HealthCheckFailed"
    assert replicas_by_revision(world) == {old: DESIRED}
    assert world.weights() == {old: 100}
    assert world.runtime.running_revisions("api") == {old}
    assert_invariants(world, mark, 1, 1)
    events = [r.event_type for r in await world.events(doc["id"])]
    assert "rollback.batch" in events


async def test_percentages_resolving_to_zero_are_refused_before_anything_starts(
    world: PipelineWorld,
) -> None:
    old = await world.first()
    started = len(world.runtime.started)
    doc = await world.deploy("eeee5555", rolling_strategy(0, "20%"))  # floor(0.8) = 0
    assert doc["status"] == "Failed"
    assert "both resolve to 0" in doc["error"]["message"]
    assert len(world.runtime.started) == started
    assert world.weights() == {old: 100}


async def test_first_rolling_deployment_starts_every_replica(world: PipelineWorld) -> None:
    doc = await world.deploy("ffff6666", rolling_strategy(1, 0))
    assert doc["status"] == "Success", doc.get("error")
    assert replicas_by_revision(world) == {doc["green_revision"]: DESIRED}

"""Two control-plane replicas (two ``Pipeline``s, ``a`` and ``b``) on one database, SQLite file
and PostgreSQL, over one fake data plane and one fake clock: a dead driver's deployment is taken
over when its lease expires and ends as it would have; a paused driver that wakes after the
takeover writes nothing and stops; ``promote`` and ``abort`` sent to the replica that does not
drive are applied by the one that does (abort within a second); concurrent submits for one
service across both replicas accept exactly one, fleets included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shipyard.domain.clock import threads_idle
from shipyard.domain.models import DeploymentRequest
from shipyard.errors import DeploymentInProgress, LeaseLost
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.store.leases import JANITOR, LeaseStore, deployment_lease
from tests.orchestrator.world import PipelineWorld, doc

LEASE = 10.0


@dataclass
class Replicas:
    world: PipelineWorld
    a: Pipeline
    b: Pipeline

    def lease(self, deployment_id: str) -> tuple[str, int]:
        row = LeaseStore(self.world.store.engine).get(deployment_lease(deployment_id))
        assert row is not None
        return row.holder, row.token


@pytest.fixture(params=["sqlite", "postgresql"])
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Replicas]:
    database = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    world = PipelineWorld(
        tmp_path, replicas=1, rps=100.0, database=database, regions=("local", "eu")
    )
    a = world.pipeline = world.new_pipeline("a", LEASE)
    await a.start()  # first: it holds the janitor lease
    b = world.new_pipeline("b", LEASE)
    await b.start()
    yield Replicas(world, a, b)
    await b.stop()
    await a.stop()
    await threads_idle()  # reads of cancelled tasks still hold connections
    world.store.engine.dispose()


def blue_green(bake: int = 60) -> dict[str, Any]:
    return {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": bake}}


def gated_canary() -> dict[str, Any]:
    stages = [{"weight": 10, "duration_seconds": 60, "pause": True}, {"weight": 50}]
    return {"Canary": {"stages": stages, "scale_down_delay_seconds": 30}}


async def events(world: PipelineWorld, deployment_id: str) -> list[str]:
    return [e.event_type for e in await world.audit.records(deployment_id=deployment_id)]


async def test_a_dead_drivers_deployment_is_taken_over_and_ends_as_planned(
    replicas: Replicas,
) -> None:
    world, a, b = replicas.world, replicas.a, replicas.b
    stable = await world.first()
    submitted = await world.submit("bbbb2222", blue_green(bake=60))
    await world.until(submitted["id"], "Baking")
    assert replicas.lease(submitted["id"]) == ("a", 1)
    # One janitor (reconciler, checkpoints) among the replicas: the janitor lease's holder.
    assert a._janitor_task is not None and b._janitor_task is None
    died_at = world.clock.now()
    await a.stop(release=False)  # kill -9: its leases expire in their own time
    final = doc(await b.wait(submitted["id"], timeout=60))
    assert final["status"] == "Success", final.get("error")
    green = final["green_revision"]
    assert world.weights() == {green: 100}
    assert replicas.lease(submitted["id"])[1] == 2
    taken = [
        e
        for e in await world.audit.records(deployment_id=submitted["id"])
        if e.event_type == "deployment.taken_over"
    ]
    assert [(t.detail["from"], t.detail["to"]) for t in taken] == [("a", "b")]
    # Taken over once the lease expired (renewed every lease/4), within a takeover pass.
    taken_at = taken[0].timestamp.timestamp()
    assert died_at + LEASE * 3 / 4 <= taken_at <= died_at + LEASE + 1.5
    # Every step's effect once: one switch to the candidate, one success.
    kinds = await events(world, submitted["id"])
    assert kinds.count("deployment.success") == 1
    assert [w for w in world.history() if w == {green: 100}] == [{green: 100}]
    assert stable not in world.weights()
    # The janitor moved to b too (a's lease expired).
    janitor = LeaseStore(world.store.engine).get(JANITOR)
    assert janitor is not None and janitor.holder == "b"
    assert b._janitor_task is not None and not b._janitor_task.done()


async def test_a_paused_driver_that_wakes_after_the_takeover_writes_nothing(
    replicas: Replicas,
) -> None:
    """``a`` stops renewing (SIGSTOP of its lease upkeep) while its task bakes: ``b`` takes the
    deployment over; when ``a``'s task wakes and writes, the write is refused (LeaseLost), the
    task stops, and the deployment ends once, by ``b``."""
    world, a, b = replicas.world, replicas.a, replicas.b
    await world.first()
    submitted = await world.submit("cccc3333", blue_green(bake=120))
    await world.until(submitted["id"], "Baking")
    stale_task = a._tasks[submitted["id"]]
    await a.driver.stop()  # no renewals, no self-fencing: only the database can stop it now
    refused: list[LeaseLost] = []
    save = world.store.save_deployment  # in the worker thread, where the fence is checked

    def watched(doc: dict[str, Any], *, active: bool) -> None:
        try:
            save(doc, active=active)
        except LeaseLost as exc:
            refused.append(exc)
            raise

    world.store.save_deployment = watched  # type: ignore[method-assign]
    final = doc(await b.wait(submitted["id"], timeout=300))
    assert final["status"] == "Success", final.get("error")
    await asyncio.wait({stale_task}, timeout=10)
    assert stale_task.cancelled()  # stopped at its first refused write
    assert refused, "a's task never tried to write after the takeover"
    assert all(e.detail["token"] == 1 for e in refused)
    assert replicas.lease(submitted["id"])[0] == "b"
    kinds = await events(world, submitted["id"])
    assert kinds.count("deployment.success") == 1
    assert kinds.count("deployment.taken_over") == 1
    assert deployment_lease(submitted["id"]) not in a.driver.held


async def test_promote_sent_to_the_other_replica_is_applied_by_the_driver(
    replicas: Replicas,
) -> None:
    world, b = replicas.world, replicas.b
    await world.first()
    submitted = await world.submit("dddd4444", gated_canary())  # driven by a
    await world.until(submitted["id"], lambda d: d["progress"]["paused"] is not None)
    answer = await b.promote(submitted["id"], "bob")
    assert answer.status.value == "Paused"
    final = doc(await b.wait(submitted["id"], timeout=120))
    assert final["status"] == "Success", final.get("error")
    gate = next(s for s in final["stages"] if s["name"] == "gate_1")
    assert gate["detail"]["promoted_by"] == "bob"
    assert replicas.lease(submitted["id"]) == ("a", 1)  # nobody took it over
    assert not LeaseStore(world.store.engine).pending(submitted["id"])


async def test_abort_sent_to_the_other_replica_takes_weight_to_zero_within_a_second(
    replicas: Replicas,
) -> None:
    world, b = replicas.world, replicas.b
    stable = await world.first()
    submitted = await world.submit("eeee5555", gated_canary())  # driven by a
    await world.until(submitted["id"], lambda d: d["progress"]["paused"] is not None)
    asked = world.clock.now()
    await b.abort(submitted["id"], "carol")
    final = doc(await b.wait(submitted["id"], timeout=120))
    assert final["status"] == "RolledBack", final.get("error")
    assert final["error"]["aborted_by"] == "carol"
    assert world.weights() == {stable: 100}
    latency = final["metrics"]["abort_latency_ms"]
    assert latency is not None and latency < 1000
    zero = [
        e
        for e in await world.audit.records(deployment_id=submitted["id"])
        if e.event_type == "canary.weight_zero"
    ]
    assert len(zero) == 1 and zero[0].timestamp.timestamp() - asked < 1.0


async def test_a_command_for_a_deployment_nobody_drives_waits_for_the_next_driver(
    replicas: Replicas,
) -> None:
    world, a, b = replicas.world, replicas.a, replicas.b
    await world.first()
    submitted = await world.submit("ffff6666", gated_canary())
    await world.until(submitted["id"], lambda d: d["progress"]["paused"] is not None)
    await a.stop(release=False)
    await b.promote(submitted["id"], "bob")  # a is gone; b does not drive it yet
    assert len(LeaseStore(world.store.engine).pending(submitted["id"])) == 1
    final = doc(await b.wait(submitted["id"], timeout=120))
    assert final["status"] == "Success", final.get("error")
    assert replicas.lease(submitted["id"])[0] == "b"
    assert not LeaseStore(world.store.engine).pending(submitted["id"])


def request(commit: str, regions: list[str]) -> DeploymentRequest:
    target: dict[str, Any] = {"service_name": "api", "regions": regions}
    if len(regions) == 1:
        target = {"service_name": "api", "region": regions[0]}
    return DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": commit},
            "target": target,
            "strategy": blue_green(bake=0),
        }
    )


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param([["local"]] * 10, id="one-region"),
        # Each overlaps every other in region eu (a fleet's second region: the store's own
        # unique index keys a record by its first region only).
        pytest.param([["local", "eu"], ["eu"]] * 5, id="fleet"),
    ],
)
async def test_concurrent_submits_across_replicas_accept_exactly_one(
    replicas: Replicas, shapes: list[list[str]]
) -> None:
    pipelines = [replicas.a, replicas.b]

    async def submit(i: int, regions: list[str]) -> str:
        try:
            await pipelines[i % 2].submit(request(f"{i:04d}abcd", regions), "alice")
        except DeploymentInProgress:
            return "409"
        return "202"

    answers = await asyncio.gather(*(submit(i, r) for i, r in enumerate(shapes)))
    assert answers.count("202") == 1, answers
    active = replicas.world.store.active_deployments()
    assert len(active) == 1
    winner = active[0]["id"]
    final = doc(await pipelines[answers.index("202") % 2].wait(winner, timeout=120))
    assert final["status"] == "Success", final.get("error")


async def test_a_replica_that_cannot_renew_stops_driving_within_a_lease(
    replicas: Replicas,
) -> None:
    """Self-fencing: ``a`` loses the database for its renewals; past a lease without one it
    cancels its driving task (no rollback, nothing written) and ``b``, which took the expired
    lease over meanwhile, finishes the deployment."""
    world, a, b = replicas.world, replicas.a, replicas.b
    await world.first()
    submitted = await world.submit("abab7777", blue_green(bake=120))
    await world.until(submitted["id"], "Baking")
    task = a._tasks[submitted["id"]]

    async def unreachable(*_: object, **__: object) -> set[str]:
        raise ConnectionError("database unreachable")

    a.leases.renew = unreachable  # type: ignore[method-assign]
    cut = world.clock.now()
    await asyncio.wait({task}, timeout=30)
    assert task.cancelled()
    fenced_at = world.clock.now()
    assert cut + LEASE * 3 / 4 <= fenced_at <= cut + LEASE + LEASE / 4 + 0.01
    assert a.driver.held == {}
    final = doc(await b.wait(submitted["id"], timeout=120))
    assert final["status"] == "Success", final.get("error")
    kinds = await events(world, submitted["id"])
    assert kinds.count("deployment.success") == 1
    assert kinds.count("deployment.taken_over") == 1


async def test_a_deployment_its_driver_could_not_carry_on_is_resumed_after_a_lease(
    replicas: Replicas,
) -> None:
    """The driving task dies of an unexpected error before it could even record a failure: its
    lease is no longer renewed, so a replica resumes it once the lease expired (not never)."""
    world, a = replicas.world, replicas.a
    await world.first()
    get = a.records.get
    failures = [RuntimeError("the store hiccuped")]
    test = asyncio.current_task()

    async def flaky(deployment_id: str) -> Any:
        if failures and asyncio.current_task() is not test:  # the driving task's first read
            raise failures.pop()
        return await get(deployment_id)

    a.records.get = flaky  # type: ignore[method-assign]
    submitted = await world.submit("acac8888", blue_green(bake=0))
    final = doc(await a.wait(submitted["id"], timeout=60))
    assert final["status"] == "Success", final.get("error")
    assert not failures
    kinds = await events(world, submitted["id"])
    assert "deployment.resumed" in kinds or "deployment.taken_over" in kinds

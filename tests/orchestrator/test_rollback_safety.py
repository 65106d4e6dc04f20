"""Rollback you can trust: the service record never says something false, the reconciler repairs
toward the store, and a deployment never silently turns into a "first deploy".

Each test here failed on the code before issue 7 (the instant rollback left the serving revision
marked warm, so the janitor retired it or the next deployment stopped it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import update

from shipyard.domain.manifest import parse_manifest
from shipyard.errors import Conflict, InvariantViolation
from shipyard.runtime.base import ReplicaStatus
from shipyard.store import db
from tests.orchestrator.world import PipelineWorld, progressive


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def serving(world: PipelineWorld) -> str | None:
    svc = world.store.get_service("api", "local")
    return svc.serving_revision if svc else None


def routable(world: PipelineWorld, revision: str) -> int:
    return sum(
        1
        for r in world.runtime.services["api"].replicas.values()
        if r.revision == revision and r.alive and r.routable
    )


async def audited(world: PipelineWorld, event_type: str) -> list[dict[str, object]]:
    return [dict(r.detail) for r in await world.audit.records() if r.event_type == event_type]


async def test_instant_rollback_is_not_retired_when_the_warm_window_ends(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=30)
    v1 = first["green_revision"]
    rb = await world.wait((await world.rollback(second["id"], "bob"))["id"])
    assert rb["status"] == "Success", rb.get("error")
    svc = world.store.get_service("api", "local")
    assert svc is not None
    assert (svc.serving_revision, svc.warm_revision, svc.warm_until) == (v1, None, None)
    # Long past the old warm window: the janitor must leave the serving revision alone.
    await world.clock.sleep(120)
    await world.pipeline.retire_expired()
    await world.pipeline.reconcile_data_planes()
    assert world.weights() == {v1: 100}
    assert routable(world, v1) == 1
    assert await audited(world, "revision.retired") == []


async def test_the_deployment_after_an_instant_rollback_bakes_and_keeps_stable_up(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0)
    await world.wait((await world.rollback(second["id"], "bob"))["id"])
    v1 = first["green_revision"]
    switches = len(world.history())
    third = await world.deploy("cccc3333", bake_seconds=10)
    assert third["status"] == "Success", third.get("error")
    assert third["blue_revision"] == v1  # not a "first deploy"
    assert "bake" in [s["name"] for s in third["stages"]]
    # The only switch is v1 -> v3 once v3 was healthy: v1 served until then.
    assert world.history()[switches:] == [{third["green_revision"]: 100}]
    svc = world.store.get_service("api", "local")
    assert svc is not None and svc.warm_revision == v1


async def test_an_earlier_deployment_can_be_rolled_back_cold(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111", scale_down_delay_seconds=1)
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=1)
    third = await world.deploy("cccc3333", bake_seconds=0, scale_down_delay_seconds=1)
    await world.clock.sleep(5)
    await world.pipeline.retire_expired()
    v1, v3 = first["green_revision"], third["green_revision"]
    assert world.runtime.running_revisions("api") == {v3}
    # Rolling back the *second* deployment puts back what served before it: v1, cold.
    rb = await world.wait((await world.rollback(second["id"], "bob"))["id"])
    assert rb["status"] == "Success", rb.get("error")
    assert rb["strategy"] == {"Rollback": {"instant": False}}
    assert (rb["blue_revision"], rb["green_revision"]) == (v3, v1)
    assert [s["name"] for s in rb["stages"]] == ["start", "health_check", "switch"]
    assert world.weights() == {v1: 100}
    assert world.runtime.running_revisions("api") == {v1}
    assert serving(world) == v1
    with pytest.raises(Conflict, match="RolledBack"):
        await world.rollback(second["id"], "bob")  # undone already
    # The third deployment's rollback restores v2 (cold), the one that served before it.
    rb3 = await world.wait((await world.rollback(third["id"], "bob"))["id"])
    assert rb3["status"] == "Success", rb3.get("error")
    assert world.weights() == {second["green_revision"]: 100}


async def test_a_deployment_refused_at_planning_changes_nothing(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=60)
    before = world.store.get_service("api", "local")
    assert before is not None and before.warm_revision == first["green_revision"]
    from shipyard.domain.models import DeploymentRequest

    sticky = DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "cccc3333"},
            "target": {"service_name": "api", "region": "local"},
            "strategy": {
                "Canary": {"stages": [{"weight": 10, "duration_seconds": 5, "sticky": True}]}
            },
        }
    )
    doc = await world.wait((await world.submit_request(sticky))["id"])
    assert doc["status"] == "Failed"
    assert "sticky" in doc["error"]["message"]
    assert world.store.get_service("api", "local") == before
    assert world.runtime.running_revisions("api") == {
        first["green_revision"],
        second["green_revision"],
    }


async def test_a_deployment_that_finds_no_ready_stable_refuses_to_run(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    v1 = first["green_revision"]
    for r in list(world.runtime.services["api"].replicas.values()):
        world.runtime.services["api"].replicas[r.replica_id] = replace(
            r, state="crashed", routable=False
        )
    started = len(world.runtime.started)
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Failed"
    assert doc["error"]["type"] == "StableRevisionMissing"
    assert v1 in doc["error"]["message"] and "nothing was changed" in doc["error"]["message"]
    assert len(world.runtime.started) == started  # no candidate was started
    assert serving(world) == v1


async def test_the_store_refuses_a_serving_revision_that_is_also_warm(world: PipelineWorld) -> None:
    await world.deploy("aaaa1111")
    rev = serving(world)
    with pytest.raises(InvariantViolation, match="both serving and warm"):
        world.store.upsert_service("api", "local", warm_revision=rev, warm_until=1.0)
    svc = world.store.get_service("api", "local")
    assert svc is not None and svc.warm_revision is None  # nothing was written


async def test_the_reconciler_repairs_a_record_written_by_an_older_shipyard(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    v1 = first["green_revision"]
    with world.store.engine.begin() as conn:  # what the old instant rollback left behind
        conn.execute(update(db.services).values(warm_revision=v1, warm_until=world.clock.now() + 5))
    await world.pipeline.reconcile_data_planes()
    await world.clock.sleep(10)
    await world.pipeline.retire_expired()
    assert world.weights() == {v1: 100}
    assert routable(world, v1) == 1
    repaired = await audited(world, "service.repaired")
    assert repaired and "also marked warm" in str(repaired[0]["problem"])


async def test_the_reconciler_starts_the_serving_revision_when_the_region_lost_it(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    v1 = first["green_revision"]
    world.runtime.services["api"].replicas.clear()  # e.g. an agent that lost its state
    world.runtime.services["api"].weights = {}
    await world.pipeline.reconcile_data_planes()
    assert world.weights() == {v1: 100}
    assert routable(world, v1) == 1
    (repaired,) = await audited(world, "data_plane.drift")
    assert repaired["revision"] == v1
    assert "no replica of the serving revision" in str(repaired["problem"])
    assert (repaired["drift"], repaired["expected"], repaired["found"]) == (
        "serving_revision",
        v1,
        [],
    )
    assert repaired["restored"] is True


async def test_the_reconciler_routes_all_traffic_back_to_the_serving_revision(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    v1 = first["green_revision"]
    world.runtime.services["api"].weights = {}  # the router lost its weights
    await world.pipeline.reconcile_data_planes()
    assert world.weights() == {v1: 100}
    (drift,) = await audited(world, "data_plane.drift")
    assert (drift["drift"], drift["revision"]) == ("weights", v1)
    assert (drift["expected"], drift["found"]) == ({v1: 100}, {})


async def test_restarts_crash_loops_and_outages_are_audited(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    v1 = first["green_revision"]
    replicas = world.runtime.services["api"].replicas
    (rid,) = replicas
    await world.pipeline.reconcile_data_planes()
    replicas[rid] = replace(replicas[rid], state="crashed", routable=False, restarts=3, exit_code=9)
    await world.pipeline.reconcile_data_planes()
    await world.pipeline.reconcile_data_planes()  # reported once, not every pass
    (restarted,) = await audited(world, "replica.restarted")
    assert (restarted["replica"], restarted["restarts"], restarted["exit_code"]) == (rid, 3, 9)
    assert len(await audited(world, "replica.crash_loop")) == 1
    (down,) = await audited(world, "service.unavailable")
    assert down["revision"] == v1
    replicas[rid] = replace(replicas[rid], state="running", routable=True, restarts=4)
    await world.pipeline.reconcile_data_planes()
    assert len(await audited(world, "service.available")) == 1
    assert [d["restarts"] for d in await audited(world, "replica.restarted")] == [3, 4]


async def test_a_failed_rolling_update_that_changed_replicas_restores_stable_capacity(
    tmp_path: Path,
) -> None:
    world = PipelineWorld(tmp_path, replicas=4, rps=100.0)
    await world.pipeline.start()
    try:
        old = await world.first()
        assert routable(world, old) == 4
        world.builder.manifest = parse_manifest(progressive(replicas=2))
        doc = await world.submit("dddd4444", {"Rolling": {"max_surge": 1, "max_unavailable": 1}})
        new = world.revision("dddd4444", doc)
        healthy: set[str] = set()

        def script(replica: ReplicaStatus, n: int) -> bool:  # the first replica only
            rid = replica.replica_id
            if not healthy or rid in healthy:
                healthy.add(rid)
                return True
            return False

        world.prober.scripts[new] = script
        final = await world.wait(doc["id"])
        assert final["status"] == "RolledBack", final.get("error")
        assert routable(world, old) == 4  # as it was, not the release's 2
        assert world.weights() == {old: 100}
    finally:
        await world.pipeline.stop()


async def test_a_failed_deployment_keeps_the_instant_rollback_window(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=300)
    v1, v2 = first["green_revision"], second["green_revision"]
    doc = await world.deploy("cccc3333", wait=False, bake_seconds=30)
    world.prober.scripts[f"cccc333-{doc['id'][:8]}"] = lambda r, n: n < 3  # fails in the bake
    failed = await world.wait(doc["id"])
    assert failed["status"] == "RolledBack"
    svc = world.store.get_service("api", "local")
    assert svc is not None and (svc.serving_revision, svc.warm_revision) == (v2, v1)
    assert world.runtime.running_revisions("api") == {v1, v2}
    rb = await world.wait((await world.rollback(second["id"], "bob"))["id"])
    assert rb["strategy"] == {"Rollback": {"instant": True}}
    assert world.weights() == {v1: 100}


async def test_a_successful_deployment_retires_the_revision_kept_warm_before(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=300)
    third = await world.deploy("cccc3333", bake_seconds=0, scale_down_delay_seconds=300)
    svc = world.store.get_service("api", "local")
    assert svc is not None and svc.warm_revision == second["green_revision"]
    assert world.runtime.running_revisions("api") == {
        second["green_revision"],
        third["green_revision"],
    }
    retired = await audited(world, "revision.retired")
    assert retired == [
        {
            "revision": first["green_revision"],
            "reason": "superseded",
            "trace_id": third["trace_id"],  # retired by the third deployment, in its trace
        }
    ]

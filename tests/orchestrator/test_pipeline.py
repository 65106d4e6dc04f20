"""The pipeline end to end on fakes: fake runtime/router, scripted health, fake clock.

Long waits (switch delays, bake windows) cost nothing: the FakeClock jumps to the next wake-up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.domain.models import DeploymentRequest
from shipyard.errors import Conflict, DeploymentInProgress, UnknownRegion
from tests.orchestrator.world import PipelineWorld, crash_when_persisted, restart


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def test_first_deployment_routes_everything_to_the_only_revision(
    world: PipelineWorld,
) -> None:
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Success", doc.get("error")
    green = doc["green_revision"]
    assert doc["blue_revision"] is None
    assert world.weights() == {green: 100}
    assert [s["name"] for s in doc["stages"]] == ["build", "start", "health_check", "switch"]
    assert doc["result"]["revision"] == green
    assert doc["metrics"]["build_duration_ms"] == 1234
    assert doc["metrics"]["validation"]["build_time_ok"] is True


async def test_blue_green_switches_after_health_and_delay_then_keeps_blue_warm(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    blue = first["green_revision"]
    t0 = world.clock.now()
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Success", doc.get("error")
    green = doc["green_revision"]
    assert doc["blue_revision"] == blue
    assert [s["name"] for s in doc["stages"]] == [
        "build",
        "start",
        "health_check",
        "switch_delay",
        "switch",
        "bake",
    ]
    # Traffic moved in one atomic step: never split, never on a revision that is not ready.
    assert world.history()[-1] == {green: 100}
    assert all(len(w) == 1 for w in world.history())
    # The switch waited for the delay and the bake ran its whole window on the fake clock.
    assert world.clock.now() - t0 >= 30 + 60
    # Blue stays warm for the scale-down delay, then the janitor stops it.
    assert world.runtime.running_revisions("api") == {blue, green}
    await world.clock.sleep(31)
    await world.pipeline.retire_expired()
    assert world.runtime.running_revisions("api") == {green}


async def test_green_that_never_gets_healthy_never_receives_traffic(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    blue = first["green_revision"]
    switches_before = len(world.history())
    doc = await world.deploy("cccc3333", wait=False)
    world.prober.scripts[f"cccc333-{doc['id'][:8]}"] = lambda r, n: False
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["type"] == "HealthCheckFailed"
    assert final["error"]["attempts"] == 3  # failure_threshold consecutive failures
    assert final["rollback_count"] == 1
    # Green got no traffic at any moment; blue kept 100%.
    assert all(w == {blue: 100} for w in world.history()[switches_before:])
    assert world.runtime.running_revisions("api") == {blue}


async def test_crashing_green_fails_at_once(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    blue = first["green_revision"]
    doc = await world.deploy("dddd4444", wait=False)
    green = f"dddd444-{doc['id'][:8]}"

    def crash_on_probe(replica: Any, n: int) -> bool:
        world.runtime.crash(replica.replica_id, exit_code=3)
        return False

    world.prober.scripts[green] = crash_on_probe
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert "crashed (exit code 3)" in final["error"]["message"]
    assert world.weights() == {blue: 100}


async def test_unhealthy_during_bake_switches_back_to_blue(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    blue = first["green_revision"]
    doc = await world.deploy("eeee5555", wait=False)
    green = f"eeee555-{doc['id'][:8]}"
    # Healthy through the gate (2 probes), then failing from the 5th probe on (inside the bake).
    world.prober.scripts[green] = lambda r, n: n < 5
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert world.history()[-2:] == [{green: 100}, {blue: 100}]
    assert world.runtime.running_revisions("api") == {blue}
    assert final["metrics"]["detection_to_rollback_ms"] is not None
    assert final["metrics"]["validation"]["rollback_time_ok"] is True
    names = [s["name"] for s in final["stages"]]
    assert names[-2:] == ["bake", "rollback"]
    svc = world.store.get_service("api", "local")
    assert svc is not None and svc.serving_revision == blue


async def test_start_failure_and_build_failure_end_failed_without_touching_traffic(
    world: PipelineWorld,
) -> None:
    first = await world.deploy("aaaa1111")
    blue = first["green_revision"]
    world.builder.fail.add("ffff6666")
    failed_build = await world.deploy("ffff6666")
    assert failed_build["status"] == "Failed"
    assert failed_build["error"]["type"] == "BuildFailed"
    assert world.weights() == {blue: 100}
    assert world.runtime.running_revisions("api") == {blue}


async def test_one_deployment_per_service_at_a_time(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111", wait=False)
    with pytest.raises(DeploymentInProgress) as exc:
        await world.deploy("bbbb2222", wait=False)
    assert exc.value.detail["running_deployment_id"] == first["id"]
    assert (await world.wait(first["id"]))["status"] == "Success"


async def test_unknown_region_is_refused_before_anything(
    world: PipelineWorld,
) -> None:
    req = DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd"},
            "target": {"service_name": "api", "region": "mars"},
            "strategy": {"BlueGreen": {"switch_delay_seconds": 0}},
        }
    )
    with pytest.raises(UnknownRegion, match="mars"):
        await world.submit_request(req)
    assert world.store.list_deployments() == []
    assert world.builder.built == []


async def test_manual_rollback_is_instant_while_blue_is_warm(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0)
    rb = await world.rollback(second["id"], "bob")
    final = await world.wait(rb["id"])
    assert final["status"] == "Success", final.get("error")
    assert final["strategy"] == {"Rollback": {"instant": True}}
    assert world.weights() == {first["green_revision"]: 100}
    assert world.runtime.running_revisions("api") == {first["green_revision"]}
    undone = world.store.get_deployment(second["id"])
    assert undone["status"] == "RolledBack"
    assert undone["rolled_back_by"] == rb["id"]
    with pytest.raises(Conflict):
        await world.rollback(second["id"], "bob")


async def test_manual_rollback_restarts_a_cold_revision_health_gated(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=5)
    await world.clock.sleep(6)
    await world.pipeline.retire_expired()
    assert world.runtime.running_revisions("api") == {second["green_revision"]}
    rb = await world.rollback(second["id"], "bob")
    final = await world.wait(rb["id"])
    assert final["status"] == "Success"
    assert final["strategy"] == {"Rollback": {"instant": False}}
    assert [s["name"] for s in final["stages"]] == ["start", "health_check", "switch"]
    assert world.weights() == {first["green_revision"]: 100}


async def test_first_deployment_cannot_be_rolled_back(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    with pytest.raises(Conflict, match="first"):
        await world.rollback(first["id"], "bob")


async def test_control_plane_restart_resumes_mid_bake_and_finishes(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    crashed = crash_when_persisted(world, "Baking")
    doc = await world.deploy("bbbb2222", wait=False)
    await asyncio.wait_for(crashed.wait(), 5)
    assert world.store.get_deployment(doc["id"])["status"] == "Baking"
    await restart(world)
    final = await world.wait(doc["id"])
    assert final["status"] == "Success"
    assert world.weights() == {final["green_revision"]: 100}
    assert world.runtime.running_revisions("api") == {
        first["green_revision"],
        final["green_revision"],
    }
    events = [r.event_type for r in await world.audit.records(deployment_id=doc["id"])]
    assert "deployment.resumed" in events


@pytest.mark.parametrize(
    "stop_at", ["Pending", "Building", "Deploying", "AwaitingSwitch", "Switching", "Baking"]
)
async def test_restart_at_any_stage_ends_cleanly(world: PipelineWorld, stop_at: str) -> None:
    await world.deploy("aaaa1111")
    crashed = crash_when_persisted(world, stop_at)
    doc = await world.deploy("bbbb2222", wait=False, bake_seconds=5)
    if stop_at != "Pending":
        await asyncio.wait_for(crashed.wait(), 5)
    await restart(world)
    final = await world.wait(doc["id"])
    assert final["status"] == "Success"
    # Never split, never an orphan: exactly the two expected revisions run, all traffic on green.
    assert world.weights() == {final["green_revision"]: 100}
    assert world.runtime.running_revisions("api") == {
        final["blue_revision"],
        final["green_revision"],
    }


async def test_restart_during_rollback_finishes_the_rollback(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    crashed = crash_when_persisted(world, "RollingBack")
    doc = await world.deploy("bbbb2222", wait=False)
    world.prober.scripts[f"bbbb222-{doc['id'][:8]}"] = lambda r, n: n < 4
    await asyncio.wait_for(crashed.wait(), 5)
    await restart(world)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert world.weights() == {first["green_revision"]: 100}
    assert world.runtime.running_revisions("api") == {first["green_revision"]}


async def test_restart_reconciles_orphans_and_split_traffic(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111")
    blue = first["green_revision"]
    from shipyard.runtime.base import RevisionSpec

    orphan = await world.runtime.start_revision(
        RevisionSpec("api", "orphan-1", "sha256:x", "/x", ["true"])
    )
    await world.runtime.set_routable("api", [orphan[0].replica_id], True)
    await world.runtime.router.set_weight("api", {blue: 50, "orphan-1": 50})
    await world.pipeline.stop()
    world.pipeline = world.new_pipeline()
    await world.pipeline.start()
    assert world.weights() == {blue: 100}
    assert world.runtime.running_revisions("api") == {blue}


async def test_every_action_is_audited_with_the_adr_fields(world: PipelineWorld) -> None:
    doc = await world.deploy("aaaa1111")
    records = await world.audit.records(deployment_id=doc["id"])
    types = [r.event_type for r in records]
    assert types[0] == "deployment.requested"
    assert types[-1] == "deployment.success"
    for needed in (
        "build.succeeded",
        "revision.started",
        "health_check.passed",
        "traffic.switched",
    ):
        assert needed in types
    last = records[-1]
    assert (last.service, last.region, last.user, last.status) == (
        "api",
        "local",
        "alice",
        "Success",
    )
    assert last.duration_ms is not None
    assert world.audit.verify().ok


async def test_duplicate_request_id_is_refused(world: PipelineWorld) -> None:
    rid = uuid.uuid4()
    req = DeploymentRequest.model_validate(
        {
            "id": str(rid),
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd"},
            "target": {"service_name": "api"},
            "strategy": {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0}},
        }
    )
    doc = await world.submit_request(req)
    await world.wait(doc["id"])
    with pytest.raises(Conflict, match="already exists"):
        await world.submit_request(req)


async def test_an_image_artifact_is_refused_by_a_directory_runtime(world: PipelineWorld) -> None:
    """builder = "docker" makes an OCI image; a data plane without containers (an agent with no
    Docker Engine) runs directories only: say so before anything starts."""
    world.builder.artifact_kind = "oci-image"
    world.runtime.artifact_kinds = ("directory",)
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Failed"
    assert "runs directory artifacts" in doc["error"]["message"]
    assert world.runtime.started == []


async def test_an_unexpected_error_ends_the_deployment_failed_not_dangling(
    world: PipelineWorld,
) -> None:
    async def broken_build(request: Any) -> Any:
        raise RuntimeError("bug in a builder")

    world.builder.build = broken_build  # type: ignore[method-assign]
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Failed"
    assert doc["error"]["message"] == "internal error: RuntimeError('bug in a builder')"
    assert world.store.active_deployments() == []

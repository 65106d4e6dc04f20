"""Which revision serves: a switch is verified, ``mark_serving`` clears a warm mark in the same
write, and nothing stops the revision the store says serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.domain.models import DeploymentRequest
from shipyard.errors import InvariantViolation, TrafficSwitchFailed
from shipyard.orchestrator import serving
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.record import DeploymentRecord
from shipyard.runtime.base import RevisionSpec
from tests.orchestrator.world import PipelineWorld


@pytest.fixture
async def world(tmp_path: Path) -> PipelineWorld:
    world = PipelineWorld(tmp_path)
    for revision in ("v1", "v2"):
        (replica,) = await world.runtime.start_revision(
            RevisionSpec("api", revision, "sha256:x", "/x", ["true"])
        )
        await world.runtime.set_routable("api", [replica.replica_id], True)
    return world


def context(world: PipelineWorld) -> DeploymentContext:
    request = DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd"},
            "target": {"service_name": "api"},
            "strategy": {"BlueGreen": {"switch_delay_seconds": 0}},
        }
    )
    record = DeploymentRecord.submitted(request, "alice", world.clock.now(), "v1")
    return DeploymentContext(world.pipeline.deps, record)


async def test_a_warm_revision_that_serves_again_is_no_longer_warm(world: PipelineWorld) -> None:
    world.store.upsert_service("api", "local", serving_revision="v2")
    world.store.upsert_service("api", "local", warm_revision="v1", warm_until=1e10)
    await serving.mark_serving(context(world), "v1")
    svc = world.store.get_service("api", "local")
    assert svc is not None
    assert (svc.serving_revision, svc.warm_revision, svc.warm_until) == ("v1", None, None)


async def test_the_serving_revision_is_never_stopped(world: PipelineWorld) -> None:
    world.store.upsert_service("api", "local", serving_revision="v1")
    ctx = context(world)
    with pytest.raises(InvariantViolation, match="refusing to stop v1"):
        await serving.stop(ctx, "v1")
    await serving.stop(ctx, "v2")
    assert world.runtime.running_revisions("api") == {"v1"}


async def test_a_switch_the_router_does_not_serve_fails(world: PipelineWorld) -> None:
    ctx = context(world)
    await serving.switch(ctx, {"v2": 10, "v1": 90})
    assert world.weights() == {"v2": 10, "v1": 90}

    async def lying(service: str, weights: object) -> bool:
        return False

    world.runtime.router.verify_weight = lying  # type: ignore[method-assign]
    with pytest.raises(TrafficSwitchFailed, match="does not serve the weights"):
        await serving.switch(ctx, {"v1": 100})

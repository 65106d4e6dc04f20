"""The stage recorder: every stage starts, succeeds or fails, and is audited, the same way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shipyard.domain.models import DeploymentRequest
from shipyard.errors import HealthCheckFailed, RevisionStartFailed
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.record import DeploymentRecord
from shipyard.orchestrator.stage import Rollback, stage
from tests.orchestrator.world import PipelineWorld


@pytest.fixture
async def ctx(tmp_path: Path) -> DeploymentContext:
    world = PipelineWorld(tmp_path)
    request = DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd"},
            "target": {"service_name": "api"},
            "strategy": {"BlueGreen": {"switch_delay_seconds": 0}},
        }
    )
    record = DeploymentRecord.submitted(request, "alice", world.clock.now(), None)
    await world.pipeline.records.create(record)
    return DeploymentContext(world.pipeline.deps, record)


async def persisted(ctx: DeploymentContext) -> list[dict[str, object]]:
    doc = await ctx.store.get_deployment(ctx.id)
    stages: list[dict[str, object]] = doc["stages"]
    return stages


async def audited(ctx: DeploymentContext) -> list[tuple[str, dict[str, object]]]:
    return [(r.event_type, dict(r.detail)) for r in await ctx.deps.audit.records()]


async def test_a_stage_is_persisted_running_then_succeeded_with_what_it_found(
    ctx: DeploymentContext,
) -> None:
    async with stage(ctx, "bake", seconds=60) as st:
        (running,) = await persisted(ctx)
        assert (running["name"], running["status"]) == ("bake", "running")
        await ctx.clock.sleep(60)
        st.done(verdict="healthy", ignored=None)
    (done,) = await persisted(ctx)
    assert done["status"] == "succeeded"
    assert done["duration_ms"] == 60_000
    assert done["detail"] == {"seconds": 60, "verdict": "healthy"}
    assert await audited(ctx) == []


async def test_an_error_fails_the_stage_and_records_its_audit_event(
    ctx: DeploymentContext,
) -> None:
    with pytest.raises(RevisionStartFailed):
        async with stage(ctx, "start", audit="start"):
            raise RevisionStartFailed("port in use")
    (failed,) = await persisted(ctx)
    assert failed["status"] == "failed"
    assert failed["detail"] == {"error": "port in use"}
    assert await audited(ctx) == [("start.failed", {"error": "port in use"})]


async def test_a_verdict_records_what_the_step_says_and_rolls_back(
    ctx: DeploymentContext,
) -> None:
    cause = HealthCheckFailed("v2 became unhealthy during the bake window: 3 failures", attempts=3)

    async def bake() -> None:
        async with stage(ctx, "bake", audit="bake") as st:
            st.fail("3 failures", audit={"error": "3 failures", "replica": "r-1"}, attempts=3)
            raise Rollback(cause, detected_at=12.5)

    with pytest.raises(Rollback) as raised:
        await bake()
    assert raised.value.cause is cause and raised.value.detected_at == 12.5
    (failed,) = await persisted(ctx)
    assert failed["detail"] == {"error": "3 failures", "attempts": 3}
    assert await audited(ctx) == [("bake.failed", {"error": "3 failures", "replica": "r-1"})]


async def test_a_resumed_stage_keeps_its_start(ctx: DeploymentContext) -> None:
    async def interrupted() -> None:
        async with stage(ctx, "switch_delay"):
            await ctx.clock.sleep(10)
            raise asyncio.CancelledError  # the control plane stops: the stage stays running

    with pytest.raises(asyncio.CancelledError):
        await interrupted()
    (running,) = await persisted(ctx)
    assert running["status"] == "running"
    async with stage(ctx, "switch_delay"):
        await ctx.clock.sleep(20)
    (done,) = await persisted(ctx)
    assert done["status"] == "succeeded"
    assert done["duration_ms"] == 30_000

"""Freeze instead of rollback (``[deploy] on_failure = "freeze"``) through the real pipeline on
fakes: a failed check leaves traffic where it is until a human promotes or aborts, with a
reason; a restart keeps it Frozen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.domain.manifest import parse_manifest
from shipyard.errors import Conflict, ReasonRequired
from shipyard.store.leases import LeaseStore, deployment_lease
from tests.orchestrator.world import (
    PipelineWorld,
    crash_when_persisted,
    doc,
    progressive,
    restart,
)

FREEZE = '\n[deploy]\non_failure = "freeze"\n'
STAGES = [{"weight": 10, "duration_seconds": 600}, {"weight": 50, "duration_seconds": 600}]


def canary() -> dict[str, Any]:
    return {"Canary": {"stages": STAGES, "scale_down_delay_seconds": 30}}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=1, rps=100.0)
    w.builder.manifest = parse_manifest(progressive(1) + FREEZE)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def frozen_canary(world: PipelineWorld) -> tuple[str, str, dict[str, Any]]:
    """A first deployment, then a canary whose analysis fails at its first stage: Frozen."""
    stable = await world.first()
    submitted = await world.submit("bbbb2222", canary())
    green = world.revision("bbbb2222", submitted)
    world.profile(green, error_rate=0.5)
    frozen = await world.until(submitted["id"], "Frozen")
    return stable, green, frozen


async def test_a_failed_analysis_freezes_with_traffic_where_it_was(world: PipelineWorld) -> None:
    stable, green, frozen = await frozen_canary(world)
    assert world.weights() == {stable: 90, green: 10}
    assert world.runtime.running_revisions("api") == {stable, green}
    state = frozen["progress"]["frozen"]
    assert state["cause"]["code"] == "analysis_failed"
    assert frozen["progress"]["plan"]["steps"][state["step"]]["type"] == "Analyse"
    assert not frozen["progress"]["rolling_back"]
    # Time passes: it stays Frozen, nothing moves (only a human ends it).
    changes = len(world.history())
    await world.clock.sleep(3600)
    now = world.store.get_deployment(frozen["id"])
    assert now["status"] == "Frozen"
    assert len(world.history()) == changes
    assert world.weights() == {stable: 90, green: 10}
    records = await world.events(frozen["id"])
    [event] = [r for r in records if r.event_type == "deployment.frozen"]
    assert event.detail["code"] == "analysis_failed"
    assert "success rate" in event.detail["error"]
    assert "deployment.rolled_back" not in [r.event_type for r in records]


async def test_promote_needs_a_reason_then_the_plan_goes_on(world: PipelineWorld) -> None:
    stable, green, frozen = await frozen_canary(world)
    with pytest.raises(ReasonRequired, match="--reason"):
        await world.pipeline.promote(frozen["id"], "bob")
    with pytest.raises(ReasonRequired):
        await world.pipeline.promote(frozen["id"], "bob", reason="   ")
    assert world.store.get_deployment(frozen["id"])["status"] == "Frozen"
    world.profile(green, error_rate=0.0)  # the cause was found and fixed
    await world.pipeline.promote(frozen["id"], "bob", reason="INC-42: bad replica replaced")
    final = await world.wait(frozen["id"])
    assert final["status"] == "Success", final.get("error")
    assert world.weights() == {green: 100}
    assert final["progress"].get("frozen") is None
    # The plan went on after the failed analysis: the second stage and the promotion.
    assert world.history()[-2:] == [{green: 50, stable: 50}, {green: 100}]
    records = await world.events(frozen["id"])
    [unfrozen] = [r for r in records if r.event_type == "deployment.unfrozen"]
    assert unfrozen.user == "bob"
    assert unfrozen.detail["reason"] == "INC-42: bad replica replaced"
    assert unfrozen.detail["action"] == "promote"
    assert unfrozen.detail["cause"] == "analysis_failed"
    [promoted] = [r for r in records if r.event_type == "deployment.promoted"]
    assert promoted.detail["by"] == "bob"
    # Only analysis_1 failed; it was not run again.
    assert [s["name"] for s in final["stages"]].count("analysis_1") == 1


async def test_abort_needs_a_reason_then_rolls_back(world: PipelineWorld) -> None:
    stable, _, frozen = await frozen_canary(world)
    with pytest.raises(ReasonRequired):
        await world.pipeline.abort(frozen["id"], "carol")
    await world.pipeline.abort(frozen["id"], "carol", reason="migration can be undone after all")
    final = await world.wait(frozen["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["code"] == "deployment_aborted"
    assert world.weights() == {stable: 100}
    assert world.runtime.running_revisions("api") == {stable}
    records = await world.events(frozen["id"])
    [unfrozen] = [r for r in records if r.event_type == "deployment.unfrozen"]
    assert unfrozen.detail["action"] == "abort"
    assert unfrozen.detail["reason"] == "migration can be undone after all"
    [asked] = [r for r in records if r.event_type == "deployment.abort_requested"]
    assert asked.detail["reason"] == "migration can be undone after all"


async def test_a_restart_while_frozen_stays_frozen(world: PipelineWorld) -> None:
    stable, green, frozen = await frozen_canary(world)
    stages = len(frozen["stages"])
    await restart(world)
    await world.clock.sleep(600)
    now = world.store.get_deployment(frozen["id"])
    assert now["status"] == "Frozen"
    assert len(now["stages"]) == stages  # nothing ran again
    assert world.weights() == {stable: 90, green: 10}
    records = await world.events(frozen["id"])
    assert [r.event_type for r in records].count("deployment.frozen") == 1
    assert "deployment.resumed" in [r.event_type for r in records]
    # The new control plane holds it and takes the human's decision.
    world.profile(green, error_rate=0.0)
    await world.pipeline.promote(frozen["id"], "bob", reason="checked by hand")
    final = await world.wait(frozen["id"])
    assert final["status"] == "Success", final.get("error")
    assert world.weights() == {green: 100}


async def test_a_manual_rollback_is_refused_while_frozen(world: PipelineWorld) -> None:
    await world.first()
    [first] = world.store.list_deployments("api", 1)
    submitted = await world.submit("bbbb2222", canary())
    world.profile(world.revision("bbbb2222", submitted), error_rate=0.5)
    await world.until(submitted["id"], "Frozen")
    with pytest.raises(Conflict, match=f"deployment {submitted['id']} is frozen"):
        await world.rollback(first["id"])
    assert world.store.get_deployment(submitted["id"])["status"] == "Frozen"


async def test_a_failed_health_check_freezes_before_any_traffic(world: PipelineWorld) -> None:
    stable = await world.first()
    submitted = await world.submit("bbbb2222", canary())
    green = world.revision("bbbb2222", submitted)
    world.prober.scripts[green] = lambda replica, n: False
    frozen = await world.until(submitted["id"], "Frozen")
    assert frozen["progress"]["frozen"]["cause"]["code"] == "health_check_failed"
    assert world.weights() == {stable: 100}
    assert green in world.runtime.running_revisions("api")  # kept for a human to look at


async def test_without_freeze_a_failure_still_rolls_back(world: PipelineWorld) -> None:
    world.builder.manifest = parse_manifest(progressive(1))
    stable = await world.first()
    submitted = await world.submit("bbbb2222", canary())
    world.profile(world.revision("bbbb2222", submitted), error_rate=0.5)
    final = doc(await world.pipeline.wait(submitted["id"]))
    assert final["status"] == "RolledBack"
    assert world.weights() == {stable: 100}


async def test_a_crash_right_after_freezing_still_announces_it_once(world: PipelineWorld) -> None:
    """Killed between persisting Frozen and auditing it: the resumed driver audits it (the
    notifications need it), once."""
    stable = await world.first()
    crashed = crash_when_persisted(world, "Frozen")
    submitted = await world.submit("bbbb2222", canary())
    green = world.revision("bbbb2222", submitted)
    world.profile(green, error_rate=0.5)
    await crashed.wait()
    events = [r.event_type for r in await world.events(submitted["id"])]
    assert "deployment.frozen" not in events
    await restart(world)
    await world.clock.sleep(60)
    events = [r.event_type for r in await world.events(submitted["id"])]
    assert events.count("deployment.frozen") == 1
    assert world.store.get_deployment(submitted["id"])["status"] == "Frozen"
    assert world.weights() == {stable: 90, green: 10}


async def test_a_takeover_while_frozen_stays_frozen(tmp_path: Path) -> None:
    """The replica holding a Frozen deployment dies (kill -9): another takes it over when its
    lease expires, holds it Frozen (nothing re-runs), and takes the human's decision."""
    world = PipelineWorld(tmp_path, replicas=1, rps=100.0)
    world.builder.manifest = parse_manifest(progressive(1) + FREEZE)
    a = world.pipeline = world.new_pipeline("a", 10.0)
    await a.start()
    b = world.new_pipeline("b", 10.0)
    await b.start()
    try:
        stable, green, frozen = await frozen_canary(world)
        await a.stop(release=False)  # its leases expire in their own time
        await world.clock.sleep(60)
        lease = LeaseStore(world.store.engine).get(deployment_lease(frozen["id"]))
        assert lease is not None and lease.holder == "b"
        now = world.store.get_deployment(frozen["id"])
        assert now["status"] == "Frozen"
        assert len(now["stages"]) == len(frozen["stages"])
        assert world.weights() == {stable: 90, green: 10}
        kinds = [r.event_type for r in await world.events(frozen["id"])]
        assert kinds.count("deployment.taken_over") == 1
        assert kinds.count("deployment.frozen") == 1
        world.profile(green, error_rate=0.0)
        await b.promote(frozen["id"], "bob", reason="looked at it")
        final = doc(await b.wait(frozen["id"], timeout=60))
        assert final["status"] == "Success", final.get("error")
    finally:
        await b.stop()
        await a.stop()

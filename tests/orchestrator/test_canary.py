"""Canary deployments through the executor on fakes: ten-minute stages in milliseconds.

The fake router serves a steady synthetic load split by the weights in force, so the analysis
reads real-looking per-revision windows (see tests/orchestrator/world.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import Conflict, TransientError
from tests.orchestrator.world import PipelineWorld, crash_when_persisted, restart

STAGES = [
    {"weight": 10, "duration_seconds": 600},
    {"weight": 50, "duration_seconds": 600},
]


def canary(stages: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    return {"Canary": {"stages": stages or STAGES, "scale_down_delay_seconds": 30, **kw}}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=1, rps=100.0)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def test_first_deployment_skips_the_stages(world: PipelineWorld) -> None:
    doc = await world.deploy("aaaa1111", canary())
    assert doc["status"] == "Success", doc.get("error")
    assert [s["name"] for s in doc["stages"]] == ["build", "start", "health_check", "switch"]
    assert world.weights() == {doc["green_revision"]: 100}


async def test_healthy_canary_walks_the_stages_and_is_promoted(world: PipelineWorld) -> None:
    stable = await world.first()
    t0 = world.clock.now()
    doc = await world.deploy("bbbb2222", canary())
    assert doc["status"] == "Success", doc.get("error")
    green = doc["green_revision"]
    assert world.history()[-3:] == [
        {green: 10, stable: 90},
        {green: 50, stable: 50},
        {green: 100},
    ]
    assert world.clock.now() - t0 >= 1200  # two ten-minute stages on the fake clock
    names = [s["name"] for s in doc["stages"]]
    assert names[-5:] == ["canary_1", "analysis_1", "canary_2", "analysis_2", "promote"]
    analysis = next(s for s in doc["stages"] if s["name"] == "analysis_1")
    assert analysis["detail"]["verdict"] == "pass"
    assert analysis["detail"]["tallies"]["measurements"] == 60  # every 10 s for 600 s
    assert analysis["detail"]["tallies"]["passed"] == 60
    assert len(analysis["detail"]["measurements"]) == 50  # the stage keeps the last 50
    assert {m["verdict"] for m in analysis["detail"]["measurements"]} == {"pass"}
    events = [r.event_type for r in await world.events(doc["id"])]
    assert events.count("analysis.measurement") == 120
    assert events.count("analysis.passed") == 2
    # Stable stays warm for scale_down_delay_seconds, then is retired.
    assert world.runtime.running_revisions("api") == {stable, green}
    await world.clock.sleep(31)
    await world.pipeline.retire_expired()
    assert world.runtime.running_revisions("api") == {green}


async def test_failing_canary_is_aborted_on_its_first_failed_measurement(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    doc = await world.submit("cccc3333", canary())
    world.profile(world.revision("cccc3333", doc), error_rate=0.2)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["type"] == "AnalysisFailed"
    assert "success rate" in final["error"]["message"]
    assert "failure_limit 0" in final["error"]["message"]
    assert world.weights() == {stable: 100}
    assert world.history()[-1] == {stable: 100}
    assert world.runtime.running_revisions("api") == {stable}
    m = final["metrics"]
    assert m["abort_latency_ms"] is not None and m["abort_latency_ms"] < 1000
    records = await world.events(doc["id"])
    measured = [r for r in records if r.event_type == "analysis.measurement"]
    assert len(measured) == 1 and measured[0].detail["verdict"] == "fail"
    failed = next(r for r in records if r.event_type == "analysis.failed")
    assert failed.detail["decision"] == "abort"
    assert "canary.weight_zero" in [r.event_type for r in records]


async def test_failure_limit_has_argo_semantics(world: PipelineWorld) -> None:
    """With failure_limit 2 the analysis fails on the third failed measurement, not before."""
    await world.first()
    stages = [{"weight": 20, "duration_seconds": 600, "analysis": {"failure_limit": 2}}]
    doc = await world.submit("dddd4444", canary(stages))
    world.profile(world.revision("dddd4444", doc), error_rate=0.5)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    measured = [r for r in await world.events(doc["id"]) if r.event_type == "analysis.measurement"]
    assert [r.detail["verdict"] for r in measured] == ["fail", "fail", "fail"]
    assert "3 failed measurement(s) exceed failure_limit 2" in final["error"]["message"]


async def test_slow_canary_is_aborted_on_latency(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.submit("eeee5555", canary())
    world.profile(world.revision("eeee5555", doc), latency_ms=400)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert "p99" in final["error"]["message"]


async def test_comparison_with_stable_catches_a_relative_regression(world: PipelineWorld) -> None:
    stable = await world.first()
    world.profile(stable, latency_ms=20)
    stages = [
        {
            "weight": 50,
            "duration_seconds": 60,
            "analysis": {"compare_with_stable": True, "max_p99_latency_ms": 1000},
        }
    ]
    doc = await world.submit("ffff6666", canary(stages))
    world.profile(world.revision("ffff6666", doc), latency_ms=90)  # under 1000 ms, 4x stable
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert "x stable's" in final["error"]["message"]


@pytest.mark.parametrize(
    ("policy", "status"),
    [("fail", "RolledBack"), ("extend", "RolledBack")],
    ids=["fail-policy", "extend-then-fail"],
)
async def test_too_little_traffic_is_never_a_silent_pass(
    world: PipelineWorld, policy: str, status: str
) -> None:
    await world.first()
    world.runtime.router.rps = 1.0  # 10% of 1 rps: 1 request per 10 s window, min_requests 50
    stages = [
        {
            "weight": 10,
            "duration_seconds": 30,
            "analysis": {"insufficient_data": policy, "max_extensions": 2},
        }
    ]
    final = await world.deploy("abab1212", canary(stages))
    assert final["status"] == status
    assert "insufficient data" in final["error"]["message"]
    verdicts = {
        r.detail["verdict"]
        for r in await world.events(final["id"])
        if r.event_type == "analysis.measurement"
    }
    assert verdicts == {"insufficient_data"}
    if policy == "extend":
        events = [r.event_type for r in await world.events(final["id"])]
        assert events.count("analysis.extended") == 2


async def test_extend_accumulates_the_window_until_there_is_enough_data(
    world: PipelineWorld,
) -> None:
    await world.first()
    world.runtime.router.rps = 20.0  # 10%: 20 per 10 s window < 50, 60 after three windows
    stages = [{"weight": 10, "duration_seconds": 10, "analysis": {"max_extensions": 5}}]
    final = await world.deploy("acac1313", canary(stages))
    assert final["status"] == "Success", final.get("error")
    measured = [
        r.detail for r in await world.events(final["id"]) if r.event_type == "analysis.measurement"
    ]
    assert [m["verdict"] for m in measured] == ["insufficient_data"] * 2 + ["pass"]
    assert measured[-1]["requests"] >= 50


async def test_pause_policy_waits_for_a_human_who_promotes(world: PipelineWorld) -> None:
    await world.first()
    world.runtime.router.rps = 1.0
    stages = [{"weight": 10, "duration_seconds": 30, "analysis": {"insufficient_data": "pause"}}]
    doc = await world.submit("adad1414", canary(stages))
    await world.until(doc["id"], "Paused")
    promoted = await world.promote(doc["id"], "bob")
    assert promoted["status"] == "Paused"
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    events = await world.events(doc["id"])
    overridden = next(r for r in events if r.event_type == "analysis.overridden")
    assert overridden.detail["promoted_by"] == "bob"


async def test_measurement_errors_have_their_own_consecutive_limit(world: PipelineWorld) -> None:
    stable = await world.first()
    world.runtime.router.metrics_error = TransientError("agent down")
    stages = [{"weight": 10, "duration_seconds": 600, "analysis": {"consecutive_error_limit": 2}}]
    final = await world.deploy("aeae1515", canary(stages))
    assert final["status"] == "RolledBack"
    assert (
        "3 consecutive measurement errors exceed consecutive_error_limit 2"
        in (final["error"]["message"])
    )
    assert world.weights() == {stable: 100}


async def test_gate_pauses_until_promote_and_promote_is_refused_otherwise(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    stages = [{"weight": 10, "duration_seconds": 60, "pause": True}, {"weight": 50}]
    doc = await world.submit("afaf1616", canary(stages))
    with pytest.raises(Conflict, match="not Paused"):
        await world.promote(doc["id"], "bob")
    await world.until(doc["id"], "Paused")
    green = world.revision("afaf1616", doc)
    assert world.weights() == {green: 10, stable: 90}
    await world.clock.sleep(3600)  # a gate does not time out
    assert world.store.get_deployment(doc["id"])["status"] == "Paused"
    await world.promote(doc["id"], "bob")
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    gate = next(s for s in final["stages"] if s["name"] == "gate_1")
    assert gate["detail"]["promoted_by"] == "bob"


async def test_a_promotion_accepted_just_before_a_restart_is_not_lost(
    world: PipelineWorld,
) -> None:
    """``promote`` answered; the control plane died right after the woken task's first write,
    before the gate was passed. The next control plane goes on: the promotion was persisted."""
    await world.first()
    stages = [{"weight": 10, "duration_seconds": 60, "pause": True}, {"weight": 50}]
    doc = await world.submit("fafa1717", canary(stages))
    await world.until(doc["id"], lambda d: d["progress"]["paused"] is not None)  # parked
    crashed = crash_when_persisted(world, "Analysing")
    await world.promote(doc["id"], "bob")
    await asyncio.wait_for(crashed.wait(), 5)
    await restart(world)
    final = await asyncio.wait_for(world.wait(doc["id"]), 60)
    assert final["status"] == "Success", final.get("error")
    gate = next(s for s in final["stages"] if s["name"] == "gate_1")
    assert gate["detail"]["promoted_by"] == "bob"


async def test_abort_while_paused_rolls_back_at_once(world: PipelineWorld) -> None:
    stable = await world.first()
    stages = [{"weight": 30, "duration_seconds": 0, "pause": True}]
    doc = await world.submit("baba2121", canary(stages))
    await world.until(doc["id"], "Paused")
    await world.abort(doc["id"], "carol")
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["type"] == "DeploymentAborted"
    assert final["error"]["aborted_by"] == "carol"
    assert world.weights() == {stable: 100}
    assert world.runtime.running_revisions("api") == {stable}
    assert final["metrics"]["abort_latency_ms"] is not None
    with pytest.raises(Conflict, match="already RolledBack"):
        await world.abort(doc["id"], "carol")


async def test_abort_mid_analysis(world: PipelineWorld) -> None:
    stable = await world.first()
    doc = await world.submit("bcbc2323", canary())
    await world.until(doc["id"], lambda d: measurements(d) >= 4)
    await world.abort(doc["id"], "carol")
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert world.weights() == {stable: 100}


async def test_sticky_stage_sets_the_manifest_key_with_the_canary_first(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    stages = [{"weight": 10, "duration_seconds": 10, "sticky": True}, {"weight": 40}]
    doc = await world.submit("bdbd2424", canary(stages))
    green = world.revision("bdbd2424", doc)
    await world.until(doc["id"], lambda d: stage_done(d, "canary_1"))
    assert world.weights() == {green: 10, stable: 90}
    sticky = world.runtime.router.sticky["api"]
    assert sticky is not None and sticky.header == "x-user"
    assert list(world.weights()) == [green, stable]
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    assert world.runtime.router.sticky["api"] is None  # the promotion is not sticky


async def test_restart_mid_analysis_resumes_with_the_same_deadline(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.submit("bebe2525", canary())
    await world.until(doc["id"], lambda d: measurements(d) >= 7)
    await world.pipeline.stop()
    world.pipeline = world.new_pipeline()
    t_restart = world.clock.now()
    await world.pipeline.start()
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    # The first stage did not start over: about 1200 s in total, not 1200 s after the restart.
    assert world.clock.now() - t_restart < 1200
    events = [r.event_type for r in await world.events(doc["id"])]
    assert "deployment.resumed" in events


def measurements(doc: dict[str, Any]) -> int:
    """Measurements the running analysis stage has taken (its persisted tallies)."""
    analysis = doc["progress"].get("analysis") or {}
    return int(analysis.get("run", {}).get("measurements", 0))


def stage_done(doc: dict[str, Any], name: str) -> bool:
    return any(s["name"] == name and s["status"] == "succeeded" for s in doc["stages"])


async def test_a_driver_dying_after_a_step_ended_but_before_the_next_began_records_it_once(
    world: PipelineWorld,
) -> None:
    """The control plane dies in the narrowest window of a weight change: ``canary_1`` ended
    (persisted) and ``traffic.switched`` was audited, but the next step's index was not written
    yet. The next control plane runs the step again (steps are idempotent) and records it once:
    one ``canary_1`` stage, one ``traffic.switched`` per planned weight."""
    stable = await world.first()
    submitted = await world.submit("cdcd2525", canary())
    crashed = asyncio.Event()
    save = world.astore.save_deployment
    test = asyncio.current_task()

    async def die_before_the_next_step(doc: dict[str, Any], *, active: bool) -> None:
        names = [s["name"] for s in doc["stages"]]
        advancing = names[-1:] == ["canary_1"] and doc["stages"][-1]["status"] == "succeeded"
        unwritten = doc["progress"]["step_started_at"] is None  # the next step's index
        if advancing and unwritten and not crashed.is_set() and asyncio.current_task() is not test:
            crashed.set()
            raise asyncio.CancelledError  # dies with the next step's index unwritten
        await save(doc, active=active)

    world.astore.save_deployment = die_before_the_next_step  # type: ignore[method-assign]
    await asyncio.wait_for(crashed.wait(), 30)
    switched = [
        e for e in await world.events(submitted["id"]) if e.event_type == "traffic.switched"
    ]
    assert len(switched) == 1  # audited before the death
    await restart(world)
    final = await asyncio.wait_for(world.wait(submitted["id"]), 120)
    assert final["status"] == "Success", final.get("error")
    green = final["green_revision"]
    names = [s["name"] for s in final["stages"]]
    assert names.count("canary_1") == 1, names
    weights = [
        e.detail["weights"]
        for e in await world.events(submitted["id"])
        if e.event_type == "traffic.switched"
    ]
    assert weights == [{green: 10, stable: 90}, {green: 50, stable: 50}, {green: 100}]

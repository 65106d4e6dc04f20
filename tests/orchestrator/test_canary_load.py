"""The built-in load step of canary analysis (``[analysis] load``) through the executor on fakes.

The fake router serves no synthetic traffic here (``rps = 0``): whatever the canary answers in a
window comes from the load the Analyse executor asked the runtime for (``FakeRouter.drive_load``
counts it on the pinned revision only, as the agent's does). The real thing, through the agent's
router to real app processes, is tests/e2e/test_canary_load.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shipyard.domain.models import CanaryStage
from tests.orchestrator.world import PipelineWorld


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=1, rps=0.0)  # no traffic but the load step's
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def canary(analysis: dict[str, Any], *, seconds: float = 30) -> dict[str, Any]:
    stage = {"weight": 10, "duration_seconds": seconds, "analysis": analysis}
    return {"Canary": {"stages": [stage], "scale_down_delay_seconds": 30}}


LOAD = {"load": {"rps": 20, "path": "/ping"}}  # 200 per 10 s window; min_requests is 50


async def test_a_canary_without_traffic_passes_thanks_to_the_load(world: PipelineWorld) -> None:
    stable = await world.first()
    final = await world.deploy("bbbb2222", canary(LOAD))
    assert final["status"] == "Success", final.get("error")
    green = final["green_revision"]
    router = world.runtime.router
    # Started before the first window, renewed after each measurement, then stopped.
    assert [(s, rev, rps, path) for s, rev, rps, path, _ in router.load_calls] == [
        ("api", green, 20, "/ping")
    ] * 3  # start + renewals after the measurements at 10 s and 20 s (30 s ends it)
    assert all(lease == 40 for *_, lease in router.load_calls)  # interval 10 + 30 s slack
    assert router.loads == {} and router.loads_stopped == ["api"]
    analysis = next(s for s in final["stages"] if s["name"] == "analysis_1")
    assert analysis["detail"]["verdict"] == "pass"
    assert analysis["detail"]["load"] == {
        "rps": 20,
        "path": "/ping",
        "revision": green,
        "running": False,
    }
    measured = analysis["detail"]["measurements"]
    assert [m["verdict"] for m in measured] == ["pass"] * 3
    assert all(m["requests"] == 200 and m["needed"] == 50 for m in measured)
    metrics = await router.metrics("api")
    assert metrics[stable]["requests"] == 0  # the load never touched stable
    assert metrics[green]["requests"] == 600  # 20 rps for the 30 s stage
    events = [r.event_type for r in await world.events(final["id"])]
    assert events.count("analysis.load_started") == events.count("analysis.load_stopped") == 1


async def test_without_the_load_the_same_canary_fails_and_says_what_was_missing(
    world: PipelineWorld,
) -> None:
    await world.first()
    final = await world.deploy(
        "cccc3333", canary({"insufficient_data": "extend", "max_extensions": 1})
    )
    assert final["status"] == "RolledBack"
    message = final["error"]["message"]
    assert "insufficient data: 0 requests seen, 50 needed (min_requests)" in message
    assert "still after 1 extension(s) of 10 s (max_extensions)" in message
    assert "[analysis] load = { rps = 10 }" in message
    assert world.runtime.router.load_calls == []


async def test_a_canary_answering_500s_under_the_load_fails(world: PipelineWorld) -> None:
    stable = await world.first()
    doc = await world.submit("dddd4444", canary(LOAD))
    world.profile(world.revision("dddd4444", doc), error_rate=1.0)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["type"] == "AnalysisFailed"
    assert "success rate 0.0000 < min_success_rate 0.99" in final["error"]["message"]
    assert world.weights() == {stable: 100}
    assert world.runtime.router.loads == {}  # stopped with the failed analysis
    analysis = next(s for s in final["stages"] if s["name"] == "analysis_1")
    assert analysis["detail"]["load"]["running"] is False


async def test_the_load_stops_before_a_pause_for_a_human(world: PipelineWorld) -> None:
    await world.first()
    # 2 rps: 20 per window < min_requests 50, and the pause policy hands over to a human.
    stages = canary({"load": {"rps": 2}, "insufficient_data": "pause"})
    doc = await world.submit("eeee5555", stages)
    await world.until(doc["id"], "Paused")
    assert world.runtime.router.loads == {}
    assert world.runtime.router.loads_stopped == ["api"]
    await world.promote(doc["id"], "bob")
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    assert world.runtime.router.loads_stopped == ["api"]  # stopped once, not again at the end


@pytest.mark.parametrize(
    ("load", "field"),
    [
        pytest.param({"rps": 1001}, "rps", id="above-the-ceiling"),
        pytest.param({"rps": 0}, "rps", id="zero"),
        pytest.param({"rps": 5, "path": "https://elsewhere.example/"}, "path", id="a-url"),
        pytest.param({"rps": 5, "url": "http://x/"}, "url", id="unknown-field"),
    ],
)
def test_the_api_refuses_a_bad_load_in_a_stage(load: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        CanaryStage.model_validate({"weight": 10, "analysis": {"load": load}})
    assert [e["loc"][-1] for e in info.value.errors()] == [field]


async def test_a_slow_metrics_read_does_not_leave_the_next_window_nearly_empty(
    world: PipelineWorld,
) -> None:
    """A window starts where the read that closed the previous one ended. CI saw windows of 81,
    2 and 81 requests: the first measurement's read took most of an interval, the next window
    was still cut one interval after that read began, and judged what was left of it."""
    await world.first()
    router = world.runtime.router

    async def slow_first_measurement(call: int) -> None:
        if call == 2:  # 1: the window's starting snapshot; 2: the measurement at 10 s
            await world.clock.sleep(9)

    router.before_metrics = slow_first_measurement
    final = await world.deploy("dddd4444", canary(LOAD))
    assert final["status"] == "Success", final.get("error")
    measured = next(s for s in final["stages"] if s["name"] == "analysis_1")["detail"][
        "measurements"
    ]
    assert [m["verdict"] for m in measured] == ["pass"] * 3, measured
    # 19 s (up to the end of the slow read), 10 s, then the 1 s left of the stage stretched to
    # half a window (5 s) instead of a window of 20 requests.
    assert [m["requests"] for m in measured] == [380, 200, 100], measured

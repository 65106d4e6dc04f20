"""A replica that crashes, never listens, or dies in the bake window is reported with its exit code
and the last lines it printed, in the deployment's error and its failed stage; the audit trail
keeps the short reason only (``orchestrator/crash_report.py``), over the fake runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shipyard.orchestrator import crash_report
from shipyard.runtime.base import LogStream
from tests.orchestrator.world import PipelineWorld

TRACEBACK: list[tuple[LogStream, str]] = [
    ("stdout", "starting notes on :8000"),
    ("stderr", "Traceback (most recent call last):"),
    ("stderr", '  File "/app/app.py", line 3, in <module>'),
    ("stderr", "KeyError: 'DATABASE_URL'"),
]


@pytest.fixture
def world(tmp_path: Path) -> PipelineWorld:
    return PipelineWorld(tmp_path)


async def test_a_crash_at_start_reports_exit_code_and_traceback(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.deploy("dddd4444", wait=False)
    green = world.revision("dddd4444", doc)
    world.runtime.output[green] = list(TRACEBACK)

    def crash_on_probe(replica: Any, n: int) -> bool:
        world.runtime.crash(replica.replica_id, exit_code=1)
        return False

    world.prober.scripts[green] = crash_on_probe
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    error = final["error"]
    assert "crashed (exit code 1) before becoming healthy" in error["message"]
    assert error["message"].endswith(
        "last 4 lines of its output:\n"
        "  starting notes on :8000\n"
        "  Traceback (most recent call last):\n"
        '    File "/app/app.py", line 3, in <module>\n'
        "  KeyError: 'DATABASE_URL'"
    )
    assert error["exit_code"] == 1
    assert error["output"] == [text for _, text in TRACEBACK]
    [stage] = [s for s in final["stages"] if s["name"] == "health_check"]
    assert stage["detail"]["error"].endswith("crashed (exit code 1) before becoming healthy")
    # The audit trail: the reason and the exit code, not the app's output.
    [failed] = [e for e in await world.events(doc["id"]) if e.event_type == "health_check.failed"]
    assert failed.detail["exit_code"] == 1
    assert "DATABASE_URL" not in str(failed.detail)


async def test_a_replica_that_never_listens_shows_what_it_printed(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.deploy("ffff6666", wait=False)
    green = world.revision("ffff6666", doc)
    world.runtime.output[green] = [("stdout", "listening on 127.0.0.1:9999")]
    world.prober.scripts[green] = lambda r, n: False
    for rid in [f"{green}-{i}" for i in range(1, 20)]:
        world.prober.answers[rid] = "refused"
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    message = final["error"]["message"]
    assert "still not listening after" in message
    assert message.endswith("last 1 lines of its output:\n  listening on 127.0.0.1:9999")
    assert final["error"]["exit_code"] is None  # it is still running


async def test_a_crash_during_bake_carries_the_output_too(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.deploy("eeee5555", wait=False)
    green = world.revision("eeee5555", doc)
    world.runtime.output[green] = [("stderr", "MemoryError")]

    def crash_in_bake(replica: Any, n: int) -> bool:
        if n >= 4:
            world.runtime.crash(replica.replica_id, exit_code=137)
        return True

    world.prober.scripts[green] = crash_in_bake
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert "became unhealthy during the bake window" in final["error"]["message"]
    assert final["error"]["output"] == ["MemoryError"]
    assert final["error"]["exit_code"] == 137


async def test_a_long_line_is_cut_and_only_the_last_lines_are_kept(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.deploy("abab1212", wait=False)
    green = world.revision("abab1212", doc)
    noise: list[tuple[LogStream, str]] = [("stdout", f"line {i}") for i in range(50)]
    world.runtime.output[green] = [*noise, ("stderr", "y" * 2000)]

    def crash_on_probe(replica: Any, n: int) -> bool:
        world.runtime.crash(replica.replica_id, exit_code=2)
        return False

    world.prober.scripts[green] = crash_on_probe
    final = await world.wait(doc["id"])
    output = final["error"]["output"]
    assert len(output) == crash_report.TAIL_LINES
    assert output[0] == "line 31"
    assert output[-1] == "y" * crash_report.MAX_LINE_CHARS + " [...]"


async def test_a_rolling_batch_that_crashes_reports_its_output_once(world: PipelineWorld) -> None:
    await world.first()
    rolling = {"Rolling": {"max_surge": 1, "max_unavailable": 0}}
    doc = await world.deploy("cdcd3434", rolling, wait=False)
    green = world.revision("cdcd3434", doc)
    world.runtime.output[green] = [("stderr", "ImportError: no module named flask")]

    def crash_on_probe(replica: Any, n: int) -> bool:
        world.runtime.crash(replica.replica_id, exit_code=1)
        return False

    world.prober.scripts[green] = crash_on_probe
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["output"] == ["ImportError: no module named flask"]
    assert final["error"]["message"].endswith("  ImportError: no module named flask")
    failed = [s for s in final["stages"] if s["status"] == "failed"]
    assert failed and all("ImportError" not in s["detail"]["error"] for s in failed)

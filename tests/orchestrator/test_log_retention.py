"""Build log retention: the janitor deletes build logs past the age or count limit, of both kinds
(each deployment's and each builder's), never an active deployment's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shipyard.orchestrator.log_retention import LogFile, LogRetention, calculate_expired
from tests.orchestrator.world import PipelineWorld

DAY = 86400.0
NOW = 100 * DAY


def files(*ages_days: float, protected: int | None = None) -> list[LogFile]:
    return [
        LogFile(Path(f"log{i}"), NOW - age * DAY, protected=i == protected)
        for i, age in enumerate(ages_days)
    ]


@pytest.mark.parametrize(
    ("logs", "retention", "expired"),
    [
        pytest.param(files(1, 2, 3), LogRetention(30 * DAY, 10), [], id="young-and-few"),
        pytest.param(files(1, 40, 31), LogRetention(30 * DAY, 10), ["log1", "log2"], id="too-old"),
        pytest.param(files(3, 1, 2, 4), LogRetention(None, 2), ["log0", "log3"], id="too-many"),
        pytest.param(
            files(1, 50, 2, protected=1), LogRetention(30 * DAY, 1), ["log2"], id="active-kept"
        ),
        pytest.param(files(1, 500), LogRetention(None, None), [], id="no-limits"),
    ],
)
def test_calculate_expired(
    logs: list[LogFile], retention: LogRetention, expired: list[str]
) -> None:
    assert sorted(str(p) for p in calculate_expired(logs, NOW, retention)) == expired


def _log(path: Path, age_days: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("output\n")
    os.utime(path, (now - age_days * DAY, now - age_days * DAY))
    return path


async def test_the_janitor_prunes_both_kinds_but_not_an_active_deployment(
    tmp_path: Path,
) -> None:
    world = PipelineWorld(tmp_path / "world")
    deps = world.pipeline.deps
    deps.logs_dir = tmp_path / "deployments"
    deps.builder_logs_dir = tmp_path / "logs"
    deps.log_retention = LogRetention(max_age_seconds=30 * DAY, max_count=2)
    now = world.clock.now()
    active = await world.deploy("aaaa1111", wait=False)  # its log is old but in use
    old_active = _log(deps.logs_dir / active["id"] / "build.log", 60, now)
    old = _log(deps.logs_dir / "old-one" / "build.log", 45, now)
    recent = [_log(deps.logs_dir / f"recent{i}" / "build.log", i, now) for i in range(3)]
    builder_logs = [_log(deps.builder_logs_dir / f"b{i}.log", i * 20, now) for i in range(3)]

    deleted = await world.pipeline.janitor.prune_logs()

    assert old_active.exists()
    assert not old.exists() and not old.parent.exists()
    # count: the newest two (recent0, recent1) stay; the active one counts but is kept.
    assert [p.exists() for p in recent] == [True, True, False]
    # b2 is 40 days old; b0, b1 are the newest two.
    assert [p.exists() for p in builder_logs] == [True, True, False]
    assert sorted(deleted) == sorted([old, recent[2], builder_logs[2]])
    await world.wait(active["id"])
    await world.pipeline.stop()

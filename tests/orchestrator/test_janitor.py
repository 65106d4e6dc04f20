"""The janitor survives anything a pass raises: it is also the heartbeat that starts a dead agent
again, so a store failure must not end it. Before issue 8 it caught only Shipyard's own errors:
an ``OperationalError`` from SQLite ended the task, silently."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from shipyard.orchestrator.janitor import MAX_INTERVAL_SECONDS
from shipyard.store.db import ServiceRow
from tests.orchestrator.world import PipelineWorld

FAILURES = 6


async def test_a_failing_store_is_logged_backed_off_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = PipelineWorld(tmp_path)
    await world.pipeline.start()
    try:
        await world.deploy("aaaa1111")
        second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=5)
        passes: list[float] = []
        enough = asyncio.Event()
        list_services = world.astore.list_services

        async def locked_then_fine() -> list[ServiceRow]:
            if not passes or passes[-1] != world.clock.now():
                passes.append(world.clock.now())  # each pass lists the services first
            if len(passes) > FAILURES + 2:
                enough.set()
            if len(passes) <= FAILURES:
                raise OperationalError(
                    "SELECT services", {}, sqlite3.OperationalError("database is locked")
                )
            return await list_services()

        world.astore.list_services = locked_then_fine  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="shipyard.orchestrator.janitor"):
            await asyncio.wait_for(enough.wait(), 10)
        gaps = [b - a for a, b in itertools.pairwise(passes)]
        # Doubling after every failure up to the cap, back to the interval once a pass works.
        assert gaps[:FAILURES] == [2, 4, 8, 16, MAX_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS]
        assert gaps[FAILURES] == 1
        logged = [r for r in caplog.records if r.name == "shipyard.orchestrator.janitor"]
        assert len(logged) == FAILURES
        assert all(r.exc_info and r.exc_info[0] is OperationalError for r in logged)
        # It went on with its work: the warm window that ended meanwhile was retired.
        assert world.runtime.running_revisions("api") == {second["green_revision"]}
    finally:
        await world.pipeline.stop()

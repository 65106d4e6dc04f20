"""The pipeline runs the audit checkpoint publisher and asks it to publish at every deployment's
end (orchestrator/outcome.py ``finish``), whatever the outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.orchestrator.world import PipelineWorld


class CountingCheckpoints:
    """Stands in for ``CheckpointPublisher``: counts requests, runs until cancelled."""

    def __init__(self) -> None:
        self.requests = 0
        self.running = asyncio.Event()
        self.cancelled = False

    def request(self) -> None:
        self.requests += 1

    async def run(self) -> None:
        self.running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_every_deployment_end_asks_for_a_checkpoint(tmp_path: Path) -> None:
    world = PipelineWorld(tmp_path)
    checkpoints = CountingCheckpoints()
    world.checkpoints = checkpoints
    world.pipeline = world.new_pipeline()
    await world.pipeline.start()
    try:
        await asyncio.wait_for(checkpoints.running.wait(), 10)
        ok = await world.deploy("aaaa1111")
        after_success = checkpoints.requests
        world.builder.fail.add("bbbb2222")
        failed = await world.deploy("bbbb2222")
    finally:
        await world.pipeline.stop()

    assert ok["status"] == "Success", ok.get("error")
    assert after_success == 1
    assert failed["status"] == "Failed"
    assert checkpoints.requests == 2
    assert checkpoints.cancelled

"""Build slots: at most N builds at once, the rest queued in submission order with their position
shown as a ``queued`` stage; an abort takes a deployment out of the queue; a restart queues again.

Driven through the real pipeline (``PipelineWorld``) with a builder whose builds block until the
test releases them, so "running" and "waiting" are states the test holds, not timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shipyard.build.base import Artifact, BuildRequest
from shipyard.build.fake import FakeBuilder
from shipyard.orchestrator.build_slots import BuildSlots
from tests.orchestrator.world import Doc, PipelineWorld, restart

BLUE_GREEN = {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0}}


class BlockingBuilder(FakeBuilder):
    """A fake build that runs until the test releases its commit."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        #: Commits whose build is running now.
        self.running: set[str] = set()
        self.most_at_once = 0
        self.changed = asyncio.Condition()

    def release(self, commit: str) -> None:
        self.gates.setdefault(commit, asyncio.Event()).set()

    async def build(self, request: BuildRequest) -> Artifact:
        commit = request.source.commit
        self.running.add(commit)
        self.most_at_once = max(self.most_at_once, len(self.running))
        async with self.changed:
            self.changed.notify_all()
        try:
            await self.gates.setdefault(commit, asyncio.Event()).wait()
        finally:
            self.running.discard(commit)
        return await super().build(request)

    async def until_running(self, *commits: str) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: set(commits) <= self.running)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, builder=BlockingBuilder())
    w.build_limit = 2
    w.pipeline = w.new_pipeline()
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()  # cancels builds still blocked


def builder(world: PipelineWorld) -> BlockingBuilder:
    assert isinstance(world.builder, BlockingBuilder)
    return world.builder


def queued_at(position: int) -> Callable[[Doc], bool]:
    def check(d: Doc) -> bool:
        last = d["stages"][-1] if d["stages"] else None
        return bool(
            last
            and last["name"] == "queued"
            and last["status"] == "running"
            and last["detail"].get("position") == position
        )

    return check


def stage_names(d: Doc) -> list[tuple[str, str]]:
    return [(s["name"], s["status"]) for s in d["stages"]]


async def test_builds_beyond_the_limit_wait_in_order_with_their_position(
    world: PipelineWorld,
) -> None:
    b = builder(world)
    a = await world.submit("aaaa1111", BLUE_GREEN, service="a")
    bb = await world.submit("bbbb2222", BLUE_GREEN, service="b")
    await b.until_running("aaaa1111", "bbbb2222")
    c = await world.submit("cccc3333", BLUE_GREEN, service="c")
    d = await world.submit("dddd4444", BLUE_GREEN, service="d")
    c_doc = await world.until(c["id"], queued_at(1))
    await world.until(d["id"], queued_at(2))
    assert c_doc["status"] == "Pending"  # not building yet
    assert b.running == {"aaaa1111", "bbbb2222"}

    b.release("aaaa1111")  # a slot frees: the first in line takes it, the next moves up
    await b.until_running("cccc3333")
    await world.until(d["id"], queued_at(1))
    c_doc = await world.until(c["id"], "Building")
    assert stage_names(c_doc) == [("queued", "succeeded"), ("build", "running")]
    assert (await world.wait(a["id"]))["status"] == "Success"

    for commit in ("bbbb2222", "cccc3333", "dddd4444"):
        b.release(commit)
    for dep in (bb, c, d):
        assert (await world.wait(dep["id"]))["status"] == "Success"
    assert b.most_at_once == 2


async def test_an_aborted_deployment_leaves_the_queue(world: PipelineWorld) -> None:
    b = builder(world)
    await world.submit("aaaa1111", BLUE_GREEN, service="a")
    await world.submit("bbbb2222", BLUE_GREEN, service="b")
    await b.until_running("aaaa1111", "bbbb2222")
    c = await world.submit("cccc3333", BLUE_GREEN, service="c")
    d = await world.submit("dddd4444", BLUE_GREEN, service="d")
    await world.until(d["id"], queued_at(2))

    await world.abort(c["id"])
    ended = await world.wait(c["id"])
    assert ended["status"] in ("Failed", "RolledBack")
    assert stage_names(ended)[0] == ("queued", "skipped")
    assert ended["stages"][0]["detail"]["left"] == "aborted by carol"
    await world.until(d["id"], queued_at(1))  # moved up behind nobody

    b.release("aaaa1111")
    await b.until_running("dddd4444")
    b.release("bbbb2222")
    b.release("dddd4444")
    assert (await world.wait(d["id"]))["status"] == "Success"
    assert "cccc3333" not in b.built


async def test_a_queued_deployment_queues_again_after_a_restart(world: PipelineWorld) -> None:
    b = builder(world)
    world.build_limit = 1
    await restart(world)  # the limit is the server's setting: a new control plane takes it
    a = await world.submit("aaaa1111", BLUE_GREEN, service="a")
    await b.until_running("aaaa1111")
    c = await world.submit("cccc3333", BLUE_GREEN, service="c")
    before = await world.until(c["id"], queued_at(1))

    await restart(world)
    # Both resume; whichever asks first builds (from the start), the other queues again.
    async with b.changed:
        await b.changed.wait_for(lambda: len(b.running) == 1)
    waiting = c if b.running == {"aaaa1111"} else a
    again = await world.until(waiting["id"], queued_at(1))
    if waiting is c:  # the same queued stage, its start kept
        assert again["stages"][-1]["started_at"] == before["stages"][-1]["started_at"]
        assert len([s for s in again["stages"] if s["name"] == "queued"]) == 1
    else:  # a's interrupted build ended, and it queued behind c
        assert stage_names(again)[-2:] == [("build", "skipped"), ("queued", "running")]

    b.release("aaaa1111")
    b.release("cccc3333")
    for dep in (a, c):
        done = await world.wait(dep["id"])
        assert done["status"] == "Success"
        assert [s for s in stage_names(done) if s[0] == "build"][-1] == ("build", "succeeded")
    assert b.most_at_once == 1


async def test_slots_hand_over_in_submission_order() -> None:
    slots = BuildSlots(1)
    order: list[str] = []
    positions: dict[str, list[int]] = {}
    moved = asyncio.Condition()
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def build(key: str, submitted: float, hold: asyncio.Event | None = None) -> None:
        async def told(position: int) -> None:
            positions.setdefault(key, []).append(position)
            async with moved:
                moved.notify_all()

        async with slots.slot(key, submitted=submitted, on_position=told):
            order.append(key)
            if hold is not None:
                first_in.set()
                await hold.wait()

    first = asyncio.create_task(build("first", 0.0, release_first))
    await first_in.wait()
    late = asyncio.create_task(build("late", 3.0))
    early = asyncio.create_task(build("early", 2.0))  # arrives after "late", submitted before
    async with moved:
        await moved.wait_for(lambda: positions == {"late": [1, 2], "early": [1]})
    assert slots.waiting == ["early", "late"]
    release_first.set()
    await asyncio.gather(first, late, early)
    assert order == ["first", "early", "late"]
    assert positions == {"late": [1, 2], "early": [1]}
    assert slots.running == frozenset() and slots.waiting == []


async def test_a_cancelled_waiter_and_holder_free_their_place() -> None:
    slots = BuildSlots(1)
    holding = asyncio.Event()

    async def hold_forever() -> None:
        async with slots.slot("h", submitted=0.0, on_position=_never):
            holding.set()
            await asyncio.Event().wait()

    async def wait_for_slot(key: str, submitted: float, queued: asyncio.Event) -> None:
        async def told(position: int) -> None:
            assert position == 1
            queued.set()

        async with slots.slot(key, submitted=submitted, on_position=told):
            pass

    holder = asyncio.create_task(hold_forever())
    await holding.wait()
    in_line = asyncio.Event()
    waiter = asyncio.create_task(wait_for_slot("w", 1.0, in_line))
    await in_line.wait()
    assert slots.waiting == ["w"]
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.waiting == []
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert slots.running == frozenset()
    never = asyncio.Event()
    await wait_for_slot("next", 2.0, never)  # free at once: never queued
    assert not never.is_set()


async def _never(position: int) -> None:
    raise AssertionError(f"a free slot was not given at once (position {position})")


def test_at_least_one_build_must_run() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BuildSlots(0)

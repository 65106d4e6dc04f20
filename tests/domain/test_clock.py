"""The fake clock: time jumps to the next wake-up only once nothing can run, thread work included.

Before ``to_thread`` was accounted for, the clock's driver jumped after twenty loop turns, so a
store call still waiting on SQLite in a worker thread saw time leap under it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shipyard.domain.clock import FakeClock, SystemClock, to_thread

#: Wall time a simulated blocking call takes (SQLite waiting on a lock); far more than the
#: event-loop turns the driver lets pass before it jumps.
BLOCKING_SECONDS = 0.2


async def test_time_jumps_to_the_next_wake_up() -> None:
    clock = FakeClock()
    t0 = clock.now()
    await clock.sleep(600)
    assert clock.now() == t0 + 600
    assert clock.monotonic() == clock.now()


async def test_time_does_not_move_while_a_thread_call_is_out() -> None:
    clock = FakeClock()
    t0 = clock.now()
    sleeper = asyncio.ensure_future(clock.sleep(10))

    def blocking() -> float:
        time.sleep(BLOCKING_SECONDS)  # the simulated slow call, not synchronisation
        return clock.now()

    seen = await to_thread(blocking)
    assert seen == t0
    assert not sleeper.done()
    await sleeper
    assert clock.now() == t0 + 10


async def test_a_cancelled_caller_does_not_release_the_clock_before_its_thread_ends() -> None:
    clock = FakeClock()
    t0 = clock.now()
    started, release = threading.Event(), threading.Event()
    seen: list[float] = []

    def blocking() -> None:
        started.set()
        release.wait(5)
        seen.append(clock.now())

    caller = asyncio.ensure_future(to_thread(blocking))
    # Wait (in a thread of its own, which the fake clock does not count) for the call to start.
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    caller.cancel()
    sleeper = asyncio.ensure_future(clock.sleep(10))
    done, _ = await asyncio.wait({sleeper}, timeout=BLOCKING_SECONDS)
    assert not done  # the thread is still out: time stood still
    release.set()
    await sleeper
    assert seen == [t0]
    assert caller.cancelled()


async def test_thread_errors_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await to_thread(fail)


async def test_system_clock_monotonic_never_goes_back() -> None:
    clock = SystemClock()
    a = clock.monotonic()
    await clock.sleep(0)
    assert clock.monotonic() >= a

"""Time, injected: the orchestrator, probes and planners read ``now()``, ``monotonic()`` and
``sleep()`` from a ``Clock`` so tests can run a ten-minute canary in milliseconds with
``FakeClock``.

Also ``to_thread``: ``asyncio.to_thread`` that a ``FakeClock`` accounts for. Blocking work (the
store's SQLite calls, artifact digests, the security gate) runs in worker threads; while such a
call is out, fake time does not move, so a store write that waits on SQLite's lock never sees a
deadline pass under it. Called by ``store.db.AsyncStore``, the orchestrator, the security gate
and the SQL audit log.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall clock, persisted in deadlines)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: latencies within one process. Never
        persisted (another process's reading means nothing)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class _ThreadWork:
    """Calls of ``to_thread`` still running on one event loop."""

    def __init__(self) -> None:
        self.running = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def started(self) -> None:
        self.running += 1
        self.idle.clear()

    def finished(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.idle.set()


_work: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ThreadWork] = (
    weakref.WeakKeyDictionary()
)


def _work_on(loop: asyncio.AbstractEventLoop) -> _ThreadWork:
    work = _work.get(loop)
    if work is None:
        work = _work[loop] = _ThreadWork()
    return work


async def to_thread(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``asyncio.to_thread``, counted until the thread is done (a FakeClock waits for it).

    The count drops when the *thread* ends, not when the caller stops waiting: a caller that
    is cancelled (an aborted deployment) leaves its thread running, and fake time must not
    jump while it does.
    """
    work = _work_on(asyncio.get_running_loop())
    work.started()
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))

    def done(task: asyncio.Future[_T]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here when the caller was cancelled meanwhile
        work.finished()

    call.add_done_callback(done)
    return await asyncio.shield(call)


async def threads_idle() -> None:
    """Until every ``to_thread`` call of the running loop has finished, those whose callers were
    cancelled included (before an engine they use is disposed: a connection a thread checks in
    afterwards would be left open)."""
    await _work_on(asyncio.get_running_loop()).idle.wait()


#: Loop turns ``_settle`` gives a loop it cannot look into (not CPython's own loop), and the
#: most it gives any loop: a task that reschedules itself forever must not hang the clock.
_BLIND_TURNS = 20
_MAX_TURNS = 10_000


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Return once nothing but the caller is runnable: every callback and task step the loop
    has queued has run, and none has queued another.

    A fixed number of turns was not enough: a rollback whose first store write came after a
    longer chain of wake-ups (lock, condition, shield, done callbacks) let fake time jump a
    second mid-rollback on a loaded machine (seen as ``abort_latency_ms == 1000``).
    """
    ready = getattr(loop, "_ready", None)  # CPython's BaseEventLoop run queue
    if ready is None:
        for _ in range(_BLIND_TURNS):
            await asyncio.sleep(0)
        return
    quiet = 0
    for _ in range(_MAX_TURNS):
        await asyncio.sleep(0)
        quiet = quiet + 1 if not ready else 0
        if quiet >= 2:
            return


class FakeClock:
    """A clock that only moves when every sleeper is waiting: ``sleep`` parks the caller, and
    time jumps straight to the earliest wake-up once the event loop has nothing else to run and
    no ``to_thread`` call is out.

    Tests drive async code with it exactly as with the real clock, without waiting on wall time.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by hand and wake whoever is due."""
        self._now += seconds
        self._wake_due()

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), fut))
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        await fut

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def _drive(self) -> None:
        work = _work_on(asyncio.get_running_loop())
        while self._sleepers:
            # Let every runnable task run (a few loop turns), and every thread call finish
            # (then the tasks it wakes), before jumping time forward.
            while True:
                await _settle(asyncio.get_running_loop())
                if not work.running:
                    break
                await work.idle.wait()
            self._sleepers = [s for s in self._sleepers if not s[2].done()]
            heapq.heapify(self._sleepers)
            if not self._sleepers:
                return
            self._now = max(self._now, self._sleepers[0][0])
            self._wake_due()

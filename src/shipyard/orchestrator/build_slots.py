"""Build slots: at most ``limit`` builds run at once on this control plane; the rest wait in a
queue (``shipyard serve --max-concurrent-builds``, default: one per CPU).

Thirty builds at once took the machine (and with it the control plane's answers) down; a build
is CPU- and disk-bound, so more than one per core only makes every build slower. The queue is
ordered by submission (``created_at``; arrival breaks ties), not by arrival: after a
control-plane restart every resumed deployment arrives again at once, and they queue again in
the order they were submitted. A slot is handed straight to the first waiter when a build ends,
so a newcomer never overtakes the queue.

A waiter is told its position (1 = next) whenever it changes, through the ``on_position``
callback, in its own task: pre-flight records it as the ``queued`` stage's ``position``, so
``GET /deployments/{id}`` and ``shipyard status`` show it. A waiter that is cancelled (an
abort, a shutdown) leaves the queue, and everyone behind it moves up; a cancelled holder gives
its slot to the next. Nothing here is persisted: the queue is rebuilt by the deployments
themselves when a restarted control plane resumes them (pre-flight asks for a slot again).

Used by ``preflight.build`` through ``Deps.build_slots``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

#: Default: one build per CPU (2 on the reference machine).
DEFAULT_LIMIT = os.cpu_count() or 2


@dataclass(order=True)
class _Waiter:
    #: (submission time, arrival number): equal times (a coarse clock) keep arrival order.
    rank: tuple[float, int]
    key: str = field(compare=False)
    granted: bool = field(default=False, compare=False)
    #: Set when this waiter is granted a slot or its position changed.
    wake: asyncio.Event = field(default_factory=asyncio.Event, compare=False)


class BuildSlots:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"at least one build must be able to run, got {limit}")
        self.limit = limit
        self._running: set[str] = set()
        self._waiting: list[_Waiter] = []
        self._arrivals = 0

    @property
    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    @property
    def waiting(self) -> list[str]:
        """Keys waiting for a slot, first in line first."""
        return [w.key for w in self._waiting]

    @asynccontextmanager
    async def slot(
        self,
        key: str,
        *,
        submitted: float,
        on_position: Callable[[int], Awaitable[None]],
    ) -> AsyncIterator[None]:
        """Hold a build slot for ``key`` around the body; while every slot is taken, wait in
        line (``submitted`` orders the line) and report each new position to ``on_position``
        (never called when a slot is free at once)."""
        self._arrivals += 1
        await self._acquire(key, (submitted, self._arrivals), on_position)
        try:
            yield
        finally:
            self._release(key)

    async def _acquire(
        self, key: str, rank: tuple[float, int], on_position: Callable[[int], Awaitable[None]]
    ) -> None:
        if len(self._running) < self.limit and not self._waiting:
            self._running.add(key)
            return
        waiter = _Waiter(rank, key)
        self._waiting.append(waiter)
        self._waiting.sort()
        self._wake_all()
        try:
            told = 0
            while not waiter.granted:
                position = self._waiting.index(waiter) + 1
                if position != told:
                    await on_position(position)
                    told = position
                    continue  # the queue may have moved meanwhile
                waiter.wake.clear()
                await waiter.wake.wait()
        except BaseException:
            if waiter.granted:
                self._release(key)  # granted while we were being cancelled: pass it on
            else:
                self._waiting.remove(waiter)
                self._wake_all()
            raise

    def _release(self, key: str) -> None:
        self._running.discard(key)
        moved = False
        while self._waiting and len(self._running) < self.limit:
            waiter = self._waiting.pop(0)
            self._running.add(waiter.key)
            waiter.granted = True
            waiter.wake.set()
            moved = True
        if moved:
            self._wake_all()

    def _wake_all(self) -> None:
        for w in self._waiting:
            w.wake.set()

"""Which replica drives what: this replica's leases (``store/leases.py``), kept alive, taken over
when another replica's expire, and given up at once when they are lost.

One ``Driver`` per ``Pipeline`` (one per ``shipyard serve`` replica, named ``replica_id``):

- ``renew`` every ``lease_seconds / 4``: every lease held is extended to now + ``lease_seconds``;
  one whose token or holder moved on is lost (``lose``).
- ``take_over`` every second: each active deployment with no lease or an expired one is taken
  (token + 1) and handed to the pipeline (``on_acquired``), which resumes it from its persisted
  step; the ``janitor`` lease likewise. The first pass, at start, also takes back what is held
  under this replica's own id (a restarted single control plane resumes at once, as before).
- its own presence: a lease on ``replica:<id>``, renewed with the others, so each replica knows
  whether any other is alive (``others``: the pipeline polls for commands other replicas
  received only then, so a lone control plane does no such polling).
- a watchdog: a replica that has not renewed for longer than a lease (the database gone, or the
  process paused) gives everything up at once (``lose`` on every lease: the pipeline cancels the
  driving tasks, with no rollback and nothing written): by then another replica may hold them.

The driving task writes under ``fence(name)``: a write after the lease moved on is refused in the
database (``LeaseLost``) and its ``on_lost`` cancels the task on this loop.

Clocks: ``expires_at`` is the holder's ``clock.now()`` plus the lease, compared with the other
replicas' ``clock.now()``: their clocks must agree to well within a lease (NTP keeps them within
milliseconds; a skew of a whole lease lets two replicas both believe they drive, and fencing is
then what keeps the second one's writes out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from shipyard.domain.clock import Clock
from shipyard.logs import log_event
from shipyard.store.leases import (
    JANITOR,
    Acquired,
    AsyncLeaseStore,
    Fence,
    deployment_lease,
    replica_lease,
)

log = logging.getLogger("shipyard.orchestrator.driving")

#: Seconds between two looks for deployments (and the janitor) whose lease expired.
TAKEOVER_INTERVAL_SECONDS = 1.0


class Driver:
    def __init__(
        self,
        *,
        leases: AsyncLeaseStore,
        clock: Clock,
        replica_id: str,
        lease_seconds: float,
        on_acquired: Callable[[Acquired, bool], Awaitable[None]],
        on_lost: Callable[[str], None],
    ) -> None:
        """``on_acquired(acquired, own)``: a lease was taken (``own``: from this replica's own
        id, at start); ``on_lost(name)``: stop whatever runs under it, now."""
        self.leases = leases
        self.clock = clock
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        #: Lease name -> the token this replica holds it with.
        self.held: dict[str, int] = {}
        #: The other replicas alive at the last look (``take_over``).
        self.others: set[str] = set()
        #: ``clock.monotonic()`` when the last successful renewal began (None: not yet).
        self._renewed: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- what the pipeline uses ----------------------------------------------------------------

    def hold(self, name: str, token: int) -> None:
        """A lease this replica took itself (a submit writes it with the deployment)."""
        self.held[name] = token
        if self._renewed is None:
            self._renewed = self.clock.monotonic()

    def token(self, name: str) -> int | None:
        return self.held.get(name)

    def fence(self, name: str) -> Fence:
        """The fence of a task working under ``name``: a write refused because the lease moved
        on makes this replica give it up (from the writing thread, onto this loop)."""
        token = self.held[name]
        loop = asyncio.get_running_loop()

        def lost() -> None:
            loop.call_soon_threadsafe(self.lose, name, token)

        return Fence(name, token, on_lost=lost)

    def lose(self, name: str, token: int | None = None) -> None:
        """Give ``name`` up (if still held with ``token``): its work stops at once."""
        if name not in self.held or (token is not None and self.held[name] != token):
            return
        del self.held[name]
        log_event(log, "lease.lost", lease=name, replica=self.replica_id)
        self._on_lost(name)

    def drop(self, name: str) -> None:
        """Stop renewing ``name`` (its work ended without finishing it): it expires within a
        lease and is taken over then, by whichever replica looks first, this one included."""
        if self.held.pop(name, None) is not None:
            log_event(log, "lease.dropped", lease=name, replica=self.replica_id)

    async def release(self, name: str) -> None:
        """Done with ``name`` (its deployment ended): it expires now."""
        token = self.held.pop(name, None)
        if token is not None:
            await self.leases.release(name, token, self.clock.now())

    async def release_all(self) -> None:
        """A graceful stop: every lease expires now, so another replica takes over at once."""
        for name in list(self.held):
            with contextlib.suppress(Exception):
                await self.release(name)

    # --- the loops -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Announce this replica (its presence lease), then keep its leases."""
        me = replica_lease(self.replica_id)
        got = await self.leases.acquire(
            me, self.replica_id, self.clock.now(), self.lease_seconds, steal_own=True
        )
        if got is not None:
            self.hold(me, got.token)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._tasks = [
            loop.create_task(self._every(self.lease_seconds / 4, self.renew)),
            loop.create_task(self._every(TAKEOVER_INTERVAL_SECONDS, self.take_over)),
            loop.create_task(self._every(self.lease_seconds / 4, self.watch)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _every(self, seconds: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            await self.clock.sleep(seconds)
            try:
                await work()
            except Exception:  # the database away: the watchdog decides when to give up
                log.exception("lease upkeep failed (%s)", getattr(work, "__name__", work))

    async def renew(self) -> None:
        """Extend every lease held; those lost are given up."""
        began = self.clock.monotonic()
        held = dict(self.held)
        lost = await self.leases.renew(self.replica_id, held, self.clock.now(), self.lease_seconds)
        self._renewed = began
        for name in lost:
            self.lose(name, held[name])

    async def watch(self) -> None:
        """Self-fencing: not renewed for longer than a lease, everything is given up."""
        if self._renewed is None or not self.held:
            return
        silent = self.clock.monotonic() - self._renewed
        if silent > self.lease_seconds:
            log_event(
                log,
                "lease.self_fenced",
                replica=self.replica_id,
                silent_seconds=round(silent, 3),
                leases=sorted(self.held),
            )
            for name, token in list(self.held.items()):
                self.lose(name, token)

    async def take_over(self, *, own: bool = False) -> None:
        """Take every lease nobody keeps alive: the janitor's, then active deployments'."""
        survey = await self.leases.survey(self.replica_id, self.clock.now(), own=own)
        self.others = survey.others
        for name in [JANITOR, *(deployment_lease(i) for i in survey.orphans)]:
            if name in self.held:
                continue
            got = await self.leases.acquire(
                name, self.replica_id, self.clock.now(), self.lease_seconds, steal_own=own
            )
            if got is None:
                continue
            self.hold(name, got.token)
            try:
                await self._on_acquired(got, got.previous in (None, self.replica_id))
            except Exception:
                # Held but not started: let it go rather than renew a lease nobody works under.
                log.exception("starting %s failed; its lease is let go", name)
                self.held.pop(name, None)
                with contextlib.suppress(Exception):
                    await self.leases.release(name, got.token, self.clock.now())

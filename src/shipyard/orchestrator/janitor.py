"""The janitor: every ``interval`` seconds, retire revisions whose warm window ended, then one
reconciler pass (which is also each data plane's heartbeat: the local runtime starts again an
agent that has gone away); at its first pass and then hourly, it deletes build logs past the
retention setting (``log_retention.py``).

It must never die: whatever a pass raises is logged, with its traceback when it is not one of
Shipyard's own errors, and the loop goes on. After an unexpected failure (the store failing,
say) the interval doubles up to ``MAX_INTERVAL_SECONDS``, and returns to ``interval`` after a
pass that succeeds.

One pass at a time: the loop's, or one asked for through ``retire_expired`` / ``reconcile``
(``Pipeline.retire_expired``, ``Pipeline.reconcile_data_planes``), which waits for a pass under
way rather than finding its services locked and skipping them. Started by the pipeline on the
replica that holds the ``janitor`` lease (its writes fenced by it), stopped when it loses it or
stops.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from shipyard.audit import AuditEvent
from shipyard.domain.clock import to_thread
from shipyard.errors import ShipyardError
from shipyard.logs import log_event
from shipyard.orchestrator import log_retention, serving
from shipyard.orchestrator.context import Deps
from shipyard.orchestrator.reconciler import Reconciler

log = logging.getLogger("shipyard.orchestrator.janitor")

#: The longest wait between two passes while they keep failing.
MAX_INTERVAL_SECONDS = 30.0
#: Build logs are pruned at the first pass, then at most this often.
PRUNE_INTERVAL_SECONDS = 3600.0


class Janitor:
    def __init__(
        self,
        *,
        deps: Deps,
        reconciler: Reconciler,
        locks: dict[tuple[str, str], asyncio.Lock],
        interval: float,
    ) -> None:
        self.deps = deps
        self.store = deps.store
        self.clock = deps.clock
        self.reconciler = reconciler
        #: The pipeline's per-service locks: a service a deployment is driving is left alone.
        self.locks = locks
        self.interval = interval
        #: The wait before the next pass (``interval``, or more while passes fail).
        self.delay = interval
        self._turn = asyncio.Lock()
        #: ``clock.monotonic()`` at the last log pruning (None: not yet; the first pass does).
        self._pruned_at: float | None = None

    async def run(self) -> None:
        """Pass after pass until cancelled (see the module docstring)."""
        while True:
            try:
                async with self._turn:
                    await self._retire_expired()
                    await self.reconciler.reconcile_all()
                    await self._prune_logs_when_due()
            except ShipyardError as exc:  # translated at its boundary: the message says it all
                log_event(log, "janitor.error", error=exc.message)
            except Exception:
                self.delay = min(self.delay * 2, MAX_INTERVAL_SECONDS)
                log.exception("janitor pass failed; next pass in %g s", self.delay)
            else:
                self.delay = self.interval
            await self.clock.sleep(self.delay)

    async def retire_expired(self) -> None:
        """Stop revisions whose warm window ended and that nothing else needs."""
        async with self._turn:
            await self._retire_expired()

    async def reconcile(self) -> None:
        """One reconciler pass (see orchestrator/reconciler.py)."""
        async with self._turn:
            await self.reconciler.reconcile_all()

    async def prune_logs(self) -> list[Path]:
        """Delete build logs past the retention setting now (see log_retention.py)."""
        retention = self.deps.log_retention
        if retention is None:
            return []
        active = {r.id for r in await self.deps.records.active()}
        deleted = await to_thread(
            log_retention.prune,
            deployments_dir=self.deps.logs_dir,
            builder_logs_dir=self.deps.builder_logs_dir,
            now=self.clock.now(),
            retention=retention,
            active=active,
        )
        if deleted:
            log_event(log, "build_logs.pruned", count=len(deleted))
        return deleted

    async def _prune_logs_when_due(self) -> None:
        now = self.clock.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL_SECONDS:
            return
        self._pruned_at = now
        await self.prune_logs()

    async def _retire_expired(self) -> None:
        now = self.clock.now()
        for svc in await self.store.list_services():
            if not (svc.warm_revision and svc.warm_until is not None and svc.warm_until <= now):
                continue
            lock = self.locks.setdefault((svc.service, svc.region), asyncio.Lock())
            if lock.locked() or await self.deps.in_flight(svc.service, svc.region):
                continue  # a deployment drives it (here, or on another replica)
            async with lock:
                row = await self.store.get_service(svc.service, svc.region)
                if row is None or row.warm_revision != svc.warm_revision:
                    continue  # changed while we waited for the lock
                if row.warm_revision != row.serving_revision:
                    await serving.stop_revision(
                        self.store,
                        self.deps.runtime(svc.region),
                        svc.service,
                        svc.warm_revision,
                        drain_timeout=self.deps.drain_timeout,
                    )
                await self.store.upsert_service(
                    svc.service, svc.region, warm_revision=None, warm_until=None
                )
                await self.deps.audit.append(
                    AuditEvent(
                        event_type="revision.retired",
                        service=svc.service,
                        region=svc.region,
                        user="shipyard",
                        status="retired",
                        detail={"revision": svc.warm_revision},
                    )
                )

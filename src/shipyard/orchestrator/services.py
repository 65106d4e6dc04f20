"""Operations on a service outside any deployment: ``scale`` (``shipyard scale``) and ``delete``
(``shipyard service delete``). Called by the API (``api/service_ops.py``) through
``Pipeline.services``; ``converge_replicas`` is also the reconciler's, which keeps a scaled count.

Both take the service's lock (the one a deployment holds while it drives the service, and the
reconciler skips a service under), and both are refused with a 409 naming the deployment while
one is in flight: a deployment's steps count and route replicas, and a change beside them would
be undone or, worse, half undone.

Scaling changes the serving revision's replica count; it is not a deployment (no build, no new
revision, no strategy). New replicas take traffic only once their health endpoint answers (a
replica that never does is stopped and the scale refused, the service keeping what it had);
removed ones stop getting new requests and finish those they hold (drained) before they stop.
The count is persisted (``store.service_scale``) for the revision serving then: the reconciler
keeps it (starts or drains replicas when the data plane differs) while that revision serves.
A deployment that makes another revision serve uses its manifest's ``[run] replicas``, and the
reconciler then forgets the old revision's count: the manifest, which is reviewed and versioned,
stays the source of truth for what a release runs (as ``kubectl apply`` after ``kubectl scale``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

from shipyard.audit import AuditEvent
from shipyard.errors import InvalidInput, NotFound, RevisionStartFailed, ShipyardError
from shipyard.health.probing import wait_healthy
from shipyard.orchestrator import artifacts
from shipyard.orchestrator.context import Deps
from shipyard.orchestrator.record import RevisionRecord
from shipyard.runtime.base import ReplicaStatus, Runtime
from shipyard.store.db import in_progress

#: ``shipyard scale`` accepts 1..MAX_REPLICAS, the manifest's own bounds for ``[run] replicas``.
MIN_REPLICAS = 1
MAX_REPLICAS = 64


@dataclasses.dataclass(frozen=True)
class ScaleResult:
    service: str
    region: str
    revision: str
    previous: int
    replicas: int
    started: tuple[str, ...]
    stopped: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    service: str
    region: str
    revisions: tuple[str, ...]
    replicas: int
    url: str | None


def counted(replicas: Sequence[ReplicaStatus], revision: str) -> list[ReplicaStatus]:
    """The replicas of ``revision`` that count toward its size: running, starting, or waiting
    out a restart backoff (the runtime brings those back on its own)."""
    return [
        r for r in replicas if r.revision == revision and (r.alive or r.next_restart_in is not None)
    ]


async def converge_replicas(
    deps: Deps, runtime: Runtime, stored: RevisionRecord, want: int
) -> tuple[list[str], list[str]]:
    """Make ``stored``'s revision run ``want`` replicas; (started, stopped) replica ids.

    Up: the runtime starts the missing ones (verified artifact, not routable), each must pass
    its health check, then they join the rotation; if one does not, every new one is stopped and
    ``RevisionStartFailed`` says why (the replicas that served keep serving). Down: the ones not
    taking traffic go first, then the newest; they are drained, then stopped.
    """
    service = stored.service
    state = await runtime.service_state(service)
    present = counted(state.replicas if state else [], stored.revision)
    if len(present) < want:
        await artifacts.verify(deps.gate, stored)
        known = {r.replica_id for r in present}
        replicas = await runtime.start_revision(
            await artifacts.spec(stored, deps.secrets, replicas=want)
        )
        fresh = [r for r in replicas if r.replica_id not in known]

        async def states() -> dict[str, ReplicaStatus]:
            now = await runtime.service_state(service)
            return {r.replica_id: r for r in (now.replicas if now else [])}

        ids = [r.replica_id for r in fresh]
        try:
            await wait_healthy(fresh, stored.health_check(), deps.prober, deps.clock, states)
        except ShipyardError as exc:
            await runtime.stop_replicas(service, ids, drain_timeout=deps.drain_timeout)
            raise RevisionStartFailed(
                f"scaling {service} to {want}: a new replica of {stored.revision} did not become "
                f"healthy ({exc.message}); the {len(fresh)} new replica(s) were stopped and the "
                f"service keeps its {len(present)}",
                revision=stored.revision,
            ) from exc
        await runtime.set_routable(service, ids, True)
        return ids, []
    if len(present) > want:
        # Not serving first (nothing to drain), then the newest: runtimes list replicas in the
        # order they were started.
        order = sorted(enumerate(present), key=lambda p: (p[1].alive and p[1].routable, -p[0]))
        victims = [r.replica_id for _, r in order[: len(present) - want]]
        await runtime.stop_replicas(service, victims, drain_timeout=deps.drain_timeout)
        return [], victims
    return [], []


class ServiceOps:
    """``scale`` and ``delete``; ``locks`` are the pipeline's per-service locks."""

    def __init__(self, *, deps: Deps, locks: dict[tuple[str, str], asyncio.Lock]) -> None:
        self.deps = deps
        self.locks = locks

    def _lock(self, service: str, region: str) -> asyncio.Lock:
        return self.locks.setdefault((service, region), asyncio.Lock())

    async def _refuse_in_flight(self, service: str, region: str) -> None:
        active = await self.deps.records.active_for(service, region)
        if active is not None:
            raise in_progress(service, region, active.id)

    async def scale(
        self, service: str, region: str, replicas: int, user: str, *, token_id: str | None = None
    ) -> ScaleResult:
        """Run ``replicas`` replicas of the serving revision (see the module docstring)."""
        if not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
            raise InvalidInput(
                f"replicas must be between {MIN_REPLICAS} and {MAX_REPLICAS}, got {replicas}"
            )
        runtime = self.deps.runtime(region)
        await self._refuse_in_flight(service, region)  # at once, not after a deployment ends
        async with self._lock(service, region):
            await self._refuse_in_flight(service, region)
            row = await self.deps.store.get_service(service, region)
            if row is None or row.serving_revision is None:
                raise NotFound(
                    f"service {service} serves no revision in region {region}: deploy it first"
                )
            stored = await self.deps.records.revision(row.serving_revision)
            state = await runtime.service_state(service)
            previous = len(counted(state.replicas if state else [], stored.revision))
            started, stopped = await converge_replicas(self.deps, runtime, stored, replicas)
            await self.deps.store.set_scale(
                service, region, stored.revision, replicas, self.deps.clock.now()
            )
            await self._audit(
                "service.scaled",
                service,
                region,
                user,
                revision=stored.revision,
                previous=previous,
                replicas=replicas,
                started=started,
                stopped=stopped,
                token_id=token_id,
            )
        return ScaleResult(
            service, region, stored.revision, previous, replicas, tuple(started), tuple(stopped)
        )

    async def delete(
        self, service: str, region: str, user: str, *, token_id: str | None = None
    ) -> DeleteResult:
        """Drain and stop every replica, remove the route, forget the service's record."""
        runtime = self.deps.runtime(region)
        await self._refuse_in_flight(service, region)
        async with self._lock(service, region):
            await self._refuse_in_flight(service, region)
            row = await self.deps.store.get_service(service, region)
            state = await runtime.service_state(service)
            if row is None and state is None:
                raise NotFound(f"service {service} does not exist in region {region}")
            revisions = tuple(sorted(state.revisions())) if state else ()
            replicas = len(state.replicas) if state else 0
            for revision in revisions:
                await runtime.stop_revision(
                    service, revision, drain_timeout=self.deps.drain_timeout
                )
            if state is not None:
                await runtime.router.remove_managed_routes(service)
            await self.deps.store.delete_service(service, region)
            url = state.url if state else (row.url if row else None)
            await self._audit(
                "service.deleted",
                service,
                region,
                user,
                revisions=list(revisions),
                replicas=replicas,
                url=url,
                token_id=token_id,
            )
        return DeleteResult(service, region, revisions, replicas, url)

    async def _audit(
        self, event_type: str, service: str, region: str, user: str, **detail: object
    ) -> None:
        await self.deps.audit.append(
            AuditEvent(
                event_type=event_type,
                service=service,
                region=region,
                user=user,
                status="done",
                detail={k: v for k, v in detail.items() if v is not None},
            )
        )

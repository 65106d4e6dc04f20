"""The reconciler: makes each region's data plane agree with the store, and says so when it acts.

The store is the truth about what should serve (``services``: serving and warm revisions); the
data plane (the agent) is what does. They can drift apart: an agent that lost its state, replicas
that crashed while the control plane was away, a record written by an older Shipyard. For every
service no deployment is driving, a pass (``reconcile_all``)

- repairs a record that says something false (a serving revision also marked warm);
- removes a service the store does not know at all (no service record, no deployment ever):
  its listener and every replica;
- stops orphan revisions: alive on the data plane, but neither serving, warm, nor part of a
  deployment in flight (whether the store has never heard of them or retired them);
- starts the serving revision again from its signed artifact, health-gated, when the data plane
  runs no replica of it at all (crashed replicas are the agent's to restart, with backoff);
- keeps the replica count ``shipyard scale`` set for the serving revision (starting replicas,
  health-gated, or draining them), and forgets a count set for a revision that no longer serves;
- routes 100% to the serving revision when the router says otherwise (say, someone holding the
  agent's token re-routed the service);
- watches replicas: every restart the agent made is audited (``replica.restarted``), a replica
  that keeps crashing is reported (``replica.crash_loop``), and a service left with no routable
  replica is reported when it goes down and when it comes back (``service.unavailable`` /
  ``service.available``).

A region a fleet deployment left ``unreachable`` (it did not answer in time, so the rollback went
on without it) gets the same treatment once it answers: its weights go to the store's serving
revision first (they may still favour the candidate), then the candidate is stopped as an orphan;
once the region serves only what the store says, the deployment's record says ``converged``
(``fleet.note_converged``, audited ``fleet.region_converged``).

Every repair is a log line and an audit record. Each difference between the data plane and the
store is one ``data_plane.drift`` record whose detail says what differed (``drift``: ``service``,
``revision``, ``serving_revision``, ``replicas`` or ``weights``), what the store says
(``expected``), what the data plane had (``found``) and what was done (``action``; ``restored``
false when the repair failed and will be retried). Called by ``Pipeline.start`` (once, before
in-flight deployments resume) and by the janitor (``janitor.py``) every ``janitor_interval``
seconds, which also makes it the data planes' heartbeat (the local runtime restarts an agent
that is gone). A service with a deployment in flight in the store, whichever replica drives it
(or none yet), is left to that deployment; only the replica holding the ``janitor`` lease runs
the janitor.
"""

from __future__ import annotations

import asyncio
import logging

from shipyard.audit import AuditEvent
from shipyard.errors import NotFound, ShipyardError
from shipyard.health.probing import wait_healthy
from shipyard.logs import log_event
from shipyard.orchestrator import artifacts, fleet, services
from shipyard.orchestrator.context import Deps
from shipyard.orchestrator.record import Record
from shipyard.runtime.base import ReplicaStatus, Runtime, ServiceState
from shipyard.runtime.fleet import CallTimedOut, bounded
from shipyard.store.db import ServiceRow

log = logging.getLogger("shipyard.orchestrator.reconciler")

#: A replica restarted this many times and not serving is reported as crash-looping.
CRASH_LOOP_RESTARTS = 3
#: After a failed attempt to start the serving revision again, wait this long before the next.
REPAIR_RETRY_SECONDS = 30.0
#: The audit event of every difference between a data plane and the store.
DRIFT = "data_plane.drift"
#: A region whose agent does not list its services within this long is skipped for the pass.
REGION_ANSWER_SECONDS = 10.0
#: How many of a service's deployments are read to tell whether the store knows it at all.
_HISTORY_LIMIT = 500


class Reconciler:
    def __init__(self, *, deps: Deps, locks: dict[tuple[str, str], asyncio.Lock]) -> None:
        self.deps = deps
        self.store = deps.store
        self.records = deps.records
        self.audit = deps.audit
        self.runtimes = deps.runtimes
        self.prober = deps.prober
        self.clock = deps.clock
        #: The pipeline's per-service locks: a service a deployment is driving is left alone.
        self.locks = locks
        self.drain_timeout = deps.drain_timeout
        self._restarts_seen: dict[str, int] = {}
        self._crash_looping: set[str] = set()
        self._unavailable: set[tuple[str, str]] = set()
        self._repair_after: dict[tuple[str, str], float] = {}
        #: (service, region) pairs the store has a deployment of (see ``_store_knows``).
        self._known: set[tuple[str, str]] = set()

    async def reconcile_all(self) -> None:
        """One pass over every region and service (see the module docstring)."""
        silent = await fleet.awaiting_convergence(self.deps)
        for region, runtime in list(self.runtimes.items()):
            try:
                # Bounded: a silent region (a partitioned or stopped remote agent, whose client
                # waits up to 120 s for a read) is skipped this pass, not the others with it.
                names = set(
                    await bounded(self.clock, REGION_ANSWER_SECONDS, runtime.list_services())
                )
            except CallTimedOut:
                log_event(
                    log,
                    "reconcile.region_unavailable",
                    region=region,
                    error=f"no answer within {REGION_ANSWER_SECONDS:g} s",
                )
                continue
            except ShipyardError as exc:
                log_event(log, "reconcile.region_unavailable", region=region, error=exc.message)
                continue
            names |= {s.service for s in await self.store.list_services() if s.region == region}
            for service in sorted(names):
                lock = self.locks.setdefault((service, region), asyncio.Lock())
                if lock.locked() or await self.deps.in_flight(service, region):
                    continue  # a deployment is driving it (here, or on another replica)
                async with lock:
                    try:
                        await self.reconcile_service(runtime, service)
                        if (service, region) in silent:
                            await self._note_converged(runtime, service)
                    except ShipyardError as exc:
                        log_event(
                            log,
                            "reconcile.failed",
                            service=service,
                            region=region,
                            error=exc.message,
                        )

    async def reconcile_service(self, runtime: Runtime, service: str) -> None:
        region = runtime.region
        svc = await self.store.get_service(service, region)
        if svc is not None and svc.warm_revision and svc.warm_revision == svc.serving_revision:
            # Written by a Shipyard before the record's invariants were enforced.
            await self.store.upsert_service(service, region, warm_revision=None, warm_until=None)
            await self._record(
                "service.repaired",
                service,
                region,
                problem="the serving revision was also marked warm (the janitor would retire it)",
                action="no longer warm",
                revision=svc.serving_revision,
            )
            svc = await self.store.get_service(service, region)
        dep = await self.records.active_for(service, region)
        state = await runtime.service_state(service)
        nothing_on_record = svc is None and dep is None
        if state is not None and nothing_on_record and not await self._store_knows(service, region):
            await self._remove_unknown(runtime, state)
            return
        serving = svc.serving_revision if svc else None
        # Before any orphan is stopped: no request goes to a revision being drained (a region
        # that missed a fleet's rollback still routes to the candidate).
        if (
            dep is None
            and serving is not None
            and state is not None
            and await self._route_to_serving(runtime, service, serving, state)
        ):
            state = await runtime.service_state(service)
        await self._stop_orphans(runtime, service, state, svc, dep)
        if dep is not None:
            return  # the deployment's own steps converge the rest
        if serving is None:
            return
        scale = await self.store.get_scale(service, region)
        if scale is not None and scale.revision != serving:
            # Set for a revision that no longer serves: the one serving now runs its manifest's
            # count (orchestrator/services.py).
            await self.store.clear_scale(service, region)
            scale = None
        want = scale.replicas if scale is not None else None
        if state is None or not any(r.revision == serving for r in state.replicas):
            state = await self._start_serving(runtime, service, serving, state, want)
        if state is None:
            return
        if want is not None:
            state = await self._keep_scale(runtime, service, serving, state, want)
        await self._watch_replicas(service, region, state, serving)
        await self._route_to_serving(runtime, service, serving, state)

    async def _route_to_serving(
        self, runtime: Runtime, service: str, serving: str, state: ServiceState
    ) -> bool:
        """100% to the serving revision when the router says otherwise and it can serve;
        whether it changed the weights."""
        region = runtime.region
        routable = any(r.revision == serving and r.alive and r.routable for r in state.replicas)
        found = {k: v for k, v in state.weights.items() if v}
        if routable and found != {serving: 100}:
            await runtime.router.set_weight(service, {serving: 100})
            await self._record(
                DRIFT,
                service,
                region,
                drift="weights",
                problem=f"the router had weights {found}, the store says {serving} serves",
                expected={serving: 100},
                found=found,
                action=f"100% to the serving revision {serving}",
                restored=True,
                revision=serving,
            )
            return True
        return False

    async def _note_converged(self, runtime: Runtime, service: str) -> None:
        """A region a fleet deployment left unreachable: once it runs and routes only what the
        store says, the deployment's record says so (``fleet.note_converged``)."""
        svc = await self.store.get_service(service, runtime.region)
        serving = svc.serving_revision if svc else None
        keep = {serving, svc.warm_revision if svc else None}
        state = await runtime.service_state(service)
        alive = state.revisions() if state is not None else set()
        weights = {k: v for k, v in state.weights.items() if v} if state is not None else {}
        if alive - keep:
            return  # an orphan still runs (a failed stop is retried next pass)
        if serving is not None and weights != {serving: 100}:
            return
        await fleet.note_converged(self.deps, service, runtime.region, serving)

    # --- the steps -------------------------------------------------------------------------

    async def _store_knows(self, service: str, region: str) -> bool:
        """Whether any deployment of ``service`` in ``region`` was ever recorded (a first
        deployment that failed leaves no service record, but its service is not a stranger)."""
        if (service, region) in self._known:
            return True
        history = await self.store.list_deployments(service, _HISTORY_LIMIT)
        if any(region in (doc.get("regions") or [doc.get("region")]) for doc in history):
            self._known.add((service, region))  # records are never deleted: known for good
            return True
        return False

    async def _remove_unknown(self, runtime: Runtime, state: ServiceState) -> None:
        """A service on the data plane that the store has never heard of: nothing deployed it,
        so nothing of it may run or listen. Its route and every replica go."""
        found = {
            "revisions": sorted(state.revisions()),
            "replicas": len(state.replicas),
            "weights": {k: v for k, v in state.weights.items() if v},
            "url": state.url,
        }
        await runtime.router.remove_managed_routes(state.service)
        await self._record(
            DRIFT,
            state.service,
            runtime.region,
            drift="service",
            problem=f"the data plane serves {state.service}, which the store does not know",
            expected=None,
            found=found,
            action="removed its route and stopped its replicas",
            restored=True,
        )

    async def _stop_orphans(
        self,
        runtime: Runtime,
        service: str,
        state: ServiceState | None,
        svc: ServiceRow | None,
        dep: Record | None,
    ) -> None:
        if state is None:
            return
        keep = {svc.serving_revision, svc.warm_revision} if svc else set()
        if dep is not None:
            keep |= {dep.blue_revision, dep.green_revision}
        for revision in sorted(state.revisions() - keep):
            try:
                await self.records.revision(revision)
                known = True
            except NotFound:
                known = False
            await runtime.stop_revision(service, revision, drain_timeout=self.drain_timeout)
            await self._record(
                DRIFT,
                service,
                runtime.region,
                drift="revision",
                problem=f"{revision} ran, but nothing serves, keeps or deploys it"
                + ("" if known else " (the store has no such revision)"),
                expected=sorted(r for r in keep if r),
                found=revision,
                known_to_store=known,
                action="drained and stopped",
                restored=True,
                revision=revision,
            )

    async def _start_serving(
        self,
        runtime: Runtime,
        service: str,
        serving: str,
        state: ServiceState | None,
        want: int | None = None,
    ) -> ServiceState | None:
        """The data plane runs nothing of the serving revision: start it again from its
        artifact (verified; ``want`` replicas if ``shipyard scale`` set a count, else its
        manifest's), health-gate it, route to it. Retried every REPAIR_RETRY_SECONDS."""
        region = runtime.region
        key = (service, region)
        if self.clock.now() < self._repair_after.get(key, 0.0):
            return state
        stored = await self.records.revision(serving)
        # What ran instead (None: the data plane did not have the service at all).
        found = None if state is None else sorted(state.revisions())
        log_event(log, "service.repairing", service=service, region=region, revision=serving)
        try:
            if await artifacts.verify(self.deps.gate, stored):
                await self.audit.append(
                    AuditEvent(
                        event_type="artifact.verified",
                        service=service,
                        region=region,
                        user="shipyard",
                        status="reconciling",
                        detail={"digest": stored.artifact_digest},
                    )
                )
            url = await runtime.ensure_service(service)
            replicas = await runtime.start_revision(
                await artifacts.spec(stored, self.deps.secrets, replicas=want)
            )
            fresh = [r for r in replicas if not r.routable]
            if fresh:

                async def states() -> dict[str, ReplicaStatus]:
                    now = await runtime.service_state(service)
                    return {r.replica_id: r for r in (now.replicas if now else [])}

                await wait_healthy(
                    fresh,
                    stored.health_check(),
                    self.prober,
                    self.clock,
                    states,
                )
                await runtime.set_routable(service, [r.replica_id for r in fresh], True)
            await runtime.router.set_weight(service, {serving: 100})
        except ShipyardError as exc:
            self._repair_after[key] = self.clock.now() + REPAIR_RETRY_SECONDS
            await self._record(
                DRIFT,
                service,
                region,
                drift="serving_revision",
                problem=f"the data plane runs no replica of the serving revision {serving}",
                expected=serving,
                found=found,
                action=f"restart failed: {exc.message}"[:500],
                restored=False,
                error=exc.code,
                revision=serving,
                retry_in_seconds=REPAIR_RETRY_SECONDS,
            )
            return await runtime.service_state(service)
        self._repair_after.pop(key, None)
        await self.store.upsert_service(service, region, url=url)
        await self._record(
            DRIFT,
            service,
            region,
            drift="serving_revision",
            problem=f"the data plane ran no replica of the serving revision {serving}",
            expected=serving,
            found=found,
            action=f"started {len(replicas)} replica(s) from its verified artifact, 100% to it",
            restored=True,
            revision=serving,
        )
        return await runtime.service_state(service)

    async def _keep_scale(
        self, runtime: Runtime, service: str, serving: str, state: ServiceState, want: int
    ) -> ServiceState:
        """Keep the count ``shipyard scale`` set: start (health-gated) or drain replicas of the
        serving revision when the data plane runs another number. Retried like a restart."""
        region = runtime.region
        found = len(services.counted(state.replicas, serving))
        if found == want:
            return state
        key = (service, region)
        if self.clock.now() < self._repair_after.get(key, 0.0):
            return state
        try:
            stored = await self.records.revision(serving)
            started, stopped = await services.converge_replicas(self.deps, runtime, stored, want)
        except ShipyardError as exc:
            self._repair_after[key] = self.clock.now() + REPAIR_RETRY_SECONDS
            await self._record(
                DRIFT,
                service,
                region,
                drift="replicas",
                problem=f"{serving} runs {found} replica(s), `shipyard scale` set {want}",
                expected=want,
                found=found,
                action=f"scaling failed: {exc.message}"[:500],
                restored=False,
                error=exc.code,
                revision=serving,
                retry_in_seconds=REPAIR_RETRY_SECONDS,
            )
        else:
            self._repair_after.pop(key, None)
            await self._record(
                DRIFT,
                service,
                region,
                drift="replicas",
                problem=f"{serving} ran {found} replica(s), `shipyard scale` set {want}",
                expected=want,
                found=found,
                action=f"started {started}" if started else f"drained and stopped {stopped}",
                restored=True,
                revision=serving,
            )
        now = await runtime.service_state(service)
        return now if now is not None else state

    async def _watch_replicas(
        self, service: str, region: str, state: ServiceState, serving: str
    ) -> None:
        """Audit the agent's restarts, report crash loops and a service that cannot answer."""
        for r in state.replicas:
            seen = self._restarts_seen.get(r.replica_id)
            if r.restarts > (seen or 0):
                await self._record(
                    "replica.restarted",
                    service,
                    region,
                    revision=r.revision,
                    replica=r.replica_id,
                    restarts=r.restarts,
                    exit_code=r.exit_code,
                    state=r.state,
                )
            self._restarts_seen[r.replica_id] = r.restarts
            looping = r.restarts >= CRASH_LOOP_RESTARTS and not (r.alive and r.routable)
            if looping and r.replica_id not in self._crash_looping:
                self._crash_looping.add(r.replica_id)
                await self._record(
                    "replica.crash_loop",
                    service,
                    region,
                    problem=f"{r.replica_id} keeps exiting ({r.restarts} restarts, last exit "
                    f"code {r.exit_code}); the agent keeps restarting it with backoff",
                    revision=r.revision,
                    replica=r.replica_id,
                    restarts=r.restarts,
                )
            elif not looping:
                self._crash_looping.discard(r.replica_id)
        key = (service, region)
        up = any(r.revision == serving and r.alive and r.routable for r in state.replicas)
        if not up and key not in self._unavailable:
            self._unavailable.add(key)
            await self._record(
                "service.unavailable",
                service,
                region,
                problem=f"no routable replica of the serving revision {serving}",
                revision=serving,
                replicas={r.replica_id: r.state for r in state.replicas},
            )
        elif up and key in self._unavailable:
            self._unavailable.discard(key)
            await self._record("service.available", service, region, revision=serving)

    async def _record(self, event_type: str, service: str, region: str, **detail: object) -> None:
        """One log line (via the audit log's structured event) and one audit record."""
        await self.audit.append(
            AuditEvent(
                event_type=event_type,
                service=service,
                region=region,
                user="shipyard",
                status="reconciled",
                # ``expected``/``found`` stay even when None: "nothing" is what differed.
                detail={
                    k: v for k, v in detail.items() if v is not None or k in ("expected", "found")
                },
            )
        )

"""What a deployment's code works with: the pipeline's collaborators (``Deps``) and, per
deployment, a ``DeploymentContext`` (the record, its region's runtime and router, the service, its
candidate and stable revisions, the clock, the store) with the few things every step does:
``save`` the record, change its status, ``audit`` an action, look at the service's replicas.

Built by ``pipeline.Pipeline`` when it drives a deployment; read by pre-flight, the step
executors (``steps/``), the rollback and the outcome. Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.trace import Tracer

from shipyard import tracing
from shipyard.analysis.providers import MetricProvider, default_providers
from shipyard.audit import AuditEvent, AuditLog
from shipyard.audit.publishing import Checkpoints
from shipyard.build.base import DEFAULT_MAX_LOG_BYTES, Builder
from shipyard.build.image_export import ImageExporter
from shipyard.build.source_policy import SourcePolicy
from shipyard.domain.clock import Clock
from shipyard.domain.models import DeploymentStatus, HealthCheck
from shipyard.errors import HealthCheckFailed, InvariantViolation, UnknownRegion
from shipyard.health.probing import Prober
from shipyard.orchestrator.build_slots import BuildSlots
from shipyard.orchestrator.log_retention import LogRetention
from shipyard.orchestrator.record import Record, Records, utc
from shipyard.runtime.base import MeteredRouter, ReplicaStatus, Runtime
from shipyard.runtime.fleet import FleetRuntime
from shipyard.security.app_secrets import SecretResolver
from shipyard.security.gate import SecurityGate
from shipyard.store.db import AsyncStore
from shipyard.store.leases import AsyncLeaseStore


def audit_event(
    record: Record,
    event_type: str,
    detail: Mapping[str, object],
    duration_ms: int | None = None,
    *,
    user: str | None = None,
) -> AuditEvent:
    """An audit event about ``record``: who asked for it (or ``user``, who acts on it now:
    a promotion, an abort), where, and its status now; ``detail["trace_id"]`` is the
    deployment's trace (an auditor goes from the record to the trace and back)."""
    if record.trace_id is not None:
        detail = {**detail, "trace_id": record.trace_id}
    return AuditEvent(
        event_type=event_type,
        deployment_id=record.id,
        service=record.service,
        region=record.region,
        user=user or record.triggered_by,
        status=record.status.value,
        duration_ms=duration_ms,
        detail={k: v for k, v in detail.items() if v is not None},
    )


@dataclass
class Deps:
    """The pipeline's collaborators, shared by every deployment it drives."""

    store: AsyncStore
    records: Records
    audit: AuditLog
    builder: Builder
    runtimes: Mapping[str, Runtime]
    prober: Prober
    clock: Clock
    #: SBOM, scan, policy and signing after the build; signature + digest checked before
    #: every start. None only in unit tests that exercise other stages.
    gate: SecurityGate | None = None
    attestations_dir: Path | None = None
    #: Where each deployment's build log is kept (``<logs_dir>/<id>/build.log``); the API
    #: serves it incrementally so the CLI can stream it. None: kept in memory only.
    logs_dir: Path | None = None
    drain_timeout: float = 30.0
    #: The audit checkpoint publisher (``shipyard serve --witness``); asked to publish at every
    #: deployment's end. None: no witness configured.
    checkpoints: Checkpoints | None = None
    #: How many builds run at once; the others wait in its queue (``--max-concurrent-builds``).
    build_slots: BuildSlots = field(default_factory=BuildSlots)
    #: A build's log stops growing past this many bytes, with a notice (``--max-build-log-mb``).
    max_build_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    #: Old build logs are deleted by the janitor (``log_retention.py``); None: kept forever.
    log_retention: LogRetention | None = field(default_factory=LogRetention)
    #: The builders' own per-build logs (``<data>/logs``), pruned with the deployments' logs.
    builder_logs_dir: Path | None = None
    #: Which repositories may be built (``--allow-source``, ``--source-root``); None: any
    #: (unit tests of other stages).
    source_policy: SourcePolicy | None = None
    #: Exports an image's files for the scan stage (the Docker builder's engine); None: an
    #: ``oci-image`` artifact cannot be scanned, so the gate refuses it (fail closed).
    image_exporter: ImageExporter | None = None
    #: Where ``[[analysis.metrics]]`` values come from, keyed by ``provider`` (``prometheus``,
    #: ``web``; the router check is built in). Tests put fakes here.
    metric_providers: Mapping[str, MetricProvider] = field(default_factory=default_providers)
    #: Leases, commands and active regions shared by every replica (``store/leases.py``): the
    #: janitor and the reconciler leave a service with a deployment in flight on any replica
    #: alone. None only in unit tests of other stages.
    leases: AsyncLeaseStore | None = None
    #: Makes the deployments' spans (``spans.py``); the no-op tracer unless ``shipyard serve``
    #: was told where to export them (``tracing.configure``).
    tracer: Tracer = field(default=tracing.NOOP)
    #: The services' secrets (``security/app_secrets.AppSecrets``): pre-flight pins the versions
    #: a revision uses, ``artifacts.spec`` opens them. None: a deployment naming secrets fails
    #: (unit tests of other stages).
    secrets: SecretResolver | None = None

    async def in_flight(self, service: str, region: str) -> bool:
        """Whether ``service`` has a deployment in flight in ``region``, on any replica."""
        return self.leases is not None and await self.leases.service_active(service, region)

    def runtime(self, region: str) -> Runtime:
        try:
            return self.runtimes[region]
        except KeyError:
            known = ", ".join(sorted(self.runtimes))
            raise UnknownRegion(f"unknown region {region!r}; this server runs: {known}") from None

    def build_log_path(self, deployment_id: str) -> Path | None:
        return None if self.logs_dir is None else self.logs_dir / deployment_id / "build.log"


@dataclass
class DeploymentContext:
    """One deployment being driven: its record, and everything its steps act through."""

    deps: Deps
    record: Record
    #: Set by ``Pipeline.promote`` after it persisted the promotion in the record.
    promoted: asyncio.Event = field(default_factory=asyncio.Event)
    #: A ``clock.monotonic()`` reading handed over in memory by whoever started this run: when
    #: a manual rollback or an abort was asked for (latencies are measured from it). None after
    #: a restart: another process's reading means nothing.
    requested_at: float | None = None
    #: Called once the record is terminal and saved (wakes ``Pipeline.wait``).
    on_finished: Callable[[], None] = lambda: None
    #: Saves of this record, one at a time and in order: a ``promote`` saving from another
    #: task must not land before (and be overwritten by) an older write still in its thread.
    _saving: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    #: A fleet record's runtime over its regions (made on first use, see ``runtime``).
    _fleet: FleetRuntime | None = field(default=None, repr=False)
    #: The plan step this run picked up in the middle (a takeover or a restart; None: it
    #: started none mid-way). That step runs again -- steps are idempotent -- but what its
    #: previous driver recorded before dying is not recorded twice (``resumed_step``).
    _resumed: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        progress = self.record.progress
        if progress.phase == "steps" and progress.step_started_at is not None:
            self._resumed = progress.step

    @property
    def resumed_step(self) -> bool:
        """Whether the step running now is one a previous driver began (and may have finished
        without recording the next one): ``stage.start`` then reuses its succeeded stage and
        ``audit`` skips an event it already recorded, so the step is recorded once."""
        progress = self.record.progress
        return (
            self._resumed is not None
            and progress.phase == "steps"
            and progress.step == self._resumed
            and progress.step_started_at is not None
        )

    # --- who and where ---------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def service(self) -> str:
        return self.record.service

    @property
    def region(self) -> str:
        return self.record.region

    @property
    def regions(self) -> list[str]:
        """Every region the deployment acts on (one, unless it is a fleet)."""
        return self.record.all_regions

    @property
    def runtime(self) -> Runtime:
        """The region's runtime; for a fleet record, one ``FleetRuntime`` over its regions
        (those marked unreachable left out: the rollback acts on every region it can reach)."""
        fleet = self.fleet_runtime
        return fleet if fleet is not None else self.deps.runtime(self.record.region)

    @property
    def fleet_runtime(self) -> FleetRuntime | None:
        record = self.record
        if record.fleet is None:
            return None
        if self._fleet is None:
            self._fleet = FleetRuntime(
                {r: self.deps.runtime(r) for r in record.all_regions},
                self.clock,
                timeout=record.fleet.region_timeout_seconds,
                excluded=set(record.fleet.unreachable()),
            )
        return self._fleet

    @property
    def router(self) -> MeteredRouter:
        return self.runtime.router

    @property
    def clock(self) -> Clock:
        return self.deps.clock

    @property
    def store(self) -> AsyncStore:
        return self.deps.store

    @property
    def records(self) -> Records:
        return self.deps.records

    @property
    def stable(self) -> str | None:
        """The revision serving before this deployment (blue); None for a first deploy."""
        return self.record.blue_revision

    @property
    def candidate(self) -> str:
        """The revision being deployed (green); named by pre-flight, before any step runs."""
        if self.record.green_revision is None:
            raise InvariantViolation(f"deployment {self.id} has no candidate revision yet")
        return self.record.green_revision

    # --- the record --------------------------------------------------------------------------

    async def save(self) -> None:
        """Persist the record as it is now (before acting on it)."""
        async with self._saving:
            self.record.updated_at = utc(self.clock.now())
            await self.records.save(self.record)

    async def set_status(self, status: DeploymentStatus) -> None:
        self.record.status = status
        await self.save()

    @property
    def step_started_at(self) -> float:
        """When the running step began (set by the plan's loop before the step runs)."""
        started = self.record.progress.step_started_at
        if started is None:
            raise InvariantViolation(f"deployment {self.id} runs a step it did not start")
        return started

    async def audit(
        self, event_type: str, duration_ms: int | None = None, **detail: object
    ) -> None:
        """One audit record (the audit log also writes the structured log line for it)."""
        await self.audit_detail(event_type, detail, duration_ms)

    async def audit_detail(
        self, event_type: str, detail: Mapping[str, object], duration_ms: int | None = None
    ) -> None:
        """``audit`` with the detail as one mapping."""
        event = audit_event(self.record, event_type, detail, duration_ms)
        if self.resumed_step and await self._recorded_in_this_step(event):
            return  # the previous driver recorded it, then died before the next step
        await self.deps.audit.append(event)

    async def _recorded_in_this_step(self, event: AuditEvent) -> bool:
        """Whether the same event (type and detail) about this deployment is in the audit log
        since the running step began."""
        since = self.record.progress.step_started_at
        assert since is not None  # resumed_step
        wanted = _plain(event.detail)
        return any(
            r.event_type == event.event_type
            and r.timestamp.timestamp() >= since
            and _plain(r.detail) == wanted
            for r in await self.deps.audit.records(deployment_id=self.id)
        )

    # --- the service's replicas --------------------------------------------------------------

    async def alive(self) -> dict[str, list[ReplicaStatus]]:
        """Alive replicas of the service, by revision."""
        state = await self.runtime.service_state(self.service)
        out: dict[str, list[ReplicaStatus]] = {}
        for r in state.replicas if state else []:
            if r.alive:
                out.setdefault(r.revision, []).append(r)
        return out

    async def replicas_of(self, revision: str) -> list[ReplicaStatus]:
        """Every replica of ``revision``; HealthCheckFailed when it has none."""
        state = await self.runtime.service_state(self.service)
        replicas = [r for r in (state.replicas if state else []) if r.revision == revision]
        if not replicas:
            raise HealthCheckFailed(f"revision {revision} has no replicas running", attempts=0)
        return replicas

    def replica_states(self) -> Callable[[], Awaitable[Mapping[str, ReplicaStatus]]]:
        """For the health gates: the service's replicas now, by id."""
        runtime, service = self.runtime, self.service

        async def states() -> Mapping[str, ReplicaStatus]:
            state = await runtime.service_state(service)
            return {r.replica_id: r for r in (state.replicas if state else [])}

        return states

    async def health_check(self, revision: str) -> HealthCheck:
        return (await self.records.revision(revision)).health_check()


def _plain(detail: Mapping[str, object]) -> object:
    """An event's detail as the audit log stores it (JSON), to compare a new one with it."""
    return json.loads(json.dumps(detail, default=str))

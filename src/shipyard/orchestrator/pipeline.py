"""The deployment pipeline's façade: what the API and ``shipyard serve`` call.

ADR section 3's ``DeploymentPipeline.deploy`` as a durable state machine. ``submit`` records a
deployment and starts driving it; ``rollback`` (a manual rollback of any successful deployment),
``promote`` (a paused canary goes on; with ``four_eyes`` only by another subject than the one who
deployed it), ``abort`` (weight 0 now, then roll back) and ``wait`` act
on one; ``start`` converges the data planes, resumes whatever a previous control plane left in
flight and starts the janitor (and the audit checkpoint publisher, when a witness is configured);
``stop`` stops driving without rolling anything back.

Driving a deployment (``_carry_out``) is, in the orchestrator's own modules: pre-flight
(``preflight.py``: build, scan, verify, plan), the plan's steps (``steps/``: one executor per step
type), then ``outcome.succeed``; a failing step rolls back (``rollback.py``), or, with
``[deploy] on_failure = "freeze"``, freezes until a human promotes or aborts it with a reason
(``freezing.py``). The record
(``record.py``) is persisted before every action, so a control plane killed at any moment and
started again continues each deployment from its persisted step (every step is idempotent) or
finishes its rollback: traffic is never left split and no revision is orphaned.

Several replicas (``shipyard serve --replica-id``) share one database: each active deployment is
driven by the replica holding its lease (``driving.py``, ``store/leases.py``), which writes under
the lease's fencing token; another replica takes it over when the lease expires and resumes it
from the persisted step. ``promote`` and ``abort`` on any replica are validated against the
stored record and written as durable commands, applied by the driver (at once when it received
them, within ``COMMAND_POLL_SECONDS`` otherwise). The janitor (reconciler, log pruning) and the
checkpoint publisher run on the replica holding the ``janitor`` lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.trace import Tracer

from shipyard import strategies, tracing
from shipyard.audit import AuditLog
from shipyard.audit.publishing import Checkpoints
from shipyard.build.base import DEFAULT_MAX_LOG_BYTES, Builder
from shipyard.build.image_export import ImageExporter
from shipyard.build.source_policy import SourcePolicy
from shipyard.domain.clock import Clock
from shipyard.domain.models import DeploymentRequest, DeploymentStatus
from shipyard.errors import (
    Conflict,
    DeploymentAborted,
    DeploymentError,
    InvalidInput,
    LeaseLost,
    PermissionDenied,
    ShipyardError,
)
from shipyard.health.probing import Prober
from shipyard.logs import log_event
from shipyard.orchestrator import (
    build_slots,
    fleet,
    freezing,
    outcome,
    preflight,
    rollback,
    steps,
)
from shipyard.orchestrator.context import DeploymentContext, Deps, audit_event
from shipyard.orchestrator.driving import Driver
from shipyard.orchestrator.janitor import Janitor
from shipyard.orchestrator.log_retention import LogRetention
from shipyard.orchestrator.reconciler import Reconciler
from shipyard.orchestrator.record import (
    DeploymentRecord,
    Record,
    RecordedError,
    Records,
    RollbackRecord,
    utc,
)
from shipyard.orchestrator.services import ServiceOps
from shipyard.orchestrator.stage import Rollback
from shipyard.runtime.base import Runtime
from shipyard.security.app_secrets import SecretResolver
from shipyard.security.gate import SecurityGate
from shipyard.store.db import AsyncStore
from shipyard.store.leases import (
    JANITOR,
    Acquired,
    AsyncLeaseStore,
    Command,
    LeaseClaim,
    LeaseRow,
    LeaseStore,
    deployment_lease,
    fenced,
    set_fence,
)

log = logging.getLogger("shipyard.orchestrator")

#: How often the driver looks for commands another replica received (``promote``, ``abort``).
COMMAND_POLL_SECONDS = 0.2
#: Without another replica alive, pending commands are still looked for every this many polls.
COMMAND_SWEEP_TURNS = 25
#: How often ``wait`` looks at a deployment another replica drives.
WAIT_POLL_SECONDS = 0.5
#: A lease's default length (``shipyard serve --lease-seconds``).
DEFAULT_LEASE_SECONDS = 10.0


class Pipeline:
    def __init__(
        self,
        *,
        store: AsyncStore,
        audit: AuditLog,
        builder: Builder,
        runtimes: Mapping[str, Runtime],
        prober: Prober,
        clock: Clock,
        gate: SecurityGate | None = None,
        attestations_dir: Path | None = None,
        logs_dir: Path | None = None,
        drain_timeout: float = 30.0,
        janitor_interval: float = 1.0,
        four_eyes: bool = False,
        checkpoints: Checkpoints | None = None,
        max_concurrent_builds: int = build_slots.DEFAULT_LIMIT,
        max_build_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        log_retention: LogRetention | None = None,
        builder_logs_dir: Path | None = None,
        source_policy: SourcePolicy | None = None,
        image_exporter: ImageExporter | None = None,
        replica_id: str = "local",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        tracer: Tracer = tracing.NOOP,
        secrets: SecretResolver | None = None,
    ) -> None:
        """``replica_id``: this replica's name in the leases (``serve --replica-id``);
        ``lease_seconds``: how long a lease lasts without renewal (a dead replica's deployments
        are taken over within it); ``tracer``: makes the deployments' spans (``spans.py``)."""
        self.leases = AsyncLeaseStore(LeaseStore(store.sync.engine))
        self.deps = Deps(
            store=store,
            records=Records(store),
            audit=audit,
            builder=builder,
            runtimes=runtimes,  # one mapping shared with serve: a joined region appears here
            prober=prober,
            clock=clock,
            gate=gate,
            attestations_dir=attestations_dir,
            logs_dir=logs_dir,
            drain_timeout=drain_timeout,
            checkpoints=checkpoints,
            build_slots=build_slots.BuildSlots(max_concurrent_builds),
            max_build_log_bytes=max_build_log_bytes,
            log_retention=log_retention or LogRetention(),
            builder_logs_dir=builder_logs_dir,
            source_policy=source_policy,
            image_exporter=image_exporter,
            leases=self.leases,
            tracer=tracer,
            secrets=secrets,  # app secrets (security/app_secrets.py)
        )
        self.records = self.deps.records
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self.driver = Driver(
            leases=self.leases,
            clock=clock,
            replica_id=replica_id,
            lease_seconds=lease_seconds,
            on_acquired=self._acquired,
            on_lost=self._lost,
        )
        self._commands_task: asyncio.Task[None] | None = None
        #: Per deployment: one applier of its commands at a time (the poll, or a request).
        self._command_locks: dict[str, asyncio.Lock] = {}
        self.clock = clock
        #: Four eyes (``shipyard serve --four-eyes``): ``promote`` refuses the deployer.
        self.four_eyes = four_eyes
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        #: The context of each deployment being driven: ``promote`` changes the record there.
        self._live: dict[str, DeploymentContext] = {}
        #: Per deployment: one reader-writer of its record at a time between a command
        #: (``promote``, ``abort``) and a task loading it, so neither overwrites the other.
        self._record_locks: dict[str, asyncio.Lock] = {}
        self._service_locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: Per service: a submit (or manual rollback) checks that none of its regions has a
        #: deployment in flight and records its own under this lock, so two submits in this
        #: process do not both build a record; across replicas, ``active_regions`` decides.
        self._submit_locks: dict[str, asyncio.Lock] = {}
        self._janitor_task: asyncio.Task[None] | None = None
        self._checkpoints_task: asyncio.Task[None] | None = None
        self.reconciler = Reconciler(deps=self.deps, locks=self._service_locks)
        #: ``scale`` and ``delete`` of a service outside any deployment (services.py).
        self.services = ServiceOps(deps=self.deps, locks=self._service_locks)
        self.janitor = Janitor(
            deps=self.deps,
            reconciler=self.reconciler,
            locks=self._service_locks,
            interval=janitor_interval,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the janitor's lease if nobody keeps it (then converge the data planes and start
        the janitor), resume what this replica (under its id) left in flight and take over what
        other replicas let expire, then keep the leases and apply commands."""
        await self.driver.take_over(own=True)
        await self.driver.start()
        self._commands_task = asyncio.get_running_loop().create_task(self._command_loop())

    async def stop(self, *, release: bool = True) -> None:
        """Stop driving deployments *without* rolling them back: a restart (or another replica)
        resumes them. ``release``: the leases expire now, so another replica takes over at
        once; without it (as after ``kill -9``) they expire in their own time."""
        await self.driver.stop()
        tasks = list(self._tasks.values())
        for t in (self._janitor_task, self._checkpoints_task, self._commands_task):
            if t is not None:
                tasks.append(t)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._janitor_task = self._checkpoints_task = self._commands_task = None
        if release:
            await self.driver.release_all()

    def runtime(self, region: str) -> Runtime:
        return self.deps.runtime(region)

    def build_log_path(self, deployment_id: str) -> Path | None:
        return self.deps.build_log_path(deployment_id)

    # --- API entry points ------------------------------------------------------------------------

    # ``user`` is who asks (a token's subject), ``token_id`` the id of the token they asked with:
    # both go into the audit record of the request.

    async def submit(
        self,
        request: DeploymentRequest,
        user: str,
        *,
        token_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> DeploymentRecord:
        """Validate, persist (one active deployment per service) and start driving it.
        ``traceparent`` (W3C, the caller's span; ``tracestate`` beside it): the deployment's
        trace is a child of it; absent or malformed, a new trace (``tracing.new_ids``)."""
        if self.deps.source_policy is not None:  # first: a refused source records nothing
            self.deps.source_policy.check(request.source.repository)
        for region in request.target.all_regions:
            self.runtime(region)
        try:
            strategies.check(request.strategy)
        except strategies.UnsupportedStrategy as exc:
            raise InvalidInput(str(exc)) from exc
        service = request.target.service_name
        async with self._submit_lock(service):
            svc = await self.deps.store.get_service(service, request.target.region)
            record = DeploymentRecord.submitted(
                request,
                user,
                self.clock.now(),
                svc.serving_revision if svc else None,
                tracing.new_ids(traceparent, tracestate),
            )
            if await self.records.exists(record.id):
                raise Conflict(
                    f"deployment id {record.id} already exists; omit `id` to get a new one"
                )
            await fleet.check_regions_free(self.deps, record)
            if record.fleet is not None:
                await fleet.check_submit(self.deps, record)
            await self._create(record)
        try:
            await self._audit(
                record,
                "deployment.requested",
                strategy=request.strategy.kind,
                commit=request.source.commit,
                repository=request.source.repository,
                token_id=token_id,
            )
        except BaseException:
            # Recorded and held but not started: let the lease run out, so it is resumed.
            self.driver.drop(deployment_lease(record.id))
            raise
        self._spawn(record.id)
        return record

    async def rollback(
        self,
        deployment_id: str,
        user: str,
        *,
        token_id: str | None = None,
        traceparent: str | None = None,
    ) -> RollbackRecord:
        """Serve again the revision that served before ``deployment_id`` (see rollback.py), in
        a trace of its own (a child of ``traceparent``'s span when valid)."""
        await freezing.refuse_rollback_while_frozen(self.deps, deployment_id)
        record = await rollback.request(self.deps, deployment_id, user)
        record.set_trace(tracing.new_ids(traceparent))
        requested = self.clock.monotonic()
        async with self._submit_lock(record.service):
            await fleet.check_regions_free(self.deps, record)
            await self._create(record)
        try:
            await self._audit(
                record,
                "rollback.requested",
                rollback_of=deployment_id,
                instant=record.strategy.Rollback.instant,
                restore=record.green_revision,
                replacing=record.blue_revision,
                token_id=token_id,
            )
        except BaseException:
            # Recorded and held but not started: let the lease run out, so it is resumed.
            self.driver.drop(deployment_lease(record.id))
            raise
        self._spawn(record.id, requested_at=requested)
        return record

    async def promote(
        self,
        deployment_id: str,
        user: str,
        *,
        token_id: str | None = None,
        reason: str | None = None,
    ) -> Record:
        """Let a paused deployment go on (a stage's gate, an analysis that paused for a
        human: inconclusive, or too little traffic with the ``pause`` policy, or a webhook gate
        with ``on_timeout = "pause"``), or a Frozen one go on after its failed step.

        Checked against the record (Paused or Frozen; Frozen only with a ``reason``, audited
        ``deployment.unfrozen``; with ``four_eyes``, the subject who deployed it,
        ``triggered_by``, may not promote it: PermissionDenied, audited as
        ``deployment.promote_refused``), then a durable command, persisted before this answers:
        the replica driving the deployment puts the promotion in the record and wakes the task
        waiting for it (this replica at once when it is the driver). A driver that dies in
        between leaves the command to the next one."""
        async with self._record_lock(deployment_id):
            ctx = self._live.get(deployment_id)
            record = ctx.record if ctx is not None else await self.records.get(deployment_id)
            if record.status not in (DeploymentStatus.PAUSED, DeploymentStatus.FROZEN):
                raise Conflict(
                    f"deployment {deployment_id} is {record.status.value}, not Paused or "
                    "Frozen; only a paused or frozen deployment can be promoted"
                )
            freezing.require_reason(record, "promote", reason)
            if self.four_eyes and user == record.triggered_by:
                await self._audit(
                    record,
                    "deployment.promote_refused",
                    actor=user,
                    by=user,
                    token_id=token_id,
                    policy="four_eyes",
                )
                raise PermissionDenied(
                    f"{user!r} deployed {deployment_id} and may not also promote it: this server "
                    "requires four eyes (`shipyard serve --four-eyes`); another subject's token "
                    "with deployment:create for the service must promote it",
                    policy="four_eyes",
                    deployed_by=record.triggered_by,
                )
            await self._audit(
                record,
                "deployment.promote_requested",
                actor=user,
                by=user,
                token_id=token_id,
                reason=reason,
            )
            if record.status is DeploymentStatus.FROZEN:
                await self._unfrozen(record, "promote", user, token_id, reason)
            answer = record.model_copy(deep=True)
            await self.leases.add_command(
                deployment_id, "promote", user, token_id, self.clock.now()
            )
        await self.apply_commands(deployment_id)
        return answer

    async def abort(
        self,
        deployment_id: str,
        user: str,
        *,
        token_id: str | None = None,
        reason: str | None = None,
    ) -> Record:
        """Abort a deployment in flight: candidate weight to 0 at once, then roll back. A Frozen
        one only with a ``reason`` (audited ``deployment.unfrozen``, action ``abort``).

        A durable command, persisted before this answers and applied by the driver (this
        replica at once when it drives the deployment, within ``COMMAND_POLL_SECONDS``
        otherwise): its driving task is cancelled (everything it did is persisted and every
        step is idempotent), the abort is persisted as a rollback, and a new task carries it
        out, so a replica that takes over meanwhile finishes it too.
        """
        requested = self.clock.monotonic()
        record = await self.records.get(deployment_id)
        if record.terminal:
            raise Conflict(f"deployment {deployment_id} is already {record.status.value}")
        freezing.require_reason(record, "abort", reason)
        if not record.progress.rolling_back:
            await self.leases.add_command(deployment_id, "abort", user, token_id, self.clock.now())
            await self._audit(
                record,
                "deployment.abort_requested",
                actor=user,
                by=user,
                token_id=token_id,
                reason=reason,
            )
            if record.status is DeploymentStatus.FROZEN:
                await self._unfrozen(record, "abort", user, token_id, reason)
        await self.apply_commands(deployment_id, requested_at=requested)
        return await self.records.get(deployment_id)

    async def _unfrozen(
        self, record: Record, action: str, user: str, token_id: str | None, reason: str | None
    ) -> None:
        """A human's decision about a Frozen deployment, with its reason: audited when it is
        taken (the command carries no reason; the audit trail keeps it)."""
        frozen = record.progress.frozen
        await self._audit(
            record,
            "deployment.unfrozen",
            actor=user,
            by=user,
            token_id=token_id,
            reason=reason,
            action=action,
            cause=frozen.cause.code if frozen is not None else None,
        )

    async def apply_commands(
        self, deployment_id: str, *, requested_at: float | None = None
    ) -> None:
        """Apply the deployment's pending commands, in order, if this replica drives it (the
        command loop, or the request that wrote one). ``requested_at``: an abort's request time
        on this replica's clock (its latency is measured from it)."""
        name = deployment_lease(deployment_id)
        if self.driver.token(name) is None:
            return  # another replica drives it (or nobody yet): the driver applies it
        async with self._command_locks.setdefault(deployment_id, asyncio.Lock()):
            if self.driver.token(name) is None:
                return
            try:
                with fenced(self.driver.fence(name)):
                    for command in await self.leases.pending(deployment_id):
                        if command.kind == "promote":
                            await self._apply_promote(command)
                        else:
                            await self._apply_abort(command, requested_at)
            except LeaseLost:
                return  # the new driver applies what is left

    async def _apply_promote(self, command: Command) -> None:
        deployment_id = command.deployment_id
        async with self._record_lock(deployment_id):
            ctx = self._live.get(deployment_id)
            record = ctx.record if ctx is not None else await self.records.get(deployment_id)
            if record.status in (DeploymentStatus.PAUSED, DeploymentStatus.FROZEN):
                record.progress.promoted_by = command.actor
                if ctx is not None:
                    await ctx.save()
                    ctx.promoted.set()
                else:
                    record.updated_at = utc(self.clock.now())
                    await self.records.save(record)
            else:  # it went on (or ended) meanwhile: nothing to promote
                log_event(
                    log,
                    "deployment.command_dropped",
                    deployment_id=deployment_id,
                    command="promote",
                    status=record.status.value,
                )
            await self.leases.mark_taken([command.id], self.replica_id, self.clock.now())

    async def _apply_abort(self, command: Command, requested_at: float | None) -> None:
        deployment_id = command.deployment_id
        task = self._tasks.get(deployment_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        user = command.actor
        if requested_at is None:  # received by another replica: its wall clock said when
            requested_at = self.clock.monotonic() - max(0.0, self.clock.now() - command.created_at)
        async with self._record_lock(deployment_id):
            record = await self.records.get(deployment_id)
            aborting = not record.terminal and not record.progress.rolling_back
            if aborting:
                cause = DeploymentAborted(f"aborted by {user}", aborted_by=user)
                preflight.leave_queue(record, self.clock.now(), f"aborted by {user}")
                record.progress.rolling_back = True
                record.progress.frozen = None  # the abort decided; the audit keeps the freeze
                record.error = RecordedError.of(cause)
                record.updated_at = utc(self.clock.now())
                await self.records.save(record)
            await self.leases.mark_taken([command.id], self.replica_id, self.clock.now())
        if not record.terminal and deployment_id not in self._tasks:
            self._spawn(deployment_id, requested_at=requested_at if aborting else None)

    async def _command_loop(self) -> None:
        """Apply the commands other replicas received for deployments this one drives."""
        for turn in itertools.count(1):
            await self.clock.sleep(COMMAND_POLL_SECONDS)
            if not self._tasks or not (self.driver.others or turn % COMMAND_SWEEP_TURNS == 0):
                # Only another replica can have received a command this one has not; one
                # that came and went between two looks at the others is swept up now and then.
                continue
            try:
                pending = await self.leases.pending()
                for deployment_id in dict.fromkeys(c.deployment_id for c in pending):
                    await self.apply_commands(deployment_id)
            except Exception:  # the database away: the lease watchdog decides
                log.exception("applying deployment commands failed")

    async def wait(self, deployment_id: str, timeout: float | None = None) -> Record:
        """Until the deployment is terminal (or ``timeout``); returns its record. A deployment
        another replica drives is looked at every ``WAIT_POLL_SECONDS``."""
        record = await self.records.get(deployment_id)
        if record.terminal:
            return record
        event = self._done.setdefault(deployment_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not event.is_set():
                    await self._changed(deployment_id, event)
                    if (await self.records.get(deployment_id)).terminal:
                        break
        return await self.records.get(deployment_id)

    async def _changed(self, deployment_id: str, event: asyncio.Event) -> None:
        """Until ``event`` is set, the local task driving the deployment ends (done, or its
        lease lost), or, when no local task drives it, ``WAIT_POLL_SECONDS`` passed."""
        task = self._tasks.get(deployment_id)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
        other: asyncio.Future[Any] = (
            asyncio.ensure_future(asyncio.shield(task))
            if task is not None
            else asyncio.ensure_future(self.clock.sleep(WAIT_POLL_SECONDS))
        )
        try:
            await asyncio.wait({waiter, other}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (waiter, other):
                f.cancel()
            await asyncio.gather(waiter, other, return_exceptions=True)

    async def driver_of(self, deployment_id: str) -> LeaseRow | None:
        """The lease of the replica driving ``deployment_id`` (None: nobody holds one)."""
        return await self.leases.get(deployment_lease(deployment_id))

    async def drivers(self, deployment_ids: Sequence[str]) -> dict[str, LeaseRow]:
        """``driver_of`` for several deployments at once, by deployment id."""
        rows = await self.leases.get_many([deployment_lease(i) for i in deployment_ids])
        return {name.partition(":")[2]: row for name, row in rows.items()}

    async def get(self, deployment_id: str) -> Record:
        return await self.records.get(deployment_id)

    async def history(
        self, service: str | None = None, limit: int = 50, *, matching: Sequence[str] | None = None
    ) -> list[Record]:
        """The latest deployments and rollbacks, newest first (of services ``matching`` one of
        these globs, if given)."""
        return await self.records.history(service, limit, matching=matching)

    async def resume_all(self) -> None:
        """Take and resume every active deployment nobody drives: those left under this
        replica's own id (a restart), and those whose lease expired."""
        await self.driver.take_over(own=True)

    async def _acquired(self, acquired: Acquired, own: bool) -> None:
        """The driver took a lease: the janitor's (start its duties) or a deployment's (resume
        it from its persisted step; audited ``deployment.resumed`` when it was this replica's
        own or nobody's, ``deployment.taken_over`` from another replica)."""
        with fenced(self.driver.fence(acquired.name)):
            if acquired.name == JANITOR:
                await self._start_janitor()
                return
            deployment_id = acquired.name.partition(":")[2]
            record = await self.records.get(deployment_id)
            if record.terminal or deployment_id in self._tasks:
                await self.driver.release(acquired.name)
                return
            log_event(
                log,
                "deployment.resuming",
                deployment_id=record.id,
                status=record.status.value,
                # Not the gates: a gate URL's path may be a token.
                progress=record.progress.model_dump(mode="json", exclude={"plan": {"gates"}}),
            )
            if own:
                await self._audit(record, "deployment.resumed")
            else:
                await self._audit(
                    record,
                    "deployment.taken_over",
                    actor="shipyard",
                    token=acquired.token,
                    **{"from": acquired.previous, "to": self.replica_id},
                )
            self._spawn(deployment_id)
        await self.apply_commands(deployment_id)  # what waited for a driver

    def _lost(self, name: str) -> None:
        """A lease moved on (or this replica fenced itself): stop what runs under it now,
        without rolling anything back or writing anything: the new holder continues."""
        if not name.startswith("deployment:"):
            if name != JANITOR:  # its own presence: another process runs under this id
                log.error("another process took replica id %s's presence lease", self.replica_id)
                return
            for task in (self._janitor_task, self._checkpoints_task):
                if task is not None:
                    task.cancel()
            self._janitor_task = self._checkpoints_task = None
            return
        task = self._tasks.get(name.partition(":")[2])
        if task is not None:
            task.cancel()

    async def _start_janitor(self) -> None:
        """On the janitor lease's holder (its fence set): converge the data planes once, then
        the janitor's loop and the checkpoint publisher, both fenced by the lease."""
        try:
            await self.reconcile_data_planes()
        except LeaseLost:
            raise
        except Exception:  # the janitor's own passes retry it
            log.exception("converging the data planes failed")
        loop = asyncio.get_running_loop()
        self._janitor_task = loop.create_task(self.janitor.run())
        if self.deps.checkpoints is not None:
            self._checkpoints_task = loop.create_task(self.deps.checkpoints.run())

    async def retire_expired(self) -> None:
        """Stop revisions whose warm window ended and that nothing else needs."""
        await self.janitor.retire_expired()

    async def reconcile_data_planes(self) -> None:
        """After a restart: no split traffic without a deployment driving it, no orphan
        revision, the serving revision running (see orchestrator/reconciler.py)."""
        await self.janitor.reconcile()

    # --- driving ---------------------------------------------------------------------------------

    async def _create(self, record: Record) -> None:
        """Record a new deployment with this replica's lease on it (one transaction)."""
        claim = LeaseClaim(self.replica_id, self.clock.now(), self.lease_seconds)
        await self.records.create(record, lease=claim)
        self.driver.hold(deployment_lease(record.id), 1)

    def _spawn(self, deployment_id: str, *, requested_at: float | None = None) -> None:
        self._done.setdefault(deployment_id, asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._drive(deployment_id, requested_at))
        self._tasks[deployment_id] = task

        def forget(_: object) -> None:
            if self._tasks.get(deployment_id) is task:
                del self._tasks[deployment_id]

        task.add_done_callback(forget)

    def _submit_lock(self, service: str) -> asyncio.Lock:
        return self._submit_locks.setdefault(service, asyncio.Lock())

    def _record_lock(self, deployment_id: str) -> asyncio.Lock:
        return self._record_locks.setdefault(deployment_id, asyncio.Lock())

    async def _drive(self, deployment_id: str, requested_at: float | None) -> None:
        name = deployment_lease(deployment_id)
        if self.driver.token(name) is None:
            return  # lost before it started: the new holder drives it
        set_fence(self.driver.fence(name))  # this task's writes carry the lease's token
        finished = False
        try:
            finished = await self._drive_held(deployment_id, requested_at)
        except asyncio.CancelledError:
            raise  # an abort (a new task follows), a lost lease, or shutting down
        except Exception:
            log.exception("deployment %s could not be driven", deployment_id)
        if not finished:
            # Neither ended nor handed on (the store failing even for its failure, say): its
            # lease is not renewed any more, so it is resumed after a lease rather than never.
            self.driver.drop(name)

    async def _drive_held(self, deployment_id: str, requested_at: float | None) -> bool:
        """Drive it to its end under its lease: True once it is terminal or the lease moved on
        (someone else continues it)."""
        name = deployment_lease(deployment_id)
        first = await self.records.get(deployment_id)
        ctx: DeploymentContext | None = None
        live: DeploymentContext | None = None
        async with contextlib.AsyncExitStack() as held:
            # Every region's lock (a fleet holds them all, in one order: no deadlock): the
            # reconciler and the janitor leave a service a deployment drives alone.
            for region in sorted(first.all_regions):
                lock = self._service_locks.setdefault((first.service, region), asyncio.Lock())
                await held.enter_async_context(lock)
            try:
                async with self._record_lock(deployment_id):
                    ctx = live = DeploymentContext(
                        self.deps,
                        await self.records.get(deployment_id),  # as commands left it
                        requested_at=requested_at,
                        on_finished=self._done.setdefault(deployment_id, asyncio.Event()).set,
                    )
                    self._live[deployment_id] = live
                await self._carry_out(live)
            except asyncio.CancelledError:
                raise  # shutting down: the next control plane resumes from the persisted step
            except LeaseLost:
                # Another replica took it over: it continues from the persisted step.
                log_event(log, "deployment.lease_lost", deployment_id=deployment_id)
                return True
            except Exception as exc:  # last line of defence: never leave a deployment dangling
                log.exception("deployment %s crashed in the orchestrator", deployment_id)
                err = (
                    exc
                    if isinstance(exc, ShipyardError)
                    else DeploymentError(f"internal error: {exc!r}")
                )
                with contextlib.suppress(Exception):
                    ctx = DeploymentContext(
                        self.deps,
                        await self.records.get(deployment_id),
                        on_finished=self._done[deployment_id].set,
                    )
                    await outcome.finish(ctx, DeploymentStatus.FAILED, err)
            finally:
                if live is not None and self._live.get(deployment_id) is live:
                    del self._live[deployment_id]
                if ctx is not None and ctx.record.terminal:
                    self._done[deployment_id].set()
                    self._record_locks.pop(deployment_id, None)
                    self._command_locks.pop(deployment_id, None)
                    with contextlib.suppress(Exception):  # unreleased: it simply expires
                        await self.driver.release(name)
        return ctx is not None and ctx.record.terminal

    async def _carry_out(self, ctx: DeploymentContext) -> None:
        record = ctx.record
        if record.progress.rolling_back:  # resumed, or aborted: finish the rollback
            cause = (
                record.error.error()
                if record.error is not None
                else DeploymentError("rollback in progress")
            )
            await rollback.roll_back(ctx, cause, ctx.requested_at)
            return
        if record.progress.phase == "build":
            if not isinstance(record, DeploymentRecord):
                raise DeploymentError(f"{record.id} is a {record.kind} record in its build phase")
            try:
                await preflight.run(ctx, record)
            except ShipyardError as exc:  # nothing was started: the deployment simply failed
                await outcome.finish(ctx, DeploymentStatus.FAILED, exc)
                return
        while True:
            if record.progress.frozen is not None:  # frozen, or resumed Frozen: a human decides
                await freezing.hold(ctx)
            try:
                await steps.run(ctx)
                break
            except LeaseLost:
                raise  # not this replica's to roll back any more
            except Rollback as rb:
                cause, detected_at = rb.cause, rb.detected_at
            except ShipyardError as exc:
                cause, detected_at = exc, None
            if freezing.applies(record):  # [deploy] on_failure = "freeze": traffic stays
                await freezing.freeze(ctx, cause)
                continue
            await rollback.roll_back(ctx, cause, detected_at)
            return
        await outcome.succeed(ctx)

    async def _audit(
        self, record: Record, event_type: str, *, actor: str | None = None, **detail: object
    ) -> None:
        """Audit ``event_type`` about ``record``; ``actor``: who acts, if not its requester."""
        await self.deps.audit.append(audit_event(record, event_type, detail, user=actor))

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
type), then ``outcome.succeed``; a failing step rolls back (``rollback.py``). The record
(``record.py``) is persisted before every action, so a control plane killed at any moment and
started again continues each deployment from its persisted step (every step is idempotent) or
finishes its rollback: traffic is never left split and no revision is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from shipyard import strategies
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
    PermissionDenied,
    ShipyardError,
)
from shipyard.health.probing import Prober
from shipyard.logs import log_event
from shipyard.orchestrator import build_slots, outcome, preflight, rollback, steps
from shipyard.orchestrator.context import DeploymentContext, Deps, audit_event
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
from shipyard.security.gate import SecurityGate
from shipyard.store.db import AsyncStore

log = logging.getLogger("shipyard.orchestrator")


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
    ) -> None:
        self.deps = Deps(
            store=store,
            records=Records(store),
            audit=audit,
            builder=builder,
            runtimes=dict(runtimes),
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
        )
        self.records = self.deps.records
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
        """Converge the data planes, resume what a previous control plane left in flight, then
        start the janitor."""
        await self.reconcile_data_planes()
        await self.resume_all()
        self._janitor_task = asyncio.get_running_loop().create_task(self.janitor.run())
        if self.deps.checkpoints is not None:
            self._checkpoints_task = asyncio.get_running_loop().create_task(
                self.deps.checkpoints.run()
            )

    async def stop(self) -> None:
        """Stop driving deployments *without* rolling them back: a restart resumes them."""
        tasks = list(self._tasks.values())
        if self._janitor_task:
            tasks.append(self._janitor_task)
        if self._checkpoints_task:
            tasks.append(self._checkpoints_task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def runtime(self, region: str) -> Runtime:
        return self.deps.runtime(region)

    def build_log_path(self, deployment_id: str) -> Path | None:
        return self.deps.build_log_path(deployment_id)

    # --- API entry points ------------------------------------------------------------------------

    # ``user`` is who asks (a token's subject), ``token_id`` the id of the token they asked with:
    # both go into the audit record of the request.

    async def submit(
        self, request: DeploymentRequest, user: str, *, token_id: str | None = None
    ) -> DeploymentRecord:
        """Validate, persist (one active deployment per service) and start driving it."""
        if self.deps.source_policy is not None:  # first: a refused source records nothing
            self.deps.source_policy.check(request.source.repository)
        self.runtime(request.target.region)
        try:
            strategies.check(request.strategy)
        except strategies.UnsupportedStrategy as exc:
            raise InvalidInput(str(exc)) from exc
        svc = await self.deps.store.get_service(request.target.service_name, request.target.region)
        record = DeploymentRecord.submitted(
            request, user, self.clock.now(), svc.serving_revision if svc else None
        )
        if await self.records.exists(record.id):
            raise Conflict(f"deployment id {record.id} already exists; omit `id` to get a new one")
        await self.records.create(record)
        await self._audit(
            record,
            "deployment.requested",
            strategy=request.strategy.kind,
            commit=request.source.commit,
            repository=request.source.repository,
            token_id=token_id,
        )
        self._spawn(record.id)
        return record

    async def rollback(
        self, deployment_id: str, user: str, *, token_id: str | None = None
    ) -> RollbackRecord:
        """Serve again the revision that served before ``deployment_id`` (see rollback.py)."""
        record = await rollback.request(self.deps, deployment_id, user)
        requested = self.clock.monotonic()
        await self.records.create(record)
        await self._audit(
            record,
            "rollback.requested",
            rollback_of=deployment_id,
            instant=record.strategy.Rollback.instant,
            restore=record.green_revision,
            replacing=record.blue_revision,
            token_id=token_id,
        )
        self._spawn(record.id, requested_at=requested)
        return record

    async def promote(
        self, deployment_id: str, user: str, *, token_id: str | None = None
    ) -> Record:
        """Let a paused deployment go on (a stage's gate, or an analysis that paused for a
        human: inconclusive, or too little traffic with the ``pause`` policy).

        The promotion is in the record, persisted, before this answers; then the task waiting
        for it is woken. A control plane restarted in between finds it there. With
        ``four_eyes``, the subject who deployed it (``triggered_by``) may not promote it:
        PermissionDenied, audited as ``deployment.promote_refused``."""
        async with self._record_lock(deployment_id):
            ctx = self._live.get(deployment_id)
            record = ctx.record if ctx is not None else await self.records.get(deployment_id)
            if record.status is not DeploymentStatus.PAUSED:
                raise Conflict(
                    f"deployment {deployment_id} is {record.status.value}, not Paused; only a "
                    "paused deployment can be promoted"
                )
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
                record, "deployment.promote_requested", actor=user, by=user, token_id=token_id
            )
            answer = record.model_copy(deep=True)
            record.progress.promoted_by = user
            if ctx is not None:
                await ctx.save()
                ctx.promoted.set()
            else:
                record.updated_at = utc(self.clock.now())
                await self.records.save(record)
        return answer

    async def abort(self, deployment_id: str, user: str, *, token_id: str | None = None) -> Record:
        """Abort a deployment in flight: candidate weight to 0 at once, then roll back.

        The driving task is cancelled (everything it did is persisted and every step is
        idempotent), the abort is persisted as a rollback, and a new task carries it out, so a
        control plane restarted meanwhile finishes it too.
        """
        requested = self.clock.monotonic()
        record = await self.records.get(deployment_id)
        if record.terminal:
            raise Conflict(f"deployment {deployment_id} is already {record.status.value}")
        task = self._tasks.get(deployment_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._record_lock(deployment_id):
            record = await self.records.get(deployment_id)
            if record.terminal:
                raise Conflict(f"deployment {deployment_id} is already {record.status.value}")
            aborting = not record.progress.rolling_back
            if aborting:
                cause = DeploymentAborted(f"aborted by {user}", aborted_by=user)
                preflight.leave_queue(record, self.clock.now(), f"aborted by {user}")
                record.progress.rolling_back = True
                record.error = RecordedError.of(cause)
                record.updated_at = utc(self.clock.now())
                await self.records.save(record)
                await self._audit(
                    record, "deployment.abort_requested", actor=user, by=user, token_id=token_id
                )
        self._spawn(deployment_id, requested_at=requested if aborting else None)
        return record

    async def wait(self, deployment_id: str, timeout: float | None = None) -> Record:
        """Until the deployment is terminal (or ``timeout``); returns its record."""
        record = await self.records.get(deployment_id)
        if record.terminal:
            return record
        event = self._done.setdefault(deployment_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        return await self.records.get(deployment_id)

    async def get(self, deployment_id: str) -> Record:
        return await self.records.get(deployment_id)

    async def history(
        self, service: str | None = None, limit: int = 50, *, matching: Sequence[str] | None = None
    ) -> list[Record]:
        """The latest deployments and rollbacks, newest first (of services ``matching`` one of
        these globs, if given)."""
        return await self.records.history(service, limit, matching=matching)

    async def resume_all(self) -> None:
        for record in await self.records.active():
            if record.id not in self._tasks:
                log_event(
                    log,
                    "deployment.resuming",
                    deployment_id=record.id,
                    status=record.status.value,
                    progress=record.progress.model_dump(mode="json"),
                )
                await self._audit(record, "deployment.resumed")
                self._spawn(record.id)

    async def retire_expired(self) -> None:
        """Stop revisions whose warm window ended and that nothing else needs."""
        await self.janitor.retire_expired()

    async def reconcile_data_planes(self) -> None:
        """After a restart: no split traffic without a deployment driving it, no orphan
        revision, the serving revision running (see orchestrator/reconciler.py)."""
        await self.janitor.reconcile()

    # --- driving ---------------------------------------------------------------------------------

    def _spawn(self, deployment_id: str, *, requested_at: float | None = None) -> None:
        self._done.setdefault(deployment_id, asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._drive(deployment_id, requested_at))
        self._tasks[deployment_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(deployment_id, None))

    def _record_lock(self, deployment_id: str) -> asyncio.Lock:
        return self._record_locks.setdefault(deployment_id, asyncio.Lock())

    async def _drive(self, deployment_id: str, requested_at: float | None) -> None:
        first = await self.records.get(deployment_id)
        lock = self._service_locks.setdefault((first.service, first.region), asyncio.Lock())
        ctx: DeploymentContext | None = None
        live: DeploymentContext | None = None
        async with lock:
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
        try:
            await steps.run(ctx)
        except Rollback as rb:
            await rollback.roll_back(ctx, rb.cause, rb.detected_at)
            return
        except ShipyardError as exc:
            await rollback.roll_back(ctx, exc, None)
            return
        await outcome.succeed(ctx)

    async def _audit(
        self, record: Record, event_type: str, *, actor: str | None = None, **detail: object
    ) -> None:
        """Audit ``event_type`` about ``record``; ``actor``: who acts, if not its requester."""
        await self.deps.audit.append(audit_event(record, event_type, detail, user=actor))

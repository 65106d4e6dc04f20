"""The deployment pipeline: carries each deployment from request to Success, Failed or RolledBack.

ADR section 3's ``DeploymentPipeline.deploy`` as a durable state machine. Stages:
``build`` (Builder) -> ``scan`` (security gate, when configured) -> the strategy's steps
(strategies/*, executed here through the Runtime/TrafficRouter protocols) -> ``Success``; or
``rollback`` when the candidate fails its health gate, its bake window, a canary analysis, or a
human aborts it (``abort``). Canary stages measure the router's own per-revision metrics
(analysis/*) and may wait for a human (``promote``); rolling updates scale the two revisions
batch by batch with weights proportional to their ready replicas, and roll back the same way.

Every deployment is a JSON document in the store, written *before* each action (the step index,
its start time, the candidate's replicas). A control plane killed at any moment and started again
calls ``resume_all``: each in-flight deployment continues from its persisted step (every step is
idempotent) or finishes its rollback, so traffic is never left split and no revision is orphaned.

Called by the API (``submit``, ``rollback``, ``promote``, ``abort``, ``wait``) and by
``shipyard serve`` (``start``/``stop``). The janitor loop stops revisions kept warm past their
``scale_down_delay_seconds``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from shipyard import strategies
from shipyard.analysis.policy import AnalysisPolicy
from shipyard.analysis.verdicts import (
    AnalysisRun,
    CountersReset,
    Measurement,
    Outcome,
    Verdict,
    judge,
    measurement_error,
    window,
)
from shipyard.audit import AuditEvent, AuditLog
from shipyard.build.base import Artifact, Builder, BuildRequest
from shipyard.build.digest import verify_artifact
from shipyard.domain.clock import Clock
from shipyard.domain.manifest import Manifest
from shipyard.domain.models import (
    DeploymentMetrics,
    DeploymentRequest,
    DeploymentStatus,
    HealthCheck,
    strategy_params,
    validate_performance,
)
from shipyard.errors import (
    AnalysisFailed,
    ArtifactVerificationFailed,
    Conflict,
    DeploymentAborted,
    DeploymentError,
    HealthCheckFailed,
    InvalidInput,
    InvariantViolation,
    NotFound,
    RevisionStartFailed,
    RollbackFailed,
    SecurityScanFailed,
    ShipyardError,
    StableRevisionMissing,
    TrafficSwitchFailed,
    UnknownRegion,
)
from shipyard.health.probing import Prober, wait_healthy, watch_until_unhealthy
from shipyard.logs import log_event
from shipyard.orchestrator.reconciler import Reconciler, revision_spec
from shipyard.runtime.base import ReplicaStatus, RevisionSpec, Runtime, StickyKey
from shipyard.security.gate import SecurityGate
from shipyard.store.db import Store
from shipyard.strategies import rolling
from shipyard.strategies.steps import (
    Analyse,
    AwaitHealthy,
    AwaitPromotion,
    Bake,
    KeepWarm,
    Pause,
    ScaleCandidate,
    ScaleStable,
    SetWeight,
    StartCandidate,
    Step,
)

log = logging.getLogger("shipyard.orchestrator")

STEP_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        StartCandidate,
        AwaitHealthy,
        Pause,
        SetWeight,
        Bake,
        KeepWarm,
        Analyse,
        AwaitPromotion,
        ScaleCandidate,
        ScaleStable,
    )
}
STEP_STATUS: dict[type[Any], DeploymentStatus] = {
    StartCandidate: DeploymentStatus.DEPLOYING,
    AwaitHealthy: DeploymentStatus.DEPLOYING,
    Pause: DeploymentStatus.AWAITING_SWITCH,
    SetWeight: DeploymentStatus.SWITCHING,
    Bake: DeploymentStatus.BAKING,
    KeepWarm: DeploymentStatus.BAKING,
    Analyse: DeploymentStatus.ANALYSING,
    AwaitPromotion: DeploymentStatus.PAUSED,
    ScaleCandidate: DeploymentStatus.DEPLOYING,
    ScaleStable: DeploymentStatus.DEPLOYING,
}
#: Measurements kept on a stage record (all of them are in the audit log).
STAGE_MEASUREMENTS_KEPT = 50


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def step_to_dict(step: Step) -> dict[str, Any]:
    return {"type": type(step).__name__, **dataclasses.asdict(step)}


def step_from_dict(d: Mapping[str, Any]) -> Step:
    fields = dict(d)
    cls = STEP_TYPES[fields.pop("type")]
    if cls is Analyse:
        fields["policy"] = AnalysisPolicy.from_dict(fields["policy"])
    step: Step = cls(**fields)
    return step


class BuildLogSink:
    """Receives build output line by line (``BuildRequest.log_sink``): appends it to the
    deployment's build log as it comes, so ``GET /deployments/{id}/logs`` streams it, and keeps
    the last lines for the stage record."""

    def __init__(self, path: Path | None, keep: int = 20) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", errors="replace")

    def __call__(self, line: str) -> None:
        self._lines.append(line)
        if self._file is not None:
            self._file.write(line if line.endswith("\n") else line + "\n")
            self._file.flush()

    def tail(self) -> list[str]:
        return list(self._lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _RestoredError(DeploymentError):
    """The cause of a rollback resumed after a restart, exactly as it was recorded."""

    def __init__(self, recorded: Mapping[str, Any]) -> None:
        super().__init__(str(recorded.get("message", "rollback in progress")))
        self._recorded = dict(recorded)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._recorded)


class _Rollback(Exception):
    """Raised inside step execution: stop the plan and roll back for ``cause``."""

    def __init__(self, cause: ShipyardError, verdict_monotonic: float | None = None) -> None:
        super().__init__(cause.message)
        self.cause = cause
        self.verdict_monotonic = verdict_monotonic


class Pipeline:
    def __init__(
        self,
        *,
        store: Store,
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
    ) -> None:
        self.store = store
        self.audit = audit
        self.builder = builder
        self.runtimes = dict(runtimes)
        self.prober = prober
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.janitor_interval = janitor_interval
        #: SBOM, scan, policy and signing after the build; signature + digest checked before
        #: every start. None only in unit tests that exercise other stages.
        self.gate = gate
        self.attestations_dir = attestations_dir
        #: Where each deployment's build log is kept (``<logs_dir>/<id>/build.log``); the API
        #: serves it incrementally so the CLI can stream it. None: kept in memory only.
        self.logs_dir = logs_dir
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._service_locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: Promotions handed to a paused deployment's task: id -> event, and who promoted.
        self._promotions: dict[str, asyncio.Event] = {}
        self._promoted_by: dict[str, str] = {}
        self.reconciler = Reconciler(
            store=store,
            audit=audit,
            runtimes=self.runtimes,
            prober=prober,
            clock=clock,
            locks=self._service_locks,
            verify=self._verify_artifact,
            drain_timeout=drain_timeout,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Converge the data planes, resume what a previous control plane left in flight, then
        start the janitor."""
        await self.reconcile_data_planes()
        await self.resume_all()
        self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())

    async def stop(self) -> None:
        """Stop driving deployments *without* rolling them back: a restart resumes them."""
        tasks = list(self._tasks.values())
        if self._janitor:
            tasks.append(self._janitor)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def runtime(self, region: str) -> Runtime:
        try:
            return self.runtimes[region]
        except KeyError:
            known = ", ".join(sorted(self.runtimes))
            raise UnknownRegion(f"unknown region {region!r}; this server runs: {known}") from None

    # --- API entry points ------------------------------------------------------------------------

    async def submit(self, request: DeploymentRequest, user: str) -> dict[str, Any]:
        """Validate, persist (taking the per-service lock) and start driving a deployment."""
        self.runtime(request.target.region)
        try:
            strategies.check(request.strategy)
        except strategies.UnsupportedStrategy as exc:
            raise InvalidInput(str(exc)) from exc
        now = self.clock.now()
        svc = self.store.get_service(request.target.service_name, request.target.region)
        serving = svc.serving_revision if svc else None
        doc: dict[str, Any] = {
            "id": str(request.id),
            "kind": "deploy",
            "service": request.target.service_name,
            "region": request.target.region,
            "status": DeploymentStatus.PENDING.value,
            "strategy": request.model_dump(mode="json")["strategy"],
            "source": request.source.model_dump(mode="json"),
            "request": request.model_dump(mode="json"),
            "triggered_by": user,
            "created_ts": now,
            "created_at": _iso(now),
            "updated_at": _iso(now),
            "stages": [],
            "metrics": {},
            "progress": {"phase": "build"},
            # Recorded at submit, never guessed later: a deployment that expects a stable
            # revision and finds none refuses to run rather than becoming a "first deploy".
            "first_deploy": serving is None,
            "stable_at_submit": serving,
        }
        with contextlib.suppress(NotFound):
            self.store.get_deployment(doc["id"])
            raise Conflict(f"deployment id {doc['id']} already exists; omit `id` to get a new one")
        self.store.create_deployment(doc)
        await self._audit(
            doc,
            "deployment.requested",
            strategy=request.strategy.kind,
            commit=request.source.commit,
            repository=request.source.repository,
        )
        self._spawn(doc["id"])
        return doc

    async def rollback(self, deployment_id: str, user: str) -> dict[str, Any]:
        """Serve again the revision that served before ``deployment_id``.

        Any successful deployment can be rolled back, the latest or an earlier one: the service
        goes back to that deployment's previous revision, whatever serves now. Instant while that
        revision is still warm (running and routable); otherwise it is started again from its
        signed artifact and health-gated before it takes traffic (a cold rollback).
        """
        target = self.store.get_deployment(deployment_id)
        if target.get("kind") != "deploy":
            raise Conflict("only deployments can be rolled back, not rollbacks")
        if target["status"] != DeploymentStatus.SUCCESS.value:
            raise Conflict(
                f"deployment {deployment_id} is {target['status']}; only a successful deployment "
                "can be rolled back (a failed one never took traffic, a rolled-back one is undone)"
            )
        restore = target.get("blue_revision")
        if not restore:
            raise Conflict(
                f"deployment {deployment_id} was the service's first; there is no earlier revision"
            )
        svc = self.store.get_service(target["service"], target["region"])
        serving = svc.serving_revision if svc else None
        if serving == restore:
            raise Conflict(
                f"service {target['service']} already serves {restore}, the revision before "
                f"deployment {deployment_id}; nothing to roll back"
            )
        runtime = self.runtime(target["region"])
        state = await runtime.service_state(target["service"])
        warm = bool(
            state and any(r.revision == restore and r.alive and r.routable for r in state.replicas)
        )
        now = self.clock.now()
        plan = strategies.blue_green.plan_instant_switch(warm=warm)
        doc: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "kind": "rollback",
            "service": target["service"],
            "region": target["region"],
            "status": DeploymentStatus.PENDING.value,
            "strategy": {"Rollback": {"instant": warm}},
            "source": target.get("source"),
            "triggered_by": user,
            "created_ts": now,
            "created_at": _iso(now),
            "updated_at": _iso(now),
            "rollback_of": deployment_id,
            # The revision serving now is this rollback's "blue" (what a failed rollback keeps);
            # the restored one is its "green". For the latest deployment they are its green and
            # blue swapped; for an earlier one, whatever serves now.
            "blue_revision": serving,
            "green_revision": restore,
            "first_deploy": serving is None,
            "stable_at_submit": serving,
            "artifact_digest": self.store.get_revision_spec(restore)["artifact_digest"],
            "stages": [],
            "metrics": {},
            "progress": {
                "phase": "steps",
                "step": 0,
                "plan": [step_to_dict(s) for s in plan],
                "manual_rollback_started": time.monotonic(),
            },
        }
        self.store.create_deployment(doc)
        await self._audit(
            doc,
            "rollback.requested",
            rollback_of=deployment_id,
            instant=warm,
            restore=restore,
            replacing=serving,
        )
        self._spawn(doc["id"])
        return doc

    async def promote(self, deployment_id: str, user: str) -> dict[str, Any]:
        """Let a paused deployment go on (a stage's gate, or an analysis that paused for a
        human: inconclusive, or too little traffic with the ``pause`` policy)."""
        doc = self.store.get_deployment(deployment_id)
        if doc["status"] != DeploymentStatus.PAUSED.value:
            raise Conflict(
                f"deployment {deployment_id} is {doc['status']}, not Paused; only a paused "
                "deployment can be promoted"
            )
        self._promoted_by[deployment_id] = user
        self._promotions.setdefault(deployment_id, asyncio.Event()).set()
        return doc

    async def abort(self, deployment_id: str, user: str) -> dict[str, Any]:
        """Abort a deployment in flight: candidate weight to 0 at once, then roll back.

        The driving task is cancelled (everything it did is persisted and every step is
        idempotent), the abort is persisted as a rollback, and a new task carries it out, so a
        control plane restarted meanwhile finishes it too.
        """
        requested = time.monotonic()
        doc = self.store.get_deployment(deployment_id)
        if DeploymentStatus(doc["status"]).terminal:
            raise Conflict(f"deployment {deployment_id} is already {doc['status']}")
        task = self._tasks.get(deployment_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        doc = self.store.get_deployment(deployment_id)
        if DeploymentStatus(doc["status"]).terminal:
            raise Conflict(f"deployment {deployment_id} is already {doc['status']}")
        progress = doc.setdefault("progress", {})
        if not progress.get("rolling_back"):
            cause = DeploymentAborted(f"aborted by {user}", aborted_by=user)
            progress["rolling_back"] = True
            progress["abort_requested_monotonic"] = requested
            doc["error"] = cause.to_dict()
            self._save(doc)
            await self._audit(doc, "deployment.abort_requested", by=user)
        self._spawn(deployment_id)
        return doc

    async def wait(self, deployment_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Until the deployment is terminal (or ``timeout``); returns its document."""
        doc = self.store.get_deployment(deployment_id)
        if DeploymentStatus(doc["status"]).terminal:
            return doc
        event = self._done.setdefault(deployment_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        return self.store.get_deployment(deployment_id)

    async def resume_all(self) -> None:
        for doc in self.store.active_deployments():
            if doc["id"] not in self._tasks:
                log_event(
                    log,
                    "deployment.resuming",
                    deployment_id=doc["id"],
                    status=doc["status"],
                    progress=doc.get("progress"),
                )
                await self._audit(doc, "deployment.resumed")
                self._spawn(doc["id"])

    # --- driving ---------------------------------------------------------------------------------

    def _spawn(self, deployment_id: str) -> None:
        self._done.setdefault(deployment_id, asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._drive(deployment_id))
        self._tasks[deployment_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(deployment_id, None))

    async def _drive(self, deployment_id: str) -> None:
        doc = self.store.get_deployment(deployment_id)
        lock = self._service_locks.setdefault((doc["service"], doc["region"]), asyncio.Lock())
        async with lock:
            try:
                await self._run(doc)
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
                    doc = self.store.get_deployment(deployment_id)
                    await self._finish(doc, DeploymentStatus.FAILED, err)
            finally:
                ev = self._done.get(deployment_id)
                if (
                    ev
                    and DeploymentStatus(
                        self.store.get_deployment(deployment_id)["status"]
                    ).terminal
                ):
                    ev.set()

    async def _run(self, doc: dict[str, Any]) -> None:
        progress = doc["progress"]
        if progress.get("rolling_back"):
            cause = _RestoredError(doc.get("error") or {"message": "rollback in progress"})
            await self._roll_back(doc, cause, progress.pop("abort_requested_monotonic", None))
            return
        if progress["phase"] == "build":
            try:
                artifact = await self._build(doc)
                self._check_runnable(doc, artifact)
                await self._scan(doc, artifact)
                await self._prepare(doc, artifact)
            except ShipyardError as exc:  # nothing was started: the deployment simply failed
                await self._finish(doc, DeploymentStatus.FAILED, exc)
                return
        await self._execute_steps(doc)

    def build_log_path(self, deployment_id: str) -> Path | None:
        return None if self.logs_dir is None else self.logs_dir / deployment_id / "build.log"

    async def _build(self, doc: dict[str, Any]) -> Artifact:
        request = DeploymentRequest.model_validate(doc["request"])
        self._set_status(doc, DeploymentStatus.BUILDING)
        stage = self._stage_start(doc, "build")
        log = BuildLogSink(self.build_log_path(doc["id"]))
        try:
            artifact = await self.builder.build(
                BuildRequest(request.source, log, no_cache=request.rebuild)
            )
        except ShipyardError as exc:
            self._stage_end(doc, stage, "failed", error=exc.message, log_tail=log.tail())
            await self._audit(doc, "build.failed", error=exc.message)
            raise
        finally:
            log.close()
        doc["metrics"]["build_duration_ms"] = artifact.duration_ms
        self._stage_end(
            doc,
            stage,
            "succeeded",
            digest=artifact.digest,
            commit=artifact.commit,
            builder=artifact.builder,
            cache_hit=artifact.cache.artifact_hit,
            log_path=str(artifact.log_path) if artifact.log_path else None,
        )
        await self._audit(
            doc,
            "build.succeeded",
            duration_ms=artifact.duration_ms,
            digest=artifact.digest,
            commit=artifact.commit,
        )
        return artifact

    def _check_runnable(self, doc: dict[str, Any], artifact: Artifact) -> None:
        """The region's runtime must be able to run what was built (before scanning it)."""
        runtime = self.runtime(doc["region"])
        runs = getattr(runtime, "artifact_kinds", ("directory",))
        if artifact.kind not in runs:
            raise RevisionStartFailed(
                f"the {runtime.kind} runtime of region {doc['region']} runs "
                f"{' or '.join(runs)} artifacts, but builder {artifact.builder!r} produced an "
                f'{artifact.kind} ({artifact.digest}); use [build] builder = "local" for this '
                "region",
                artifact_kind=artifact.kind,
            )

    async def _scan(self, doc: dict[str, Any], artifact: Artifact) -> None:
        """ADR section 9: SBOM, vulnerability scan, policy, signature (the security gate)."""
        if self.gate is None:
            return
        assert self.attestations_dir is not None
        self._set_status(doc, DeploymentStatus.SCANNING)
        stage = self._stage_start(doc, "scan")
        try:
            report = await self.gate.check(
                artifact, self.attestations_dir, source_repository=doc["source"]["repository"]
            )
        except SecurityScanFailed as exc:
            self._stage_end(
                doc,
                stage,
                "failed",
                error=exc.message,
                vulnerabilities=exc.vulnerabilities,
                findings=exc.detail.get("findings"),
            )
            await self._audit(
                doc,
                "security_scan.failed",
                error=exc.message,
                vulnerabilities=exc.vulnerabilities,
                advisories=[f.get("advisory_id") for f in exc.detail.get("findings") or []],
            )
            raise
        doc["attestation"] = {"envelope": str(report.envelope_path), "sbom": str(report.sbom_path)}
        summary = report.to_dict()
        self._stage_end(
            doc,
            stage,
            "succeeded",
            packages=report.packages,
            findings=len(report.findings),
            evaluation=summary["evaluation"],
            scan_skipped=report.scan_skipped,
            sbom=summary["sbom"],
            provenance=summary["provenance"],
            durations_ms=summary["durations_ms"],
        )
        await self._audit(
            doc,
            "security_scan.passed",
            duration_ms=report.durations_ms.get("total"),
            packages=report.packages,
            findings=len(report.findings),
            scan_skipped=report.scan_skipped,
            keyid=report.keyid,
        )

    async def _verify_artifact(self, doc: dict[str, Any], spec: dict[str, Any]) -> None:
        """Only the exact digest that was built, scanned and signed may start."""
        if self.gate is None:
            return
        envelope = spec.get("attestation", {}).get("envelope")
        if not envelope:
            raise ArtifactVerificationFailed(
                f"revision {spec['revision']} has no signed provenance; rebuild it",
                reason="unsigned",
            )
        await self.gate.verify_digest(spec["artifact_digest"], Path(envelope))
        location = Path(spec["artifact_location"])
        if await asyncio.to_thread(location.is_dir):
            await asyncio.to_thread(
                verify_artifact, Path(spec["artifact_location"]), spec["artifact_digest"]
            )
        await self._audit(doc, "artifact.verified", digest=spec["artifact_digest"])

    async def _prepare(self, doc: dict[str, Any], artifact: Artifact) -> None:
        """Name the candidate revision, find the stable one, plan the strategy's steps."""
        request = DeploymentRequest.model_validate(doc["request"])
        manifest: Manifest = artifact.manifest
        revision = f"{artifact.commit[:7]}-{doc['id'][:8]}"
        spec = RevisionSpec(
            service=doc["service"],
            revision=revision,
            artifact_digest=artifact.digest,
            artifact_location=artifact.location,
            argv=manifest.run.argv,
            env=manifest.run.env,
            replicas=manifest.run.replicas,
            health_endpoint=manifest.health.endpoint,
        )
        self.store.save_revision(
            revision,
            doc["service"],
            doc["region"],
            doc["id"],
            {
                **spec.to_dict(),
                "health": manifest.health.model_dump(),
                "attestation": doc.get("attestation", {}),
            },
            self.clock.now(),
        )
        svc = self.store.get_service(doc["service"], doc["region"])
        stable = svc.serving_revision if svc else None
        expected = doc.get("stable_at_submit", stable)  # documents from before it was recorded
        if stable != expected:
            raise StableRevisionMissing(
                f"service {doc['service']} served {expected} when this deployment was submitted "
                f"and {stable} now; submit the deployment again",
                expected=expected,
                found=stable,
            )
        stable_ready = 0
        if stable:
            stable_ready = await self._require_stable(doc, stable)
        try:
            plan = list(
                strategies.plan(
                    request.strategy,
                    has_stable=stable is not None,
                    analysis_defaults=manifest.analysis,
                    replicas=manifest.run.replicas,
                    stable_replicas=stable_ready or None,
                ).steps
            )
        except strategies.InvalidPlan as exc:
            raise InvalidInput(str(exc)) from exc
        if any(isinstance(s, SetWeight) and s.sticky for s in plan) and not (
            manifest.routing.sticky_header or manifest.routing.sticky_cookie
        ):
            raise InvalidInput(
                "a canary stage asks for sticky assignment but shipyard.toml names no key: add "
                '[routing] sticky_header = "x-user-id" (or sticky_cookie = "session")'
            )
        progress: dict[str, Any] = {
            "phase": "steps",
            "step": 0,
            "plan": [step_to_dict(s) for s in plan],
            "sticky": {
                "header": manifest.routing.sticky_header,
                "cookie": manifest.routing.sticky_cookie,
            },
        }
        if request.strategy.kind == "Rolling":
            params = strategy_params(request.strategy)
            surge, unavailable = rolling.limits(params, manifest.run.replicas)
            progress["rolling"] = {
                "replicas": manifest.run.replicas,
                # What a rollback restores: the stable revision's own replica count, which a
                # release that also changes [run] replicas does not change.
                "stable_replicas": (
                    int(self.store.get_revision_spec(stable).get("replicas", 1)) if stable else 0
                ),
                "max_surge": surge,
                "max_unavailable": unavailable,
            }
        doc["artifact_digest"] = artifact.digest
        doc["commit"] = artifact.commit
        doc["blue_revision"] = stable
        doc["green_revision"] = revision
        doc["progress"] = progress
        self._save(doc)
        if plan and request.strategy.kind != "BlueGreen":
            await self._audit(
                doc,
                "plan.created",
                strategy=request.strategy.kind,
                steps=[s.name for s in plan],
                stable=stable,
                candidate=revision,
                **progress.get("rolling", {}),
            )

    async def _require_stable(self, doc: dict[str, Any], stable: str) -> int:
        """Ready replicas of the revision the store says serves; StableRevisionMissing if none.

        A deployment that finds no ready stable revision refuses to run: carrying it out as a
        first deploy would drop its bake, its canary stages and anything to roll back to.
        """
        state = await self.runtime(doc["region"]).service_state(doc["service"])
        replicas = [r for r in (state.replicas if state else []) if r.revision == stable]
        ready = sum(1 for r in replicas if r.alive and r.routable)
        if ready == 0:
            seen = ", ".join(f"{r.replica_id} {r.state}" for r in replicas) or "no replicas"
            log_event(log, "stable.missing", deployment_id=doc["id"], revision=stable, seen=seen)
            raise StableRevisionMissing(
                f"service {doc['service']} should be serving {stable}, but region "
                f"{doc['region']} runs no ready replica of it ({seen}); nothing was changed. "
                f"Shipyard restarts crashed replicas and repairs the region on its own: check "
                f"`shipyard status {doc['service']}`, then deploy again",
                revision=stable,
                replicas=seen,
            )
        return ready

    async def _execute_steps(self, doc: dict[str, Any]) -> None:
        progress = doc["progress"]
        plan = [step_from_dict(s) for s in progress["plan"]]
        try:
            while progress["step"] < len(plan):
                step = plan[progress["step"]]
                if progress.get("step_started_at") is None:
                    progress["step_started_at"] = self.clock.now()
                self._set_status(doc, STEP_STATUS[type(step)])  # persisted before acting
                await self._execute(doc, step)
                progress["step"] += 1
                progress["step_started_at"] = None
                self._save(doc)
        except _Rollback as rb:
            await self._roll_back(doc, rb.cause, rb.verdict_monotonic)
            return
        except ShipyardError as exc:
            await self._roll_back(doc, exc, None)
            return
        await self._succeed(doc)

    async def _execute(self, doc: dict[str, Any], step: Step) -> None:
        runtime = self.runtime(doc["region"])
        service, candidate, stable = doc["service"], doc["green_revision"], doc.get("blue_revision")
        started = doc["progress"]["step_started_at"]
        match step:
            case StartCandidate():
                stage = self._stage_start(doc, step.name)
                stored = self.store.get_revision_spec(candidate)
                spec = revision_spec(stored)
                doc["url"] = await runtime.ensure_service(service)
                try:
                    await self._verify_artifact(doc, stored)
                    replicas = await runtime.start_revision(spec)
                except DeploymentError as exc:
                    self._stage_end(doc, stage, "failed", error=exc.message)
                    raise
                doc["progress"]["candidate_replicas"] = [r.replica_id for r in replicas]
                self._stage_end(
                    doc,
                    stage,
                    "succeeded",
                    revision=candidate,
                    replicas=[r.replica_id for r in replicas],
                )
                await self._audit(
                    doc, "revision.started", revision=candidate, replicas=len(replicas)
                )
            case AwaitHealthy():
                stage = self._stage_start(doc, step.name)
                check = self._health_check(candidate)
                replicas = await self._replicas(doc, candidate)
                try:
                    report = await wait_healthy(
                        replicas, check, self.prober, self.clock, self._states_of(doc)
                    )
                except HealthCheckFailed as exc:
                    self._stage_end(doc, stage, "failed", error=exc.message, attempts=exc.attempts)
                    await self._audit(
                        doc, "health_check.failed", error=exc.message, attempts=exc.attempts
                    )
                    raise _Rollback(exc) from exc
                await runtime.set_routable(service, [r.replica_id for r in replicas], True)
                doc["metrics"]["health_check_duration_ms"] = report.duration_ms
                self._stage_end(doc, stage, "succeeded", attempts=report.attempts)
                await self._audit(
                    doc,
                    "health_check.passed",
                    duration_ms=report.duration_ms,
                    attempts=report.attempts,
                )
            case Pause():
                stage = self._stage_start(doc, step.name, seconds=step.seconds)
                await self.clock.sleep(started + step.seconds - self.clock.now())
                self._stage_end(doc, stage, "succeeded")
            case SetWeight():
                stage = self._stage_start(doc, step.name, candidate_weight=step.candidate)
                weights = {candidate: step.candidate}  # canary first: sticky ranges follow it
                if stable and step.candidate < 100:
                    weights[stable] = 100 - step.candidate
                await self._switch(doc, weights, sticky=step.sticky)
                if step.candidate == 100:
                    self._mark_serving(doc, candidate)
                self._stage_end(doc, stage, "succeeded", weights=weights)
                await self._audit(doc, "traffic.switched", weights=weights)
            case Bake():
                stage = self._stage_start(doc, step.name, seconds=step.seconds)
                replicas = await self._replicas(doc, candidate)
                verdict = await watch_until_unhealthy(
                    replicas,
                    self._health_check(candidate),
                    self.prober,
                    self.clock,
                    self._states_of(doc),
                    until=started + step.seconds,
                )
                if verdict is not None:
                    self._stage_end(doc, stage, "failed", error=verdict.reason)
                    await self._audit(
                        doc, "bake.failed", error=verdict.reason, replica=verdict.replica_id
                    )
                    raise _Rollback(
                        HealthCheckFailed(
                            f"{candidate} became unhealthy during the bake window: "
                            f"{verdict.reason}",
                            attempts=verdict.attempts,
                        ),
                        verdict.at_monotonic,
                    )
                self._stage_end(doc, stage, "succeeded")
            case KeepWarm():
                await self._keep_warm(doc, stable, step.seconds)
            case Analyse():
                await self._analyse(doc, step, started)
            case AwaitPromotion():
                stage = self._stage_start(doc, step.name, stage=step.stage)
                by = await self._await_promotion(doc, f"stage {step.stage} gate")
                self._stage_end(doc, stage, "succeeded", promoted_by=by)
            case ScaleCandidate():
                stage = self._stage_start(doc, step.name, replicas=step.replicas)
                doc["url"] = await runtime.ensure_service(service)
                try:
                    weights = await self._scale_up(doc, candidate, step.replicas, stable)
                except DeploymentError as exc:
                    self._stage_end(doc, stage, "failed", error=exc.message)
                    raise
                self._stage_end(doc, stage, "succeeded", weights=weights)
                await self._audit(
                    doc,
                    "replicas.scaled",
                    revision=candidate,
                    replicas=step.replicas,
                    weights=weights,
                )
            case ScaleStable():
                stage = self._stage_start(doc, step.name, replicas=step.replicas)
                weights = await self._scale_down(doc, stable, step.replicas, candidate)
                self._stage_end(doc, stage, "succeeded", weights=weights)
                await self._audit(
                    doc, "replicas.scaled", revision=stable, replicas=step.replicas, weights=weights
                )

    async def _keep_warm(self, doc: dict[str, Any], stable: str | None, seconds: float) -> None:
        """The revision this deployment replaced stays warm for ``seconds`` (instant rollback),
        and takes over the window of the one kept warm before, which is stopped now.

        Only a deployment that got this far ends the previous window: one that fails or is
        rolled back leaves it as it was, so the service can still go back instantly.
        """
        service, region = doc["service"], doc["region"]
        svc = self.store.get_service(service, region)
        previous = svc.warm_revision if svc else None
        if stable and seconds > 0:
            self.store.upsert_service(
                service, region, warm_revision=stable, warm_until=self.clock.now() + seconds
            )
        else:
            if previous is not None:
                self.store.upsert_service(service, region, warm_revision=None, warm_until=None)
            if stable:
                await self._stop_revision(service, region, stable)
        if previous is not None and previous not in (stable, doc.get("green_revision")):
            await self._stop_revision(service, region, previous)
            await self._audit(doc, "revision.retired", revision=previous, reason="superseded")

    # --- canary analysis -------------------------------------------------------------------------

    async def _analyse(self, doc: dict[str, Any], step: Analyse, started: float) -> None:
        """Hold the stage for ``step.seconds`` measuring every interval; see analysis.verdicts.

        Resumable: the deadline, the tallies and the window's starting snapshot are persisted
        in ``progress["analysis"]`` after every measurement.
        """
        progress, policy = doc["progress"], step.policy
        service, candidate = doc["service"], doc["green_revision"]
        stable = doc.get("blue_revision")
        router = self.runtime(doc["region"]).router
        stage = self._stage_start(
            doc, step.name, stage=step.stage, weight=step.weight, seconds=step.seconds
        )
        state: dict[str, Any] | None = progress.get("analysis")
        if state is None or state.get("step") != progress["step"]:
            state = {
                "step": progress["step"],
                "deadline": started + step.seconds,
                "last_at": self.clock.now(),
                "baseline": None,
                "run": AnalysisRun(policy).to_dict(),
                "paused": None,
            }
            progress["analysis"] = state
            self._save(doc)
        if not policy.enabled or step.weight == 0:
            why = "disabled for this stage" if not policy.enabled else "the canary has weight 0"
            await self._audit(doc, "analysis.skipped", stage=step.stage, reason=why)
            await self.clock.sleep(state["deadline"] - self.clock.now())
            self._stage_end(doc, stage, "succeeded", analysis="skipped", reason=why)
            return
        run = AnalysisRun.from_dict(state["run"])
        if state["paused"]:
            await self._analysis_paused(doc, stage, state, state["paused"])
            return
        if state["baseline"] is None:
            with contextlib.suppress(ShipyardError):  # unavailable: the first window says so
                state["baseline"] = dict(await router.metrics(service))
                state["last_at"] = self.clock.now()
                self._save(doc)
        while True:
            at = min(state["last_at"] + policy.interval_seconds, state["deadline"])
            await self.clock.sleep(at - self.clock.now())
            now = self.clock.now()
            at_deadline = now >= state["deadline"]
            snapshot: dict[str, Any] | None = None
            try:
                snapshot = dict(await router.metrics(service))
                if state["baseline"] is None:
                    raise CountersReset("no earlier snapshot to measure a window from")
                m = judge(
                    window(snapshot, state["baseline"], candidate),
                    window(snapshot, state["baseline"], stable),
                    policy,
                )
            except CountersReset as exc:
                m = measurement_error(str(exc))
                state["baseline"] = snapshot  # start a fresh window from here
            except ShipyardError as exc:
                m = measurement_error(f"metrics unavailable: {exc.message}"[:500])
            decision = run.record(m, at_deadline=at_deadline)
            decided = time.monotonic()
            if m.verdict not in (Verdict.ERROR, Verdict.INSUFFICIENT_DATA) and snapshot:
                state["baseline"] = snapshot  # else the window keeps growing (extend)
            state["last_at"] = now
            state["run"] = run.to_dict()
            await self._record_measurement(doc, stage, step, m, decision.outcome.value)
            match decision.outcome:
                case Outcome.FAILED:
                    self._stage_end(
                        doc, stage, "failed", error=decision.reason, tallies=state["run"]
                    )
                    await self._audit(
                        doc,
                        "analysis.failed",
                        stage=step.stage,
                        weight=step.weight,
                        decision="abort",
                        reason=decision.reason,
                    )
                    raise _Rollback(
                        AnalysisFailed(
                            f"canary analysis failed at stage {step.stage} "
                            f"({step.weight}%): {decision.reason}",
                            stage=step.stage,
                            verdict=m.verdict.value,
                        ),
                        decided,
                    )
                case Outcome.PASSED:
                    self._stage_end(doc, stage, "succeeded", verdict="pass", tallies=state["run"])
                    await self._audit(
                        doc,
                        "analysis.passed",
                        stage=step.stage,
                        weight=step.weight,
                        decision="continue",
                        reason=decision.reason,
                    )
                    return
                case Outcome.EXTENDED:
                    state["deadline"] += policy.interval_seconds
                    self._save(doc)
                    await self._audit(
                        doc,
                        "analysis.extended",
                        stage=step.stage,
                        reason=decision.reason,
                        extensions=run.extensions,
                    )
                case Outcome.PAUSED:
                    state["paused"] = decision.reason
                    self._save(doc)
                    await self._analysis_paused(doc, stage, state, decision.reason)
                    return
                case Outcome.CONTINUE:
                    self._save(doc)

    async def _record_measurement(
        self,
        doc: dict[str, Any],
        stage: dict[str, Any],
        step: Analyse,
        m: Measurement,
        outcome: str,
    ) -> None:
        kept: list[dict[str, Any]] = stage["detail"].setdefault("measurements", [])
        kept.append({"at": _iso(self.clock.now()), **m.to_dict()})
        del kept[:-STAGE_MEASUREMENTS_KEPT]
        self._save(doc)
        await self._audit(
            doc, "analysis.measurement", stage=step.stage, outcome=outcome, **m.to_dict()
        )

    async def _analysis_paused(
        self, doc: dict[str, Any], stage: dict[str, Any], state: dict[str, Any], reason: str
    ) -> None:
        await self._audit(doc, "analysis.paused", reason=reason)
        by = await self._await_promotion(doc, reason)
        state["paused"] = None
        self._stage_end(doc, stage, "succeeded", verdict="overridden", promoted_by=by)
        await self._audit(doc, "analysis.overridden", reason=reason, promoted_by=by)

    async def _await_promotion(self, doc: dict[str, Any], reason: str) -> str:
        """Paused until ``promote`` (``abort`` cancels this task); returns who promoted."""
        event = self._promotions.setdefault(doc["id"], asyncio.Event())
        previous = doc["status"]
        doc["progress"]["paused"] = reason
        self._set_status(doc, DeploymentStatus.PAUSED)
        await self._audit(doc, "deployment.paused", reason=reason)
        await event.wait()
        event.clear()
        by = self._promoted_by.pop(doc["id"], "unknown")
        doc["progress"].pop("paused", None)
        self._set_status(
            doc,
            DeploymentStatus(previous)
            if previous != DeploymentStatus.PAUSED.value
            else DeploymentStatus.ANALYSING,
        )
        await self._audit(doc, "deployment.promoted", by=by, reason=reason)
        return by

    # --- rolling ---------------------------------------------------------------------------------

    def _spec(self, revision: str) -> RevisionSpec:
        return revision_spec(self.store.get_revision_spec(revision))

    async def _ready(self, doc: dict[str, Any]) -> dict[str, list[ReplicaStatus]]:
        state = await self.runtime(doc["region"]).service_state(doc["service"])
        out: dict[str, list[ReplicaStatus]] = {}
        for r in state.replicas if state else []:
            if r.alive:
                out.setdefault(r.revision, []).append(r)
        return out

    async def _scale_up(
        self, doc: dict[str, Any], revision: str, replicas: int, other: str | None
    ) -> dict[str, int]:
        """``revision`` up to ``replicas``: start, health-gate the new ones, route to them, and
        re-weight both revisions by ready replicas. Idempotent."""
        runtime = self.runtime(doc["region"])
        service = doc["service"]
        alive = await self._ready(doc)
        if not alive.get(revision):
            await self._verify_artifact(doc, self.store.get_revision_spec(revision))
        started = await runtime.start_revision(
            dataclasses.replace(self._spec(revision), replicas=replicas)
        )
        fresh = [r for r in started if not r.routable]
        if fresh:
            try:
                await wait_healthy(
                    fresh,
                    self._health_check(revision),
                    self.prober,
                    self.clock,
                    self._states_of(doc),
                )
            except HealthCheckFailed as exc:
                await self._audit(
                    doc,
                    "health_check.failed",
                    revision=revision,
                    error=exc.message,
                    attempts=exc.attempts,
                )
                raise _Rollback(exc) from exc
            await runtime.set_routable(service, [r.replica_id for r in fresh], True)
        return await self._rebalance(doc, revision, other)

    async def _scale_down(
        self, doc: dict[str, Any], revision: str | None, replicas: int, other: str
    ) -> dict[str, int]:
        """``revision`` down to ``replicas``: re-weight first, then drain and stop the rest."""
        if revision is None:
            return {}
        alive = (await self._ready(doc)).get(revision, [])
        # Stop replicas that take no traffic first, then the newest.
        order = sorted(alive, key=lambda r: (r.routable, r.replica_id))
        stop = order[: max(0, len(alive) - replicas)]
        ready_after = sum(1 for r in alive if r.routable and r not in stop)
        ready_other = sum(1 for r in (await self._ready(doc)).get(other, []) if r.routable)
        weights = rolling.weights_for(other, ready_other, revision, ready_after)
        await self._switch(doc, weights)
        self._note_serving(doc, weights)
        if stop:
            await self.runtime(doc["region"]).stop_replicas(
                doc["service"], [r.replica_id for r in stop], drain_timeout=self.drain_timeout
            )
        return weights

    async def _rebalance(
        self, doc: dict[str, Any], first: str, other: str | None
    ) -> dict[str, int]:
        alive = await self._ready(doc)
        ready_first = sum(1 for r in alive.get(first, []) if r.routable)
        ready_other = sum(1 for r in alive.get(other, []) if r.routable) if other else 0
        weights = rolling.weights_for(first, ready_first, other, ready_other)
        await self._switch(doc, weights)
        self._note_serving(doc, weights)
        return weights

    def _note_serving(self, doc: dict[str, Any], weights: Mapping[str, int]) -> None:
        """The store's serving revision follows whoever holds 100% of traffic."""
        full = [rev for rev, w in weights.items() if w == 100]
        if full:
            self._mark_serving(doc, full[0])

    def _mark_serving(self, doc: dict[str, Any], revision: str) -> None:
        """Record that ``revision`` now takes 100% of the service's traffic.

        A warm revision that serves again (an instant rollback) stops being warm in the same
        write: left marked warm, the janitor would retire it when the window ends, or the next
        deployment would stop it before its own candidate is up.
        """
        svc = self.store.get_service(doc["service"], doc["region"])
        values: dict[str, Any] = {"serving_revision": revision}
        if doc.get("url"):
            values["url"] = doc["url"]
        if svc is not None and svc.warm_revision == revision:
            values.update(warm_revision=None, warm_until=None)
        self.store.upsert_service(doc["service"], doc["region"], **values)

    # --- outcomes --------------------------------------------------------------------------------

    async def _switch(
        self, doc: dict[str, Any], weights: dict[str, int], *, sticky: bool = False
    ) -> None:
        router = self.runtime(doc["region"]).router
        key = None
        if sticky:
            names = doc["progress"].get("sticky") or {}
            key = StickyKey(header=names.get("header"), cookie=names.get("cookie"))
        await router.set_weight(doc["service"], weights, sticky=key)
        ok = await router.verify_weight(doc["service"], weights)
        if ok is False:
            raise TrafficSwitchFailed(f"router does not serve the weights we set: {weights}")

    async def _roll_back(
        self, doc: dict[str, Any], cause: ShipyardError, verdict_monotonic: float | None
    ) -> None:
        """Stable back to 100%, candidate drained and stopped. Idempotent (resumable)."""
        doc["progress"]["rolling_back"] = True
        doc["error"] = cause.to_dict()
        self._set_status(doc, DeploymentStatus.ROLLING_BACK)
        stage = self._stage_start(doc, "rollback")
        t0 = time.monotonic()
        service, region = doc["service"], doc["region"]
        stable, candidate = doc.get("blue_revision"), doc.get("green_revision")
        try:
            if stable and candidate and doc["progress"].get("rolling"):
                await self._restore_replicas(doc, stable, candidate)
            if stable:
                await self._switch(doc, {stable: 100})
                switched = time.monotonic()
                self._mark_serving(doc, stable)
                if verdict_monotonic is not None:
                    latency = int((switched - verdict_monotonic) * 1000)
                    doc["metrics"]["detection_to_rollback_ms"] = latency
                    if isinstance(cause, AnalysisFailed | DeploymentAborted) or cause.to_dict().get(
                        "type"
                    ) in ("AnalysisFailed", "DeploymentAborted"):
                        doc["metrics"]["abort_latency_ms"] = latency
                        await self._audit(
                            doc,
                            "canary.weight_zero",
                            weights={stable: 100},
                            abort_latency_ms=latency,
                        )
                doc["metrics"]["rollback_duration_ms"] = int((switched - t0) * 1000)
            if not stable:
                svc = self.store.get_service(service, region)
                if svc and svc.serving_revision == candidate:
                    self.store.upsert_service(service, region, serving_revision=None)
            if candidate:
                await self._stop_revision(service, region, candidate)
        except ShipyardError as exc:
            self._stage_end(doc, stage, "failed", error=exc.message)
            await self._finish(
                doc,
                DeploymentStatus.FAILED,
                RollbackFailed(f"{exc.message} (while rolling back: {cause.message})"),
            )
            return
        self._stage_end(doc, stage, "succeeded", restored=stable)
        status = DeploymentStatus.ROLLED_BACK if stable else DeploymentStatus.FAILED
        if status is DeploymentStatus.ROLLED_BACK:
            doc["rollback_count"] = doc.get("rollback_count", 0) + 1
        await self._finish(doc, status, cause)

    async def _restore_replicas(self, doc: dict[str, Any], stable: str, candidate: str) -> None:
        """Rolling rollback: stable back to its full replica count under the same surge and
        availability limits (the rollout's arithmetic with the roles swapped), candidate
        replicas that never took traffic stopped first."""
        spec = doc["progress"]["rolling"]
        desired = int(spec.get("stable_replicas") or spec["replicas"])
        alive = await self._ready(doc)
        unready = [r.replica_id for r in alive.get(candidate, []) if not r.routable]
        if unready:
            await self.runtime(doc["region"]).stop_replicas(
                doc["service"], unready, drain_timeout=self.drain_timeout
            )
        alive = await self._ready(doc)
        ready_candidate = sum(1 for r in alive.get(candidate, []) if r.routable)
        ready_stable = sum(1 for r in alive.get(stable, []) if r.routable)
        steps = rolling.batches(
            desired,
            spec["max_surge"],
            spec["max_unavailable"],
            old=ready_candidate,
            new=ready_stable,
        )
        for step in steps:
            if isinstance(step, ScaleCandidate):  # roles swapped: scale *stable* up
                weights = await self._scale_up(doc, stable, step.replicas, candidate)
            else:
                assert isinstance(step, ScaleStable)
                weights = await self._scale_down(doc, candidate, step.replicas, stable)
            await self._audit(doc, "rollback.batch", step=step.name, weights=weights)

    async def _succeed(self, doc: dict[str, Any]) -> None:
        if doc["kind"] == "rollback":
            target = self.store.get_deployment(doc["rollback_of"])
            target["status"] = DeploymentStatus.ROLLED_BACK.value
            target["rolled_back_by"] = doc["id"]
            target["rollback_count"] = target.get("rollback_count", 0) + 1
            started = doc["progress"].get("manual_rollback_started")
            if started is not None:
                doc["metrics"]["rollback_duration_ms"] = int((time.monotonic() - started) * 1000)
            self.store.save_deployment(target, active=False)
            await self._audit(target, "deployment.rolled_back", rolled_back_by=doc["id"])
        await self._finish(doc, DeploymentStatus.SUCCESS, None)

    async def _finish(
        self, doc: dict[str, Any], status: DeploymentStatus, error: ShipyardError | None
    ) -> None:
        now = self.clock.now()
        doc["status"] = status.value
        doc["finished_at"] = _iso(now)
        doc["updated_at"] = _iso(now)
        if error is not None:
            doc["error"] = error.to_dict()
        metrics = DeploymentMetrics.model_validate(doc["metrics"])
        metrics.total_duration_ms = int((now - doc["created_ts"]) * 1000)
        metrics.validation = validate_performance(metrics)
        doc["metrics"] = metrics.model_dump(mode="json")
        svc = self.store.get_service(doc["service"], doc["region"])
        doc["result"] = {
            "deployment_id": doc["id"],
            "status": status.value,
            "service": doc["service"],
            "region": doc["region"],
            "revision": svc.serving_revision if svc else None,
            "previous_revision": doc.get("blue_revision"),
            "url": (svc.url if svc else None) or doc.get("url"),
            "duration_ms": metrics.total_duration_ms,
            "metrics": doc["metrics"],
        }
        self.store.save_deployment(doc, active=False)
        await self._audit(
            doc,
            f"deployment.{status.value.lower()}",
            duration_ms=metrics.total_duration_ms,
            error=error.message if error else None,
        )
        ev = self._done.get(doc["id"])
        if ev:
            ev.set()

    # --- janitor ---------------------------------------------------------------------------------

    async def _janitor_loop(self) -> None:
        """Every ``janitor_interval``: stop revisions whose warm window ended, then one
        reconciler pass (which is also each data plane's heartbeat: the local runtime restarts
        an agent that has gone away, and replicas are watched after their bake window)."""
        while True:
            try:
                await self.retire_expired()
                await self.reconciler.reconcile_all()
            except ShipyardError as exc:
                log_event(log, "janitor.error", error=exc.message)
            await self.clock.sleep(self.janitor_interval)

    async def reconcile_data_planes(self) -> None:
        """After a restart: no split traffic without a deployment driving it, no orphan
        revision, the serving revision running (see orchestrator/reconciler.py)."""
        await self.reconciler.reconcile_all()

    async def retire_expired(self) -> None:
        """Stop revisions whose warm window ended and that nothing else needs."""
        now = self.clock.now()
        for svc in self.store.list_services():
            if svc.warm_revision and svc.warm_until is not None and svc.warm_until <= now:
                lock = self._service_locks.setdefault((svc.service, svc.region), asyncio.Lock())
                if lock.locked():
                    continue
                async with lock:
                    row = self.store.get_service(svc.service, svc.region)
                    if row is None or row.warm_revision != svc.warm_revision:
                        continue  # changed while we waited for the lock
                    if row.warm_revision != row.serving_revision:
                        await self._stop_revision(svc.service, svc.region, svc.warm_revision)
                    self.store.upsert_service(
                        svc.service, svc.region, warm_revision=None, warm_until=None
                    )
                    await self.audit.append(
                        AuditEvent(
                            event_type="revision.retired",
                            service=svc.service,
                            region=svc.region,
                            user="shipyard",
                            status="retired",
                            detail={"revision": svc.warm_revision},
                        )
                    )

    # --- helpers ---------------------------------------------------------------------------------

    async def _stop_revision(self, service: str, region: str, revision: str) -> None:
        """Drain and stop ``revision``; never the one the store says serves (that would be an
        outage Shipyard made itself), whoever asks."""
        svc = self.store.get_service(service, region)
        if svc is not None and svc.serving_revision == revision:
            raise InvariantViolation(
                f"refusing to stop {revision}: it is the revision {service}@{region} serves",
                service=service,
                revision=revision,
            )
        await self.runtime(region).stop_revision(
            service, revision, drain_timeout=self.drain_timeout
        )
        log_event(log, "revision.stopped", service=service, region=region, revision=revision)

    def _health_check(self, revision: str) -> HealthCheck:
        spec = self.store.get_revision_spec(revision)
        return HealthCheck.model_validate(spec.get("health", {}))

    async def _replicas(self, doc: dict[str, Any], revision: str) -> list[ReplicaStatus]:
        state = await self.runtime(doc["region"]).service_state(doc["service"])
        replicas = [r for r in (state.replicas if state else []) if r.revision == revision]
        if not replicas:
            raise HealthCheckFailed(f"revision {revision} has no replicas running", attempts=0)
        return replicas

    def _states_of(self, doc: dict[str, Any]) -> Any:
        runtime = self.runtime(doc["region"])

        async def states() -> dict[str, ReplicaStatus]:
            state = await runtime.service_state(doc["service"])
            return {r.replica_id: r for r in (state.replicas if state else [])}

        return states

    def _set_status(self, doc: dict[str, Any], status: DeploymentStatus) -> None:
        if doc["status"] != status.value:
            doc["status"] = status.value
        self._save(doc)

    def _save(self, doc: dict[str, Any]) -> None:
        doc["updated_at"] = _iso(self.clock.now())
        self.store.save_deployment(doc, active=True)

    def _stage_start(self, doc: dict[str, Any], name: str, **detail: Any) -> dict[str, Any]:
        stages: list[dict[str, Any]] = doc["stages"]
        if stages and stages[-1]["name"] == name and stages[-1]["status"] == "running":
            return stages[-1]  # resumed: keep the original start time
        stage = {
            "name": name,
            "status": "running",
            "started_at": _iso(self.clock.now()),
            "_t0": self.clock.now(),
            "detail": detail,
        }
        stages.append(stage)
        self._save(doc)
        return stage

    def _stage_end(
        self, doc: dict[str, Any], stage: dict[str, Any], status: str, **detail: Any
    ) -> None:
        now = self.clock.now()
        stage["status"] = status
        stage["finished_at"] = _iso(now)
        stage["duration_ms"] = int((now - stage["_t0"]) * 1000)
        stage["detail"].update({k: v for k, v in detail.items() if v is not None})
        self._save(doc)

    async def _audit(
        self, doc: dict[str, Any], event_type: str, duration_ms: int | None = None, **detail: Any
    ) -> None:
        await self.audit.append(
            AuditEvent(
                event_type=event_type,
                deployment_id=doc["id"],
                service=doc["service"],
                region=doc["region"],
                user=doc.get("triggered_by"),
                status=doc["status"],
                duration_ms=duration_ms,
                detail={k: v for k, v in detail.items() if v is not None},
            )
        )  # the audit log also writes the structured JSON log line for the event

"""Pre-flight: everything a deployment does before it touches the data plane.

1. ``build``: the ``Builder`` resolves the source and builds it (the log streams to
   ``<logs_dir>/<id>/build.log``), returning a content-addressed artifact;
2. ``check_runnable``: the region's runtime must be able to run that kind of artifact;
3. ``scan``: the security gate writes the SBOM, scans, applies the policy and signs (ADR
   section 9); an image's files are first exported from the engine (``image_scan.py``);
4. ``observe``: the stable revision is the one recorded at submit, and the data plane runs a
   ready replica of it (``StableRevisionMissing`` otherwise: carrying on as a "first deploy"
   would drop the bake, the canary stages and anything to roll back to);
5. ``calculate_plan``: the strategy's plan, computed purely from the request, the manifest and
   what ``observe`` saw; a plan refused here (e.g. a sticky stage without a key) changes nothing;
6. ``resolve_secrets``: the newest version of each secret ``[run] secrets`` / ``secret_files``
   names, pinned for this revision (``SecretMissing`` names any that is not set);
7. ``apply_plan``: only then are the revision (with its secret versions) and the plan
   persisted, and the plan announced.

A failure anywhere ends the deployment Failed, with nothing started. Called by the pipeline's
driver for a deployment in its ``build`` phase.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from opentelemetry.util.types import AttributeValue

from shipyard import strategies
from shipyard.build.base import DEFAULT_MAX_LOG_BYTES, Artifact, BuildRequest
from shipyard.build.running import truncation_notice
from shipyard.domain.manifest import Manifest
from shipyard.domain.models import DeploymentRequest, DeploymentStatus
from shipyard.errors import (
    InvalidInput,
    NotFound,
    RevisionStartFailed,
    SecretMissing,
    SecurityScanFailed,
    ShipyardError,
    StableRevisionMissing,
)
from shipyard.logs import log_event
from shipyard.orchestrator import image_scan
from shipyard.orchestrator import stage as stages
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.record import (
    Attestation,
    DeploymentRecord,
    PlanRecord,
    Progress,
    Record,
    RevisionRecord,
    Stage,
    utc,
)
from shipyard.orchestrator.stage import stage
from shipyard.private_files import open_log
from shipyard.runtime.base import StickyKey
from shipyard.strategies import release_points
from shipyard.strategies.steps import Plan, SetWeight

log = logging.getLogger("shipyard.orchestrator")


class BuildLogSink:
    """Receives build output line by line (``BuildRequest.log_sink``): appends it to the
    deployment's build log as it comes, so ``GET /deployments/{id}/logs`` streams it, and keeps
    the last lines for the stage record.

    The file holds at most ``max_bytes`` (counting what an earlier run of the same deployment
    wrote before a restart): past it one notice line (``running.truncation_notice``), then
    lines are dropped. Builders cap their own log the same way (``running.BuildLog``); this
    covers any builder, and the stage's tail keeps the last lines either way."""

    def __init__(
        self, path: Path | None, keep: int = 20, *, max_bytes: int = DEFAULT_MAX_LOG_BYTES
    ) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._file: IO[str] | None = None
        self.max_bytes = max_bytes
        self.written = 0
        #: True once output was dropped.
        self.truncated = False
        if path is not None:
            self._file = os.fdopen(open_log(path), "a", encoding="utf-8", errors="replace")
            self.written = self._file.tell()

    def __call__(self, line: str) -> None:
        self._lines.append(line)
        if self._file is None or self.truncated:
            return
        text = line if line.endswith("\n") else line + "\n"
        size = len(text.encode("utf-8", errors="replace"))
        if self.written + size > self.max_bytes:
            self.truncated = True
            text = truncation_notice(self.max_bytes) + "\n"
            size = len(text.encode())
        self._file.write(text)
        self._file.flush()
        self.written += size

    def tail(self) -> list[str]:
        return list(self._lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class Situation:
    """What pre-flight found on the data plane, for the planner."""

    #: The revision serving now (the one recorded at submit); None: a first deploy.
    stable: str | None = None
    #: Its ready replicas now: where a rolling update starts from.
    stable_ready: int = 0
    #: Its own replica count: what a rolling rollback restores.
    stable_desired: int = 0


async def run(ctx: DeploymentContext, record: DeploymentRecord) -> None:
    """Build, scan, verify the situation, plan; the record ends in its ``steps`` phase."""
    artifact = await build(ctx, record)
    check_runnable(ctx, artifact)
    await scan(ctx, record, artifact)
    situation = await observe(ctx, record)
    plan = calculate_plan(record.request, artifact.manifest, situation)
    secrets = await resolve_secrets(ctx, artifact.manifest)
    await apply_plan(ctx, record, artifact, plan, situation, secrets=secrets)


async def build(ctx: DeploymentContext, record: DeploymentRecord) -> Artifact:
    """Wait for a build slot (a ``queued`` stage with its position while all are taken), then
    build (the ``build`` stage)."""
    queued: Stage | None = None

    async def on_position(position: int) -> None:
        nonlocal queued
        if queued is None:
            queued = await enter_queue(ctx, position)
        else:
            queued.detail["position"] = position
            await ctx.save()

    slots = ctx.deps.build_slots
    async with slots.slot(record.id, submitted=record.created_ts, on_position=on_position):
        if queued is not None:
            await stages.end(ctx, queued, "succeeded")
        return await _build(ctx, record)


async def enter_queue(ctx: DeploymentContext, position: int) -> Stage:
    """The running ``queued`` stage at ``position`` (resumed after a restart: the same one).

    A build that a restart interrupted is over: its stage ends ``skipped`` (the build runs
    again, from the start, once this deployment has a slot)."""
    last = ctx.record.stages[-1] if ctx.record.stages else None
    if last is not None and last.name == "build" and last.status == "running":
        await stages.end(
            ctx, last, "skipped", interrupted="the control plane restarted during this build"
        )
    log_event(log, "build.queued", deployment_id=ctx.id, position=position)
    queued = await stages.start(ctx, "queued", position=position)
    if queued.detail.get("position") != position:
        queued.detail["position"] = position
        await ctx.save()
    return queued


def leave_queue(record: Record, now: float, why: str) -> None:
    """End a ``queued`` stage still running (an abort took the deployment out of the queue);
    the caller saves the record."""
    for st in record.stages:
        if st.name == "queued" and st.status == "running":
            st.status = "skipped"
            st.finished_at = utc(now)
            st.duration_ms = int((now - st.started_ts) * 1000)
            st.detail["left"] = why


async def _build(ctx: DeploymentContext, record: DeploymentRecord) -> Artifact:
    request = record.request
    await ctx.set_status(DeploymentStatus.BUILDING)
    async with stage(ctx, "build", audit="build") as st:
        limit = ctx.deps.max_build_log_bytes
        sink = BuildLogSink(ctx.deps.build_log_path(record.id), max_bytes=limit)
        try:
            if ctx.deps.source_policy is not None:  # the list may have narrowed since submit
                ctx.deps.source_policy.check(request.source.repository)
            artifact = await ctx.deps.builder.build(
                BuildRequest(request.source, sink, no_cache=request.rebuild, max_log_bytes=limit)
            )
        except ShipyardError as exc:
            st.fail(exc.message, audit={"error": exc.message}, log_tail=sink.tail())
            raise
        finally:
            sink.close()
        record.metrics.build_duration_ms = artifact.duration_ms
        st.annotate(_build_attributes(artifact))
        st.done(
            digest=artifact.digest,
            commit=artifact.commit,
            builder=artifact.builder,
            cache_hit=artifact.cache.artifact_hit,
            log_path=str(artifact.log_path) if artifact.log_path else None,
            log_truncated=sink.truncated or None,
        )
    await ctx.audit(
        "build.succeeded",
        duration_ms=artifact.duration_ms,
        digest=artifact.digest,
        commit=artifact.commit,
    )
    return artifact


def _build_attributes(artifact: Artifact) -> dict[str, AttributeValue]:
    """The build span's: what was reused (the artifact, the dependency environment)."""
    out: dict[str, AttributeValue] = {
        "shipyard.artifact.digest": artifact.digest,
        "shipyard.build.builder": artifact.builder,
        "shipyard.build.cache.artifact_hit": artifact.cache.artifact_hit,
        "vcs.ref.head.revision": artifact.commit,
    }
    if artifact.cache.dependencies_hit is not None:
        out["shipyard.build.cache.dependencies_hit"] = artifact.cache.dependencies_hit
    return out


def _findings_attributes(severities: Iterable[str]) -> dict[str, AttributeValue]:
    """The scan span's findings by severity: ``shipyard.scan.findings.<severity>`` (lower
    case) and their total."""
    counts = collections.Counter(s.lower() for s in severities)
    out: dict[str, AttributeValue] = {
        f"shipyard.scan.findings.{severity}": n for severity, n in sorted(counts.items())
    }
    out["shipyard.scan.findings.total"] = sum(counts.values())
    return out


def check_runnable(ctx: DeploymentContext, artifact: Artifact) -> None:
    """The region's runtime must be able to run what was built (before scanning it)."""
    runtime = ctx.runtime
    runs: tuple[str, ...] = getattr(runtime, "artifact_kinds", ("directory",))
    problem = getattr(runtime, "artifact_kind_problems", {}).get(artifact.kind)
    if artifact.kind not in runs and problem:
        raise RevisionStartFailed(
            f"{problem}; builder {artifact.builder!r} produced an {artifact.kind} "
            f"({artifact.digest})",
            artifact_kind=artifact.kind,
        )
    if artifact.kind not in runs:
        raise RevisionStartFailed(
            f"the {runtime.kind} runtime of region {ctx.region} runs "
            f"{' or '.join(runs)} artifacts, but builder {artifact.builder!r} produced an "
            f'{artifact.kind} ({artifact.digest}); use [build] builder = "local" for this '
            "region",
            artifact_kind=artifact.kind,
        )


async def scan(ctx: DeploymentContext, record: DeploymentRecord, artifact: Artifact) -> None:
    """ADR section 9: SBOM, vulnerability scan, policy, signature (the security gate)."""
    gate = ctx.deps.gate
    if gate is None:
        return
    assert ctx.deps.attestations_dir is not None, "a security gate needs attestations_dir"
    await ctx.set_status(DeploymentStatus.SCANNING)
    async with stage(ctx, "scan", audit="security_scan") as st:
        export: dict[str, object] | None = None
        try:
            async with AsyncExitStack() as scope:
                rootfs: Path | None = None
                exporter = ctx.deps.image_exporter
                if artifact.kind == "oci-image" and exporter is not None:
                    # The image's files, by image ID: what is scanned is what gets signed.
                    exported = await scope.enter_async_context(
                        image_scan.exported_rootfs(exporter, artifact.digest)
                    )
                    rootfs, export = exported.path, exported.report.to_dict()
                report = await gate.check(
                    artifact,
                    ctx.deps.attestations_dir,
                    source_repository=record.request.source.repository,
                    rootfs=rootfs,
                )
        except SecurityScanFailed as exc:
            findings = exc.detail.get("findings")
            st.annotate(
                _findings_attributes(
                    str(f.get("severity")) for f in findings or [] if isinstance(f, dict)
                )
            )
            st.fail(
                exc.message,
                audit={
                    "error": exc.message,
                    "vulnerabilities": exc.vulnerabilities,
                    "advisories": [f.get("advisory_id") for f in findings or []],
                },
                vulnerabilities=exc.vulnerabilities,
                findings=findings,
                reason=exc.detail.get("reason"),
                export=export,
            )
            raise
        record.attestation = Attestation(
            envelope=str(report.envelope_path), sbom=str(report.sbom_path)
        )
        summary = report.to_dict()
        st.annotate(_findings_attributes(f.severity.value for f in report.findings))
        st.done(
            packages=report.packages,
            findings=len(report.findings),
            evaluation=summary["evaluation"],
            scan_skipped=report.scan_skipped,
            sbom=summary["sbom"],
            provenance=summary["provenance"],
            durations_ms=summary["durations_ms"],
            export=export,
        )
    await ctx.audit(
        "security_scan.passed",
        duration_ms=report.durations_ms.get("total"),
        packages=report.packages,
        findings=len(report.findings),
        scan_skipped=report.scan_skipped,
        keyid=report.keyid,
    )


async def observe(ctx: DeploymentContext, record: DeploymentRecord) -> Situation:
    """The stable revision, checked against what was recorded at submit and against the data
    plane (``require_stable``)."""
    expected = record.stable_at_submit
    for region in ctx.regions:  # a fleet: every region must still serve it
        svc = await ctx.store.get_service(ctx.service, region)
        stable = svc.serving_revision if svc else None
        if stable != expected:
            where = f" in region {region}" if record.fleet is not None else ""
            raise StableRevisionMissing(
                f"service {ctx.service} served {expected} when this deployment was submitted "
                f"and {stable} now{where}; submit the deployment again",
                expected=expected,
                found=stable,
            )
    if stable is None:
        return Situation()
    ready = await require_stable(ctx, stable)
    try:
        desired = (await ctx.records.revision(stable)).replicas
    except NotFound:  # a service record older than its revision's: restore what runs now
        desired = ready
    return Situation(stable, ready, desired)


async def require_stable(ctx: DeploymentContext, stable: str) -> int:
    """Ready replicas of the revision the store says serves; StableRevisionMissing if none.

    A deployment that finds no ready stable revision refuses to run: carrying it out as a
    first deploy would drop its bake, its canary stages and anything to roll back to.
    """
    fleet = ctx.fleet_runtime
    if fleet is not None:  # every region must run it, each is checked on its own
        states = await fleet.each("service_state", lambda _, rt: rt.service_state(ctx.service))
        ready = 0
        for region, state in states.items():
            mine = [r for r in (state.replicas if state else []) if r.revision == stable]
            if not any(r.alive and r.routable for r in mine):
                seen = ", ".join(f"{r.replica_id} {r.state}" for r in mine) or "no replicas"
                raise StableRevisionMissing(
                    f"service {ctx.service} should be serving {stable}, but region {region} "
                    f"runs no ready replica of it ({seen}); nothing was changed. Shipyard "
                    "repairs the region on its own: check `shipyard status`, then deploy again",
                    revision=stable,
                    region=region,
                )
            ready = max(ready, sum(1 for r in mine if r.alive and r.routable))
        return ready
    state = await ctx.runtime.service_state(ctx.service)
    replicas = [r for r in (state.replicas if state else []) if r.revision == stable]
    ready = sum(1 for r in replicas if r.alive and r.routable)
    if ready == 0:
        seen = ", ".join(f"{r.replica_id} {r.state}" for r in replicas) or "no replicas"
        log_event(log, "stable.missing", deployment_id=ctx.id, revision=stable, seen=seen)
        raise StableRevisionMissing(
            f"service {ctx.service} should be serving {stable}, but region "
            f"{ctx.region} runs no ready replica of it ({seen}); nothing was changed. "
            f"Shipyard restarts crashed replicas and repairs the region on its own: check "
            f"`shipyard status {ctx.service}`, then deploy again",
            revision=stable,
            replicas=seen,
        )
    return ready


def calculate_plan(request: DeploymentRequest, manifest: Manifest, situation: Situation) -> Plan:
    """The strategy's plan for this situation (pure); ``InvalidInput`` when it cannot run."""
    try:
        plan = strategies.plan(
            request.strategy,
            has_stable=situation.stable is not None,
            analysis_defaults=manifest.analysis,
            replicas=manifest.run.replicas,
            stable_replicas=situation.stable_ready or None,
            stable_desired=situation.stable_desired,
        )
    except strategies.InvalidPlan as exc:
        raise InvalidInput(str(exc)) from exc
    plan = release_points.place(plan, manifest.hooks, manifest.gates)
    if any(isinstance(s, SetWeight) and s.sticky for s in plan.steps) and not (
        manifest.routing.sticky_header or manifest.routing.sticky_cookie
    ):
        raise InvalidInput(
            "a canary stage asks for sticky assignment but shipyard.toml names no key: add "
            '[routing] sticky_header = "x-user-id" (or sticky_cookie = "session")'
        )
    return plan


async def resolve_secrets(ctx: DeploymentContext, manifest: Manifest) -> dict[str, int]:
    """``{name: newest version}`` of every secret the manifest names (``[run] secrets`` and
    ``secret_files``); SecretMissing, before anything started, for one that is not set."""
    names = [*manifest.run.secrets, *manifest.run.secret_files]
    if not names:
        return {}
    if ctx.deps.secrets is None:
        raise SecretMissing(
            f"shipyard.toml names secrets ({', '.join(sorted(names))}) and this control plane "
            "has no secret store configured",
            service=ctx.service,
        )
    return await ctx.deps.secrets.current_versions(ctx.service, names)


async def apply_plan(
    ctx: DeploymentContext,
    record: DeploymentRecord,
    artifact: Artifact,
    plan: Plan,
    situation: Situation,
    *,
    secrets: Mapping[str, int] | None = None,
) -> None:
    """Persist the candidate revision (with the pinned ``secrets`` versions) and the plan
    (the deployment enters its steps phase)."""
    secrets = dict(secrets or {})
    manifest = artifact.manifest
    revision = f"{artifact.commit[:7]}-{record.id[:8]}"
    await ctx.records.save_revision(
        RevisionRecord(
            service=record.service,
            revision=revision,
            artifact_digest=artifact.digest,
            artifact_location=artifact.location,
            argv=list(manifest.run.argv),
            env=dict(manifest.run.env),
            replicas=manifest.run.replicas,
            health_endpoint=manifest.health.endpoint,
            health=manifest.health,
            attestation=record.attestation or Attestation(),
            entry={
                "hosts": list(manifest.service.hosts),
                "port": manifest.service.port,
                "https_redirect": manifest.service.https_redirect,
                "hsts_max_age": manifest.service.hsts_max_age,
                # Only when asked: a record (or agent) from before the key still reads it.
                **({"revision_header": True} if manifest.routing.revision_header else {}),
            },
            artifact_kind=artifact.kind,
            container=(
                {
                    "port": manifest.run.port,
                    "memory_bytes": manifest.run.memory_bytes,
                    "nano_cpus": manifest.run.nano_cpus,
                }
                if artifact.kind == "oci-image"
                else None
            ),
            stop_timeout=manifest.run.stop_timeout_seconds,
            hooks=manifest.hooks,
            secrets=secrets,
            secret_files=dict(manifest.run.secret_files),
        ),
        region=record.region,
        deployment_id=record.id,
        now=ctx.clock.now(),
    )
    sticky = StickyKey(manifest.routing.sticky_header, manifest.routing.sticky_cookie)
    record.artifact_digest = artifact.digest
    record.commit = artifact.commit
    record.blue_revision = situation.stable
    record.green_revision = revision
    record.secrets = secrets
    record.progress = Progress(
        phase="steps",
        plan=PlanRecord.of(
            plan, sticky, gates=manifest.gates, on_failure=manifest.deploy.on_failure
        ),
    )
    fleet = ctx.fleet_runtime
    if record.fleet is not None and fleet is not None:
        record.fleet.region_timeout_seconds = manifest.fleet.region_timeout_seconds
        fleet.timeout = manifest.fleet.region_timeout_seconds
    await ctx.save()
    if plan.steps and plan.announce:
        limits = dataclasses.asdict(plan.rolling) if plan.rolling else {}
        await ctx.audit(
            "plan.created",
            strategy=record.request.strategy.kind,
            steps=[s.name for s in plan.steps],
            stable=situation.stable,
            candidate=revision,
            **limits,
        )

"""The deployment record: what the orchestrator persists about each deployment, typed and versioned.

A record is the durable half of a deployment's state machine (the store's ``deployments.doc``):
``DeploymentRecord`` for a deployment, ``RollbackRecord`` for a manual rollback, both from
``RecordBase`` and told apart by ``kind``. ``Progress`` is where the executor stands (the plan,
the step index, a promotion, a canary stage's analysis); ``Stage`` is one line of the history the
API shows. ``RevisionRecord`` is a revision as the store keeps it (what a rollback restarts).

Documents carry ``schema_version``. ``load_record`` reads every version this Shipyard knows:
version 0 is what Shipyard wrote before records were typed (no version field), version 1 what it
wrote before fleet deployments (no ``regions``), both migrated on read; every write is the
current version. JSON stays at this module's edge (``load_record``,
``Record.model_dump``); the rest of the orchestrator sees models. ``Records`` is the typed
repository over ``store.db.AsyncStore`` that the pipeline, its steps and the reconciler use.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
)

from shipyard import errors
from shipyard.analysis.metrics import MetricRun
from shipyard.analysis.verdicts import AnalysisRun
from shipyard.domain import repository_urls
from shipyard.domain.models import (
    DeploymentMetrics,
    DeploymentRequest,
    DeploymentResult,
    DeploymentStatus,
    DeploymentStrategy,
    HealthCheck,
    SourceConfig,
)
from shipyard.domain.release import GateSpec, HooksSection, gate_names
from shipyard.errors import NotFound, PermanentError, ShipyardError
from shipyard.runtime.base import (
    ArtifactKind,
    ContainerSpec,
    EntrySpec,
    RevisionSpec,
    StickyKey,
)
from shipyard.store.db import AsyncStore
from shipyard.store.leases import LeaseClaim
from shipyard.strategies.steps import Plan, RollingLimits, Step
from shipyard.tracing import TraceIds

#: The version every record is written with.
SCHEMA_VERSION = 2


def utc(ts: float) -> datetime:
    """A clock reading (seconds since the epoch) as the UTC time records show."""
    return datetime.fromtimestamp(ts, UTC)


class _Model(BaseModel):
    # Fields a newer Shipyard added are ignored rather than refused: the record stays readable.
    model_config = ConfigDict(extra="ignore")


# --- steps: dataclasses in strategies/steps.py, stored as {"type": name, **fields} -------------

STEP_TYPES: dict[str, type[Step]] = {cls.__name__: cls for cls in typing.get_args(Step)}
_STEP_ADAPTERS: dict[type[Step], TypeAdapter[Step]] = {
    cls: TypeAdapter(cls) for cls in STEP_TYPES.values()
}


def _load_step(value: object) -> Step:
    if isinstance(value, tuple(STEP_TYPES.values())):
        return typing.cast(Step, value)
    if not isinstance(value, Mapping) or value.get("type") not in STEP_TYPES:
        raise ValueError(f"not a stored step: {value!r}")
    cls = STEP_TYPES[value["type"]]
    fields = {k: v for k, v in value.items() if k != "type"}
    return _STEP_ADAPTERS[cls].validate_python(fields)


def _dump_step(step: Step) -> dict[str, object]:
    fields = _STEP_ADAPTERS[type(step)].dump_python(step, mode="json")
    return {"type": type(step).__name__, **fields}


StoredStep = Annotated[Step, PlainValidator(_load_step), PlainSerializer(_dump_step)]


# --- parts of a record ---------------------------------------------------------------------------


class RecordedError(_Model):
    """An error as ``ShipyardError.to_dict`` wrote it: its class, code and message, and its
    detail fields beside them (``attempts``, ``aborted_by``, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    code: str
    message: str

    @classmethod
    def of(cls, error: ShipyardError) -> RecordedError:
        return cls.model_validate(error.to_dict())

    def error(self) -> ShipyardError:
        """The error again, as its own class (``errors.from_dict``)."""
        return errors.from_dict(self.model_dump())


StageStatus = Literal["running", "succeeded", "failed", "skipped"]


class Stage(_Model):
    """One stage of the history (``GET /deployments/{id}`` shows them): a step, build, scan or
    rollback, with what it found. ``detail`` is free-form JSON for people."""

    name: str
    status: StageStatus = "running"
    started_at: datetime
    #: ``started_at`` as a clock reading, for durations.
    started_ts: float
    detail: dict[str, object] = Field(default_factory=dict)
    finished_at: datetime | None = None
    duration_ms: int | None = None


class PlanRecord(_Model):
    """A strategy's ``Plan`` as persisted, with the manifest's sticky key (canary stages), its
    ``[[gates]]`` by name (what a ``CallGate`` step asks) and ``[deploy] on_failure`` (a
    resumed deployment freezes or rolls back as its manifest said)."""

    steps: list[StoredStep]
    rolling: RollingLimits | None = None
    sticky: StickyKey = Field(default_factory=StickyKey)
    gates: dict[str, GateSpec] = Field(default_factory=dict)
    on_failure: Literal["rollback", "freeze"] = "rollback"

    @classmethod
    def of(
        cls,
        plan: Plan,
        sticky: StickyKey | None = None,
        *,
        gates: Sequence[GateSpec] = (),
        on_failure: Literal["rollback", "freeze"] = "rollback",
    ) -> PlanRecord:
        return cls(
            steps=list(plan.steps),
            rolling=plan.rolling,
            sticky=sticky or StickyKey(),
            gates=dict(zip(gate_names(list(gates)), gates, strict=True)),
            on_failure=on_failure,
        )


#: A router metrics snapshot, ``{revision: RevisionMetrics.to_dict()}`` as the agent answers it.
MetricsSnapshot = dict[str, dict[str, object]]


class AnalysisState(_Model):
    """A canary stage's analysis between two measurements, persisted after each so a restarted
    control plane resumes the same stage with the same deadline and tallies."""

    #: The index of the ``Analyse`` step it belongs to.
    step: int
    deadline: float
    last_at: float
    #: The snapshot the next window is measured from (None: none taken yet).
    baseline: MetricsSnapshot | None = None
    run: AnalysisRun
    #: Why the analysis paused for a human (None: not paused).
    paused: str | None = None
    #: A fleet's canary: each region's own window start and tallies, judged beside the merged
    #: fleet's (``baseline``/``run``). Empty for one region.
    region_baselines: dict[str, MetricsSnapshot | None] = Field(default_factory=dict)
    region_runs: dict[str, AnalysisRun] = Field(default_factory=dict)
    #: ``[[analysis.metrics]]``: each metric's (or a fleet's metric's, per region) tallies and
    #: schedule, keyed ``name`` or ``name@region``. Empty: the router check alone (``run``).
    metrics: dict[str, MetricRun] = Field(default_factory=dict)


class FrozenState(_Model):
    """Why and where a deployment with ``[deploy] on_failure = "freeze"`` froze
    (``orchestrator/freezing.py``): the failure, the index of the step that failed, when."""

    cause: RecordedError
    step: int
    at: datetime


class Progress(_Model):
    """Where the deployment stands: written before every action."""

    phase: Literal["build", "steps"] = "build"
    plan: PlanRecord | None = None
    #: Index into ``plan.steps`` of the step running (or next).
    step: int = 0
    #: When the running step began (a clock reading): deadlines are computed from it.
    step_started_at: float | None = None
    candidate_replicas: list[str] = Field(default_factory=list)
    #: Why the deployment waits for a human (while Paused).
    paused: str | None = None
    #: Who promoted the running step (a gate, or a paused analysis). Persisted before
    #: ``promote`` answers, cleared when the step is done: a restart in between keeps it.
    promoted_by: str | None = None
    analysis: AnalysisState | None = None
    rolling_back: bool = False
    #: The ``post_rollback`` hook ran to its end (``rollback.py``): a resumed rollback does
    #: not run it again.
    post_rollback_ran: bool = False
    #: Set while Frozen (a check failed with ``on_failure = "freeze"``): traffic stays where it
    #: was until a human promotes (the plan goes on after ``frozen.step``) or aborts.
    frozen: FrozenState | None = None


#: Where one region of a fleet deployment stands: ``pending`` (nothing done there yet),
#: ``deploying`` (the plan's steps run there), ``switched`` (the candidate serves there: the
#: deployment succeeded), ``rolled_back`` (stable serves again, candidate stopped),
#: ``unreachable`` (it did not answer within ``[fleet] region_timeout_seconds``: its state is
#: unknown), ``converged`` (it answered again and the reconciler brought it to the decided state).
RegionPhase = Literal["pending", "deploying", "switched", "rolled_back", "unreachable", "converged"]


class RegionState(_Model):
    """One region of a fleet deployment."""

    state: RegionPhase = "pending"
    #: The service's URL in that region (its own data plane's listener).
    url: str | None = None
    #: Why it is ``unreachable`` (the call that timed out).
    error: str | None = None
    updated_at: datetime | None = None


class SwitchSkew(_Model):
    """One traffic change across a fleet: how far apart the regions acknowledged it."""

    #: The plan's step index (None: the rollback's switch).
    step: int | None
    weights: dict[str, int]
    #: From the first region's acknowledgement to the last one's, in milliseconds.
    skew_ms: float
    #: Each region's acknowledgement, in ms after the first one.
    acks_ms: dict[str, float] = Field(default_factory=dict)


class FleetState(_Model):
    """A deployment across several regions (``target.regions``): each region's state and the
    skew of every traffic change (``runtime/fleet.py`` measures it)."""

    regions: dict[str, RegionState]
    #: ``[fleet] region_timeout_seconds`` of the manifest, once pre-flight read it.
    region_timeout_seconds: float = 30.0
    switches: list[SwitchSkew] = Field(default_factory=list)

    @property
    def max_skew_ms(self) -> float | None:
        return max((s.skew_ms for s in self.switches), default=None)

    def unreachable(self) -> list[str]:
        return [name for name, r in self.regions.items() if r.state == "unreachable"]

    @classmethod
    def of(cls, regions: Sequence[str]) -> FleetState:
        return cls(regions={name: RegionState() for name in regions})


class Attestation(_Model):
    """Where the signed provenance (DSSE envelope) and the SBOM of an artifact are."""

    envelope: str | None = None
    sbom: str | None = None


# --- records -------------------------------------------------------------------------------------


class RecordBase(_Model):
    schema_version: int = SCHEMA_VERSION
    id: str
    service: str
    #: The first of ``regions``: where a single-region deployment runs (the store's row key).
    region: str
    #: Every region it acts on, in lockstep: ``[region]`` unless it is a fleet deployment.
    regions: list[str] = Field(default_factory=list)
    #: Each region's state and the switches' skews; None for one region.
    fleet: FleetState | None = None
    status: DeploymentStatus = DeploymentStatus.PENDING
    triggered_by: str
    #: ``created_at`` as a clock reading (durations, the store's ordering column).
    created_ts: float
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    source: SourceConfig | None = None
    #: Stable (serving before) and candidate revisions.
    blue_revision: str | None = None
    green_revision: str | None = None
    #: Recorded when the record is made, never guessed later: a deployment that expects a
    #: stable revision and finds none refuses to run rather than becoming a "first deploy".
    first_deploy: bool
    stable_at_submit: str | None
    artifact_digest: str | None = None
    url: str | None = None
    stages: list[Stage] = Field(default_factory=list)
    metrics: DeploymentMetrics = Field(default_factory=DeploymentMetrics)
    progress: Progress = Field(default_factory=Progress)
    error: RecordedError | None = None
    result: DeploymentResult | None = None
    rollback_count: int = 0
    #: The deployment's OpenTelemetry trace (``tracing.py``), chosen at submit and never
    #: changed: whichever replica drives it parents its spans on ``trace_span_id``, the root
    #: span emitted when it ends. None in records made before tracing (no spans for them).
    trace_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    #: The root span's id (16 hex digits).
    trace_span_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    #: The caller's span (``traceparent`` of the deploy request); None: the root is the trace's.
    trace_parent_span_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    #: W3C trace flags of the trace (bit 0: sampled).
    trace_flags: int = Field(default=0, ge=0, le=255)

    def set_trace(self, ids: TraceIds) -> None:
        """Place the record in a trace (at submit, before it is first stored)."""
        self.trace_id = ids.trace_id
        self.trace_span_id = ids.span_id
        self.trace_parent_span_id = ids.parent_span_id
        self.trace_flags = ids.flags

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    @property
    def all_regions(self) -> list[str]:
        """``regions``, or ``[region]`` for a record that names none."""
        return list(self.regions) or [self.region]


class DeploymentRecord(RecordBase):
    """A deployment of a built, scanned and signed revision, carried out by its strategy."""

    kind: Literal["deploy"] = "deploy"
    request: DeploymentRequest
    strategy: DeploymentStrategy
    commit: str | None = None
    attestation: Attestation | None = None
    #: The manual rollback that undid it.
    rolled_back_by: str | None = None
    #: ``{name: version}`` of every secret its revision gets (``[run] secrets`` and
    #: ``secret_files``), pinned at pre-flight; never a value. Empty: none (or recorded before).
    secrets: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def submitted(
        cls,
        request: DeploymentRequest,
        user: str,
        now: float,
        serving: str | None,
        trace: TraceIds | None = None,
    ) -> DeploymentRecord:
        """A new deployment's record; ``trace``: its place in a trace (``tracing.new_ids``)."""
        regions = request.target.all_regions
        record = cls(
            id=str(request.id),
            service=request.target.service_name,
            region=request.target.region,
            regions=regions,
            fleet=FleetState.of(regions) if len(regions) > 1 else None,
            strategy=request.strategy,
            source=request.source,
            request=request,
            triggered_by=user,
            created_ts=now,
            created_at=utc(now),
            updated_at=utc(now),
            first_deploy=serving is None,
            stable_at_submit=serving,
        )
        if trace is not None:
            record.set_trace(trace)
        return record


class RollbackParams(_Model):
    #: Whether the restored revision was still warm (no restart, no health gate).
    instant: bool


class RollbackStrategy(_Model):
    """Shown as ``{"Rollback": {"instant": true}}`` beside the ADR's strategies."""

    Rollback: RollbackParams


class RollbackRecord(RecordBase):
    """A manual rollback: serve again the revision that served before ``rollback_of``.

    Its ``blue_revision`` is what served when it was asked for (what a failed rollback keeps),
    its ``green_revision`` the revision it restores."""

    kind: Literal["rollback"] = "rollback"
    rollback_of: str
    strategy: RollbackStrategy


#: A stored record of either kind (``kind`` says which).
Record = Annotated[DeploymentRecord | RollbackRecord, Field(discriminator="kind")]
_RECORD: TypeAdapter[Record] = TypeAdapter(Record)


class RevisionRecord(_Model):
    """A revision as the store keeps it: its ``RevisionSpec``, health check and attestation."""

    service: str
    revision: str
    artifact_digest: str
    artifact_location: str
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    replicas: int = 1
    health_endpoint: str | None = None
    health: HealthCheck | None = None
    attestation: Attestation = Field(default_factory=Attestation)
    #: The manifest's ``[service]`` hosts, port, https_redirect, hsts_max_age (``EntrySpec``);
    #: None for revisions stored before them (the runtime keeps what it has).
    entry: dict[str, Any] | None = None
    #: ``oci-image`` for revisions built as images (run as containers); stored before images
    #: ran: directory.
    artifact_kind: ArtifactKind = "directory"
    #: Images: ``ContainerSpec`` as a dict (port, memory_bytes, nano_cpus); None: defaults.
    container: dict[str, Any] | None = None
    #: ``[run] stop_timeout_seconds``.
    stop_timeout: float = 10.0
    #: The manifest's ``[hooks]`` (``orchestrator/hooks.py`` runs them in this revision's
    #: artifact); revisions stored before hooks have none.
    hooks: HooksSection = Field(default_factory=HooksSection)
    #: ``{name: version}`` of the service's secrets it runs with, pinned when it was deployed
    #: (so a rollback to it restores those values); never a value (``artifacts.spec`` opens
    #: them). Each is an environment variable of its name unless ``secret_files`` names it.
    secrets: dict[str, int] = Field(default_factory=dict)
    #: ``[run] secret_files``: secret name -> file name in ``$SHIPYARD_SECRETS_DIR``.
    secret_files: dict[str, str] = Field(default_factory=dict)

    def spec(self) -> RevisionSpec:
        """What a runtime runs. Revisions stored before ``health_endpoint`` existed take it
        from their health check (a runtime probes it before routing to a restarted replica)."""
        endpoint = self.health_endpoint or (self.health.endpoint if self.health else None)
        return RevisionSpec(
            service=self.service,
            revision=self.revision,
            artifact_digest=self.artifact_digest,
            artifact_location=self.artifact_location,
            argv=list(self.argv),
            env=dict(self.env),
            replicas=self.replicas,
            health_endpoint=endpoint,
            entry=EntrySpec.from_dict(self.entry) if self.entry is not None else None,
            artifact_kind=self.artifact_kind,
            container=ContainerSpec.from_dict(self.container) if self.container else None,
            stop_timeout=self.stop_timeout,
        )

    def health_check(self) -> HealthCheck:
        return self.health or HealthCheck()


# --- reading and writing -------------------------------------------------------------------------


def load_record(doc: Mapping[str, Any]) -> Record:
    """A stored document as its record, migrated from older versions."""
    version = doc.get("schema_version", 0)
    if version == 0:
        doc = _migrate_v0(doc)
        version = 1
    if version == 1:
        doc = _migrate_v1(doc)
    elif version != SCHEMA_VERSION:
        raise PermanentError(
            f"deployment {doc.get('id')} was stored with schema_version {version}; this Shipyard "
            f"reads versions up to {SCHEMA_VERSION} (it was written by a newer Shipyard)",
            deployment_id=doc.get("id"),
        )
    return _RECORD.validate_python(_without_credentials(doc))


def _without_credentials(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """A record stored before repository URLs with credentials were refused reads with the
    credential replaced by ``***`` (``domain.repository_urls``): it loads, and the API never
    returns the secret. The row keeps it until the record is next written."""

    def scrub(source: Any) -> Any:
        repo = source.get("repository") if isinstance(source, Mapping) else None
        if isinstance(repo, str) and repository_urls.has_credentials(repo):
            return {**source, "repository": repository_urls.redacted(repo)}
        return source

    out = dict(doc)
    if "source" in out:
        out["source"] = scrub(out["source"])
    request = out.get("request")
    if isinstance(request, Mapping) and "source" in request:
        out["request"] = {**request, "source": scrub(request["source"])}
    return out


def dump_record(record: Record) -> dict[str, Any]:
    """The document the store keeps (JSON-ready)."""
    return record.model_dump(mode="json")


def _migrate_v0(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Version 0: the untyped document of Shipyard before issue 8.

    - the plan was a bare list of steps, with the manifest's sticky key and a rolling update's
      limits beside it in ``progress``; they are one ``PlanRecord`` now;
    - ``progress`` kept ``time.monotonic()`` readings (``manual_rollback_started``,
      ``abort_requested_monotonic``), meaningless in another process: dropped;
    - a stage's start as a clock reading was ``_t0``;
    - documents older than ``stable_at_submit`` take the stable revision they planned with.
    """
    out = dict(doc)
    out["schema_version"] = 1
    out.setdefault("stable_at_submit", out.get("blue_revision"))
    out.setdefault("first_deploy", out["stable_at_submit"] is None)
    out["stages"] = [_stage_v0(s) for s in out.get("stages") or []]
    progress = dict(out.get("progress") or {})
    progress.pop("manual_rollback_started", None)
    progress.pop("abort_requested_monotonic", None)
    sticky = progress.pop("sticky", None) or {}
    rolling = progress.pop("rolling", None)
    if rolling is not None:
        rolling = dict(rolling)
        rolling["stable_replicas"] = rolling.get("stable_replicas") or rolling["replicas"]
    if isinstance(progress.get("plan"), list):
        progress["plan"] = {"steps": progress["plan"], "sticky": sticky, "rolling": rolling}
    out["progress"] = progress
    return out


def _migrate_v1(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1: before fleet deployments, a record acted on its one ``region``."""
    out = dict(doc)
    out["schema_version"] = SCHEMA_VERSION
    out.setdefault("regions", [out["region"]])
    return out


def _stage_v0(stage: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(stage)
    t0 = out.pop("_t0", None)
    out["started_ts"] = (
        t0 if t0 is not None else datetime.fromisoformat(out["started_at"]).timestamp()
    )
    return out


class Records:
    """The orchestrator's typed view of the store: deployment records and revisions. Every call
    goes through ``AsyncStore`` (a worker thread); a record is serialised here, on the loop,
    before it is handed over."""

    def __init__(self, store: AsyncStore) -> None:
        self.store = store

    async def get(self, deployment_id: str) -> Record:
        return load_record(await self.store.get_deployment(deployment_id))

    async def exists(self, deployment_id: str) -> bool:
        try:
            await self.store.get_deployment(deployment_id)
        except NotFound:
            return False
        return True

    async def create(self, record: Record, *, lease: LeaseClaim | None = None) -> None:
        """Insert, with the ``lease`` of the replica that will drive it (same transaction);
        ``DeploymentInProgress`` if the service already has an active one in any region."""
        await self.store.create_deployment(
            dump_record(record), active=not record.terminal, lease=lease
        )

    async def save(self, record: Record) -> None:
        """Write the record; it stays active (resumed after a restart) until it is terminal."""
        await self.store.save_deployment(dump_record(record), active=not record.terminal)

    async def active(self) -> list[Record]:
        return [load_record(d) for d in await self.store.active_deployments()]

    async def active_for(self, service: str, region: str) -> Record | None:
        """The deployment in flight of ``service`` in ``region``: its own (the store's row is
        keyed by a record's first region), or a fleet's that spans ``region``."""
        doc = await self.store.active_deployment(service, region)
        if doc is not None:
            return load_record(doc)
        for record in await self.active():
            if record.service == service and region in record.all_regions:
                return record
        return None

    async def history(
        self, service: str | None = None, limit: int = 50, *, matching: Sequence[str] | None = None
    ) -> list[Record]:
        docs = await self.store.list_deployments(service, limit, matching=matching)
        return [load_record(d) for d in docs]

    async def revision(self, revision: str) -> RevisionRecord:
        return RevisionRecord.model_validate(await self.store.get_revision_spec(revision))

    async def save_revision(
        self, rev: RevisionRecord, *, region: str, deployment_id: str, now: float
    ) -> None:
        """Keep a revision (the first write wins: a revision never changes)."""
        await self.store.save_revision(
            rev.revision, rev.service, region, deployment_id, rev.model_dump(mode="json"), now
        )

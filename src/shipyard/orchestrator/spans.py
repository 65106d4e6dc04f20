"""A deployment's spans: what the orchestrator tells OpenTelemetry, from its records.

One trace per deployment (ids in the record, see ``tracing.py``):

- the root span ``deployment <service>`` (``rollback <service>`` for a manual rollback),
  emitted once by ``emit_root`` when ``outcome.finish`` has saved the final status, with the
  id fixed at submit; it starts at ``created_at`` and ends at ``finished_at``;
- one span per stage (``stage.stage``: build, scan, each plan step -- health gates, weight
  changes, bakes, analyses --, rollback), a child of the root's ``SpanContext`` rebuilt from
  the record: a deployment resumed after a restart, or taken over by another replica, goes on
  in the same trace. A resumed stage's span starts when the stage first started;
- ``analysis.measurement`` spans, children of their analysis stage's span.

Times come from the deployment's clock (``ctx.clock``), the same readings as the record's.

Attributes: the OpenTelemetry semantic conventions where one fits -- ``deployment.id``,
``deployment.status`` (``succeeded``/``failed``), ``vcs.ref.head.revision`` (the commit),
``vcs.repository.url.full``, ``error.type`` (the typed error's ``code``); ``service.name`` and
``service.version`` are Shipyard's own (the resource: the spans are Shipyard's telemetry);
``deployment.environment.name`` belongs on the resource too (``OTEL_RESOURCE_ATTRIBUTES``),
since Shipyard has no notion of an environment. Shipyard's own are under ``shipyard.``:
``shipyard.deployment.id``, ``shipyard.service`` (the deployed service), ``shipyard.region``,
``shipyard.regions``, ``shipyard.revision`` (the candidate), ``shipyard.stable_revision``,
``shipyard.artifact.digest``, ``shipyard.strategy``, ``shipyard.stage``, and each stage's scalar
detail as ``shipyard.stage.<key>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from shipyard import tracing
from shipyard.domain import repository_urls
from shipyard.domain.models import DeploymentStatus
from shipyard.errors import ShipyardError
from shipyard.orchestrator.record import DeploymentRecord, Record, Stage

if TYPE_CHECKING:
    from shipyard.orchestrator.context import DeploymentContext

Attributes = dict[str, AttributeValue]

#: A span's status description is cut to this many characters (the record has the whole).
_DESCRIPTION_CHARS = 300


def _ns(ts: float) -> int:
    return int(ts * 1_000_000_000)


def deployment_attributes(record: Record) -> Attributes:
    """What names the deployment on every one of its spans."""
    out: Attributes = {
        "shipyard.deployment.id": record.id,
        "shipyard.deployment.kind": record.kind,
        "shipyard.service": record.service,
        "shipyard.region": record.region,
    }
    if record.fleet is not None:
        out["shipyard.regions"] = list(record.all_regions)
    return out


def root_attributes(record: Record) -> Attributes:
    """The root span's: the deployment as a whole (see the module docstring)."""
    out = deployment_attributes(record)
    out["deployment.id"] = record.id
    out["deployment.status"] = (
        "succeeded" if record.status is DeploymentStatus.SUCCESS else "failed"
    )
    out["shipyard.status"] = record.status.value
    optional: dict[str, str | int | None] = {
        "shipyard.revision": record.green_revision,
        "shipyard.stable_revision": record.blue_revision,
        "shipyard.artifact.digest": record.artifact_digest,
        "shipyard.rollback_count": record.rollback_count,
    }
    if isinstance(record, DeploymentRecord):
        optional["shipyard.strategy"] = record.strategy.kind
        optional["vcs.ref.head.revision"] = record.commit or record.request.source.commit
    else:
        optional["shipyard.strategy"] = "rollback"
        optional["shipyard.rollback_of"] = record.rollback_of
    if record.source is not None:
        optional["vcs.repository.url.full"] = repository_urls.redacted(record.source.repository)
    out.update({k: v for k, v in optional.items() if v is not None})
    for key, value in record.metrics.model_dump().items():
        scalar = tracing.scalar(value)
        if scalar is not None:
            out[f"shipyard.metrics.{key}"] = scalar
    return out


def _in_deployment(record: Record) -> Context | None:
    """The context a stage span starts in: the deployment's root span as its parent."""
    if record.trace_id is None or record.trace_span_id is None:
        return None
    return tracing.parent_context(record.trace_id, record.trace_span_id, record.trace_flags)


def start_stage(ctx: DeploymentContext, stage: Stage) -> Span | None:
    """The span of ``stage`` (None: the record is in no trace), started when the stage first
    started; ended by ``end_stage``."""
    parent = _in_deployment(ctx.record)
    if parent is None:
        return None
    attributes = deployment_attributes(ctx.record)
    attributes["shipyard.stage"] = stage.name
    progress = ctx.record.progress
    if progress.phase == "steps" and progress.plan is not None:
        attributes["shipyard.step.index"] = progress.step
    return ctx.deps.tracer.start_span(
        stage.name,
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        start_time=_ns(stage.started_ts),
    )


def end_stage(
    ctx: DeploymentContext,
    span: Span | None,
    stage: Stage,
    *,
    annotations: Mapping[str, AttributeValue] | None = None,
    error: ShipyardError | None = None,
    interrupted: BaseException | None = None,
) -> None:
    """End a stage's span with the stage's scalar detail, ``annotations`` (what the stage
    added for the trace: cache hits, findings by severity, weights), and its outcome: ERROR
    with ``error.type`` = ``error.code`` when it failed; ``interrupted``: the body was cancelled
    (shutdown, abort, lost lease -- the stage stays running and is resumed, in a new span) or
    failed with something that is not Shipyard's error."""
    if span is None:
        return
    for key, value in stage.detail.items():
        scalar = tracing.scalar(value)
        if scalar is not None:
            span.set_attribute(f"shipyard.stage.{key}", scalar)
    span.set_attribute("shipyard.stage.status", stage.status)
    if annotations:
        span.set_attributes(annotations)
    if error is not None:
        fail(span, error.code, error.message)
    elif interrupted is not None:
        if isinstance(interrupted, Exception):
            fail(span, type(interrupted).__qualname__, repr(interrupted))
        else:
            span.set_attribute("shipyard.stage.interrupted", True)
    span.end(end_time=_ns(ctx.clock.now()))


def fail(span: Span, code: str, message: str) -> None:
    """ERROR status, ``error.type`` = ``code``, the message's first line as description."""
    span.set_attribute("error.type", code)
    headline = message.partition("\n")[0][:_DESCRIPTION_CHARS]
    span.set_status(Status(StatusCode.ERROR, headline))


def emit_root(ctx: DeploymentContext) -> None:
    """The root span of a deployment that reached its final status (``outcome.finish``, after
    saving it): started and ended at once with the ids fixed at submit, so every span made
    before it, by any replica, is already its child."""
    record = ctx.record
    if record.trace_id is None or record.trace_span_id is None:
        return
    parent = (
        tracing.parent_context(
            record.trace_id, record.trace_parent_span_id, record.trace_flags, remote=True
        )
        if record.trace_parent_span_id is not None
        else Context()  # the trace's root (its trace id is fixed too)
    )
    name = f"{'rollback' if record.kind == 'rollback' else 'deployment'} {record.service}"
    end = record.finished_at.timestamp() if record.finished_at else ctx.clock.now()
    with tracing.fixed_ids(record.trace_id, record.trace_span_id):
        span = ctx.deps.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=root_attributes(record),
            start_time=_ns(record.created_ts),
        )
    if record.error is not None and record.status is not DeploymentStatus.SUCCESS:
        fail(span, record.error.code, record.error.message)
    span.end(end_time=_ns(end))


def measurement(
    ctx: DeploymentContext, stage_span: Span | None, measured: Mapping[str, object]
) -> None:
    """An ``analysis.measurement`` span (a point in time) under its analysis stage's span:
    each scalar (or list of strings) of the measurement as ``shipyard.analysis.<key>``
    (``verdict``, ``requests``, ``success_rate``, ``p99_ms``, ``metric``, ...)."""
    if stage_span is None or not stage_span.get_span_context().is_valid:
        return
    attributes = deployment_attributes(ctx.record)
    for key, value in measured.items():
        scalar = tracing.scalar(value)
        if scalar is not None:
            attributes[f"shipyard.analysis.{key}"] = scalar
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            attributes[f"shipyard.analysis.{key}"] = [str(v) for v in value]
    now = _ns(ctx.clock.now())
    span = ctx.deps.tracer.start_span(
        "analysis.measurement",
        context=trace.set_span_in_context(stage_span),
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        start_time=now,
    )
    span.end(end_time=now)

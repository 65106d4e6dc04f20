"""The stage recorder: every stage of a deployment is recorded the same way.

::

    async with stage(ctx, "bake", audit="bake", seconds=600) as st:
        ...                     # the work; st.done(**detail) says what it found
        st.fail(reason, ...)    # optional, before raising: what to record instead of the error

On entry the stage is appended to the record as ``running`` and persisted (a resumed deployment
finds its running stage and keeps its start time; a step whose previous driver ended its stage but
died before the next step began finds that stage, and ends it again). On success it ends
``succeeded`` with what the body said. When the body raises a ``ShipyardError`` (or
``Rollback``, a step's verdict) the stage ends ``failed`` with the error, the ``<audit>.failed``
event is recorded when the stage has one, and the exception goes on. A cancelled task
(shutdown, abort) leaves the stage running: the next run resumes it.

Every stage is also a span of the deployment's trace (``spans.py``): named after the stage,
started when the stage first started, ended with its scalar detail, what the body added with
``st.annotate`` (cache hits, findings by severity, weights) and, when it failed, ERROR with the
typed error's code. A cancelled stage's span ends marked ``shipyard.stage.interrupted``; the
run that resumes the stage makes a new one.

``Rollback`` is how a step says "stop the plan and roll back": the cause, and when the verdict was
reached (a ``clock.monotonic()`` reading: rollback latency is measured from it). Used by
pre-flight, the step executors and the rollback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from shipyard.errors import ShipyardError
from shipyard.orchestrator import spans
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.record import Stage, utc


class Rollback(Exception):
    """Raised by a step: stop the plan and roll back for ``cause``."""

    def __init__(self, cause: ShipyardError, *, detected_at: float | None = None) -> None:
        super().__init__(cause.message)
        self.cause = cause
        #: ``clock.monotonic()`` when the failure was detected (None: measure from the rollback).
        self.detected_at = detected_at


@dataclass(frozen=True)
class Failure:
    """What a failed stage records: its error, detail fields, and the audit event's detail
    (by default the error and the same fields)."""

    error: str
    detail: Mapping[str, object] = field(default_factory=dict)
    audit: Mapping[str, object] | None = None

    def audit_detail(self) -> dict[str, object]:
        if self.audit is not None:
            return dict(self.audit)
        return {"error": self.error, **self.detail}


@dataclass
class StageRun:
    """The body's handle on its stage."""

    record: Stage
    found: dict[str, object] = field(default_factory=dict)
    failure: Failure | None = None
    #: The stage's span (None: the deployment is in no trace); children hang from it.
    span: Span | None = None
    #: Attributes for the span only (``annotate``).
    annotations: dict[str, AttributeValue] = field(default_factory=dict)

    def done(self, **detail: object) -> None:
        """What the stage found, recorded when it succeeds."""
        self.found.update(detail)

    def fail(
        self, error: str, *, audit: Mapping[str, object] | None = None, **detail: object
    ) -> None:
        """What to record if the body then raises, instead of the exception's message."""
        self.failure = Failure(error, detail, audit)

    def annotate(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Attributes for the stage's span, not the record (semantic names, or numbers the
        record keeps as a list or a mapping)."""
        self.annotations.update(attributes)


@asynccontextmanager
async def stage(
    ctx: DeploymentContext, name: str, *, audit: str | None = None, **detail: object
) -> AsyncIterator[StageRun]:
    """Record stage ``name`` around the body (see the module docstring). ``audit``: the event
    family whose ``.failed`` event a failure records (``"health_check"``); ``detail``: recorded
    when the stage starts."""
    run = StageRun(await start(ctx, name, **detail))
    run.span = spans.start_stage(ctx, run.record)
    try:
        yield run
    except (ShipyardError, Rollback) as exc:
        cause = exc.cause if isinstance(exc, Rollback) else exc
        failure = run.failure or Failure(cause.message)
        try:
            await end(ctx, run.record, "failed", error=failure.error, **failure.detail)
        finally:
            spans.end_stage(ctx, run.span, run.record, annotations=run.annotations, error=cause)
        if audit is not None:
            await ctx.audit_detail(f"{audit}.failed", failure.audit_detail())
        raise
    except BaseException as exc:  # cancelled (the stage stays running), or a bug
        spans.end_stage(ctx, run.span, run.record, annotations=run.annotations, interrupted=exc)
        raise
    try:
        await end(ctx, run.record, "succeeded", **run.found)
    finally:
        spans.end_stage(ctx, run.span, run.record, annotations=run.annotations)


async def start(ctx: DeploymentContext, name: str, **detail: object) -> Stage:
    """Append a running stage and persist it; a resumed run finds its own and keeps it."""
    stages = ctx.record.stages
    if stages and stages[-1].name == name and stages[-1].status == "running":
        return stages[-1]  # resumed: keep the original start time
    if (
        stages
        and stages[-1].name == name
        and stages[-1].status == "succeeded"
        and ctx.resumed_step
        and stages[-1].started_ts >= (ctx.record.progress.step_started_at or 0.0)
    ):
        # The step's previous driver ended this stage and died before recording the next
        # step: the step runs again (idempotent) and ends the same record again.
        return stages[-1]
    now = ctx.clock.now()
    record = Stage(name=name, started_at=utc(now), started_ts=now, detail=dict(detail))
    stages.append(record)
    await ctx.save()
    return record


async def end(
    ctx: DeploymentContext,
    record: Stage,
    status: Literal["succeeded", "failed", "skipped"],
    **detail: object,
) -> None:
    now = ctx.clock.now()
    record.status = status
    record.finished_at = utc(now)
    record.duration_ms = int((now - record.started_ts) * 1000)
    record.detail.update({k: v for k, v in detail.items() if v is not None})
    await ctx.save()

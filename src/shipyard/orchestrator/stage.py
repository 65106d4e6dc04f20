"""The stage recorder: every stage of a deployment is recorded the same way.

::

    async with stage(ctx, "bake", audit="bake", seconds=600) as st:
        ...                     # the work; st.done(**detail) says what it found
        st.fail(reason, ...)    # optional, before raising: what to record instead of the error

On entry the stage is appended to the record as ``running`` and persisted (a resumed deployment
finds its running stage and keeps its start time). On success it ends ``succeeded`` with what the
body said. When the body raises a ``ShipyardError`` (or ``Rollback``, a step's verdict) the stage
ends ``failed`` with the error, the ``<audit>.failed`` event is recorded when the stage has one,
and the exception goes on. A cancelled task (shutdown, abort) leaves the stage running: the next
run resumes it.

``Rollback`` is how a step says "stop the plan and roll back": the cause, and when the verdict was
reached (a ``clock.monotonic()`` reading: rollback latency is measured from it). Used by
pre-flight, the step executors and the rollback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from shipyard.errors import ShipyardError
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

    def done(self, **detail: object) -> None:
        """What the stage found, recorded when it succeeds."""
        self.found.update(detail)

    def fail(
        self, error: str, *, audit: Mapping[str, object] | None = None, **detail: object
    ) -> None:
        """What to record if the body then raises, instead of the exception's message."""
        self.failure = Failure(error, detail, audit)


@asynccontextmanager
async def stage(
    ctx: DeploymentContext, name: str, *, audit: str | None = None, **detail: object
) -> AsyncIterator[StageRun]:
    """Record stage ``name`` around the body (see the module docstring). ``audit``: the event
    family whose ``.failed`` event a failure records (``"health_check"``); ``detail``: recorded
    when the stage starts."""
    run = StageRun(await start(ctx, name, **detail))
    try:
        yield run
    except (ShipyardError, Rollback) as exc:
        cause = exc.cause if isinstance(exc, Rollback) else exc
        failure = run.failure or Failure(cause.message)
        await end(ctx, run.record, "failed", error=failure.error, **failure.detail)
        if audit is not None:
            await ctx.audit_detail(f"{audit}.failed", failure.audit_detail())
        raise
    await end(ctx, run.record, "succeeded", **run.found)


async def start(ctx: DeploymentContext, name: str, **detail: object) -> Stage:
    """Append a running stage and persist it; a resumed run finds its own and keeps it."""
    stages = ctx.record.stages
    if stages and stages[-1].name == name and stages[-1].status == "running":
        return stages[-1]  # resumed: keep the original start time
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

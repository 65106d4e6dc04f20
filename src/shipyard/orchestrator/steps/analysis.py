"""``Analyse``: hold a canary stage's weight for ``seconds`` while measuring it every interval.

Each measurement is the window of the router's per-revision counters since the previous
snapshot, judged by ``analysis.verdicts`` (for the canary, and against stable when the policy
compares). The tallies decide: go on, pass, fail (roll back at once: weight 0 is the rollback's
first switch, and its latency is measured from this verdict), extend the stage by an interval, or
pause for a human (``gate.await_promotion``).

Resumable: the deadline, the tallies and the window's starting snapshot are persisted in
``progress.analysis`` after every measurement, so a restarted control plane continues the same
stage with the same deadline.

The built-in load (``[analysis] load = { rps, path }``): when the stage's policy has one and the
router is a ``runtime.base.LoadDriver``, the load starts before the first window, its lease
(one interval plus ``LOAD_LEASE_SLACK_SECONDS``) is renewed after every measurement, and it is
stopped when the analysis ends: passed, failed, before a pause for a human, or cancelled (an
abort). If the control plane dies instead, the lease runs out on the data plane. What the load
did is on the stage record (``detail.load``) and in the audit log (``analysis.load_started`` /
``analysis.load_stopped``); a runtime that cannot drive load is recorded there too, and the
analysis goes on with real traffic only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
from shipyard.domain.models import DeploymentStatus
from shipyard.errors import AnalysisFailed, ShipyardError
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.record import AnalysisState, MetricsSnapshot, utc
from shipyard.orchestrator.stage import Rollback, StageRun, stage
from shipyard.orchestrator.steps.gate import await_promotion
from shipyard.orchestrator.steps.registry import executes
from shipyard.runtime.base import LoadDriver
from shipyard.strategies.steps import Analyse

#: Measurements kept on a stage record (all of them are in the audit log).
STAGE_MEASUREMENTS_KEPT = 50
#: A load's lease outlives the next renewal (one interval away) by this much: a slow metrics
#: call must not stop the load mid-window, and a dead control plane's load ends soon after.
LOAD_LEASE_SLACK_SECONDS = 30.0


@dataclass(frozen=True)
class _Then:
    """An audit event to record once the stage has ended."""

    event: str
    detail: Mapping[str, object] = field(default_factory=dict)


@executes(Analyse, status=DeploymentStatus.ANALYSING)
async def analyse(ctx: DeploymentContext, step: Analyse) -> None:
    async with stage(
        ctx,
        step.name,
        audit="analysis",
        stage=step.stage,
        weight=step.weight,
        seconds=step.seconds,
    ) as st:
        then = await _hold(ctx, step, st)
    if then is not None:
        await ctx.audit_detail(then.event, then.detail)


async def _hold(ctx: DeploymentContext, step: Analyse, st: StageRun) -> _Then | None:
    progress, policy = ctx.record.progress, step.policy
    state = progress.analysis
    if state is None or state.step != progress.step:
        state = AnalysisState(
            step=progress.step,
            deadline=ctx.step_started_at + step.seconds,
            last_at=ctx.clock.now(),
            run=AnalysisRun(policy),
        )
        progress.analysis = state
        await ctx.save()
    if not policy.enabled or step.weight == 0:
        why = "disabled for this stage" if not policy.enabled else "the canary has weight 0"
        await ctx.audit("analysis.skipped", stage=step.stage, reason=why)
        await ctx.clock.sleep(state.deadline - ctx.clock.now())
        st.done(analysis="skipped", reason=why)
        return None
    if state.paused:
        return await _paused(ctx, st, state, state.paused)
    loading = await _drive_load(ctx, step, st, first=True)
    try:
        return await _measure(ctx, step, st, state, loading)
    finally:
        if loading:
            await _stop_load(ctx, step, st)


async def _measure(
    ctx: DeploymentContext, step: Analyse, st: StageRun, state: AnalysisState, loading: bool
) -> _Then | None:
    policy = step.policy
    if state.baseline is None:
        with contextlib.suppress(ShipyardError):  # unavailable: the first window says so
            state.baseline = _snapshot(await ctx.router.metrics(ctx.service))
            state.last_at = ctx.clock.now()
            await ctx.save()
    run = state.run
    while True:
        at = min(state.last_at + policy.interval_seconds, state.deadline)
        await ctx.clock.sleep(at - ctx.clock.now())
        now = ctx.clock.now()
        at_deadline = now >= state.deadline
        snapshot: MetricsSnapshot | None = None
        try:
            snapshot = _snapshot(await ctx.router.metrics(ctx.service))
            if state.baseline is None:
                raise CountersReset("no earlier snapshot to measure a window from")
            m = judge(
                window(snapshot, state.baseline, ctx.candidate),
                window(snapshot, state.baseline, ctx.stable),
                policy,
            )
        except CountersReset as exc:
            m = measurement_error(str(exc))
            state.baseline = snapshot  # start a fresh window from here
        except ShipyardError as exc:
            m = measurement_error(f"metrics unavailable: {exc.message}"[:500])
        decision = run.record(m, at_deadline=at_deadline)
        decided = ctx.clock.monotonic()
        if m.verdict not in (Verdict.ERROR, Verdict.INSUFFICIENT_DATA) and snapshot:
            state.baseline = snapshot  # else the window keeps growing (extend)
        state.last_at = now
        if loading and decision.outcome in (Outcome.CONTINUE, Outcome.EXTENDED):
            await _drive_load(ctx, step, st, first=False)  # renew the lease, record its counts
        await _record_measurement(ctx, st, step, m, decision.outcome.value)
        match decision.outcome:
            case Outcome.FAILED:
                st.fail(
                    decision.reason,
                    audit={
                        "stage": step.stage,
                        "weight": step.weight,
                        "decision": "abort",
                        "reason": decision.reason,
                    },
                    tallies=run.to_dict(),
                )
                raise Rollback(
                    AnalysisFailed(
                        f"canary analysis failed at stage {step.stage} "
                        f"({step.weight}%): {decision.reason}",
                        stage=step.stage,
                        verdict=m.verdict.value,
                    ),
                    detected_at=decided,
                )
            case Outcome.PASSED:
                st.done(verdict="pass", tallies=run.to_dict())
                return _Then(
                    "analysis.passed",
                    {
                        "stage": step.stage,
                        "weight": step.weight,
                        "decision": "continue",
                        "reason": decision.reason,
                    },
                )
            case Outcome.EXTENDED:
                state.deadline += policy.interval_seconds
                await ctx.save()
                await ctx.audit(
                    "analysis.extended",
                    stage=step.stage,
                    reason=decision.reason,
                    extensions=run.extensions,
                )
            case Outcome.PAUSED:
                state.paused = decision.reason
                await ctx.save()
                if loading:  # a human decides now: no load while the deployment waits
                    await _stop_load(ctx, step, st)
                return await _paused(ctx, st, state, decision.reason)
            case Outcome.CONTINUE:
                await ctx.save()


async def _drive_load(ctx: DeploymentContext, step: Analyse, st: StageRun, *, first: bool) -> bool:
    """Start (``first``) or renew the stage's built-in load on the candidate; whether it runs.
    What it did so far, or why it cannot run, goes on the stage record."""
    load = step.policy.load
    if load is None:
        return False
    router = ctx.router
    wanted: dict[str, object] = {"rps": load.rps, "path": load.path, "revision": ctx.candidate}
    if not isinstance(router, LoadDriver):
        why = f"the {ctx.runtime.kind} runtime cannot drive load; measuring real traffic only"
        st.record.detail["load"] = {**wanted, "error": why}
        await ctx.audit("analysis.load_unavailable", stage=step.stage, reason=why)
        return False
    lease = step.policy.interval_seconds + LOAD_LEASE_SLACK_SECONDS
    try:
        got = await router.drive_load(
            ctx.service, ctx.candidate, load.rps, load.path, lease_seconds=lease
        )
    except ShipyardError as exc:
        why = f"load could not start: {exc.message}"[:500]
        st.record.detail["load"] = {**wanted, "error": why}
        await ctx.audit("analysis.load_unavailable", stage=step.stage, reason=why)
        return False
    st.record.detail["load"] = {**wanted, **_load_counts(got)}
    if first:
        await ctx.audit_detail("analysis.load_started", {"stage": step.stage, **wanted})
    await ctx.save()
    return True


async def _stop_load(ctx: DeploymentContext, step: Analyse, st: StageRun) -> None:
    """Stop the load (once); never raises (the lease ends it if the data plane cannot be
    told)."""
    loaded = st.record.detail.get("load")
    if isinstance(loaded, dict) and loaded.get("running") is False:
        return  # stopped already, before a pause
    try:
        got = (
            await ctx.router.stop_load(ctx.service) if isinstance(ctx.router, LoadDriver) else None
        )
    except ShipyardError as exc:
        got = None
        st.record.detail.setdefault("load", {})
        detail = st.record.detail["load"]
        if isinstance(detail, dict):
            detail["stop_error"] = exc.message[:500]
    counts = _load_counts(got or {})
    loaded = st.record.detail.get("load")
    if isinstance(loaded, dict):
        loaded.update(counts, running=False)
    await ctx.audit("analysis.load_stopped", stage=step.stage, **counts)


def _load_counts(got: Mapping[str, Any]) -> dict[str, int]:
    keys = ("sent", "answered", "status_5xx", "failed", "missed")
    return {k: int(got[k]) for k in keys if isinstance(got.get(k), int)}


def _snapshot(metrics: Mapping[str, Mapping[str, Any]]) -> MetricsSnapshot:
    return {revision: dict(counters) for revision, counters in metrics.items()}


async def _record_measurement(
    ctx: DeploymentContext, st: StageRun, step: Analyse, m: Measurement, outcome: str
) -> None:
    kept = st.record.detail.get("measurements")
    if not isinstance(kept, list):
        kept = st.record.detail["measurements"] = []
    kept.append({"at": utc(ctx.clock.now()).isoformat(), **m.to_dict()})
    del kept[:-STAGE_MEASUREMENTS_KEPT]
    await ctx.save()
    await ctx.audit("analysis.measurement", stage=step.stage, outcome=outcome, **m.to_dict())


async def _paused(ctx: DeploymentContext, st: StageRun, state: AnalysisState, reason: str) -> _Then:
    await ctx.audit("analysis.paused", reason=reason)
    by = await await_promotion(ctx, reason)
    state.paused = None
    st.done(verdict="overridden", promoted_by=by)
    return _Then("analysis.overridden", {"reason": reason, "promoted_by": by})

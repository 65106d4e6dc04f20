"""``Analyse``: hold a canary stage's weight for ``seconds`` while measuring it every interval.

Each measurement is the window of the router's per-revision counters since the previous
snapshot, judged by ``analysis.verdicts`` (for the canary, and against stable when the policy
compares). The tallies decide: go on, pass, fail (roll back at once: weight 0 is the rollback's
first switch, and its latency is measured from this verdict), extend the stage by an interval, or
pause for a human (``gate.await_promotion``).

A fleet (``target.regions``) is judged twice per window: the merged fleet's counters decide as
above, and each region's own counters are judged too (``region_runs``, counting only pass and
fail verdicts, since a region's share of the traffic may be small): a region whose failed
measurements exceed ``failure_limit`` fails the whole fleet, the error naming it.

``[[analysis.metrics]]`` (the stage's list, else the manifest's): when metrics are listed they
*are* the analysis (``_measure_metrics``). Each metric (a fleet's metric naming ``{{region}}``:
each region's) is measured on its own interval by its provider (``Deps.metric_providers``;
``router`` is the check above, judged by the ``[analysis]`` thresholds), concurrently when
several are due, and tallied with its own limits (``analysis.metrics``). The first metric beyond
its failure or error limit aborts (the error names it, and its region), the first beyond its
inconclusive limit or with no data under the ``pause`` policy pauses, and the stage passes once
every metric is done (its deadline reached, or its ``count`` taken) and the stage's time is up.
Every measurement goes through ``_record_measurement`` (stage record, audit log, trace span)
with its metric's name, provider, query as sent, value and verdict.

Resumable: the deadline, the tallies and the window's starting snapshot are persisted in
``progress.analysis`` after every measurement, so a restarted control plane continues the same
stage with the same deadline (each metric's tallies and schedule too: ``AnalysisState.metrics``).

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

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shipyard.analysis import metrics
from shipyard.analysis.policy import AnalysisPolicy
from shipyard.analysis.verdicts import (
    AnalysisRun,
    CountersReset,
    Decision,
    Measurement,
    Outcome,
    Verdict,
    judge,
    measurement_error,
    window,
)
from shipyard.domain.models import DeploymentStatus
from shipyard.errors import AnalysisFailed, RegionUnreachable, ShipyardError
from shipyard.orchestrator import spans
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.record import AnalysisState, MetricsSnapshot, utc
from shipyard.orchestrator.stage import Rollback, StageRun, stage
from shipyard.orchestrator.steps.gate import await_promotion
from shipyard.orchestrator.steps.registry import executes
from shipyard.runtime.base import LoadDriver
from shipyard.runtime.fleet import merged
from shipyard.strategies.steps import Analyse

#: Measurements kept on a stage record (all of them are in the audit log).
STAGE_MEASUREMENTS_KEPT = 50
#: A load's lease outlives the next renewal (one interval away) by this much: a slow metrics
#: call must not stop the load mid-window, and a dead control plane's load ends soon after.
LOAD_LEASE_SLACK_SECONDS = 30.0
#: A provider's read may take this much longer than its request timeout (connect, then read)
#: before the measurement is an error.
PROVIDER_TIMEOUT_SLACK_SECONDS = 5.0


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
        deadline, now = ctx.step_started_at + step.seconds, ctx.clock.now()
        state = AnalysisState(
            step=progress.step,
            deadline=deadline,
            last_at=now,
            run=AnalysisRun(policy),
            metrics=metrics.start_runs(
                policy,
                now=now,
                deadline=deadline,
                regions=ctx.regions if ctx.record.fleet is not None else None,
            ),
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
    measure = _measure_metrics if state.metrics else _measure
    try:
        return await measure(ctx, step, st, state, loading)
    finally:
        if loading:
            await _stop_load(ctx, step, st)


async def _measure(
    ctx: DeploymentContext, step: Analyse, st: StageRun, state: AnalysisState, loading: bool
) -> _Then | None:
    policy = step.policy
    if state.baseline is None:
        await _first_snapshot(ctx, state)
    run = state.run
    while True:
        at = _next_measurement(state, policy.interval_seconds, step.seconds)
        await ctx.clock.sleep(at - ctx.clock.now())
        at_deadline = ctx.clock.now() >= state.deadline
        m, snapshot, regional, read_at = await _router_window(ctx, state, policy)
        decision = run.record(m, at_deadline=at_deadline)
        failing = _judge_regions(ctx, state, regional, policy)
        if failing is not None and decision.outcome is not Outcome.FAILED:
            decision, m = failing[1], failing[2]
        decided = ctx.clock.monotonic()
        if m.verdict not in (Verdict.ERROR, Verdict.INSUFFICIENT_DATA) and snapshot:
            state.baseline = snapshot  # else the window keeps growing (extend)
        state.last_at = read_at
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
                where = f" in region {failing[0]}" if failing is not None else ""
                raise Rollback(
                    AnalysisFailed(
                        f"canary analysis failed at stage {step.stage} "
                        f"({step.weight}%){where}: {decision.reason}",
                        stage=step.stage,
                        verdict=m.verdict.value,
                        **({"region": failing[0]} if failing is not None else {}),
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


@dataclass(frozen=True)
class _Taken:
    """One metric's measurement of a tick: when it was read, and (the router check on a fleet)
    the first region failing on its own."""

    key: str
    measurement: Measurement
    read_at: float
    failing: tuple[str, Decision, Measurement] | None = None


async def _measure_metrics(
    ctx: DeploymentContext, step: Analyse, st: StageRun, state: AnalysisState, loading: bool
) -> _Then | None:
    """``[[analysis.metrics]]``: every metric measured on its own schedule and tallied with its
    own limits (``analysis.metrics``); the first metric to fail aborts, the first to pause
    pauses, and the stage passes once every metric is done and the stage's time is up."""
    policy, runs = step.policy, state.metrics
    router = any(metrics.metric_named(policy, r.metric).provider == "router" for r in runs.values())
    if router and state.baseline is None:
        await _first_snapshot(ctx, state)
    while True:
        pending = {k: r.due(step.seconds) for k, r in runs.items() if not r.done}
        if not pending:
            await ctx.clock.sleep(state.deadline - ctx.clock.now())  # hold the stage's weight
            summary = "; ".join(
                f"{key}: {r.run.passed} passed, {r.run.failed} failed, "
                f"{r.run.inconclusive} inconclusive, {r.run.errors} errors"
                for key, r in runs.items()
            )
            st.done(verdict="pass", metrics=_metric_tallies(state))
            return _Then(
                "analysis.passed",
                {
                    "stage": step.stage,
                    "weight": step.weight,
                    "decision": "continue",
                    "reason": summary,
                },
            )
        await ctx.clock.sleep(min(pending.values()) - ctx.clock.now())
        now = ctx.clock.now()
        due = [k for k, t in pending.items() if t <= now]
        failed: tuple[_Taken, Decision] | None = None
        paused: Decision | None = None
        for taken in await _take(ctx, step, state, due):
            r, m = runs[taken.key], taken.measurement
            decision = r.run.record(m, at_deadline=r.at_deadline(now))
            if taken.failing is not None and decision.outcome is not Outcome.FAILED:
                decision, m = taken.failing[1], taken.failing[2]
            r.last_at = taken.read_at
            if decision.outcome is Outcome.PASSED:
                r.done = True
            elif decision.outcome is Outcome.EXTENDED:
                r.extend()
                await ctx.audit(
                    "analysis.extended",
                    stage=step.stage,
                    metric=taken.key,
                    reason=decision.reason,
                    extensions=r.run.extensions,
                )
            await _record_measurement(ctx, st, step, m, decision.outcome.value)
            if decision.outcome is Outcome.FAILED and failed is None:
                failed = (dataclasses.replace(taken, measurement=m), decision)
            elif decision.outcome is Outcome.PAUSED and paused is None:
                paused = Decision(Outcome.PAUSED, f"metric {taken.key}: {decision.reason}")
        state.deadline = max(
            [state.deadline, *(r.deadline for r in runs.values() if r.deadline is not None)]
        )
        decided = ctx.clock.monotonic()
        if failed is not None:
            raise _metric_failed(step, st, state, failed, decided)
        if paused is not None:
            state.paused = paused.reason
            await ctx.save()
            if loading:
                await _stop_load(ctx, step, st)
            return await _paused(ctx, st, state, paused.reason)
        if loading:
            await _drive_load(ctx, step, st, first=False)
        await ctx.save()


def _metric_failed(
    step: Analyse,
    st: StageRun,
    state: AnalysisState,
    failed: tuple[_Taken, Decision],
    decided: float,
) -> Rollback:
    taken, decision = failed
    m = taken.measurement
    run = state.metrics[taken.key]
    region = m.region or (taken.failing[0] if taken.failing is not None else None)
    reason = f"metric {run.metric}: {decision.reason}"
    st.fail(
        reason,
        audit={
            "stage": step.stage,
            "weight": step.weight,
            "decision": "abort",
            "metric": run.metric,
            "reason": reason,
        },
        metrics=_metric_tallies(state),
    )
    where = f" in region {region}" if region is not None else ""
    return Rollback(
        AnalysisFailed(
            f"canary analysis failed at stage {step.stage} ({step.weight}%){where}: {reason}",
            stage=step.stage,
            verdict=m.verdict.value,
            metric=run.metric,
            **({"region": region} if region is not None else {}),
        ),
        detected_at=decided,
    )


def _metric_tallies(state: AnalysisState) -> dict[str, object]:
    """Each metric's tallies for the stage record (the policy it ran with is in the plan)."""
    return {
        key: {**{k: v for k, v in r.run.to_dict().items() if k != "policy"}, "done": r.done}
        for key, r in state.metrics.items()
    }


async def _take(
    ctx: DeploymentContext, step: Analyse, state: AnalysisState, due: list[str]
) -> list[_Taken]:
    """The measurements of the metrics ``due`` now, taken concurrently, in ``due``'s order."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_take_one(ctx, step, state, key)) for key in due]
    except* RegionUnreachable as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


async def _take_one(
    ctx: DeploymentContext, step: Analyse, state: AnalysisState, key: str
) -> _Taken:
    run = state.metrics[key]
    metric = metrics.metric_named(step.policy, run.metric)
    if metric.provider == "router":
        return await _take_router(ctx, state, key, run.run.policy)
    provider = ctx.deps.metric_providers.get(metric.provider)

    def error(why: str) -> _Taken:
        m = measurement_error(why)
        named = replace(m, metric=metric.name, provider=metric.provider, region=run.region)
        return _Taken(key, named, ctx.clock.now())

    if provider is None:
        return error(f"no {metric.provider} provider is configured in this control plane")
    values = metrics.template_values(
        service=ctx.service,
        canary=ctx.candidate,
        stable=ctx.stable,
        region=run.region or ctx.region,
        interval_seconds=run.interval,
    )
    try:
        # The provider's own timeout bounds each request; this bounds the whole read.
        async with asyncio.timeout(metric.timeout_seconds + PROVIDER_TIMEOUT_SLACK_SECONDS):
            reading = await provider.read(metric, values)
    except TimeoutError:
        return error(
            f"the {metric.provider} provider did not answer within {metric.timeout_seconds:g} s"
        )
    except ShipyardError as exc:
        return error(exc.message[:500])
    return _Taken(key, metrics.judge_reading(metric, reading, run.region), ctx.clock.now())


async def _take_router(
    ctx: DeploymentContext, state: AnalysisState, key: str, policy: AnalysisPolicy
) -> _Taken:
    """The built-in router check as one of the metrics: the window since the last snapshot,
    judged by the ``[analysis]`` thresholds (and, for a fleet, each region's own window)."""
    m, snapshot, regional, read_at = await _router_window(ctx, state, policy)
    failing = _judge_regions(ctx, state, regional, policy)
    if m.verdict not in (Verdict.ERROR, Verdict.INSUFFICIENT_DATA) and snapshot:
        state.baseline = snapshot
    name = state.metrics[key].metric
    return _Taken(key, replace(m, metric=name, provider="router"), read_at, failing)


async def _router_window(
    ctx: DeploymentContext, state: AnalysisState, policy: AnalysisPolicy
) -> tuple[Measurement, MetricsSnapshot | None, dict[str, MetricsSnapshot], float]:
    """Read the router's counters and judge the window since ``state.baseline``: the
    measurement, the snapshot read (None: unreadable), each region's, and when the read ended.
    Counters that went backwards start a fresh window from this read. Called by the built-in
    check (``_measure``) and by ``provider = "router"`` among listed metrics."""
    snapshot: MetricsSnapshot | None = None
    regional: dict[str, MetricsSnapshot] = {}
    read_at = ctx.clock.now()
    try:
        snapshot, regional = await _read(ctx)
        read_at = ctx.clock.now()
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
    except RegionUnreachable:
        raise  # a fleet's region went silent: the fleet rolls back now, not after N errors
    except ShipyardError as exc:
        m = measurement_error(f"metrics unavailable: {exc.message}"[:500])
    return m, snapshot, regional, read_at


def _next_measurement(state: AnalysisState, interval: float, seconds: float) -> float:
    """When the next window closes: one interval after the last read ended (the window starts at
    that read's snapshot, so a slow read does not eat the next window), cut short by the stage's
    deadline, but never to less than half a window (an interval, or the whole stage if shorter):
    a read that ended just before the deadline would otherwise leave a window of a few requests
    to judge (CI saw windows of 81, 2 and 81 requests at 40 rps)."""
    shortest = min(interval, seconds) / 2
    return max(min(state.last_at + interval, state.deadline), state.last_at + shortest)


async def _read(ctx: DeploymentContext) -> tuple[MetricsSnapshot, dict[str, MetricsSnapshot]]:
    """The counters analysis judges: the router's (a fleet's merged), and each region's own."""
    fleet = ctx.fleet_runtime
    if fleet is None:
        return _snapshot(await ctx.router.metrics(ctx.service)), {}
    regional = {
        region: _snapshot(counters)
        for region, counters in (await fleet.router.region_metrics(ctx.service)).items()
    }
    return _snapshot(merged(regional.values())), regional


async def _first_snapshot(ctx: DeploymentContext, state: AnalysisState) -> None:
    """The router's counters the first window is measured from."""
    try:
        state.baseline, first = await _read(ctx)
        state.region_baselines = dict(first)
        state.last_at = ctx.clock.now()
        await ctx.save()
    except RegionUnreachable:
        raise
    except ShipyardError:
        pass  # unavailable: the first window says so


def _judge_regions(
    ctx: DeploymentContext,
    state: AnalysisState,
    regional: Mapping[str, MetricsSnapshot],
    policy: AnalysisPolicy,
) -> tuple[str, Decision, Measurement] | None:
    """Each region's window judged on its own (see the module docstring); the first region
    whose failures exceed the limit, with its decision and measurement, else None. The fleet's
    own measurement decides everything else."""
    failing: tuple[str, Decision, Measurement] | None = None
    for region, snapshot in regional.items():
        baseline = state.region_baselines.get(region)
        if baseline is None:
            state.region_baselines[region] = snapshot
            continue
        try:
            m = judge(
                window(snapshot, baseline, ctx.candidate),
                window(snapshot, baseline, ctx.stable),
                policy,
            )
        except CountersReset:
            state.region_baselines[region] = snapshot
            continue
        if m.verdict not in (Verdict.PASS, Verdict.FAIL):
            continue  # too little traffic in one region is the fleet's verdict to make
        state.region_baselines[region] = snapshot
        run = state.region_runs.setdefault(region, AnalysisRun(policy))
        decision = run.record(m, at_deadline=False)
        if decision.outcome is Outcome.FAILED and failing is None:
            failing = (region, decision, m)
    return failing


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
    at = utc(ctx.clock.now()).isoformat()
    kept.append({"at": at, **m.to_dict()})
    del kept[:-STAGE_MEASUREMENTS_KEPT]
    await ctx.save()
    spans.measurement(ctx, st.span, {"stage": step.stage, "outcome": outcome, **m.to_dict()})
    # ``at`` makes each measurement its own event: a resumed step drops audit events identical to
    # one recorded earlier in the step (DeploymentContext.audit), and two windows can measure
    # alike (two "insufficient_data, 0 requests" in a row were audited once).
    await ctx.audit("analysis.measurement", stage=step.stage, outcome=outcome, at=at, **m.to_dict())


async def _paused(ctx: DeploymentContext, st: StageRun, state: AnalysisState, reason: str) -> _Then:
    await ctx.audit("analysis.paused", reason=reason)
    by = await await_promotion(ctx, reason)
    state.paused = None
    st.done(verdict="overridden", promoted_by=by)
    return _Then("analysis.overridden", {"reason": reason, "promoted_by": by})

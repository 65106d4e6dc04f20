"""``CallGate``: ask a ``[[gates]]`` webhook whether the deployment may go on.

The gate (its ``GateSpec``, persisted in the plan by name: ``PlanRecord.gates``) is asked once
(``gating.ask``): a 2xx goes on. Anything else (4xx, 5xx, 3xx, a timeout, no connection) does
what its ``on_timeout`` says:

- ``fail``: ``GateRefused`` (code ``gate_refused``): the pipeline rolls back, or freezes with
  ``[deploy] on_failure = "freeze"``; at ``pre_rollout`` nothing has started, so the deployment
  ends ``Failed`` (the rollback's rule);
- ``pause``: the deployment is Paused ("gate <name> answered 503") and the gate is asked again
  every ``timeout_seconds``, until it answers a 2xx or a human promotes (``shipyard promote``);
  ``abort`` rolls back. Nothing is persisted per ask but its audit record.

The step is one stage ``gate_<name>`` (its last answer: status code or ``timeout``, duration,
how many asks, who promoted); every answer is audited ``gate.passed`` or ``gate.refused`` with
the gate, its point, the URL's host (never the URL: its path may be a token), the status code
or ``timeout`` and the duration. A control plane restarted mid-step asks again (the same
``Idempotency-Key``); a promotion persisted before the restart lets the step through unasked.
"""

from __future__ import annotations

import asyncio

from shipyard.domain.models import DeploymentStatus
from shipyard.domain.release import GateSpec
from shipyard.errors import GateRefused, InvariantViolation
from shipyard.orchestrator import gating
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.stage import stage
from shipyard.orchestrator.steps.registry import executes
from shipyard.strategies.steps import CallGate


@executes(CallGate, status=DeploymentStatus.AWAITING_SWITCH)
async def call(ctx: DeploymentContext, step: CallGate) -> None:
    gate = spec(ctx, step)
    async with stage(
        ctx, f"gate_{step.gate}", gate=step.gate, at=step.at, host=gating.host(gate.url)
    ) as st:
        if ctx.record.progress.promoted_by is not None:  # promoted while paused, then restarted
            st.done(promoted_by=ctx.record.progress.promoted_by, asks=0)
            return
        answer = await _ask(ctx, step, gate)
        if answer.ok:
            st.done(asks=1, **answer.detail())
            return
        if gate.on_timeout == "fail":
            message = f"gate {step.gate} ({step.at}) answered {answer.said}"
            st.fail(message, **answer.detail())
            raise GateRefused(
                f"{message}: the deployment may not go on. Ask the gate's owner "
                f"({gating.host(gate.url)}) why, then deploy again",
                gate=step.gate,
                at=step.at,
                **answer.detail(),
            )
        answer, asks, by = await _paused(ctx, step, gate, answer)
        st.done(asks=asks, **answer.detail(), **({"promoted_by": by} if by else {}))


def spec(ctx: DeploymentContext, step: CallGate) -> GateSpec:
    """The gate the step names, from the persisted plan."""
    plan = ctx.record.progress.plan
    gate = plan.gates.get(step.gate) if plan is not None else None
    if gate is None:
        raise InvariantViolation(
            f"deployment {ctx.id} asks gate {step.gate!r}, which its plan does not hold"
        )
    return gate


async def _ask(ctx: DeploymentContext, step: CallGate, gate: GateSpec) -> gating.Answer:
    """Ask once and audit the answer."""
    answer = await gating.ask(ctx.record, step, gate)
    await ctx.audit_detail(
        "gate.passed" if answer.ok else "gate.refused",
        {"gate": step.gate, "at": step.at, "host": gating.host(gate.url), **answer.detail()},
        duration_ms=answer.duration_ms,
    )
    return answer


async def _paused(
    ctx: DeploymentContext, step: CallGate, gate: GateSpec, answer: gating.Answer
) -> tuple[gating.Answer, int, str | None]:
    """Paused until the gate answers a 2xx (asked every ``timeout_seconds``) or a human
    promotes (``abort`` cancels this task). Returns the last answer, how many asks, and who
    promoted (None: the gate opened)."""
    progress = ctx.record.progress
    reason = f"gate {step.gate} answered {answer.said}"
    previous = ctx.record.status
    progress.paused = reason
    await ctx.set_status(DeploymentStatus.PAUSED)
    await ctx.audit("deployment.paused", reason=reason, gate=step.gate)
    asks = 1
    while progress.promoted_by is None:
        if await _promoted_within(ctx, gate.timeout_seconds):
            continue
        answer = await _ask(ctx, step, gate)
        asks += 1
        if answer.ok:
            break
    by = progress.promoted_by
    progress.paused = None
    await ctx.set_status(
        previous if previous is not DeploymentStatus.PAUSED else DeploymentStatus.AWAITING_SWITCH
    )
    if by is not None:  # else the gate opened it: its gate.passed record says so
        await ctx.audit("deployment.promoted", by=by, reason=reason)
    return answer, asks, by


async def _promoted_within(ctx: DeploymentContext, seconds: float) -> bool:
    """Whether ``Pipeline.promote`` woke this task within ``seconds`` (on the clock)."""
    woken = asyncio.ensure_future(ctx.promoted.wait())
    slept = asyncio.ensure_future(ctx.clock.sleep(seconds))
    try:
        await asyncio.wait({woken, slept}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (woken, slept):
            f.cancel()
        await asyncio.gather(woken, slept, return_exceptions=True)
    if ctx.promoted.is_set():
        ctx.promoted.clear()
        return True
    return False

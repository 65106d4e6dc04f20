"""Running one ``[hooks]`` command of a deployment: shared by the ``RunHook`` step
(``steps/hooks.py``: ``pre_deploy``, ``pre_switch``, ``post_switch``) and the rollback
(``rollback.py``: ``post_rollback``).

``run`` runs the hook of ``point`` stored with the candidate's ``RevisionRecord`` once, through
the deployment's runtime (a fleet runs it in its first region only), in the candidate's artifact,
sandbox and environment: the spec is ``artifacts.spec(revision)``, exactly what the start step
hands the runtime (so the service's secrets come with it), after the same signature and digest
check. It is recorded as the stage ``hook_<point>`` (command, exit code, duration) and audited
``hook.succeeded`` / ``hook.failed`` (point, command, exit code, duration: never its output or
environment). Its output is appended to the deployment's log (``Deps.build_log_path``, what
``GET /deployments/{id}/logs`` serves), each line prefixed ``[hook <point>]``, bounded like the
build's (``Deps.max_build_log_bytes``).

A failure (non-zero exit, timeout, or a hook that could not start) is ``HookFailed`` with the
exit code and the last lines of output; whether it stops the deployment is the hook's
``fatal(point)``: fatal, it is raised; otherwise it is returned, recorded and audited, and the
deployment goes on. A control plane that dies while a hook runs runs it again when it resumes
(the agent kills the first run when its connection goes away); a hook that finished never runs
again -- also when its driver died after recording its stage but before the step index moved on
(``_ran_before``: the recorded outcome stands).
"""

from __future__ import annotations

from shipyard.domain.release import HookPoint
from shipyard.errors import DeploymentError, HookFailed, LeaseLost, ShipyardError, TransientError
from shipyard.orchestrator import artifacts
from shipyard.orchestrator.context import DeploymentContext
from shipyard.orchestrator.preflight import BuildLogSink
from shipyard.orchestrator.record import RevisionRecord, Stage
from shipyard.orchestrator.stage import stage
from shipyard.runtime.base import HookResult, HookRun

#: Lines of a failed hook's output its error carries (the whole output is in the log).
TAIL_LINES = 20
#: A line of that tail is cut to this many characters.
TAIL_LINE_CHARS = 400


def stage_name(point: HookPoint) -> str:
    return f"hook_{point}"


async def run(
    ctx: DeploymentContext, point: HookPoint, revision: RevisionRecord
) -> ShipyardError | None:
    """Run ``revision``'s hook at ``point`` (see the module docstring): None when it succeeded
    or there is none; the failure when it failed and is not fatal; raises it when it is."""
    hook = revision.hooks.at(point)
    if hook is None:
        return None
    fatal = hook.fatal(point)
    ran = _ran_before(ctx, point)
    if ran is not None:  # it finished; its driver died before recording that: not again
        if ran.status == "succeeded" or not fatal:
            return None
        raise HookFailed(
            str(ran.detail.get("error") or f"{point} hook failed"),
            point=point,
            exit_code=ran.detail.get("exit_code"),
            timed_out=bool(ran.detail.get("timed_out")),
        )
    prefix = f"[hook {point}] "
    audit: dict[str, object] = {"point": point, "command": hook.text}
    try:
        async with stage(ctx, stage_name(point), audit="hook", command=hook.text) as st:
            st.annotate({"shipyard.hook.point": point, "shipyard.revision": revision.revision})
            sink = BuildLogSink(
                ctx.deps.build_log_path(ctx.id),
                keep=TAIL_LINES,
                max_bytes=ctx.deps.max_build_log_bytes,
            )
            try:
                sink(f"{prefix}$ {hook.text}")
                if await artifacts.verify(ctx.deps.gate, revision):
                    await ctx.audit("artifact.verified", digest=revision.artifact_digest)
                spec = await artifacts.spec(revision, ctx.deps.secrets)
                job = HookRun(point=point, argv=hook.argv, timeout_seconds=hook.timeout_seconds)
                result = await ctx.runtime.run_hook(spec, job, lambda line: sink(prefix + line))
                sink(f"{prefix}{_ending(result, hook.timeout_seconds)}")
            except (DeploymentError, TransientError) as exc:
                st.fail(exc.message, audit={**audit, "error": exc.code})
                raise
            finally:
                sink.close()
            detail: dict[str, object] = {
                "exit_code": result.exit_code,
                "duration_ms": result.duration_ms,
                "timed_out": result.timed_out or None,
                "dropped_lines": result.dropped_lines or None,
                "log_truncated": sink.truncated or None,
            }
            if not result.succeeded:
                failed = _failure(point, result, hook.timeout_seconds, sink.tail(), prefix)
                st.fail(
                    failed.message.partition("\n")[0],
                    audit={**audit, "exit_code": result.exit_code,
                           "duration_ms": result.duration_ms, "timed_out": result.timed_out},
                    fatal=fatal,
                    **detail,
                )  # fmt: skip
                raise failed
            st.done(**detail)
    except LeaseLost:
        raise
    except (DeploymentError, TransientError) as exc:
        if fatal:
            raise
        return exc
    await ctx.audit_detail(
        "hook.succeeded",
        {**audit, "exit_code": result.exit_code, "duration_ms": result.duration_ms},
        result.duration_ms,
    )
    return None


def _ran_before(ctx: DeploymentContext, point: HookPoint) -> Stage | None:
    """The hook's stage, ended, when a previous driver ran it to its end and died before the
    deployment went on (the last stage is it: a plan step resumed, ``ctx.resumed_step``, or a
    rollback resumed after ``post_rollback``); None otherwise."""
    stages = ctx.record.stages
    last = stages[-1] if stages else None
    if last is None or last.name != stage_name(point) or last.status not in ("succeeded", "failed"):
        return None
    if point == "post_rollback":
        return last if ctx.record.progress.rolling_back else None
    started = ctx.record.progress.step_started_at
    return last if ctx.resumed_step and started is not None and last.started_ts >= started else None


def _ending(result: HookResult, timeout: float) -> str:
    if result.timed_out:
        return f"killed after {timeout:g} s (timeout_seconds)"
    dropped = f"; {result.dropped_lines} lines of output dropped" if result.dropped_lines else ""
    return f"exited with code {result.exit_code} after {result.duration_ms} ms{dropped}"


def _failure(
    point: HookPoint, result: HookResult, timeout: float, tail: list[str], prefix: str
) -> HookFailed:
    """The error of a failed hook: what happened, and its last lines of output (without the
    log's prefix and the lines this module wrote around them)."""
    lines = [
        line.removeprefix(prefix)[:TAIL_LINE_CHARS]
        for line in tail[:-1]  # the last is the ending line
        if not line.startswith(f"{prefix}$ ")
    ]
    if result.timed_out:
        what = f"{point} hook ran past its timeout_seconds ({timeout:g} s) and was killed"
    else:
        what = f"{point} hook exited with code {result.exit_code}"
    message = what + (": last output:\n" + "\n".join(lines) if lines else " (no output)")
    return HookFailed(
        message,
        point=point,
        exit_code=result.exit_code,
        timed_out=result.timed_out,
        duration_ms=result.duration_ms,
    )

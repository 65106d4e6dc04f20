"""A replica that crashed or never became healthy, reported with its exit code and the last lines
it printed: what a user needs to fix a release that cannot start (a Python traceback, "address
already in use", a missing variable). Called by the health gates that roll back
(``steps/health.py``, ``steps/scale.py``, ``steps/bake.py``) before they record the failure.

The lines come from the runtime (``Runtime.read_logs``: masked of every secret the agent knows,
so they may go in the deployment's error), at most ``TAIL_LINES``, each cut to
``MAX_LINE_CHARS``, so a record stays small. They go into the error's message (what ``shipyard
deploy`` and ``status`` print) and its ``output`` field; the audit trail keeps only the short
reason and the exit code. A runtime that cannot tell (no logs, agent down) leaves the error as
it was: the report is a help, never a second failure.
"""

from __future__ import annotations

import logging

from shipyard.errors import HealthCheckFailed, ShipyardError
from shipyard.logs import log_event
from shipyard.orchestrator.context import DeploymentContext
from shipyard.runtime.base import LogQuery

log = logging.getLogger("shipyard.orchestrator")

#: Lines of a failed replica's output carried in the deployment's error.
TAIL_LINES = 20
MAX_LINE_CHARS = 500


async def with_output(ctx: DeploymentContext, exc: HealthCheckFailed) -> HealthCheckFailed:
    """``exc`` with the exit code and last lines of the replica it names (``replica``)."""
    replica_id = exc.detail.get("replica")
    if not isinstance(replica_id, str) or "output" in exc.detail:
        return exc
    try:
        batch = await ctx.runtime.read_logs(
            ctx.service, LogQuery(replica_id=replica_id, tail=TAIL_LINES)
        )
        status = (await ctx.replica_states()()).get(replica_id)
    except ShipyardError as error:
        log_event(log, "crash_report.unavailable", replica=replica_id, error=error.message[:200])
        return exc
    exit_code = None
    if status is not None:
        exit_code = status.exit_code if not status.alive else status.last_exit_code
    lines = [_cut(line.text) for line in batch.lines]
    message = exc.message
    if exit_code is not None and f"exit code {exit_code}" not in message:
        message += f" (exit code {exit_code})"
    if lines:
        message += f"\nlast {len(lines)} lines of its output:\n" + "\n".join(
            f"  {text}" for text in lines
        )
    else:
        message += "\nit printed nothing"
    return HealthCheckFailed(
        message,
        **{**exc.detail, "attempts": exc.attempts, "exit_code": exit_code, "output": lines},
    )


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS] + " [...]"

"""Health probes with the ADR's HealthCheck semantics.

- healthy after ``success_threshold`` consecutive successes, unhealthy after ``failure_threshold``
  consecutive failures; a non-2xx answer or a timeout is a failure;
- a refused connection before the first success means "still starting" until the start deadline;
- no probe waits longer than ``HEALTH_CHECK_TIMEOUT_MS`` (5 s).

``ThresholdTracker`` is the pure counting part (tested with a fake clock). ``wait_healthy`` gates a
new revision; ``watch_until_unhealthy`` monitors one during the bake window. Both are called by the
orchestrator's step executors with a ``Prober`` (``HttpProber`` for real, a scripted one in tests)
and a ``replica_states`` callback so a crashed process fails at once instead of after its
thresholds.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

import httpx

from shipyard.domain.clock import Clock
from shipyard.domain.models import HEALTH_CHECK_TIMEOUT_MS, HealthCheck
from shipyard.errors import HealthCheckFailed
from shipyard.runtime.base import ReplicaStatus


class Outcome(StrEnum):
    OK = "ok"
    FAIL = "fail"  # answered, but not 2xx
    TIMEOUT = "timeout"
    REFUSED = "refused"  # nothing listening (yet)
    ERROR = "error"  # connection reset, protocol error...


@dataclass(frozen=True)
class ProbeResult:
    outcome: Outcome
    status_code: int | None = None
    latency_ms: float = 0.0
    detail: str = ""


class Prober(Protocol):
    async def __call__(self, replica: ReplicaStatus, check: HealthCheck) -> ProbeResult: ...


#: The most of a health answer's body a probe reads: the status decides, the body is only kept
#: to be discarded. Unbounded, one 300 MB ``/health`` answer took the control plane from 137 MB
#: to 719 MB (issue 10).
PROBE_BODY_LIMIT = 64 * 1024


class HttpProber:
    """GETs ``http://host:port{endpoint}`` with the check's timeout (capped at 5 s) for the whole
    exchange, reading at most ``PROBE_BODY_LIMIT`` bytes of the body before closing."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_keepalive_connections=0), follow_redirects=False
        )

    async def __call__(self, replica: ReplicaStatus, check: HealthCheck) -> ProbeResult:
        timeout = min(check.timeout_seconds, HEALTH_CHECK_TIMEOUT_MS / 1000)
        url = f"http://{replica.host}:{replica.port}{check.endpoint}"
        start = time.perf_counter()
        try:
            # httpx's timeout is per read: a deadline for the whole exchange stops an answer
            # dripped one byte at a time from holding the probe.
            async with asyncio.timeout(timeout):
                status = await self._get_status(url, timeout)
        except httpx.ConnectError as exc:
            outcome = Outcome.REFUSED if _refused(exc) else Outcome.ERROR
            return ProbeResult(outcome, detail=str(exc)[:200])
        except (httpx.TimeoutException, TimeoutError):
            return ProbeResult(Outcome.TIMEOUT, detail=f"no answer within {timeout:g}s")
        except httpx.HTTPError as exc:
            return ProbeResult(Outcome.ERROR, detail=repr(exc)[:200])
        ms = (time.perf_counter() - start) * 1000
        ok = 200 <= status < 300
        return ProbeResult(Outcome.OK if ok else Outcome.FAIL, status, ms, f"HTTP {status}")

    async def _get_status(self, url: str, timeout: float) -> int:
        """The answer's status, after reading at most ``PROBE_BODY_LIMIT`` bytes of its body;
        leaving the stream early closes the connection (none is kept alive)."""
        async with self._client.stream("GET", url, timeout=timeout) as r:
            seen = 0
            async for chunk in r.aiter_raw():
                seen += len(chunk)
                if seen >= PROBE_BODY_LIMIT:
                    break
            return r.status_code

    async def aclose(self) -> None:
        await self._client.aclose()


def _refused(exc: BaseException) -> bool:
    """Whether a connect error is "nothing listening" (somewhere down the cause chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if (
            isinstance(seen, ConnectionRefusedError)
            or getattr(seen, "errno", None) == errno.ECONNREFUSED
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return "refused" in str(exc).lower()


Verdict = Literal["starting", "pending", "healthy", "unhealthy"]


class ThresholdTracker:
    """Consecutive-success/failure counting for one replica (pure; time passed in)."""

    def __init__(self, check: HealthCheck, started_at: float) -> None:
        self.check = check
        self.start_deadline = started_at + check.start_timeout_seconds
        self.successes = 0
        self.failures = 0
        self.attempts = 0
        self.ever_succeeded = False
        self.last: ProbeResult | None = None

    def observe(self, result: ProbeResult, now: float) -> Verdict:
        self.attempts += 1
        self.last = result
        if result.outcome is Outcome.OK:
            self.successes += 1
            self.failures = 0
            self.ever_succeeded = True
        elif result.outcome is Outcome.REFUSED and not self.ever_succeeded:
            self.successes = 0
            if now >= self.start_deadline:
                return "unhealthy"
            return "starting"
        else:
            self.failures += 1
            self.successes = 0
        if self.failures >= self.check.failure_threshold:
            return "unhealthy"
        if self.successes >= self.check.success_threshold:
            return "healthy"
        return "pending"


ReplicaStates = Callable[[], Awaitable[Mapping[str, ReplicaStatus]]]


@dataclass(frozen=True)
class HealthReport:
    attempts: int
    duration_ms: int


def _crashed(status: ReplicaStatus | None, restarts: int) -> str | None:
    """Why the replica counts as crashed, or None. ``restarts`` is its count when watching
    began: a runtime that restarts exited replicas may have done so between two polls, so a
    higher count is a crash too, even if the replica is running again."""
    if status is None:
        return "disappeared"
    if not status.alive:
        return f"{status.state} (exit code {status.exit_code})"
    if status.restarts > restarts:
        return f"crashed and was restarted (exit code {status.last_exit_code})"
    return None


async def wait_healthy(
    replicas: Sequence[ReplicaStatus],
    check: HealthCheck,
    prober: Prober,
    clock: Clock,
    replica_states: ReplicaStates,
) -> HealthReport:
    """Probe every replica until all are healthy; HealthCheckFailed on the first that is not."""
    started = clock.now()
    trackers = {r.replica_id: ThresholdTracker(check, started) for r in replicas}
    restarts = {r.replica_id: r.restarts for r in replicas}
    pending = {r.replica_id: r for r in replicas}
    while pending:
        states = await replica_states()
        for rid in list(pending):
            dead = _crashed(states.get(rid), restarts[rid])
            if dead:
                raise HealthCheckFailed(
                    f"replica {rid} {dead} before becoming healthy",
                    attempts=trackers[rid].attempts,
                    replica=rid,
                )
            pending[rid] = states.get(rid, pending[rid])  # probe where it listens now
        results = await asyncio.gather(*(prober(r, check) for r in pending.values()))
        now = clock.now()
        for (rid, _), result in zip(list(pending.items()), results, strict=True):
            verdict = trackers[rid].observe(result, now)
            if verdict == "healthy":
                del pending[rid]
            elif verdict == "unhealthy":
                t = trackers[rid]
                why = (
                    f"still not listening after {check.start_timeout_seconds:g}s"
                    if result.outcome is Outcome.REFUSED
                    else f"{t.failures} consecutive failed probes of {check.endpoint}, last: "
                    f"{result.detail or result.outcome}"
                )
                raise HealthCheckFailed(
                    f"replica {rid} is unhealthy: {why}", attempts=t.attempts, replica=rid
                )
        if pending:
            await clock.sleep(check.interval_seconds)
    total = sum(t.attempts for t in trackers.values())
    return HealthReport(attempts=total, duration_ms=int((clock.now() - started) * 1000))


@dataclass(frozen=True)
class UnhealthyVerdict:
    replica_id: str
    reason: str
    attempts: int
    #: ``clock.monotonic()`` when the verdict was reached: rollback latency is measured from here.
    at: float


async def watch_until_unhealthy(
    replicas: Sequence[ReplicaStatus],
    check: HealthCheck,
    prober: Prober,
    clock: Clock,
    replica_states: ReplicaStates,
    until: float,
) -> UnhealthyVerdict | None:
    """Monitor serving replicas until the clock reaches ``until``; the first unhealthy verdict
    (failure threshold reached, or a crash) is returned at once, else None."""
    trackers = {
        r.replica_id: ThresholdTracker(check, clock.now() - check.start_timeout_seconds)
        for r in replicas
    }
    for t in trackers.values():
        t.ever_succeeded = True  # they passed the gate: a refused connection now is a failure
    restarts = {r.replica_id: r.restarts for r in replicas}
    while clock.now() < until:
        states = await replica_states()
        for r in replicas:
            dead = _crashed(states.get(r.replica_id), restarts[r.replica_id])
            if dead:
                return UnhealthyVerdict(
                    r.replica_id,
                    f"replica {dead}",
                    trackers[r.replica_id].attempts,
                    clock.monotonic(),
                )
        results = await asyncio.gather(*(prober(r, check) for r in replicas))
        now = clock.now()
        for r, result in zip(replicas, results, strict=True):
            if trackers[r.replica_id].observe(result, now) == "unhealthy":
                t = trackers[r.replica_id]
                return UnhealthyVerdict(
                    r.replica_id,
                    f"{t.failures} consecutive failed probes of {check.endpoint}, last: "
                    f"{result.detail or result.outcome}",
                    t.attempts,
                    clock.monotonic(),
                )
        await clock.sleep(min(check.interval_seconds, max(0.0, until - clock.now())))
    return None

"""Health-check semantics (ADR HealthCheck): thresholds on a fake clock; the real HTTP prober."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.domain.clock import FakeClock
from shipyard.domain.models import HealthCheck
from shipyard.errors import HealthCheckFailed
from shipyard.health.probing import (
    HttpProber,
    Outcome,
    ProbeResult,
    ThresholdTracker,
    wait_healthy,
    watch_until_unhealthy,
)
from shipyard.runtime.base import ReplicaStatus

CHECK = HealthCheck(
    endpoint="/h",
    interval_seconds=1,
    timeout_seconds=1,
    success_threshold=2,
    failure_threshold=3,
    start_timeout_seconds=10,
)
OK, FAIL, REFUSED, TIMEOUT = (
    ProbeResult(o) for o in (Outcome.OK, Outcome.FAIL, Outcome.REFUSED, Outcome.TIMEOUT)
)


@pytest.mark.parametrize(
    ("results", "verdicts"),
    [
        ([OK, OK], ["pending", "healthy"]),
        ([FAIL, FAIL, FAIL], ["pending", "pending", "unhealthy"]),
        ([TIMEOUT, TIMEOUT, TIMEOUT], ["pending", "pending", "unhealthy"]),
        ([FAIL, FAIL, OK, FAIL, FAIL, OK, OK], ["pending"] * 6 + ["healthy"]),
        ([OK, FAIL, OK, OK], ["pending", "pending", "pending", "healthy"]),
        ([REFUSED, REFUSED, OK, OK], ["starting", "starting", "pending", "healthy"]),
        ([OK, REFUSED, REFUSED, REFUSED], ["pending", "pending", "pending", "unhealthy"]),
    ],
    ids=[
        "two-successes",
        "three-failures",
        "timeouts-fail",
        "failures-reset-by-success",
        "success-streak-reset",
        "refused-while-starting",
        "refused-after-success-fails",
    ],
)
def test_threshold_tracker(results: list[ProbeResult], verdicts: list[str]) -> None:
    t = ThresholdTracker(CHECK, started_at=0.0)
    assert [t.observe(r, now=float(i)) for i, r in enumerate(results)] == verdicts


def test_refused_past_the_start_deadline_is_unhealthy() -> None:
    t = ThresholdTracker(CHECK, started_at=0.0)
    assert t.observe(REFUSED, now=9.9) == "starting"
    assert t.observe(REFUSED, now=10.0) == "unhealthy"


REPLICA = ReplicaStatus("r1", "v1", "127.0.0.1", 1, "running")


class Script:
    def __init__(self, *results: ProbeResult) -> None:
        self.results = list(results)
        self.calls = 0

    async def __call__(self, replica: ReplicaStatus, check: HealthCheck) -> ProbeResult:
        self.calls += 1
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


async def _alive() -> dict[str, ReplicaStatus]:
    return {"r1": REPLICA}


async def test_wait_healthy_probes_every_interval_until_threshold() -> None:
    clock = FakeClock(start=0)
    report = await wait_healthy([REPLICA], CHECK, Script(REFUSED, REFUSED, OK, OK), clock, _alive)
    assert report.attempts == 4
    assert clock.now() == 3.0  # probes at t=0,1,2,3


async def test_wait_healthy_gives_up_at_the_start_deadline() -> None:
    clock = FakeClock(start=0)
    with pytest.raises(HealthCheckFailed, match="still not listening after 10s") as exc:
        await wait_healthy([REPLICA], CHECK, Script(REFUSED), clock, _alive)
    assert exc.value.attempts == 11


async def test_wait_healthy_reports_attempts_on_failure() -> None:
    with pytest.raises(HealthCheckFailed, match="3 consecutive failed probes") as exc:
        await wait_healthy([REPLICA], CHECK, Script(FAIL), FakeClock(), _alive)
    assert exc.value.attempts == 3


async def test_crash_fails_without_waiting_for_thresholds() -> None:
    async def crashed() -> dict[str, ReplicaStatus]:
        return {"r1": ReplicaStatus("r1", "v1", "127.0.0.1", 1, "crashed", exit_code=2)}

    script = Script(REFUSED)
    with pytest.raises(HealthCheckFailed, match=r"crashed \(exit code 2\)"):
        await wait_healthy([REPLICA], CHECK, script, FakeClock(), crashed)
    assert script.calls == 0


RESTARTED = ReplicaStatus(
    "r1", "v1", "127.0.0.1", 2, "running", restarts=1, last_exit_code=137
)  # killed between two polls and already running again, on another port


async def _restarted() -> dict[str, ReplicaStatus]:
    return {"r1": RESTARTED}


async def test_a_crash_the_runtime_already_restarted_still_fails_the_gate() -> None:
    with pytest.raises(HealthCheckFailed, match=r"crashed and was restarted \(exit code 137\)"):
        await wait_healthy([REPLICA], CHECK, Script(REFUSED), FakeClock(), _restarted)


async def test_a_crash_the_runtime_already_restarted_ends_the_bake() -> None:
    verdict = await watch_until_unhealthy(
        [REPLICA], CHECK, Script(OK), FakeClock(start=0), _restarted, until=60
    )
    assert verdict is not None and "crashed and was restarted" in verdict.reason


async def test_probes_follow_the_port_the_replica_listens_on_now() -> None:
    moved = ReplicaStatus("r1", "v1", "127.0.0.1", 7, "running")
    ports: list[int] = []

    async def prober(replica: ReplicaStatus, check: HealthCheck) -> ProbeResult:
        ports.append(replica.port)
        return OK

    async def states() -> dict[str, ReplicaStatus]:
        return {"r1": moved}

    await wait_healthy([REPLICA], CHECK, prober, FakeClock(), states)
    assert ports == [7, 7]


async def test_watch_returns_the_unhealthy_verdict_inside_the_window() -> None:
    clock = FakeClock(start=0)
    verdict = await watch_until_unhealthy(
        [REPLICA], CHECK, Script(OK, OK, FAIL), clock, _alive, until=60
    )
    assert verdict is not None
    assert "3 consecutive failed probes" in verdict.reason
    assert clock.now() == 4.0  # failures at t=2,3,4


async def test_watch_passes_a_healthy_window() -> None:
    clock = FakeClock(start=0)
    assert (
        await watch_until_unhealthy([REPLICA], CHECK, Script(OK), clock, _alive, until=30) is None
    )
    assert clock.now() == 30


# --- the real prober against real sockets --------------------------------------------------------


@contextlib.asynccontextmanager
async def http_server(status: int, delay: float = 0.0) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _replica(port: int) -> ReplicaStatus:
    return ReplicaStatus("r1", "v1", "127.0.0.1", port, "running")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, Outcome.OK), (204, Outcome.OK), (500, Outcome.FAIL), (301, Outcome.FAIL)],
)
async def test_http_prober_status_codes(status: int, outcome: Outcome) -> None:
    prober = HttpProber()
    async with http_server(status) as port:
        result = await prober(_replica(port), CHECK)
    await prober.aclose()
    assert result.outcome is outcome
    assert result.status_code == status


async def test_http_prober_timeout_and_refused() -> None:
    prober = HttpProber()
    check = CHECK.model_copy(update={"timeout_seconds": 0.2})
    async with http_server(200, delay=2) as port:
        assert (await prober(_replica(port), check)).outcome is Outcome.TIMEOUT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert (await prober(_replica(free), check)).outcome is Outcome.REFUSED
    await prober.aclose()


# --- bounded reads: a huge or endless answer costs a probe at most PROBE_BODY_LIMIT -------------

HUGE = 300 * 1024 * 1024


@contextlib.asynccontextmanager
async def streaming_server(status: int, *, drip: bool = False) -> AsyncIterator[int]:
    """Answers ``status`` with a 300 MB body (1 MiB writes, each drained: the server itself
    holds one chunk), or with ``drip`` one byte every 50 ms; stops when the client hangs up."""
    chunk = b"x" * (1024 * 1024)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {HUGE}\r\n\r\n".encode())
            for _ in range(HUGE // len(chunk)):
                if drip:
                    writer.write(b"x")
                    await asyncio.sleep(0.05)
                else:
                    writer.write(chunk)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) start again from the current RSS (Linux's clear_refs "5")."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")


@pytest.mark.parametrize(("status", "outcome"), [(200, Outcome.OK), (503, Outcome.FAIL)])
async def test_a_300_mb_health_answer_leaves_memory_flat(status: int, outcome: Outcome) -> None:
    prober = HttpProber()
    check = CHECK.model_copy(update={"timeout_seconds": 5})
    async with streaming_server(status) as port:
        _reset_peak_rss()
        before = _kib("VmRSS")
        results = [await prober(_replica(port), check) for _ in range(5)]
        peak = _kib("VmHWM")
    await prober.aclose()
    assert [r.outcome for r in results] == [outcome] * 5, results
    assert [r.status_code for r in results] == [status] * 5
    growth_mib = (peak - before) / 1024
    assert growth_mib < 50, f"peak RSS grew by {growth_mib:.0f} MiB over 5 probes"


async def test_an_answer_dripped_forever_times_out_as_a_whole() -> None:
    prober = HttpProber()
    check = CHECK.model_copy(update={"timeout_seconds": 0.5})
    async with streaming_server(200, drip=True) as port:
        result = await prober(_replica(port), check)  # each byte well within a read timeout
    await prober.aclose()
    assert result.outcome is Outcome.TIMEOUT, result

"""One contract, both ``Prober``s: ``health.fake.FakeProber`` (answers from its table) and
``health.probing.HttpProber`` against real sockets on this machine.

Each case names what a replica's health endpoint does (answers a status, refuses the connection,
never answers); the harness makes that true (a tiny HTTP server or a port nothing listens on for
the real prober, an ``answers`` entry for the fake) and the same assertions run on both: the
probe's outcome, status code and detail, and the health gate's verdict built on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import pytest

from shipyard.domain.clock import FakeClock
from shipyard.domain.models import HealthCheck
from shipyard.errors import HealthCheckFailed
from shipyard.health.fake import Answer, FakeProber
from shipyard.health.probing import HttpProber, Outcome, Prober, wait_healthy
from shipyard.runtime.base import ReplicaStatus

CHECK = HealthCheck(
    endpoint="/health",
    interval_seconds=1,
    timeout_seconds=0.2,
    success_threshold=2,
    failure_threshold=3,
    start_timeout_seconds=5,
)


class Endpoints(Protocol):
    @property
    def prober(self) -> Prober: ...

    async def replica(self, answer: Answer) -> ReplicaStatus:
        """A replica whose health endpoint behaves as ``answer``."""
        ...


class FakeEndpoints:
    def __init__(self) -> None:
        self.prober = FakeProber()
        self._n = 0

    async def replica(self, answer: Answer) -> ReplicaStatus:
        self._n += 1
        replica = ReplicaStatus(f"r{self._n}", "v1", "127.0.0.1", 20000 + self._n, "running")
        self.prober.answers[replica.replica_id] = answer
        return replica


class RealEndpoints:
    """Servers on 127.0.0.1 answering a fixed status, or holding every request unanswered."""

    def __init__(self) -> None:
        self.prober = HttpProber()
        self.requests: list[bytes] = []
        self._servers: list[asyncio.Server] = []
        self._release = asyncio.Event()

    async def replica(self, answer: Answer) -> ReplicaStatus:
        if answer == "refused":
            with socket.socket() as s:  # bound, never listening, closed: nothing answers there
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        else:
            server = await asyncio.start_server(self._handler(answer), "127.0.0.1", 0)
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
        return ReplicaStatus("r", "v1", "127.0.0.1", port, "running")

    def _handler(
        self, answer: Answer
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                if answer == "timeout":
                    await self._release.wait()
                else:
                    writer.write(
                        f"HTTP/1.1 {answer} X\r\nContent-Length: 0\r\n"
                        "Location: /elsewhere\r\nConnection: close\r\n\r\n".encode()
                    )
                    await writer.drain()
            writer.close()

        return handle

    async def aclose(self) -> None:
        self._release.set()
        for server in self._servers:
            server.close()
            await server.wait_closed()
        await self.prober.aclose()


@pytest.fixture(params=["fake", "http"])
async def endpoints(request: pytest.FixtureRequest) -> AsyncIterator[Endpoints]:
    if request.param == "fake":
        yield FakeEndpoints()
        return
    real = RealEndpoints()
    try:
        yield real
    finally:
        await real.aclose()


@pytest.mark.parametrize(
    ("answer", "outcome", "status", "detail"),
    [
        pytest.param(200, Outcome.OK, 200, "HTTP 200", id="200-ok"),
        pytest.param(204, Outcome.OK, 204, "HTTP 204", id="204-ok"),
        pytest.param(301, Outcome.FAIL, 301, "HTTP 301", id="301-not-followed"),
        pytest.param(404, Outcome.FAIL, 404, "HTTP 404", id="404-fail"),
        pytest.param(500, Outcome.FAIL, 500, "HTTP 500", id="500-fail"),
        pytest.param(503, Outcome.FAIL, 503, "HTTP 503", id="503-fail"),
        pytest.param("refused", Outcome.REFUSED, None, None, id="refused"),
        pytest.param("timeout", Outcome.TIMEOUT, None, "no answer within 0.2s", id="timeout"),
    ],
)
async def test_one_probe(
    endpoints: Endpoints, answer: Answer, outcome: Outcome, status: int | None, detail: str | None
) -> None:
    result = await endpoints.prober(await endpoints.replica(answer), CHECK)

    assert (result.outcome, result.status_code) == (outcome, status)
    if detail is not None:  # a refused connection's text is the HTTP library's, not ours
        assert result.detail == detail
    assert result.latency_ms >= 0


async def test_the_real_probe_asks_for_the_checks_endpoint() -> None:
    # Only the real prober has a request line; the fake answers by replica id.
    real = RealEndpoints()
    try:
        await real.prober(await real.replica(200), CHECK)
    finally:
        await real.aclose()

    [head] = real.requests
    assert head.startswith(b"GET /health HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(500, "3 consecutive failed probes of /health, last: HTTP 500", id="500"),
        pytest.param("timeout", "last: no answer within 0.2s", id="timeout"),
        pytest.param("refused", "still not listening after 5s", id="refused"),
    ],
)
async def test_the_health_gate_reaches_the_same_verdict(
    endpoints: Endpoints, answer: Answer, message: str
) -> None:
    replica = await endpoints.replica(answer)

    async def states() -> dict[str, ReplicaStatus]:
        return {replica.replica_id: replica}

    with pytest.raises(HealthCheckFailed, match=message):
        await wait_healthy([replica], CHECK, endpoints.prober, FakeClock(), states)


async def test_the_health_gate_passes_a_healthy_endpoint(endpoints: Endpoints) -> None:
    replica = await endpoints.replica(200)

    async def states() -> dict[str, ReplicaStatus]:
        return {replica.replica_id: replica}

    report = await wait_healthy([replica], CHECK, endpoints.prober, FakeClock(), states)

    assert report.attempts == CHECK.success_threshold

"""The built-in load step of canary analysis (Flagger's load tester as the anchor): ``GET path``
at a steady rate to one revision of one service, through that service's router.

A canary that gets too little real traffic cannot be judged (``insufficient_data``). With
``[analysis] load = { rps = 20, path = "/" }`` the control plane's Analyse executor
(``orchestrator/steps/analysis.py``) asks the agent for load on the canary revision
(``PUT /v1/services/{service}/load``, sent by ``runtime.local.AgentRouter.drive_load``), renews
its lease at every measurement and stops it (``DELETE``) when the analysis ends. The lease is the
safety net: a control plane that dies mid-analysis leaves load running for at most one lease.

Where the requests go: ``ServiceProxy.open_pinned(revision)``, the router's own client protocol
on a socket pair, pinned to the canary's route. So every request takes the real path (parsing,
limits, upstream pools) and counts in the canary's per-revision metrics, which is what the
analysis reads; it never reaches stable, and there is no way to aim it at any other host: the
destination is the revision's replicas, chosen by the router, and ``path`` is only a request
target (origin-form, validated by ``LoadSpec``).

Open loop, like wrk2 and Flagger's ``hey``: a ticker fires a request every ``1/rps`` seconds on a
free keep-alive connection (at most ``MAX_CONNECTIONS`` open); a slot with none free, or one the
ticker was too late for, is counted as ``missed`` rather than sent late, so a slow canary shows up
as fewer answers (and a longer p99) instead of a generator that quietly slows down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import asdict, dataclass

import h11

from shipyard.domain.models import MAX_LOAD_RPS
from shipyard.routing.proxy import ServiceProxy

#: Keep-alive connections one load may hold open (and requests in flight).
MAX_CONNECTIONS = 64
#: A request without a complete answer after this long counts as failed; its connection closes.
REQUEST_TIMEOUT = 10.0
#: The longest lease the agent grants; the control plane renews every measurement interval.
MAX_LEASE_SECONDS = 3600.0
#: When a load stops, requests in flight get this long to finish before they are cut.
STOP_GRACE_SECONDS = 1.0
_PATH = re.compile(r"/[!-~]{0,2047}")


@dataclass(frozen=True)
class LoadSpec:
    """What to send: ``GET path`` at ``rps`` to ``revision``. Validated here too (the agent's API
    is a trust boundary of its own): ValueError names the field."""

    revision: str
    rps: float
    path: str = "/"

    def __post_init__(self) -> None:
        if not self.revision or any(not 0x21 <= ord(c) <= 0x7E for c in self.revision):
            raise ValueError(f"revision must be a printable name, got {self.revision!r}")
        if not 0 < self.rps <= MAX_LOAD_RPS:
            raise ValueError(f"rps must be in (0, {MAX_LOAD_RPS}], got {self.rps!r}")
        if not _PATH.fullmatch(self.path):
            raise ValueError(
                "path must start with / and be printable ASCII without spaces "
                f"(at most 2048 characters), got {self.path[:100]!r}"
            )


@dataclass
class LoadStats:
    """What a load sent and got back (its answers also count in the router's metrics)."""

    sent: int = 0
    answered: int = 0
    status_5xx: int = 0
    #: No complete answer: the connection broke, REQUEST_TIMEOUT passed, or ``stop`` cut it.
    #: ``sent == answered + failed`` once the load has stopped.
    failed: int = 0
    #: Slots not sent: every connection busy, or the ticker was late.
    missed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _Connection:
    """One keep-alive client connection into the router, with its HTTP/1.1 state (h11)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT)

    async def get(self, target: bytes, host: bytes) -> int:
        """Send ``GET target`` and read the whole answer; its status. Raises on a broken
        exchange (h11.ProtocolError, OSError, ConnectionError)."""
        http = self.http
        self.writer.write(
            http.send(
                h11.Request(
                    method="GET",
                    target=target,
                    headers=[
                        (b"host", host),
                        (b"user-agent", b"shipyard-load/1"),
                        (b"x-shipyard-load", b"1"),
                    ],
                )
            )
            + (http.send(h11.EndOfMessage()) or b"")
        )
        await self.writer.drain()
        status = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the router closed the connection before answering")

    @property
    def reusable(self) -> bool:
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.writer.close()


class LoadRun:
    """One load on one revision until ``stop`` or its lease runs out. Made and stopped by the
    agent (``agent/server.py``); all on the agent's event loop."""

    def __init__(
        self, proxy: ServiceProxy, spec: LoadSpec, *, host: str, lease_seconds: float
    ) -> None:
        self.proxy = proxy
        self.spec = spec
        self.stats = LoadStats()
        self._host = host.encode("ascii")
        self._target = spec.path.encode("ascii")
        self._loop = asyncio.get_running_loop()
        self._deadline = 0.0
        self.renew(lease_seconds)
        self._idle: list[_Connection] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._ticker = self._loop.create_task(
            self._tick(), name=f"shipyard-load-{proxy.service}-{spec.revision}"
        )

    @property
    def running(self) -> bool:
        return not self._ticker.done()

    def renew(self, lease_seconds: float) -> None:
        """Keep sending for ``lease_seconds`` from now (at most ``MAX_LEASE_SECONDS``)."""
        if not 0 < lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be in (0, {MAX_LEASE_SECONDS:g}]")
        self._deadline = self._loop.time() + lease_seconds

    def describe(self) -> dict[str, object]:
        return {
            "revision": self.spec.revision,
            "rps": self.spec.rps,
            "path": self.spec.path,
            "running": self.running,
            "lease_left_seconds": round(max(0.0, self._deadline - self._loop.time()), 3),
            **self.stats.to_dict(),
        }

    async def stop(self) -> LoadStats:
        """Stop sending; requests in flight get ``STOP_GRACE_SECONDS``, then are cut."""
        self._ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=STOP_GRACE_SECONDS)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        self.proxy.release_pinned(self.spec.revision)
        return self.stats

    async def _tick(self) -> None:
        loop, period = self._loop, 1.0 / self.spec.rps
        next_at = loop.time()
        while True:
            now = loop.time()
            if now >= self._deadline:
                return
            if now < next_at:
                await asyncio.sleep(min(next_at, self._deadline) - now)
                continue
            late = int((now - next_at) / period)
            if late:  # the loop was busy: those slots are gone, not sent in a burst
                self.stats.missed += late
                next_at += late * period
            next_at += period
            if len(self._inflight) >= MAX_CONNECTIONS:
                self.stats.missed += 1
                continue
            task = loop.create_task(self._one())
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _one(self) -> None:
        conn = self._idle.pop() if self._idle else None
        self.stats.sent += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if conn is None:
                    conn = _Connection(*await self.proxy.open_pinned(self.spec.revision))
                status = await conn.get(self._target, self._host)
        except (TimeoutError, OSError, ConnectionError, h11.ProtocolError, RuntimeError):
            self.stats.failed += 1
            if conn is not None:
                conn.close()
            return
        except asyncio.CancelledError:  # cut by ``stop``: no answer, so it counts as failed
            self.stats.failed += 1
            if conn is not None:
                conn.close()
            raise
        self.stats.answered += 1
        if status >= 500:
            self.stats.status_5xx += 1
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()

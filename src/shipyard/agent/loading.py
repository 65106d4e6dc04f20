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
free keep-alive connection (at most ``MAX_CONNECTIONS`` in flight); a slot with none free, or one
more than ``CATCH_UP_SECONDS`` overdue (a stalled loop), is counted as ``missed`` rather than sent
late, so a slow canary shows up as fewer answers (and a longer p99) instead of a generator that
quietly slows down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import asdict, dataclass

from shipyard.domain.models import MAX_LOAD_RPS
from shipyard.routing.proxy import ServiceProxy

#: Keep-alive connections one load may hold open (and requests in flight).
MAX_CONNECTIONS = 64
#: A request without a complete answer after this long counts as failed; its connection closes.
REQUEST_TIMEOUT = 10.0
#: The longest lease the agent grants; the control plane renews every measurement interval.
MAX_LEASE_SECONDS = 3600.0
#: Slots a late timer passed are sent at once up to this much of the rate; beyond, missed.
CATCH_UP_SECONDS = 0.1
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


class BadResponse(Exception):
    """The router's answer could not be framed (it never should: the router frames it)."""


_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*(?=\r\n)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[^\r]*close", re.IGNORECASE)


async def _skip(reader: asyncio.StreamReader, n: int) -> None:
    """Read and drop ``n`` body bytes, 64 KiB at a time (a large answer is never held whole)."""
    while n > 0:
        n -= len(await reader.readexactly(min(n, 65536)))


class _Connection:
    """One keep-alive client connection into the router.

    The answer is framed by hand (status line, ``Content-Length`` / chunked / close-delimited)
    rather than with h11: what comes back is the router's own framing, and h11 cost about half
    of the generator's CPU per request (cProfile at 1000 rps).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    async def get(self, request: bytes) -> int:
        """Send ``request`` (a whole GET) and read the whole answer; its status. Raises on a
        broken exchange (BadResponse, OSError, asyncio.IncompleteReadError, LimitOverrunError)."""
        self.writer.write(request)
        reader = self.reader
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.") or len(head) < 12 or not head[9:12].isdigit():
                raise BadResponse(f"not an HTTP/1.x status line: {head[:40]!r}")
            status = int(head[9:12])
            if status >= 200:
                break  # 1xx: an interim answer, the real one follows
        if _CLOSE.search(head) or head.startswith(b"HTTP/1.0"):
            self.reusable = False
        if status in (204, 304):
            return status
        if _CHUNKED.search(head):
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    return status
                await _skip(reader, size + 2)
        length = _LENGTH.search(head)
        if length is not None:
            await _skip(reader, int(length[1]))
            return status
        self.reusable = False  # close-delimited: the body ends with the connection
        while await reader.read(65536):
            pass
        return status

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
        self._request = (
            b"GET %s HTTP/1.1\r\nhost: %s\r\nuser-agent: shipyard-load/1\r\n"
            b"x-shipyard-load: 1\r\n\r\n" % (spec.path.encode("ascii"), host.encode("ascii"))
        )
        self._loop = asyncio.get_running_loop()
        self._deadline = 0.0
        self.renew(lease_seconds)
        self._idle: list[_Connection] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._halted = False
        self._closing: asyncio.Task[LoadStats] | None = None
        self._ticker = self._loop.create_task(
            self._tick(), name=f"shipyard-load-{proxy.service}-{spec.revision}"
        )

    @property
    def running(self) -> bool:
        return not self._halted and not self._ticker.done()

    async def ended(self) -> None:
        """Wait until the lease runs out (or ``stop``); requests may still be in flight."""
        await asyncio.wait([self._ticker])

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

    def halt(self) -> asyncio.Task[LoadStats]:
        """Stop sending now, without waiting: the agent answers ``DELETE .../load`` at once, so
        a failed analysis's rollback is not held up. Requests in flight get
        ``STOP_GRACE_SECONDS`` to finish in the returned task, then are cut. Idempotent."""
        self._halted = True
        self._ticker.cancel()
        if self._closing is None:
            self._closing = self._loop.create_task(self._close())
        return self._closing

    async def stop(self) -> LoadStats:
        """``halt``, and wait until every request has finished or been cut."""
        return await self.halt()

    async def _close(self) -> LoadStats:
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
        loop, rps = self._loop, self.spec.rps
        start, fired = loop.time(), 0
        catch_up = max(1, int(rps * CATCH_UP_SECONDS))
        while True:
            now = loop.time()
            if now >= self._deadline:
                return
            # Slots due by now. Timers fire up to a millisecond late (a whole period at 1000
            # rps), so the few slots a late wake-up passed are sent at once; only a backlog
            # longer than CATCH_UP_SECONDS (a stalled loop) is dropped as missed.
            due = int((now - start) * rps) + 1 - fired
            if due > catch_up:
                self.stats.missed += due - catch_up
                fired += due - catch_up
                due = catch_up
            for _ in range(due):
                fired += 1
                if len(self._inflight) >= MAX_CONNECTIONS:
                    self.stats.missed += 1
                    continue
                task = loop.create_task(self._one())
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            await asyncio.sleep(max(0.0, min(start + fired / rps, self._deadline) - now))

    async def _one(self) -> None:
        conn = self._idle.pop() if self._idle else None
        self.stats.sent += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if conn is None:
                    conn = _Connection(*await self.proxy.open_pinned(self.spec.revision))
                status = await conn.get(self._request)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            BadResponse,
            ValueError,
            RuntimeError,
        ):
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

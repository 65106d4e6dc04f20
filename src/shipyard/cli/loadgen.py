"""A small steady load generator for the demo: keep-alive HTTP/1.1 GETs from N connections,
counting every response by outcome. (Tests and benchmarks use wrk; this one needs nothing
installed and counts exactly which requests failed and why.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadReport:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    #: Successful answers by the ``x-shipyard-revision`` they carried ("" without one: the
    #: service's manifest did not set ``[routing] revision_header = true``; the examples do).
    served_by: Counter[str] = field(default_factory=Counter)
    #: revision -> wall-clock time (time.time()) its first successful answer arrived: when this
    #: URL started serving it, seen from outside (``shipyard demo --fleet``'s and
    #: bench/bench_fleet.py's switch skew).
    first_seen: dict[str, float] = field(default_factory=dict)


class LoadGenerator:
    """Runs in its own thread and event loop until ``stop()``; ``report`` is live."""

    def __init__(self, url: str, connections: int = 8) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.path = u.path or "/"
        self.connections = connections
        self.report = LoadReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> LoadGenerator:
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.report

    async def _run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.connections)))

    async def _worker(self) -> None:
        req = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not self._stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                assert reader is not None
                writer.write(req)
                status_line = await asyncio.wait_for(reader.readline(), 10)
                if not status_line:
                    raise ConnectionError("connection closed without a response")
                status = int(status_line.split()[1])
                length, revision, close = 0, "", False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    key = name.strip().lower()
                    if key == "content-length":
                        length = int(value)
                    elif key == "x-shipyard-revision":
                        revision = value.strip()
                    elif key == "connection" and value.strip().lower() == "close":
                        close = True
                await reader.readexactly(length)
                self.report.requests += 1
                if 200 <= status < 300:
                    self.report.ok += 1
                    self.report.served_by[revision] += 1
                    self.report.first_seen.setdefault(revision, time.time())
                else:
                    self.report.failed += 1
                    self.report.reasons[f"HTTP {status}"] += 1
                if close:
                    writer.close()
                    writer = None
            except (
                OSError,
                ConnectionError,
                asyncio.IncompleteReadError,
                TimeoutError,
                ValueError,
            ) as exc:
                self.report.requests += 1
                self.report.failed += 1
                self.report.reasons[type(exc).__name__] += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

"""A router without sockets or a running loop: fake transports, a hand-cranked loop, a fake pool.

test_client.py, test_batching.py and test_pool.py use these to drive the real protocol classes one
callback at a time, in orders a real event loop would also allow, and to look at every byte they
write. What the kernel and asyncio would do later (deliver ``connection_lost`` after a close,
finish a connect, run the batcher's flush) happens only when the test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from shipyard.routing import metrics as routing_metrics
from shipyard.routing.client import Client
from shipyard.routing.context import ProxyContext
from shipyard.routing.pool import Pool
from shipyard.routing.table import Backend, Route, Table
from shipyard.routing.upstream import Upstream


class FakeLoop:
    """``call_soon`` queues; :meth:`run_ready` runs what is queued (one loop iteration);
    ``call_later`` holds its callbacks until :meth:`run_later` (the delay has passed)."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], object]] = []
        self.later: list[Callable[[], object]] = []

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.ready.append(callback)

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        self.later.append(lambda: callback(*args))

    def run_later(self) -> None:
        later, self.later = self.later, []
        for callback in later:
            callback()

    def run_ready(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


class FakeTransport:
    """Records writes; a close or abort is reported to the protocol by :meth:`deliver_loss`."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.lost = False
        self.reading = True
        self.eof_written = False

    @property
    def written(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        if not self.closing:  # (asyncio drops what is written after close)
            self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def write_eof(self) -> None:
        self.eof_written = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def deliver_loss(self) -> bool:
        """What the loop does after a close: ``connection_lost`` once. True if it did now."""
        if self.closing and not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)
            return True
        return False


def connect(protocol: asyncio.Protocol) -> FakeTransport:
    transport = FakeTransport(protocol)
    protocol.connection_made(cast(asyncio.Transport, transport))
    return transport


class FakePool(Pool):
    """A pool whose connects wait in :attr:`connecting` until the test finishes them."""

    def __init__(self, backend: Backend, max_idle: int = 64) -> None:
        super().__init__(backend, max_idle)
        self.connecting: list[tuple[ProxyContext, Client, int]] = []
        self.opened: list[Upstream] = []

    def open(self, ctx: ProxyContext, client: Client, gen: int) -> None:
        self.conns += 1
        self.connecting.append((ctx, client, gen))

    def finish_connect(self, ok: bool = True) -> None:
        """The oldest connect completes (or fails), as ``Pool._open`` would go on."""
        ctx, client, gen = self.connecting.pop(0)
        if not ok:
            self.closed_one()
            if client.waiting_for(gen):
                client.connect_failed(self, ConnectionRefusedError("refused by the test"))
            return
        up = Upstream(self, ctx.batcher)
        connect(up)
        self.opened.append(up)
        if client.waiting_for(gen):
            client.attach(up)
        else:
            self.release(up)

    def add_idle(self, ctx: ProxyContext, count: int) -> None:
        for _ in range(count):
            up = Upstream(self, ctx.batcher)
            connect(up)
            self.conns += 1
            self.opened.append(up)
            self.idle.append(up)


def router(*, max_body: int = 10 * 2**20) -> tuple[ProxyContext, FakeLoop, FakePool]:
    """A ProxyContext routing revision v1 to one fake pool, bound to a FakeLoop."""
    loop = FakeLoop()
    ctx = ProxyContext(max_body=max_body, connect_timeout=2.0)
    ctx.bind(cast(asyncio.AbstractEventLoop, loop))
    pool = FakePool(Backend("r1", "v1", "127.0.0.1", 1))
    counters = routing_metrics.RevisionCounters("v1")
    ctx.table = Table({"v1": 100}, [Route("v1", [pool], counters)], None, None)
    return ctx, loop, pool

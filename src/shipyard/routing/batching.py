"""Write batching: a router connection's writes are held and flushed once per loop iteration.

``routing.client`` and ``routing.upstream`` connections derive from :class:`BatchedConnection`
and write only through :meth:`BatchedConnection.send`; each ``ServiceProxy`` owns one
:class:`WriteBatcher` (in its ``ProxyContext``) that flushes them all at the end of the event-loop
iteration in which they wrote.

Why: under load one iteration handles many requests; writing each the moment it is ready wakes
the peer (wrk, nginx) once per request, which on a small machine costs more CPU than the
proxying itself. Flushing once per iteration lets the kernel and the peers handle a batch per
wake-up. Measured while building the router (BENCHMARKS.md, router section): writing at once made
the router, wrk and nginx each wake two to three times as often per request; batched, the router
makes about 0.01 context switches per request where HAProxy makes 0.19, and that is what took it
to HAProxy's throughput on this machine.
"""

from __future__ import annotations

import asyncio

__all__ = ["BatchedConnection", "WriteBatcher"]


class WriteBatcher:
    """The connections with writes held in this loop iteration, and the flush that sends them."""

    __slots__ = ("dirty", "loop", "scheduled")

    loop: asyncio.AbstractEventLoop  # set by bind() (the proxy's start)

    def __init__(self) -> None:
        self.dirty: list[BatchedConnection] = []
        self.scheduled = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def flush(self) -> None:
        """Write what the last loop iteration produced, one write per connection."""
        self.scheduled = False
        dirty = self.dirty
        self.dirty = []
        for conn in dirty:
            out = conn.out
            if out is not None:
                conn.out = None
                if not conn.transport.is_closing():
                    conn.transport.write(out)


class BatchedConnection(asyncio.Protocol):
    """A connection whose writes are held until the end of the event-loop iteration.

    All writes to the transport go through :meth:`send` so their order is kept;
    :meth:`close_transport` flushes what is held before closing.
    """

    transport: asyncio.Transport

    __slots__ = ("batcher", "out", "transport")

    def __init__(self, batcher: WriteBatcher) -> None:
        self.batcher = batcher
        self.out: bytes | None = None

    def send(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.out = data
            batcher = self.batcher
            batcher.dirty.append(self)
            if not batcher.scheduled:
                batcher.scheduled = True
                batcher.loop.call_soon(batcher.flush)
        else:  # a second write in the same iteration (body chunks, pipelining): rare
            self.out = out + data

    def close_transport(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            if not self.transport.is_closing():
                self.transport.write(out)
        self.transport.close()

    def abort_transport(self) -> None:
        self.out = None
        self.transport.abort()

"""The upstream connection pool: keep-alive connections to one backend, and opening new ones.

``routing.proxy`` keeps one :class:`Pool` per backend and the routing table routes to pools;
``routing.client`` takes an idle connection from the pool it was routed to, or asks the pool to
:meth:`Pool.open` one; ``routing.upstream`` puts a connection back when its response is complete.
A pool whose backend left the table is retired: it keeps no idle connection, and it counts the
connections still open so that ``ServiceProxy.drain_replica`` knows when the last exchange on that
backend has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from shipyard.routing.table import Backend
from shipyard.routing.upstream import Upstream

if TYPE_CHECKING:
    from shipyard.routing.client import Client
    from shipyard.routing.context import ProxyContext

__all__ = ["DOWN_SECONDS", "Pool"]

#: After a failed connect, a backend is skipped by new requests for this long (if others remain).
DOWN_SECONDS = 2.0


class Pool:
    """Keep-alive connections to one backend: the idle ones, and a count of all that are open
    or opening (so a retired backend's drain knows when its last exchange has finished)."""

    __slots__ = ("backend", "conns", "down_until", "drained", "idle", "max_idle", "retired")

    def __init__(self, backend: Backend, max_idle: int) -> None:
        self.backend = backend
        self.max_idle = max_idle
        self.idle: list[Upstream] = []
        self.retired = False
        #: ``time.monotonic()`` until which the routing table skips this backend.
        self.down_until = 0.0
        self.conns = 0
        self.drained: asyncio.Event | None = None

    def take_idle(self) -> Upstream | None:
        """An idle connection that is still open, most recently used first (least likely to
        have been closed by the backend meanwhile)."""
        idle = self.idle
        while idle:
            up = idle.pop()
            if not up.transport.is_closing():
                return up
        return None

    def mark_down(self) -> None:
        """A connect to this backend failed: new requests avoid it for a while."""
        self.down_until = time.monotonic() + DOWN_SECONDS

    def closed_one(self) -> None:
        """A connection of this pool closed (or failed to open)."""
        self.conns -= 1
        if self.conns == 0 and self.drained is not None:
            self.drained.set()

    def release(self, up: Upstream) -> None:
        """Keep ``up`` for the next request, unless the pool is full or retired."""
        up.reused = True
        if self.retired or len(self.idle) >= self.max_idle:
            up.close_transport()
        else:
            self.idle.append(up)  # (if it closes meanwhile, whoever pops it skips it)

    def discard(self, up: Upstream) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(up)

    def retire(self) -> None:
        """The backend left the routing table: close the idle connections, keep none from now."""
        self.retired = True
        for up in self.idle:
            up.close_transport()
        self.idle.clear()

    def open(self, ctx: ProxyContext, client: Client, gen: int) -> None:
        """Open a connection for ``client``'s exchange number ``gen``, in the background."""
        task = ctx.loop.create_task(self._open(ctx, client, gen))
        ctx.tasks.add(task)
        task.add_done_callback(ctx.tasks.discard)

    async def _open(self, ctx: ProxyContext, client: Client, gen: int) -> None:
        backend = self.backend

        def factory() -> Upstream:
            return Upstream(self, ctx.batcher)

        self.conns += 1
        try:
            async with asyncio.timeout(ctx.connect_timeout):
                _, up = await ctx.loop.create_connection(factory, backend.host, backend.port)
        except (OSError, TimeoutError) as exc:
            self.closed_one()
            if client.waiting_for(gen):
                client.connect_failed(self, exc)
            return
        if client.waiting_for(gen):
            client.attach(up)
        else:  # the client went away or moved on meanwhile: keep the connection for the next one
            self.release(up)

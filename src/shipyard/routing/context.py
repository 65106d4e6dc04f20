"""What one router's connections share: the routing table, the write batcher, limits, counters.

``ServiceProxy`` (``routing.proxy``) creates one :class:`ProxyContext`, swaps its ``table`` on
every ``configure``, and hands it to every client connection it accepts; ``routing.client`` and
``routing.pool`` read everything they need of the proxy from it and nothing else. It holds no
logic beyond waking ``drain`` waiters.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shipyard.routing.batching import WriteBatcher
from shipyard.routing.http1 import Forwarding
from shipyard.routing.table import Table

if TYPE_CHECKING:
    from shipyard.routing.client import Client
    from shipyard.routing.pool import Pool

__all__ = ["ProxyContext"]


@dataclass(slots=True, eq=False)
class ProxyContext:
    """One router's shared state. Read and written only on the proxy's event loop."""

    #: Largest request body accepted (413 above it).
    max_body: int
    connect_timeout: float
    #: The routing table requests are picked from now; ``configure`` replaces it whole.
    table: Table[Pool] = field(default_factory=lambda: Table({}, [], None, None))
    batcher: WriteBatcher = field(default_factory=WriteBatcher)
    #: What the router adds to every forwarded request (Via, X-Forwarded-*).
    forwarding: Forwarding = field(default_factory=Forwarding)
    #: Open client connections (the timeout sweep and ``close`` walk them).
    clients: set[Client] = field(default_factory=set)
    #: Background tasks (upstream connects, the timeout sweep); ``close`` cancels them.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: ``drain(revision)`` calls waiting for that revision's in-flight count to reach zero.
    drain_waiters: dict[str, list[asyncio.Future[None]]] = field(default_factory=dict)
    #: Requests answered 503 because no revision had a backend.
    unrouted: int = 0
    loop: asyncio.AbstractEventLoop = field(init=False)  # set by bind() (the proxy's start)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batcher.bind(loop)

    def wake(self, revision: str) -> None:
        """``revision`` has nothing in flight: release whoever waits in ``drain``."""
        for fut in self.drain_waiters.get(revision, ()):
            if not fut.done():
                fut.set_result(None)

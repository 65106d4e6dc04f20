"""What one router's connections share: the routing table, the write batcher, limits, counters.

``ServiceProxy`` (``routing.proxy``) creates one :class:`ProxyContext`, swaps its ``table`` on
every ``configure``, and hands it to every client connection it accepts; ``routing.client`` and
``routing.pool`` read everything they need of the proxy from it and nothing else. It holds no
logic beyond waking ``drain`` waiters.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shipyard.routing.batching import WriteBatcher
from shipyard.routing.http1 import Forwarding
from shipyard.routing.limits import ConnectionBudget, RouterLimits
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
    #: This service's timeouts and connection cap.
    limits: RouterLimits = field(default_factory=RouterLimits)
    #: The process-wide connection cap, shared with the other services' routers.
    budget: ConnectionBudget = field(default_factory=lambda: ConnectionBudget(16384))
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
    #: Connections answered 503 because this service's or the agent's cap was reached.
    refused: int = 0
    #: Requests answered 408 (head or body too slow); idle keep-alive connections closed.
    slow_clients: int = 0
    idle_closed: int = 0
    #: The timeout sweep's limits, in ticks of ``tick`` seconds (set by the proxy's start).
    tick: float = 1.0
    head_ticks: int = 10
    keepalive_ticks: int = 60
    body_ticks: int = 10
    response_ticks: int = 60
    loop: asyncio.AbstractEventLoop = field(init=False)  # set by bind() (the proxy's start)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batcher.bind(loop)
        self.apply_limits(self.limits)

    def apply_limits(self, limits: RouterLimits) -> None:
        """Use ``limits`` from now on (the sweep's next tick); connections already open keep
        their place even past a lowered cap."""
        self.limits = limits
        timeouts = (
            limits.head_timeout,
            limits.keepalive_timeout,
            limits.body_timeout,
            limits.response_timeout,
        )
        # Eight ticks per shortest timeout: a timeout fires within 1/8 of its value late.
        self.tick = tick = min(1.0, max(0.01, min(timeouts) / 8))
        self.head_ticks = math.ceil(limits.head_timeout / tick)
        self.keepalive_ticks = math.ceil(limits.keepalive_timeout / tick)
        self.body_ticks = math.ceil(limits.body_timeout / tick)
        self.response_ticks = math.ceil(limits.response_timeout / tick)

    def wake(self, revision: str) -> None:
        """``revision`` has nothing in flight: release whoever waits in ``drain``."""
        for fut in self.drain_waiters.get(revision, ()):
            if not fut.done():
                fut.set_result(None)

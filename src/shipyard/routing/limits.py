"""The router's limits: timeouts, connection caps, and the process's descriptor limit.

``ServiceProxy`` (``routing.proxy``) takes a :class:`RouterLimits` (one per service; the agent
passes its agent-wide defaults with the service's own overrides, ``agent.server``) and a
:class:`ConnectionBudget` shared by every router of the agent; ``routing.client`` enforces them
(``Client.tick`` for the timeouts, ``connection_made`` for the caps). ``agent.server`` and
``python -m shipyard.routing.proxy`` call :func:`raise_descriptor_limit` once at start.

The defaults follow HAProxy and nginx: a request head must arrive whole within 10 s (HAProxy's
``timeout http-request``; slowloris sends a byte every few seconds, so the clock is not reset by
progress), a keep-alive connection may wait 60 s for its next request (``timeout
http-keep-alive``), a request body may stall 10 s (nginx's ``client_body_timeout`` is 60 s; a
body that makes no progress for 10 s on loopback or a LAN is an attacker or a dead peer), and
the upstream's response head may take 60 s (``timeout server``). Past a connection cap the router
answers ``503`` at once and closes (HAProxy's ``maxconn`` queues in the backlog instead; a fast
answer tells a load balancer in front to go elsewhere).
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "DESCRIPTOR_RESERVE",
    "ConnectionBudget",
    "RouterLimits",
    "raise_descriptor_limit",
]

log = logging.getLogger("shipyard.routing.proxy")

#: Descriptors the router never takes for itself: the agent's API (uvicorn in the same process),
#: replica pipes and log files, state files. Each client connection may hold two descriptors (its
#: own and an upstream one), so the agent-wide cap is at most ``(limit - reserve) // 2``.
DESCRIPTOR_RESERVE = 256


@dataclass(frozen=True, slots=True)
class RouterLimits:
    """One service router's timeouts (seconds) and connection cap."""

    #: The whole request head must arrive within this (408 and close). Counted from the
    #: connection's accept for its first request, from the head's first byte after that.
    head_timeout: float = 10.0
    #: An idle keep-alive connection waits this long for its next request (then closed silently).
    keepalive_timeout: float = 60.0
    #: A request body that makes no progress for this long: 408 and close.
    body_timeout: float = 10.0
    #: The upstream's silence, once it has the request, before the router answers 504.
    response_timeout: float = 60.0
    #: Open client connections to this service; past it, a fast 503 and close.
    max_connections: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"router limit {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"router limit {f.name} must be positive, got {value!r}")
        if not isinstance(self.max_connections, int):
            raise ValueError(
                f"router limit max_connections must be an integer, got {self.max_connections!r}"
            )

    def with_overrides(self, overrides: dict[str, Any] | None) -> RouterLimits:
        """These limits with some replaced (a service's own over the agent's defaults);
        ValueError naming the field for an unknown name or a bad value."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown router limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ConnectionBudget:
    """Client connections open across every router of one process, against one cap.

    Shared by all the agent's ``ServiceProxy`` instances (each counts its own connections
    against its service's ``max_connections`` as well), so one flooded service cannot take the
    descriptors the others and the agent's API need.
    """

    __slots__ = ("limit", "open", "refused")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"the agent-wide connection limit must be positive, got {limit}")
        self.limit = limit
        self.open = 0
        #: Connections refused because this cap was reached (every service's together).
        self.refused = 0

    @classmethod
    def for_descriptors(cls, wanted: int) -> ConnectionBudget:
        """A budget of ``wanted`` connections, lowered to what the descriptor limit allows
        (two descriptors per client connection, :data:`DESCRIPTOR_RESERVE` kept back)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls(wanted)
        fits = max(1, (soft - DESCRIPTOR_RESERVE) // 2)
        if fits < wanted:
            log.info(
                "router connection limit lowered from %d to %d: the descriptor limit is %d",
                wanted,
                fits,
                soft,
            )
        return cls(min(wanted, fits))


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard maximum; returns (before, after).

    Idle sockets cost a descriptor each: at the common default of 1,024 a thousand idle clients
    used to take every service and the agent's API down at once (issue 10).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # RLIM_INFINITY hard limit: the kernel caps at nr_open
        target = 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d: %s", soft, exc)
            return soft, soft
    return soft, target

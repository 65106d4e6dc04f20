"""The routing table: which revision, then which backend, a request goes to. No sockets.

``ServiceProxy.configure`` (``routing.proxy``) validates the weights here and builds a new
:class:`Table` for every change, then swaps it in whole: a request already routed keeps its
route, the next one sees the new table. ``routing.client`` calls :meth:`Table.pick` and
:meth:`Route.next_pool` once per request, so both are a few list indexings.

A revision is picked by nginx's smooth weighted round-robin, unrolled into a schedule of at most
100 picks; a request carrying a sticky key (header or cookie) goes by ``crc32(key) % 100`` to a
bucket instead, buckets assigned to revisions as cumulative ranges so that raising the first
revision's share only moves keys onto it. Within a revision, backends take turns.

The table routes to whatever the proxy keeps per backend (its connection pool); all it needs to
know of one is whether it is marked down after a failed connect (:class:`Target`).
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from shipyard.routing import metrics as routing_metrics
from shipyard.routing.http1 import TOKEN

__all__ = [
    "Backend",
    "Route",
    "Table",
    "Target",
    "effective_weights",
    "group_backends",
    "smooth_schedule",
    "validate_sticky_names",
    "validate_weights",
]


@dataclass(frozen=True, slots=True)
class Backend:
    """One running replica of a revision, reachable at ``host:port``."""

    replica_id: str
    revision: str
    host: str
    port: int


class Target(Protocol):
    """What the table routes to, per backend."""

    #: ``time.monotonic()`` until which new requests avoid it (0.0: not marked down).
    down_until: float


T = TypeVar("T", bound=Target)


class Route(Generic[T]):
    """One revision in a routing table: its backends' targets, round-robin over them."""

    __slots__ = ("counters", "crlf_header", "header", "pools", "revision", "rr")

    def __init__(
        self,
        revision: str,
        pools: list[T],
        counters: routing_metrics.RevisionCounters,
        revision_header: bool = True,
    ) -> None:
        """``revision_header``: answer with ``x-shipyard-revision`` (False: ``header`` is empty
        and ``crlf_header`` the bare CRLF it replaces, so responses pass unchanged)."""
        self.revision = revision
        self.pools = pools
        self.counters = counters
        self.header = (
            b"x-shipyard-revision: " + revision.encode() + b"\r\n" if revision_header else b""
        )
        self.crlf_header = b"\r\n" + self.header  # replaces the status line's CRLF
        self.rr = 0

    def next_pool(self) -> T:
        pools = self.pools
        i = self.rr
        self.rr = i + 1 if i + 1 < len(pools) else 0
        pool = pools[i]
        if pool.down_until:
            return self._skip_down(i)
        return pool

    def _skip_down(self, i: int) -> T:
        pools = self.pools
        now = time.monotonic()
        for k in range(len(pools)):
            pool = pools[(i + k) % len(pools)]
            if pool.down_until <= now:
                pool.down_until = 0.0
                return pool
        return pools[i]  # all marked down: try anyway rather than fail without trying


class Table(Generic[T]):
    """An immutable routing decision (plus pick cursors); ``configure`` swaps in a new one."""

    __slots__ = (
        "by_revision",
        "next",
        "routes",
        "schedule",
        "sticky",
        "sticky_cookie",
        "sticky_re",
        "weights",
    )

    def __init__(
        self,
        weights: dict[str, int],
        routes: list[Route[T]],
        sticky_header: str | None,
        sticky_cookie: str | None,
    ) -> None:
        self.weights = weights
        self.routes = routes
        self.by_revision = {r.revision: r for r in routes}
        self.schedule = smooth_schedule([(r, weights[r.revision]) for r in routes])
        self.next = 0
        self.sticky_cookie = sticky_cookie.encode() if sticky_cookie else None
        self.sticky: list[Route[T]] | None = None
        self.sticky_re: re.Pattern[bytes] | None = None
        names = []
        if sticky_header:
            names.append(re.escape(sticky_header.encode()))
        if sticky_cookie:
            names.append(b"cookie")
        if names:
            # Buckets 0..99 map to revisions by cumulative ranges in the order of ``weights``, so
            # raising the first revision's share only moves keys onto it, never off it.
            self.sticky = [r for r in routes for _ in range(weights[r.revision])] or None
            self.sticky_re = re.compile(
                rb"\r\n(" + b"|".join(names) + rb"):[ \t]*([^\r]*)", re.IGNORECASE
            )

    def pick(self, key: bytes | None) -> Route[T] | None:
        if key is not None and self.sticky is not None:
            return self.sticky[zlib.crc32(key) % 100]
        schedule = self.schedule
        if not schedule:
            return None
        i = self.next
        self.next = i + 1 if i + 1 < len(schedule) else 0
        return schedule[i]

    def sticky_key(self, head: bytes) -> bytes | None:
        """The value of the sticky header (preferred) or cookie in a request head, if any."""
        assert self.sticky_re is not None
        cookie = None
        for name, value in self.sticky_re.findall(head):
            if name.lower() != b"cookie":
                return value.strip() or None
            if cookie is None and self.sticky_cookie is not None:
                cookie = _cookie(value, self.sticky_cookie)
        return cookie


R = TypeVar("R")


def smooth_schedule(weighted: list[tuple[R, int]]) -> list[R]:
    """nginx's smooth weighted round-robin, unrolled over one cycle (at most 100 picks)."""
    weighted = [(r, w) for r, w in weighted if w > 0]
    if not weighted:
        return []
    g = 0
    for _, w in weighted:
        g = math.gcd(g, w)
    ws = [w // g for _, w in weighted]
    total = sum(ws)
    current = [0] * len(ws)
    out: list[R] = []
    for _ in range(total):
        best = 0
        for i, w in enumerate(ws):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(weighted[best][0])
    return out


def validate_weights(weights: Mapping[str, int]) -> dict[str, int]:
    """The weights as a dict; ValueError unless printable revision names with ints summing to
    100 (or nothing, for no traffic)."""
    out: dict[str, int] = {}
    for revision, weight in weights.items():
        if not isinstance(revision, str) or not revision:
            raise ValueError(f"revision names must be non-empty strings, got {revision!r}")
        if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in revision):
            raise ValueError(f"revision {revision!r} must be printable ASCII without spaces")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise ValueError(f"weight of {revision!r} must be an int in 0..100, got {weight!r}")
        out[revision] = weight
    total = sum(out.values())
    if total not in (0, 100):
        raise ValueError(f"weights must sum to 100 (or be empty for no traffic), got {total}")
    return out


def validate_sticky_names(sticky_header: str | None, sticky_cookie: str | None) -> None:
    """ValueError unless each given name is a token (RFC 9110 section 5.6.2)."""
    for what, name in (("sticky_header", sticky_header), ("sticky_cookie", sticky_cookie)):
        if name is not None and not TOKEN.fullmatch(name.encode()):
            raise ValueError(f"{what} {name!r} is not a valid header/cookie name")


def group_backends(backends: Sequence[Backend]) -> dict[str, list[Backend]]:
    """Backends by revision, duplicates dropped, order kept; TypeError for a non-Backend."""
    by_revision: dict[str, list[Backend]] = {}
    for backend in backends:
        if not isinstance(backend, Backend):
            raise TypeError(f"expected Backend, got {backend!r}")
        group = by_revision.setdefault(backend.revision, [])
        if backend not in group:
            group.append(backend)
    return by_revision


def effective_weights(requested: dict[str, int], served: set[str]) -> dict[str, int]:
    """Give the share of revisions without backends to the others, proportionally, in ints."""
    live = {rev: w for rev, w in requested.items() if w > 0 and rev in served}
    total = sum(live.values())
    if total in (0, 100):
        return {rev: live.get(rev, 0) for rev in requested}
    share = {rev: w * 100 // total for rev, w in live.items()}
    left = 100 - sum(share.values())
    order = list(requested)
    by_remainder = sorted(live, key=lambda rev: (-(live[rev] * 100 % total), order.index(rev)))
    for rev in by_remainder[:left]:
        share[rev] += 1
    return {rev: share.get(rev, 0) for rev in requested}


def _cookie(header: bytes, name: bytes) -> bytes | None:
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value.strip(b'"') or None
    return None

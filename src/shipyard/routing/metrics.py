"""Per-revision traffic metrics of the router: live counters and the snapshots read from them.

``routing.client`` updates a :class:`RevisionCounters` on every request (plain int attributes and a
bucket list, so the hot path stays cheap); ``ServiceProxy.metrics()`` hands out
:class:`RevisionMetrics` snapshots. The agent exposes them, and canary analysis compares two
snapshots taken some time apart (``later.minus(earlier)``) to judge a window of traffic.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Upper bounds (ms) of the latency histogram buckets; a latency falls into the first bucket whose
#: bound is >= it. The last bucket is unbounded.
BUCKET_BOUNDS_MS: tuple[float, ...] = (
    1.0,
    2.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    math.inf,
)
_FINITE_BOUNDS_S: tuple[float, ...] = tuple(b / 1000.0 for b in BUCKET_BOUNDS_MS[:-1])


class RevisionCounters:
    """Live, mutable counters of one revision. Updated only from the router's event loop."""

    __slots__ = (
        "buckets",
        "client_aborts",
        "inflight",
        "latency_sum",
        "requests",
        "retries",
        "revision",
        "status_2xx",
        "status_3xx",
        "status_4xx",
        "status_5xx",
        "upstream_errors",
    )

    def __init__(self, revision: str) -> None:
        self.revision = revision
        self.requests = 0
        self.status_2xx = 0
        self.status_3xx = 0
        self.status_4xx = 0
        self.status_5xx = 0
        self.upstream_errors = 0
        self.client_aborts = 0
        self.retries = 0
        self.inflight = 0
        self.latency_sum = 0.0
        self.buckets = [0] * len(BUCKET_BOUNDS_MS)

    def observe(self, status: int, seconds: float) -> None:
        """Count one finished response (``status`` as the client saw it) and its latency."""
        self.requests += 1
        if status >= 500:
            self.status_5xx += 1
        elif status >= 400:
            self.status_4xx += 1
        elif status >= 300:
            self.status_3xx += 1
        elif status >= 200:
            self.status_2xx += 1
        self.buckets[bisect_left(_FINITE_BOUNDS_S, seconds)] += 1
        self.latency_sum += seconds

    def snapshot(self) -> RevisionMetrics:
        return RevisionMetrics(
            revision=self.revision,
            requests=self.requests,
            status_2xx=self.status_2xx,
            status_3xx=self.status_3xx,
            status_4xx=self.status_4xx,
            status_5xx=self.status_5xx,
            upstream_errors=self.upstream_errors,
            client_aborts=self.client_aborts,
            retries=self.retries,
            latency_buckets=tuple(self.buckets),
            latency_sum_ms=self.latency_sum * 1000.0,
            inflight=self.inflight,
        )


def _empty_buckets() -> tuple[int, ...]:
    return (0,) * len(BUCKET_BOUNDS_MS)


@dataclass(frozen=True)
class RevisionMetrics:
    """What one revision served, as counted by the router since it started.

    ``requests`` counts finished requests (answered or aborted by the client). The status classes
    count responses as the client saw them: router-generated 502/504, and responses the upstream
    broke off midway, count as 5xx and also as ``upstream_errors``. ``client_aborts`` are requests
    whose client went away first (no class). ``latency_buckets`` holds per-bucket (not cumulative)
    counts for :data:`BUCKET_BOUNDS_MS`. ``inflight`` is a gauge at snapshot time.
    """

    BUCKET_BOUNDS_MS: ClassVar[tuple[float, ...]] = BUCKET_BOUNDS_MS

    revision: str
    requests: int = 0
    status_2xx: int = 0
    status_3xx: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    upstream_errors: int = 0
    client_aborts: int = 0
    retries: int = 0
    latency_buckets: tuple[int, ...] = field(default_factory=_empty_buckets)
    latency_sum_ms: float = 0.0
    inflight: int = 0

    @property
    def responses(self) -> int:
        """Responses with a status class (requests minus client aborts and 1xx upgrades)."""
        return self.status_2xx + self.status_3xx + self.status_4xx + self.status_5xx

    @property
    def success_rate(self) -> float | None:
        """Share of non-5xx responses, or None when there were none."""
        total = self.responses
        if total == 0:
            return None
        return (total - self.status_5xx) / total

    @property
    def mean_ms(self) -> float | None:
        observed = sum(self.latency_buckets)
        return self.latency_sum_ms / observed if observed else None

    def quantile(self, q: float) -> float | None:
        """Latency quantile in ms (e.g. ``quantile(0.99)``), interpolated inside its bucket.

        None when nothing was observed. A quantile in the unbounded last bucket reports that
        bucket's lower bound (the histogram cannot say more).
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        total = sum(self.latency_buckets)
        if total == 0:
            return None
        rank = q * total
        cumulative = 0
        for i, count in enumerate(self.latency_buckets):
            if count and cumulative + count >= rank:
                lower = BUCKET_BOUNDS_MS[i - 1] if i else 0.0
                upper = BUCKET_BOUNDS_MS[i]
                if math.isinf(upper):
                    return lower
                fraction = max(0.0, (rank - cumulative) / count)
                return lower + (upper - lower) * fraction
            cumulative += count
        return BUCKET_BOUNDS_MS[-2]  # unreachable: rank <= total

    def minus(self, earlier: RevisionMetrics) -> RevisionMetrics:
        """The traffic between ``earlier`` and this snapshot (``inflight`` stays this one's)."""
        if earlier.revision != self.revision:
            raise ValueError(f"cannot subtract {earlier.revision!r} from {self.revision!r} metrics")
        return RevisionMetrics(
            revision=self.revision,
            requests=self.requests - earlier.requests,
            status_2xx=self.status_2xx - earlier.status_2xx,
            status_3xx=self.status_3xx - earlier.status_3xx,
            status_4xx=self.status_4xx - earlier.status_4xx,
            status_5xx=self.status_5xx - earlier.status_5xx,
            upstream_errors=self.upstream_errors - earlier.upstream_errors,
            client_aborts=self.client_aborts - earlier.client_aborts,
            retries=self.retries - earlier.retries,
            latency_buckets=tuple(
                a - b for a, b in zip(self.latency_buckets, earlier.latency_buckets, strict=True)
            ),
            latency_sum_ms=self.latency_sum_ms - earlier.latency_sum_ms,
            inflight=self.inflight,
        )

    def plus(self, other: RevisionMetrics) -> RevisionMetrics:
        """This revision's traffic and ``other``'s together (several routers' counts of one
        revision: a fleet's regions, the fake's synthetic and counted traffic)."""
        return RevisionMetrics(
            revision=self.revision,
            requests=self.requests + other.requests,
            status_2xx=self.status_2xx + other.status_2xx,
            status_3xx=self.status_3xx + other.status_3xx,
            status_4xx=self.status_4xx + other.status_4xx,
            status_5xx=self.status_5xx + other.status_5xx,
            upstream_errors=self.upstream_errors + other.upstream_errors,
            client_aborts=self.client_aborts + other.client_aborts,
            retries=self.retries + other.retries,
            latency_buckets=tuple(
                a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
            ),
            latency_sum_ms=self.latency_sum_ms + other.latency_sum_ms,
            inflight=self.inflight + other.inflight,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RevisionMetrics:
        """Inverse of ``to_dict`` (what the agent's metrics endpoint answers)."""
        latency = d.get("latency_ms") or {}
        by_bound = {str(k): int(v) for k, v in (latency.get("buckets") or {}).items()}
        return cls(
            revision=str(d["revision"]),
            requests=int(d.get("requests", 0)),
            status_2xx=int(d.get("status_2xx", 0)),
            status_3xx=int(d.get("status_3xx", 0)),
            status_4xx=int(d.get("status_4xx", 0)),
            status_5xx=int(d.get("status_5xx", 0)),
            upstream_errors=int(d.get("upstream_errors", 0)),
            client_aborts=int(d.get("client_aborts", 0)),
            retries=int(d.get("retries", 0)),
            latency_buckets=tuple(
                by_bound.get("+Inf" if math.isinf(b) else f"{b:g}", 0) for b in BUCKET_BOUNDS_MS
            ),
            latency_sum_ms=float(latency.get("sum", 0.0)),
            inflight=int(d.get("inflight", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; bucket bounds as strings ("+Inf" for the last), quantiles included."""
        return {
            "revision": self.revision,
            "requests": self.requests,
            "status_2xx": self.status_2xx,
            "status_3xx": self.status_3xx,
            "status_4xx": self.status_4xx,
            "status_5xx": self.status_5xx,
            "upstream_errors": self.upstream_errors,
            "client_aborts": self.client_aborts,
            "retries": self.retries,
            "inflight": self.inflight,
            "success_rate": self.success_rate,
            "latency_ms": {
                "buckets": {
                    ("+Inf" if math.isinf(bound) else f"{bound:g}"): count
                    for bound, count in zip(BUCKET_BOUNDS_MS, self.latency_buckets, strict=True)
                },
                "sum": self.latency_sum_ms,
                "p50": self.quantile(0.5),
                "p90": self.quantile(0.9),
                "p99": self.quantile(0.99),
            },
        }

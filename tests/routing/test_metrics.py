"""Per-revision router metrics (routing/metrics.py): counters, snapshots, windows, quantiles."""

from __future__ import annotations

import pytest

from shipyard.routing import metrics as routing_metrics

from .conftest import MakeClient, MakeProxy, MakeUpstream, one_app


async def test_metrics_count_statuses_latency_and_windows(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    _app, proxy, client = await one_app(upstreams, proxies, clients)
    for path in ["/"] * 6 + ["/status/301", "/status/404", "/status/500", "/status/503"]:
        await client.request("GET", path)
    first = proxy.metrics()["v1"]
    assert (first.requests, first.responses) == (10, 10)
    assert (first.status_2xx, first.status_3xx, first.status_4xx, first.status_5xx) == (6, 1, 1, 2)
    assert first.upstream_errors == 0  # the app's own 5xx are not router errors
    assert first.success_rate == pytest.approx(0.8)
    assert sum(first.latency_buckets) == 10
    p99 = first.quantile(0.99)
    assert p99 is not None
    assert 0 < p99 <= routing_metrics.BUCKET_BOUNDS_MS[-2]
    assert first.inflight == 0

    for _ in range(5):
        await client.request("GET", "/status/502")
    window = proxy.metrics()["v1"].minus(first)
    assert (window.requests, window.status_5xx, window.status_2xx) == (5, 5, 0)
    assert window.success_rate == 0.0
    assert sum(window.latency_buckets) == 5
    as_dict = window.to_dict()
    assert as_dict["status_5xx"] == 5
    assert as_dict["latency_ms"]["buckets"]["+Inf"] == 0


def test_metrics_snapshot_is_a_copy() -> None:
    counters = routing_metrics.RevisionCounters("v1")
    counters.observe(200, 0.003)
    snapshot = counters.snapshot()
    counters.observe(500, 0.003)
    assert (snapshot.requests, snapshot.status_5xx) == (1, 0)
    assert counters.snapshot().status_5xx == 1


def _histogram(**counts: int) -> routing_metrics.RevisionMetrics:
    """Metrics whose histogram holds ``counts`` keyed like ``le_5=3`` (bound in ms)."""
    buckets = [0] * len(routing_metrics.BUCKET_BOUNDS_MS)
    for key, count in counts.items():
        bound = float("inf") if key == "le_inf" else float(key.removeprefix("le_"))
        buckets[routing_metrics.BUCKET_BOUNDS_MS.index(bound)] = count
    return routing_metrics.RevisionMetrics("v1", latency_buckets=tuple(buckets))


@pytest.mark.parametrize(
    ("metrics", "q", "expected"),
    [
        (_histogram(), 0.99, None),
        (_histogram(le_1=100), 0.5, 0.5),
        (_histogram(le_1=100), 1.0, 1.0),
        (_histogram(le_10=50, le_25=50), 0.5, 10.0),
        (_histogram(le_10=50, le_25=50), 0.75, 17.5),
        (_histogram(le_2=99, le_500=1), 0.99, 2.0),
        (_histogram(le_2=98, le_500=2), 0.99, 375.0),
        (_histogram(le_5=1, le_inf=99), 0.99, 10000.0),
        (_histogram(le_1=10), 0.0, 0.0),
    ],
    ids=[
        "empty",
        "median-in-first-bucket",
        "max-in-first-bucket",
        "median-at-bucket-edge",
        "interpolated",
        "p99-at-edge",
        "p99-in-slow-bucket",
        "unbounded-bucket-reports-lower-bound",
        "q0",
    ],
)
def test_quantile_from_histogram(
    metrics: routing_metrics.RevisionMetrics, q: float, expected: float | None
) -> None:
    assert metrics.quantile(q) == (pytest.approx(expected) if expected is not None else None)


def test_minus_refuses_other_revisions() -> None:
    with pytest.raises(ValueError, match="cannot subtract"):
        routing_metrics.RevisionMetrics("a").minus(routing_metrics.RevisionMetrics("b"))

"""``api.metrics``: the collector over the store and the routers, rendered by prometheus-client on
the app's own registry and read back with prometheus-client's parser (the end-to-end scrape
through the HTTP API is in test_api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shipyard.api.metrics import MetricsEndpoint
from shipyard.domain.clock import FakeClock
from shipyard.errors import AgentUnavailable
from shipyard.runtime.base import RevisionSpec, Runtime
from shipyard.runtime.fake import FakeRuntime, TrafficProfile
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(body: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def labels(revision: str, region: str = "eu", **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted({"service": "web", "region": region, "revision": revision, **extra}.items())
    )


@pytest.fixture
def store(tmp_path: Path) -> AsyncStore:
    return AsyncStore(Store(open_engine(None, tmp_path)))


async def serving(clock: FakeClock, weights: dict[str, int], region: str = "eu") -> FakeRuntime:
    """A fake region whose router serves ``web`` at ``weights`` under 100 req/s of load."""
    rt = FakeRuntime(region, now=clock.now)
    for rev in weights:
        spec = RevisionSpec("web", rev, "sha256:" + "0" * 64, "/a", ["app"])
        replicas = await rt.start_revision(spec)
        await rt.set_routable("web", [r.replica_id for r in replicas], True)
    await rt.router.set_weight("web", weights)
    rt.router.rps = 100.0
    return rt


async def test_weights_are_ratios_and_counters_follow_the_router(store: AsyncStore) -> None:
    clock = FakeClock()
    rt = await serving(clock, {"v2": 10, "v1": 90})
    rt.router.profiles["v2"] = TrafficProfile(error_rate=0.5)
    clock.advance(10)

    samples = parse(await MetricsEndpoint().render(store, {"eu": rt}))

    assert samples[("shipyard_router_weight_ratio", labels("v1"))] == 0.9
    assert samples[("shipyard_router_weight_ratio", labels("v2"))] == 0.1
    assert samples[("shipyard_router_requests_total", labels("v1"))] == 900
    assert samples[("shipyard_router_requests_total", labels("v2"))] == 100
    assert samples[("shipyard_router_responses_total", labels("v2", code="5xx"))] == 50
    assert samples[("shipyard_router_responses_total", labels("v2", code="2xx"))] == 50
    assert samples[("shipyard_router_inflight", labels("v1"))] == 0
    assert samples[("shipyard_scrape_errors", (("region", "eu"),))] == 0


async def test_the_latency_histogram_is_cumulative_in_seconds(store: AsyncStore) -> None:
    clock = FakeClock()
    rt = await serving(clock, {"v1": 100})
    rt.router.profiles["v1"] = TrafficProfile(latency_ms=30.0)  # the 50 ms bucket
    clock.advance(5)

    samples = parse(await MetricsEndpoint().render(store, {"eu": rt}))

    buckets = {
        dict(lab)["le"]: value
        for (name, lab), value in samples.items()
        if name == "shipyard_router_request_duration_seconds_bucket"
    }
    assert list(buckets) == [
        *("0.001", "0.002", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5"),
        *("1.0", "2.5", "5.0", "10.0", "+Inf"),
    ]
    assert {le: n for le, n in buckets.items() if float(le) < 0.05} == dict.fromkeys(
        ["0.001", "0.002", "0.005", "0.01", "0.025"], 0.0
    )
    assert {n for le, n in buckets.items() if float(le) >= 0.05} == {500.0}
    assert samples[("shipyard_router_request_duration_seconds_count", labels("v1"))] == 500
    assert samples[("shipyard_router_request_duration_seconds_sum", labels("v1"))] == 15.0


async def test_an_unreadable_region_is_marked_and_the_others_still_served(
    store: AsyncStore,
) -> None:
    clock = FakeClock()
    healthy = await serving(clock, {"v1": 100}, region="eu")
    broken = await serving(clock, {"v9": 100}, region="us")
    broken.router.metrics_error = AgentUnavailable("agent for region us did not answer")
    clock.advance(1)
    runtimes: dict[str, Runtime] = {"eu": healthy, "us": broken}

    samples = parse(await MetricsEndpoint().render(store, runtimes))

    assert samples[("shipyard_scrape_errors", (("region", "eu"),))] == 0
    assert samples[("shipyard_scrape_errors", (("region", "us"),))] == 1
    assert samples[("shipyard_router_requests_total", labels("v1"))] == 100
    assert ("shipyard_router_requests_total", labels("v9", region="us")) not in samples
    # What was read before the failure (the routing table) is still exposed.
    assert samples[("shipyard_router_weight_ratio", labels("v9", region="us"))] == 1.0


async def test_each_app_has_its_own_registry_never_the_global_one(store: AsyncStore) -> None:
    clock = FakeClock()
    first, second = MetricsEndpoint(), MetricsEndpoint()
    rt = await serving(clock, {"v1": 100})
    clock.advance(2)

    one = parse(await first.render(store, {"eu": rt}))
    other = parse(await second.render(store, {}))

    assert one[("shipyard_router_requests_total", labels("v1"))] == 200
    assert not any(name.startswith("shipyard_router_requests") for name, _ in other)
    assert b"shipyard_" not in generate_latest(REGISTRY)

"""``api.metrics_history``: the ADR section 8 histograms and the deployments by strategy, derived
from the records of real deployments (the orchestrator's fake world: the real pipeline and store
over a fake data plane), read incrementally, and the same from a fresh endpoint (a restarted or
second control-plane replica)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shipyard.api.metrics import MetricsEndpoint
from shipyard.api.metrics_history import ROLLBACK_BUCKETS, Histogram
from shipyard.store.db import AsyncStore
from tests.orchestrator.world import PipelineWorld

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HISTOGRAMS = (
    "shipyard_deployment_duration_seconds",
    "shipyard_build_duration_seconds",
    "shipyard_health_check_duration_seconds",
    "shipyard_rollback_duration_seconds",
)


def parse(body: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` with exactly these labels (KeyError names what exists)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        have = [dict(lab) for n, lab in samples if n == name]
        raise KeyError(f"{name}{labels} not exposed; {name} has {have}")
    return samples[key]


class CountingStore(AsyncStore):
    """The world's store, counting the documents ``/metrics`` fetches."""

    def __init__(self, inner: AsyncStore) -> None:
        super().__init__(inner.sync)
        self.fetched: list[str] = []

    async def get_deployments(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        self.fetched.extend(ids)
        return await super().get_deployments(ids)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def history_of(world: PipelineWorld) -> dict[str, dict[str, Any]]:
    """first: succeeded; failed: its health gate failed (automatic rollback); third: succeeded,
    then rolled back by hand (``rollback``)."""
    instant = {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 5}}
    first = await world.deploy("aaaa1111", instant)
    submitted = await world.deploy("cccc3333", instant, wait=False)
    world.prober.scripts[world.revision("cccc3333", submitted)] = lambda r, n: False
    failed = await world.wait(submitted["id"])
    third = await world.deploy("dddd4444", instant)
    rb = await world.rollback(third["id"])
    rollback = await world.wait(rb["id"])
    assert [first["status"], failed["status"], third["status"], rollback["status"]] == [
        "Success",
        "RolledBack",
        "Success",
        "Success",
    ], (failed.get("error"), rollback.get("error"))
    docs = {"first": first, "failed": failed, "third": third, "rollback": rollback}
    return {name: world.store.get_deployment(d["id"]) for name, d in docs.items()}


async def test_the_adr_figures_are_histograms_of_the_finished_records(
    world: PipelineWorld,
) -> None:
    docs = await history_of(world)
    store = CountingStore(world.astore)
    endpoint = MetricsEndpoint()

    samples = parse(await endpoint.render(store, world.runtimes))

    where = {"service": "api", "region": "local"}
    bg = {**where, "strategy": "BlueGreen"}
    duration = "shipyard_deployment_duration_seconds"
    # The status each finished with: the third stays Success here though it is RolledBack now.
    assert value(samples, f"{duration}_count", **bg, status="Success") == 2
    assert value(samples, f"{duration}_count", **bg, status="RolledBack") == 1
    assert value(samples, f"{duration}_count", **where, strategy="Rollback", status="Success") == 1
    total = sum(d["metrics"]["total_duration_ms"] / 1000 for d in (docs["first"], docs["third"]))
    assert value(samples, f"{duration}_sum", **bg, status="Success") == pytest.approx(total)
    # Every health gate, the failed one too; a build per deployment (none for the rollback).
    health = "shipyard_health_check_duration_seconds_count"
    assert value(samples, health, **bg, outcome="succeeded") == 2
    assert value(samples, health, **bg, outcome="failed") == 1
    assert (
        value(samples, "shipyard_build_duration_seconds_count", **where, outcome="succeeded") == 3
    )
    rollback = "shipyard_rollback_duration_seconds"
    assert value(samples, f"{rollback}_count", **bg, trigger="automatic") == 1
    manual = {**where, "strategy": "Rollback", "trigger": "manual"}
    assert value(samples, f"{rollback}_count", **manual) == 1
    assert value(samples, f"{rollback}_sum", **manual) == pytest.approx(
        docs["rollback"]["metrics"]["rollback_duration_ms"] / 1000
    )
    # Deployments as they stand now, by strategy; the old series keeps its two labels.
    by = "shipyard_deployments_by_strategy"
    assert value(samples, by, kind="deploy", status="RolledBack", strategy="BlueGreen") == 2
    assert value(samples, by, kind="deploy", status="Success", strategy="BlueGreen") == 1
    assert value(samples, by, kind="rollback", status="Success", strategy="Rollback") == 1
    assert value(samples, "shipyard_deployments", kind="deploy", status="RolledBack") == 2
    assert sorted(store.fetched) == sorted(d["id"] for d in docs.values())


async def test_a_scrape_reads_only_what_is_new_and_never_counts_twice(
    world: PipelineWorld,
) -> None:
    await history_of(world)
    store = CountingStore(world.astore)
    endpoint = MetricsEndpoint()
    before = parse(await endpoint.render(store, world.runtimes))
    store.fetched.clear()

    again = parse(await endpoint.render(store, world.runtimes))
    assert store.fetched == []
    assert {k: v for k, v in again.items() if k[0].startswith(HISTOGRAMS)} == {
        k: v for k, v in before.items() if k[0].startswith(HISTOGRAMS)
    }

    # A deployment still running is read (its strategy), and read again once it has finished.
    running = await world.deploy(
        "eeee5555", {"BlueGreen": {"switch_delay_seconds": 60}}, wait=False
    )
    await world.until(running["id"], "AwaitingSwitch")
    during = parse(await endpoint.render(store, world.runtimes))
    assert store.fetched == [running["id"]]
    assert (
        value(
            during,
            "shipyard_deployments_by_strategy",
            kind="deploy",
            status="AwaitingSwitch",
            strategy="BlueGreen",
        )
        == 1
    )
    created = value(
        during,
        "shipyard_active_deployment_created_timestamp_seconds",
        kind="deploy",
        service="api",
        region="local",
        strategy="BlueGreen",
        status="AwaitingSwitch",
    )
    assert created == running["created_ts"]
    count = ("shipyard_deployment_duration_seconds_count", "Success")
    loc = {"service": "api", "region": "local"}
    bg = {**loc, "strategy": "BlueGreen"}
    assert value(during, count[0], **bg, status=count[1]) == 2
    # Series that have seen nothing yet are there at zero, so increase() sees the first one.
    assert value(during, count[0], **bg, status="Failed") == 0
    assert value(during, "shipyard_build_duration_seconds_sum", **loc, outcome="failed") == 0
    await world.wait(running["id"])
    after = parse(await endpoint.render(store, world.runtimes))
    assert store.fetched == [running["id"], running["id"]]
    assert value(after, count[0], **bg, status=count[1]) == 3
    assert not [k for k in after if k[0] == "shipyard_active_deployment_created_timestamp_seconds"]


async def test_every_replica_and_a_restart_answer_the_same(world: PipelineWorld) -> None:
    await history_of(world)
    scraped_before = parse(await MetricsEndpoint().render(world.astore, world.runtimes))
    fresh = parse(await MetricsEndpoint().render(world.astore, world.runtimes))

    def figures(s: Samples) -> Samples:
        return {k: v for k, v in s.items() if k[0].startswith(HISTOGRAMS)}

    assert figures(fresh) == figures(scraped_before)
    assert len(figures(fresh)) > 0


@pytest.mark.parametrize(
    ("seconds", "first_bucket"),
    [
        pytest.param(0.05, "0.1", id="below-the-first-bound"),
        pytest.param(30.0, "30.0", id="on-the-adr-target-counts-as-within"),
        pytest.param(30.001, "60.0", id="just-over-the-target"),
        pytest.param(1000.0, "+Inf", id="beyond-every-bound"),
    ],
)
def test_buckets_are_cumulative_and_a_bound_is_inclusive(seconds: float, first_bucket: str) -> None:
    h = Histogram("x_seconds", "x", ("service",), ROLLBACK_BUCKETS)
    h.observe(["web"], seconds)
    [sample_set] = [h.family()]
    buckets = {s.labels["le"]: s.value for s in sample_set.samples if s.name.endswith("_bucket")}
    bounds = list(buckets)
    assert bounds[-1] == "+Inf"
    assert {le for le, n in buckets.items() if n == 1} == set(bounds[bounds.index(first_bucket) :])
    assert {le for le, n in buckets.items() if n == 0} == set(bounds[: bounds.index(first_bucket)])

"""``runtime/fleet.py``'s FleetRuntime over fake regions: ids namespaced by region and routed
back, errors named by region, a silent region timed out on the fake clock while the others
finish, merged metrics, and each switch's acknowledgements."""

from __future__ import annotations

import asyncio

import pytest

from shipyard.domain.clock import FakeClock
from shipyard.errors import AgentUnavailable, InvalidInput, RegionUnreachable, RevisionStartFailed
from shipyard.runtime.base import LogQuery, RevisionSpec
from shipyard.runtime.fake import FakeRuntime
from shipyard.runtime.fleet import FleetRuntime, merged, split
from tests.orchestrator.gated import GatedRuntime

SPEC = RevisionSpec("api", "r1", "sha256:" + "0" * 64, "/art", ["app"], replicas=2)


def fleet_of(clock: FakeClock, *regions: str) -> tuple[FleetRuntime, dict[str, FakeRuntime]]:
    fakes = {r: FakeRuntime(r, now=clock.now) for r in regions}
    return FleetRuntime(dict(fakes), clock, timeout=5.0), fakes


async def test_replica_ids_are_namespaced_and_routed_back() -> None:
    clock = FakeClock()
    fleet, fakes = fleet_of(clock, "eu", "us")
    await fleet.ensure_service("api")
    assert fleet.urls == {"eu": "http://eu.fake/api", "us": "http://us.fake/api"}
    started = await fleet.start_revision(SPEC)
    ids = [r.replica_id for r in started]
    assert len(ids) == 4 and {split(i)[0] for i in ids} == {"eu", "us"}
    us_ids = [i for i in ids if i.startswith("us/")]
    await fleet.set_routable("api", us_ids, True)
    state = await fleet.service_state("api")
    assert state is not None
    routable = {r.replica_id for r in state.replicas if r.routable}
    assert routable == set(us_ids)  # only us's, and only in us
    fakes["us"].print(split(us_ids[0])[1], "hello from us")
    batch = await fleet.read_logs("api", LogQuery(replica_id=us_ids[0]))
    assert [(line.replica_id, line.text) for line in batch.lines][-1] == (
        us_ids[0],
        "hello from us",
    )
    with pytest.raises(InvalidInput):
        await fleet.set_routable("api", ["no-region-here"], True)


async def test_a_failing_region_is_named_after_every_region_answered() -> None:
    clock = FakeClock()
    fleet, fakes = fleet_of(clock, "eu", "us", "ap")
    fakes["us"].fail_start.add("r1")
    with pytest.raises(RevisionStartFailed) as failed:
        await fleet.start_revision(SPEC)
    assert failed.value.message.startswith("region us: ")
    assert failed.value.detail["region"] == "us"
    assert fakes["eu"].running_revisions("api") == {"r1"}  # the others finished theirs
    assert fakes["ap"].running_revisions("api") == {"r1"}


async def test_a_silent_region_times_out_on_the_clock_and_is_remembered() -> None:
    clock = FakeClock()
    fakes = {r: FakeRuntime(r, now=clock.now) for r in ("eu", "us")}
    log: list[tuple[str, str, str]] = []
    gated = {r: GatedRuntime(f, log, clock) for r, f in fakes.items()}
    fleet = FleetRuntime(dict(gated), clock, timeout=5.0)
    gated["us"].hang()
    t0 = clock.now()
    with pytest.raises(RegionUnreachable) as silent:
        await fleet.ensure_service("api")
    assert clock.now() - t0 == pytest.approx(5.0)
    assert silent.value.detail == {"region": "us", "call": "ensure_service"}
    assert fleet.timed_out == {"us"}
    assert ("us", "ensure_service", "cancelled") in log
    fleet.exclude("us")
    assert await fleet.ensure_service("api") == "http://eu.fake/api"  # the rest go on
    gated["us"].answer()
    await asyncio.sleep(0)


class _Unreachable(FakeRuntime):
    """A region whose transport gives up first: the agent client's connect or TLS handshake
    timeout to a stopped agent (shorter than the fleet's bound), or a refused connection."""

    async def ensure_service(self, service: str) -> str:
        raise AgentUnavailable(f"agent for region {self.region} did not answer: ConnectTimeout('')")


async def test_a_region_whose_transport_gives_up_is_unreachable_too() -> None:
    clock = FakeClock()
    members = {"eu": FakeRuntime("eu", now=clock.now), "ap": _Unreachable("ap", now=clock.now)}
    fleet = FleetRuntime(dict(members), clock, timeout=20.0)
    with pytest.raises(RegionUnreachable) as silent:
        await fleet.ensure_service("api")
    # Not a failure of the deployment's own (which would fail the rollback too): the region is
    # silent, so the rollback leaves it out and the reconciler converges it when it answers.
    assert silent.value.detail == {"region": "ap", "call": "ensure_service"}
    assert "ConnectTimeout" in silent.value.message
    assert fleet.timed_out == {"ap"}
    fleet.exclude("ap")
    assert await fleet.ensure_service("api") == "http://eu.fake/api"


async def test_a_switch_records_each_regions_acknowledgement() -> None:
    clock = FakeClock()
    fakes = {r: FakeRuntime(r, now=clock.now) for r in ("eu", "us")}
    log: list[tuple[str, str, str]] = []
    gated = {r: GatedRuntime(f, log, clock) for r, f in fakes.items()}
    gated["us"].delays["set_weight"] = 0.25
    fleet = FleetRuntime(dict(gated), clock)
    await fleet.ensure_service("api")
    started = await fleet.start_revision(SPEC)
    await fleet.set_routable("api", [r.replica_id for r in started], True)
    await fleet.router.set_weight("api", {"r1": 100})
    acks = fleet.router.last_switch
    assert acks is not None and set(acks.acks) == {"eu", "us"}
    assert acks.skew_ms == pytest.approx(250.0)
    assert acks.offsets_ms() == {"eu": 0.0, "us": pytest.approx(250.0)}


def test_merged_metrics_add_counters_and_recompute_quantiles() -> None:
    fast = {
        "r1": {
            "requests": 100,
            "status_2xx": 100,
            "latency_ms": {"buckets": {"5": 100}, "sum": 300.0},
        }
    }
    slow = {
        "r1": {
            "requests": 100,
            "status_5xx": 100,
            "latency_ms": {"buckets": {"1000": 100}, "sum": 90000.0},
        }
    }
    out = merged([fast, slow])
    assert out["r1"]["requests"] == 200
    assert out["r1"]["status_2xx"] == 100 and out["r1"]["status_5xx"] == 100
    assert out["r1"]["success_rate"] == pytest.approx(0.5)
    assert out["r1"]["latency_ms"]["sum"] == pytest.approx(90300.0)
    assert out["r1"]["latency_ms"]["p99"] > 5

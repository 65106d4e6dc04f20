"""Fleet deployments (``target.regions``) through the real pipeline on fakes: one fake data plane
per region behind a gate (tests/orchestrator/gated.py) that logs every call per region, can
stop answering, and can take a known time on the fake clock.

What must hold: every region moves through the same steps, no region gets a traffic change
before every region finished the step before it, each switch's skew is recorded; a failure in
any region (a crash, a failing analysis, a region that stops answering) puts every region it can
reach back on stable and the deployment ends RolledBack naming the region; a silent region is
``unreachable`` and converges once it answers; the decision survives a restart; a manual rollback
acts on the whole fleet; a submit that cannot be carried out records nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.domain.models import DeploymentRequest
from shipyard.errors import Conflict, DeploymentInProgress, InvalidInput, UnknownRegion
from shipyard.runtime.base import ReplicaStatus, RevisionSpec
from shipyard.runtime.fake import TrafficProfile
from tests.orchestrator.gated import CallLog, GatedRuntime
from tests.orchestrator.world import Doc, PipelineWorld, crash_when_persisted, restart

REGIONS = ("eu", "us", "ap")
BLUE_GREEN = {"BlueGreen": {"switch_delay_seconds": 0, "scale_down_delay_seconds": 30}}


class Fleet:
    """A ``PipelineWorld`` with three regions, each behind a ``GatedRuntime``."""

    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.world = PipelineWorld(tmp, regions=REGIONS, **kw)
        self.log: CallLog = []
        self.gates = {
            r: GatedRuntime(self.world.fakes[r], self.log, self.world.clock) for r in REGIONS
        }
        self.world.runtimes.update(self.gates)  # the pipeline's own mapping

    async def deploy(self, commit: str, strategy: dict[str, Any] = BLUE_GREEN) -> Doc:
        submitted = await self.world.submit(commit, strategy, regions=REGIONS)
        return await self.world.wait(submitted["id"])

    def weights(self, region: str) -> dict[str, int]:
        return {k: v for k, v in self.world.fakes[region].services["api"].weights.items() if v}

    def running(self, region: str) -> set[str]:
        return self.world.fakes[region].running_revisions("api")

    def serving(self, region: str) -> str | None:
        row = self.world.store.get_service("api", region)
        return row.serving_revision if row else None


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    await f.world.pipeline.stop()


def assert_lockstep(log: CallLog, regions: tuple[str, ...]) -> int:
    """Every traffic change goes to every region before anything else is asked of any region,
    and begins when no region has any other call in flight (each finished the step before it).
    Returns how many switches there were."""
    in_flight: dict[tuple[str, str], int] = {}
    switches = 0
    told: set[str] | None = None  # regions told of the switch under way
    for region, call, phase in log:
        if phase == "begin" and call == "set_weight":
            if told is None:
                busy = {k: n for k, n in in_flight.items() if n and k[1] != "set_weight"}
                assert busy == {}, f"a switch began while {busy} were still in flight"
                told = set()
                switches += 1
            assert region not in told, f"{region} was told twice in one switch"
            told.add(region)
            if told == set(regions):
                told = None
        elif phase == "begin":
            assert told is None, f"{region} got {call} before every region got the switch"
        key = (region, call)
        in_flight[key] = in_flight.get(key, 0) + (1 if phase == "begin" else -1)
    assert told is None, "a switch never reached every region"
    return switches


@pytest.mark.parametrize(
    "log",
    [
        pytest.param(
            [("eu", "set_routable", "begin"), ("us", "set_weight", "begin")], id="step-unfinished"
        ),
        pytest.param(
            [("eu", "set_weight", "begin"), ("eu", "set_weight", "end"), ("eu", "verify", "begin")],
            id="next-call-before-every-region-switched",
        ),
        pytest.param([("eu", "set_weight", "begin")], id="switch-missing-a-region"),
    ],
)
def test_the_lockstep_check_catches_a_region_ahead(log: CallLog) -> None:
    with pytest.raises(AssertionError):
        assert_lockstep(log, ("eu", "us"))


async def test_blue_green_fleet_switches_in_lockstep_and_records_each_skew(fleet: Fleet) -> None:
    first = await fleet.deploy("aaaa1111")
    assert first["status"] == "Success", first.get("error")
    blue = first["green_revision"]
    for region in REGIONS:
        assert fleet.weights(region) == {blue: 100}
        assert fleet.serving(region) == blue
        row = fleet.world.store.get_service("api", region)
        assert row is not None and row.url == f"http://{region}.fake/api"
    assert first["regions"] == list(REGIONS)
    assert {r: s["state"] for r, s in first["fleet"]["regions"].items()} == dict.fromkeys(
        REGIONS, "switched"
    )

    # us acknowledges 40 ms after eu, ap 10 ms after: the skew is what the fake clock says.
    fleet.gates["us"].delays["set_weight"] = 0.040
    fleet.gates["ap"].delays["set_weight"] = 0.010
    fleet.log.clear()
    second = await fleet.deploy("bbbb2222")
    assert second["status"] == "Success", second.get("error")
    green = second["green_revision"]
    assert assert_lockstep(fleet.log, REGIONS) == 1
    for region in REGIONS:
        assert fleet.weights(region) == {green: 100}
        assert fleet.serving(region) == green
        assert fleet.running(region) == {blue, green}  # blue warm in every region
        row = fleet.world.store.get_service("api", region)
        assert row is not None and row.warm_revision == blue
    switches = second["fleet"]["switches"]
    assert len(switches) == 1
    assert switches[0]["weights"] == {green: 100}
    assert switches[0]["skew_ms"] == pytest.approx(40.0, abs=0.01)
    assert switches[0]["acks_ms"]["eu"] == 0.0
    assert switches[0]["acks_ms"]["ap"] == pytest.approx(10.0, abs=0.01)
    assert second["result"]["switch_skew_ms"] == pytest.approx(40.0, abs=0.01)
    assert second["result"]["regions"] == dict.fromkeys(REGIONS, "switched")

    # Every region started the candidate before any region's health gate made it routable.
    starts = [i for i, e in enumerate(fleet.log) if e[1:] == ("start_revision", "end")]
    routable = [i for i, e in enumerate(fleet.log) if e[1:] == ("set_routable", "begin")]
    assert len(starts) == 3 and len(routable) == 3 and max(starts) < min(routable)


async def test_canary_fleet_switches_every_stage_in_lockstep(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, replicas=1, rps=100.0)
    try:
        stable = (await fleet.deploy("aaaa1111"))["green_revision"]
        fleet.log.clear()
        stages = [{"weight": 10, "duration_seconds": 60}, {"weight": 50, "duration_seconds": 60}]
        done = await fleet.deploy("bbbb2222", {"Canary": {"stages": stages}})
        assert done["status"] == "Success", done.get("error")
        green = done["green_revision"]
        assert assert_lockstep(fleet.log, REGIONS) == 3
        assert [s["weights"] for s in done["fleet"]["switches"]] == [
            {green: 10, stable: 90},
            {green: 50, stable: 50},
            {green: 100},
        ]
        for region in REGIONS:
            assert fleet.weights(region) == {green: 100}
    finally:
        await fleet.world.pipeline.stop()


async def test_candidate_crashing_in_one_region_rolls_back_every_region(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    doc = await fleet.world.submit("cccc3333", BLUE_GREEN, regions=REGIONS)
    green = fleet.world.revision("cccc3333", doc)

    def crash_in_us(replica: ReplicaStatus, n: int) -> bool:
        region, _, own = replica.replica_id.partition("/")
        if region != "us":
            return True
        fleet.world.fakes["us"].crash(own, exit_code=3)
        return False

    fleet.world.prober.scripts[green] = crash_in_us
    final = await fleet.world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["type"] == "HealthCheckFailed"
    assert final["error"]["message"].startswith("region us: ")
    assert final["error"]["region"] == "us"
    for region in REGIONS:
        assert fleet.weights(region) == {blue: 100}
        assert green not in fleet.running(region)
        assert fleet.serving(region) == blue
    assert final["result"]["regions"] == dict.fromkeys(REGIONS, "rolled_back")
    # It never took traffic anywhere: no region was switched to it.
    assert all(green not in w for r in REGIONS for _, w in fleet.world.fakes[r].router.history)


async def test_analysis_failing_in_one_region_fails_the_fleet(tmp_path: Path) -> None:
    """ap's canary fails its own thresholds while the merged fleet's would pass (ap carries
    3% of the traffic): the fleet still fails, naming ap."""
    fleet = Fleet(tmp_path, replicas=1)
    for region, rps in (("eu", 1000.0), ("us", 1000.0), ("ap", 60.0)):
        fleet.world.fakes[region].router.rps = rps
    try:
        stable = (await fleet.deploy("aaaa1111"))["green_revision"]
        stages = [{"weight": 10, "duration_seconds": 600}]
        doc = await fleet.world.submit("dddd4444", {"Canary": {"stages": stages}}, regions=REGIONS)
        green = fleet.world.revision("dddd4444", doc)
        fleet.world.fakes["ap"].router.profiles[green] = TrafficProfile(error_rate=0.05)
        final = await fleet.world.wait(doc["id"])
        assert final["status"] == "RolledBack"
        assert final["error"]["type"] == "AnalysisFailed"
        assert "in region ap" in final["error"]["message"]
        assert final["error"]["region"] == "ap"
        analysis = next(s for s in final["stages"] if s["name"] == "analysis_1")
        assert analysis["detail"]["measurements"][-1]["verdict"] == "fail"  # ap's window
        for region in REGIONS:
            assert fleet.weights(region) == {stable: 100}
            assert fleet.running(region) == {stable}
    finally:
        await fleet.world.pipeline.stop()


async def test_region_that_stops_answering_is_left_out_then_converges(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    # us applies the switch but its answer never comes (a partition after the request).
    fleet.gates["us"].hang(["set_weight"], when="after")
    t0 = fleet.world.clock.now()
    final = await fleet.deploy("eeee5555")
    green = final["green_revision"]
    assert final["status"] == "RolledBack"
    assert fleet.world.clock.now() - t0 >= 30  # [fleet] region_timeout_seconds, fake time
    assert final["error"]["code"] == "region_unreachable"
    assert final["error"]["region"] == "us"
    assert "region us did not answer set_weight within 30 s" in final["error"]["message"]
    states = {r: s["state"] for r, s in final["fleet"]["regions"].items()}
    assert states == {"eu": "rolled_back", "us": "unreachable", "ap": "rolled_back"}
    assert final["result"]["regions"]["us"] == "unreachable"
    for region in ("eu", "ap"):
        assert fleet.weights(region) == {blue: 100}
        assert green not in fleet.running(region)
    # us still routes to the candidate, but the store says blue serves there too.
    assert fleet.weights("us") == {green: 100}
    assert all(fleet.serving(r) == blue for r in REGIONS)
    events = [e.event_type for e in await fleet.world.events(final["id"])]
    assert "fleet.region_unreachable" in events

    fleet.gates["us"].answer()
    await fleet.world.pipeline.reconcile_data_planes()
    assert fleet.weights("us") == {blue: 100}
    assert fleet.running("us") == {blue}
    after = fleet.world.store.get_deployment(final["id"])
    assert after["status"] == "RolledBack"
    assert after["fleet"]["regions"]["us"]["state"] == "converged"
    assert after["result"]["regions"]["us"] == "converged"
    converged = [
        e for e in await fleet.world.events(final["id"]) if e.event_type == "fleet.region_converged"
    ]
    assert len(converged) == 1 and converged[0].detail["region"] == "us"
    # The weights went back before the candidate was stopped.
    us = [(c, p) for r, c, p in fleet.log if r == "us"]
    last_switch = max(i for i, e in enumerate(us) if e == ("set_weight", "end"))
    last_stop = max(i for i, e in enumerate(us) if e == ("stop_revision", "begin"))
    assert last_switch < last_stop


async def test_restart_mid_rollback_keeps_the_decision(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    crashed = crash_when_persisted(fleet.world, "RollingBack")
    doc = await fleet.world.submit("ffff6666", BLUE_GREEN, regions=REGIONS)
    green = fleet.world.revision("ffff6666", doc)
    # us's replicas never become healthy.
    fleet.world.prober.scripts[green] = lambda replica, n: not replica.replica_id.startswith("us/")
    await crashed.wait()
    stored = fleet.world.store.get_deployment(doc["id"])
    assert stored["status"] == "RollingBack"
    assert stored["progress"]["rolling_back"] is True
    assert stored["error"]["region"] == "us"
    await restart(fleet.world)
    final = await fleet.world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["region"] == "us"
    assert final["error"]["message"] == stored["error"]["message"]
    for region in REGIONS:
        assert fleet.weights(region) == {blue: 100}
        assert green not in fleet.running(region)


async def test_manual_rollback_acts_on_every_region(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    second = await fleet.deploy("bbbb2222")
    rb = await fleet.world.rollback(second["id"])
    assert rb["regions"] == list(REGIONS)
    done = await fleet.world.wait(rb["id"])
    assert done["status"] == "Success", done.get("error")
    assert done["strategy"] == {"Rollback": {"instant": True}}  # blue still warm everywhere
    for region in REGIONS:
        assert fleet.weights(region) == {blue: 100}
        assert fleet.serving(region) == blue
    undone = fleet.world.store.get_deployment(second["id"])
    assert undone["status"] == "RolledBack" and undone["rolled_back_by"] == rb["id"]


async def test_abort_rolls_back_the_whole_fleet(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    doc = await fleet.world.submit(
        "abab1212", {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 600}}, regions=REGIONS
    )
    await fleet.world.until(doc["id"], "Baking")
    await fleet.world.abort(doc["id"])
    final = await fleet.world.wait(doc["id"])
    assert final["status"] == "RolledBack" and final["error"]["type"] == "DeploymentAborted"
    for region in REGIONS:
        assert fleet.weights(region) == {blue: 100}
        assert fleet.running(region) == {blue}


def request(regions: list[str], strategy: dict[str, Any] = BLUE_GREEN) -> DeploymentRequest:
    return DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd1234"},
            "target": {"service_name": "api", "regions": regions},
            "strategy": strategy,
        }
    )


async def test_submit_refusals_record_nothing(fleet: Fleet) -> None:
    world = fleet.world
    with pytest.raises(UnknownRegion, match="'mars'"):
        await world.pipeline.submit(request(["eu", "mars"]), "alice")
    with pytest.raises(InvalidInput, match="rolling update"):
        await world.pipeline.submit(
            request(["eu", "us"], {"Rolling": {"max_surge": 1, "max_unavailable": 0}}), "alice"
        )
    assert world.store.list_deployments(None, 10) == []

    # Regions serving different revisions: refused until they agree.
    eu_only = await world.submit("aaaa1111", BLUE_GREEN)  # the first region alone
    assert (await world.wait(eu_only["id"]))["status"] == "Success"
    with pytest.raises(Conflict, match="serve different revisions") as refused:
        await world.pipeline.submit(request(list(REGIONS)), "alice")
    assert "eu: " in refused.value.message and "us: nothing" in refused.value.message
    assert len(world.store.list_deployments(None, 10)) == 1


async def test_one_deployment_per_service_in_every_region_of_a_fleet(fleet: Fleet) -> None:
    world = fleet.world
    await fleet.deploy("aaaa1111")
    # A fleet in flight holds all its regions, not only the first (the store's row key).
    running = await world.submit("bbbb2222", BLUE_GREEN, regions=REGIONS)
    single_ap = DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "cccc3333"},
            "target": {"service_name": "api", "region": "ap"},
            "strategy": BLUE_GREEN,
        }
    )
    with pytest.raises(DeploymentInProgress, match=running["id"]) as refused:
        await world.pipeline.submit(single_ap, "alice")
    assert "region ap" in refused.value.message
    await world.wait(running["id"])

    # And a region's own deployment in flight refuses a fleet over it, naming it.
    single_us = await world.submit_request(
        DeploymentRequest.model_validate(
            {**single_ap.model_dump(mode="json"), "target": {"service_name": "api", "region": "us"}}
        )
    )
    with pytest.raises(DeploymentInProgress, match=single_us["id"]) as refused:
        await world.pipeline.submit(request(list(REGIONS)), "alice")
    assert "region us" in refused.value.message
    await world.wait(single_us["id"])
    ids = {d["id"] for d in world.store.list_deployments(None, 10)}
    assert len(ids) == 3


async def test_region_silent_during_canary_analysis_rolls_back_at_once(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, replicas=1, rps=100.0)
    try:
        stable = (await fleet.deploy("aaaa1111"))["green_revision"]
        stages = [{"weight": 10, "duration_seconds": 600}]
        doc = await fleet.world.submit("bcbc1313", {"Canary": {"stages": stages}}, regions=REGIONS)
        await fleet.world.until(doc["id"], "Analysing")
        fleet.gates["ap"].hang(["metrics"])
        t0 = fleet.world.clock.now()
        final = await fleet.world.wait(doc["id"])
        green = final["green_revision"]
        assert final["status"] == "RolledBack"
        assert final["error"]["code"] == "region_unreachable" and final["error"]["region"] == "ap"
        assert fleet.world.clock.now() - t0 < 600  # not the stage's end, nor N errors later
        assert final["fleet"]["regions"]["ap"]["state"] == "unreachable"
        for region in ("eu", "us"):
            assert fleet.weights(region) == {stable: 100}
            assert fleet.running(region) == {stable}
        assert fleet.weights("ap") == {green: 10, stable: 90}  # never told: unknown to us
        fleet.gates["ap"].answer()
        await fleet.world.pipeline.reconcile_data_planes()
        assert fleet.weights("ap") == {stable: 100}
        assert fleet.running("ap") == {stable}
        after = fleet.world.store.get_deployment(final["id"])
        assert after["fleet"]["regions"]["ap"]["state"] == "converged"
    finally:
        await fleet.world.pipeline.stop()


async def test_restart_mid_partition_rollback_keeps_the_silent_region_out(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    fleet.gates["us"].hang(["set_weight"], when="after")
    crashed = crash_when_persisted(fleet.world, "RollingBack")
    doc = await fleet.world.submit("cdcd1414", BLUE_GREEN, regions=REGIONS)
    await crashed.wait()
    stored = fleet.world.store.get_deployment(doc["id"])
    assert stored["progress"]["rolling_back"] is True  # the decision, before any action
    assert stored["error"]["code"] == "region_unreachable" and stored["error"]["region"] == "us"
    await restart(fleet.world)
    final = await fleet.world.wait(doc["id"])
    green = final["green_revision"]
    assert final["status"] == "RolledBack"
    assert final["error"] == stored["error"]
    assert final["fleet"]["regions"]["us"]["state"] == "unreachable"
    for region in ("eu", "ap"):
        assert fleet.weights(region) == {blue: 100}
        assert green not in fleet.running(region)
    fleet.gates["us"].answer()
    await fleet.world.pipeline.reconcile_data_planes()
    assert fleet.weights("us") == {blue: 100} and fleet.running("us") == {blue}
    after = fleet.world.store.get_deployment(doc["id"])
    assert after["fleet"]["regions"]["us"]["state"] == "converged"


async def test_promote_lets_the_whole_fleet_go_on(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, replicas=1, rps=100.0)
    try:
        stable = (await fleet.deploy("aaaa1111"))["green_revision"]
        stages = [{"weight": 20, "duration_seconds": 60, "pause": True}]
        doc = await fleet.world.submit("dede1515", {"Canary": {"stages": stages}}, regions=REGIONS)
        await fleet.world.until(doc["id"], "Paused")
        green = fleet.world.revision("dede1515", doc)
        for region in REGIONS:
            assert fleet.weights(region) == {green: 20, stable: 80}
        await fleet.world.promote(doc["id"])
        final = await fleet.world.wait(doc["id"])
        assert final["status"] == "Success", final.get("error")
        for region in REGIONS:
            assert fleet.weights(region) == {green: 100}
            assert fleet.serving(region) == green
    finally:
        await fleet.world.pipeline.stop()


async def test_a_first_fleet_deployment_failing_in_one_region_leaves_nothing_running(
    fleet: Fleet,
) -> None:
    doc = await fleet.world.submit("efef1616", BLUE_GREEN, regions=REGIONS)
    green = fleet.world.revision("efef1616", doc)
    fleet.world.prober.scripts[green] = lambda replica, n: not replica.replica_id.startswith("ap/")
    final = await fleet.world.wait(doc["id"])
    assert final["status"] == "Failed"  # nothing to go back to
    assert final["error"]["region"] == "ap"
    for region in REGIONS:
        assert fleet.running(region) == set()
        assert fleet.serving(region) is None
    await fleet.world.pipeline.reconcile_data_planes()
    drift = [e for e in await fleet.world.audit.records() if e.event_type == "data_plane.drift"]
    # Every region knows the service (a fleet's record names them all): none is a stranger.
    assert [e.region for e in drift if e.detail.get("drift") == "service"] == []


async def test_reconciler_routes_away_from_a_revision_unknown_to_the_store_first(
    fleet: Fleet,
) -> None:
    """A region whose router favours a revision the store never heard of (say, a control plane
    that died before recording it): weights back to the serving revision, then the stranger is
    drained and stopped."""
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    us = fleet.world.fakes["us"]
    stray = RevisionSpec("api", "zzzz999-stray", "sha256:" + "1" * 64, "/elsewhere", ["app"])
    started = await us.start_revision(stray)
    await us.set_routable("api", [r.replica_id for r in started], True)
    await us.router.set_weight("api", {"zzzz999-stray": 100})
    fleet.log.clear()
    await fleet.world.pipeline.reconcile_data_planes()
    assert fleet.weights("us") == {blue: 100}
    assert fleet.running("us") == {blue}
    calls = [c for r, c, p in fleet.log if r == "us" and p == "begin"]
    assert calls.index("set_weight") < calls.index("stop_revision")
    drift = [e for e in await fleet.world.audit.records() if e.event_type == "data_plane.drift"]
    stopped = [e.detail for e in drift if e.region == "us" and e.detail["drift"] == "revision"]
    assert stopped[0]["found"] == "zzzz999-stray" and stopped[0]["known_to_store"] is False
    # eu and ap were left as they were.
    assert all(e.region == "us" for e in drift)


async def test_a_silent_region_does_not_hold_up_the_reconciler_pass(fleet: Fleet) -> None:
    blue = (await fleet.deploy("aaaa1111"))["green_revision"]
    fleet.gates["us"].hang()  # nothing answers there
    ap = fleet.world.fakes["ap"]  # reconciled after us, in the pass's order
    stray = RevisionSpec("api", "yyyy888-stray", "sha256:" + "2" * 64, "/elsewhere", ["app"])
    await ap.start_revision(stray)
    t0 = fleet.world.clock.now()
    await fleet.world.pipeline.reconcile_data_planes()
    assert fleet.world.clock.now() - t0 == pytest.approx(10.0)  # REGION_ANSWER_SECONDS, fake
    assert fleet.running("ap") == {blue}  # the pass went on past the silent region
    fleet.gates["us"].answer()

"""The fake runtime's restart of a killed replica, on an injected clock: the same backoff, the
same "routable again only if it was" and "never after a stop" rules as the agent's supervisor
(the contract suite checks the common part against the real agent)."""

from __future__ import annotations

import pytest

from shipyard.domain.clock import FakeClock
from shipyard.runtime.base import ReplicaStatus, RevisionSpec
from shipyard.runtime.fake import FakeRuntime


def _spec(replicas: int = 1) -> RevisionSpec:
    return RevisionSpec("svc", "v1", "sha256:" + "0" * 64, "/nowhere", ["app"], {}, replicas)


async def _replica(rt: FakeRuntime, replica_id: str) -> ReplicaStatus:
    state = await rt.service_state("svc")
    assert state is not None
    [found] = [r for r in state.replicas if r.replica_id == replica_id]
    return found


async def test_a_killed_replica_waits_out_a_doubling_backoff_then_comes_back() -> None:
    clock = FakeClock()
    rt = FakeRuntime(now=clock.now, restart_delay=0.5, restart_delay_max=1.5)
    [r] = await rt.start_revision(_spec())
    await rt.set_routable("svc", [r.replica_id], True)
    ports = {r.port}
    for n, delay in enumerate((0.5, 1.0, 1.5, 1.5), start=1):
        rt.kill_replica(r.replica_id)
        down = await _replica(rt, r.replica_id)
        assert (down.state, down.routable) == ("crashed", False)
        assert down.next_restart_in == pytest.approx(delay)
        clock.advance(delay - 0.1)
        assert (await _replica(rt, r.replica_id)).state == "crashed"
        clock.advance(0.2)
        up = await _replica(rt, r.replica_id)
        assert (up.state, up.routable, up.restarts, up.last_exit_code) == ("running", True, n, -9)
        assert up.port not in ports
        ports.add(up.port)
    assert rt.restarted == [r.replica_id] * 4


async def test_not_routable_before_means_not_routable_after() -> None:
    clock = FakeClock()
    rt = FakeRuntime(now=clock.now)
    routed, unrouted, unrouted_later = await rt.start_revision(_spec(replicas=3))
    await rt.set_routable("svc", [routed.replica_id, unrouted_later.replica_id], True)
    for r in (routed, unrouted, unrouted_later):
        rt.kill_replica(r.replica_id)
    await rt.set_routable("svc", [unrouted_later.replica_id], False)  # during the backoff
    clock.advance(0.5)
    state = await rt.service_state("svc")
    assert state is not None
    assert {r.replica_id: (r.state, r.routable) for r in state.replicas} == {
        routed.replica_id: ("running", True),
        unrouted.replica_id: ("running", False),
        unrouted_later.replica_id: ("running", False),
    }


async def test_stop_during_the_backoff_cancels_the_restart() -> None:
    clock = FakeClock()
    rt = FakeRuntime(now=clock.now)
    [r] = await rt.start_revision(_spec())
    rt.kill_replica(r.replica_id)
    # The waiting replica counts: starting the revision again adds none beside it.
    assert await rt.start_revision(_spec()) == [await _replica(rt, r.replica_id)]
    await rt.stop_replicas("svc", [r.replica_id])
    clock.advance(60)
    state = await rt.service_state("svc")
    assert state is not None and state.replicas == []
    assert rt.restarted == []

"""Replicas that exit on their own are restarted (agent/supervisor.py): with a growing backoff,
never after ``stop``, their process group killed, and back into the router's rotation only when
they were routable before and pass their readiness probe. Real ``replica_app.py`` processes, the
agent driven in-process through its API (``httpx.ASGITransport``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.agent.server import Agent
from shipyard.agent.supervisor import Replica, RestartPolicy, Supervisor
from shipyard.runtime.base import RevisionSpec
from tests.agent.helpers import (
    TRUSTED_KEY,
    StartCounter,
    agent_client,
    app_host_pid,
    eventually,
    get_info,
    make_artifact,
    process_gone,
    running_agent,
    spec_for,
    wait_gone_blocking,
)

#: Small delays so a test waits for the supervisor in tenths of a second, not seconds.
FAST = RestartPolicy(initial_delay=0.05, max_delay=1.0, ready_timeout=15, ready_interval=0.05)
#: A restart that would come long after any test has ended: what happens before it is tested.
NEVER = RestartPolicy(initial_delay=600, max_delay=600)

CRASH_AT_ONCE = ["python3", "-c", "raise SystemExit(3)"]
NEVER_LISTENS = ["python3", "-c", "import time; time.sleep(600)"]


@pytest.mark.parametrize(
    ("failures", "ran_for", "expected"),
    [
        pytest.param(0, 0.0, (1, 0.5), id="first-exit"),
        pytest.param(1, 0.1, (2, 1.0), id="doubles"),
        pytest.param(5, 1.0, (6, 16.0), id="sixth"),
        pytest.param(6, 1.0, (7, 30.0), id="capped"),
        pytest.param(7, 59.9, (8, 30.0), id="not-long-enough-to-reset"),
        pytest.param(7, 60.0, (1, 0.5), id="reset-after-a-long-run"),
        pytest.param(10_000, 0.0, (10_001, 30.0), id="no-overflow"),
    ],
)
def test_backoff_doubles_is_capped_and_resets(
    failures: int, ran_for: float, expected: tuple[int, float]
) -> None:
    assert RestartPolicy().calculate_backoff(failures, ran_for) == expected


# --- through the agent -----------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    async with running_agent(tmp_path / "data", restart=FAST) as pair:
        yield pair


async def _start(
    client: httpx.AsyncClient, spec: RevisionSpec, *, routable: bool
) -> dict[str, Any]:
    """Start one replica, wait until it answers, and (if ``routable``) route all traffic to it."""
    r = await client.put(
        f"/v1/services/{spec.service}/revisions/{spec.revision}", json=spec.to_dict()
    )
    assert r.status_code == 200, r.text
    [replica] = r.json()["replicas"]
    info = await eventually(lambda: get_info(replica["port"]), what="the replica answering")
    replica = {**replica, "instance": info["instance"], "host_pid": app_host_pid(replica["pid"])}
    if routable:
        r = await client.post(
            f"/v1/services/{spec.service}/routable",
            json={"replica_ids": [replica["replica_id"]], "routable": True},
        )
        assert r.status_code == 200, r.text
        r = await client.put(
            f"/v1/services/{spec.service}/weights", json={"weights": {spec.revision: 100}}
        )
        assert r.status_code == 200, r.text
    return dict(replica)


async def _replica(client: httpx.AsyncClient, replica_id: str) -> dict[str, Any]:
    state = (await client.get("/v1/services/svc")).json()
    [replica] = [r for r in state["replicas"] if r["replica_id"] == replica_id]
    return dict(replica)


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        dict(getattr(r, "shipyard_fields", {}))
        for r in caplog.records
        if r.name == "shipyard.agent" and r.getMessage() == event
    ]


async def test_a_killed_replica_comes_back_on_a_new_port_and_serves_through_the_router(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shipyard.agent")
    a, client = agent
    spec = spec_for(make_artifact(tmp_path, "v1"), health_endpoint="/health")
    before = await _start(client, spec, routable=True)
    url = a.url(a.routes["svc"])
    async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
        assert (await c.get(url)).text == f"v1 {before['instance']}\n"

        os.kill(before["host_pid"], signal.SIGKILL)
        # Hold the old port before the agent can even notice the exit: the restarted replica
        # must then get another one, and the router must follow it there.
        wait_gone_blocking(before["host_pid"])
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", before["port"]))
            holder.listen()

            async def back() -> dict[str, Any] | None:
                r = await _replica(client, before["replica_id"])
                return r if r["restarts"] == 1 and r["routable"] else None

            after = await eventually(back, what="the replica back in rotation")
            assert after["state"] == "running"
            assert after["pid"] != before["pid"]
            assert after["port"] != before["port"]
            # Sandboxed, the app's monitor reports a signal death as shells do (128 + signal).
            killed = 128 + signal.SIGKILL if a.supervisor.sandbox.enabled else -signal.SIGKILL
            assert (after["last_exit_code"], after["exit_code"]) == (killed, None)
            restarted_app = await get_info(after["port"])
            assert restarted_app is not None and restarted_app["instance"] != before["instance"]
            assert (await c.get(url)).text == f"v1 {restarted_app['instance']}\n"

    [exited] = _events(caplog, "replica.exited")
    assert exited == {
        "service": "svc",
        "revision": "v1",
        "replica": before["replica_id"],
        "exit_code": killed,
        "reason": "exited",
        "restarts": 0,
        "next_restart_in": FAST.initial_delay,
    }
    [restarted] = _events(caplog, "replica.restarted")
    assert restarted["restarts"] == 1 and restarted["port"] == after["port"]
    [ready] = _events(caplog, "replica.ready")
    assert ready["routable"] is True


async def test_a_replica_that_was_not_routable_does_not_become_routable(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    _, client = agent
    before = await _start(client, spec_for(make_artifact(tmp_path, "v1")), routable=False)
    os.kill(before["host_pid"], signal.SIGKILL)

    async def running_again() -> dict[str, Any] | None:
        r = await _replica(client, before["replica_id"])
        return r if r["restarts"] == 1 and r["state"] == "running" else None

    after = await eventually(running_again, what="the restart")
    assert after["routable"] is False
    r = await client.put("/v1/services/svc/weights", json={"weights": {"v1": 100}})
    assert r.status_code == 409


async def test_a_restarted_replica_that_fails_its_readiness_probe_gets_no_traffic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shipyard.agent")
    # ready_timeout long enough for a sandboxed Python to start and count itself on a loaded
    # machine (0.3 s killed it first, so the sick restart was never seen: flaky at load 10)
    policy = RestartPolicy(initial_delay=0.05, max_delay=0.05, ready_timeout=1.5)
    counter = StartCounter()
    a = Agent(tmp_path / "data", "local", restart=policy, trusted_key=TRUSTED_KEY)
    client = agent_client(a)
    spec = spec_for(
        make_artifact(tmp_path, "v1"),
        health_endpoint="/health",
        env={"START_URL": counter.url, "SICK_AFTER_FIRST": "1"},
    )
    try:
        before = await _start(client, spec, routable=True)
        os.kill(before["host_pid"], signal.SIGKILL)

        async def gave_up() -> bool:
            return any(
                e["reason"] == "not ready after 1.5s (probed /health)"
                for e in _events(caplog, "replica.exited")
            )

        await eventually(gave_up, what="the readiness probe giving up")
        replica = a.supervisor.replicas[before["replica_id"]]
        assert replica.routable  # still wanted: it would come back if it got healthy
        assert not replica.serving
        assert a.routes["svc"].proxy.weights == {"v1": 0}
        async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
            assert (await c.get(a.url(a.routes["svc"]))).status_code == 503
        assert all(not e["routable"] for e in _events(caplog, "replica.ready"))
        assert counter.starts >= 2
    finally:
        await client.aclose()
        await a.close()
        counter.__exit__()


async def test_state_json_keeps_a_replica_in_backoff_and_a_new_agent_restores_it(
    tmp_path: Path,
) -> None:
    a = Agent(tmp_path / "data", "local", restart=NEVER, trusted_key=TRUSTED_KEY)
    client = agent_client(a)
    spec = spec_for(make_artifact(tmp_path, "v1"), health_endpoint="/health")
    try:
        before = await _start(client, spec, routable=True)
        os.kill(before["host_pid"], signal.SIGKILL)

        async def waiting() -> dict[str, Any] | None:
            r = await _replica(client, before["replica_id"])
            return r if r["state"] == "crashed" else None

        crashed = await eventually(waiting, what="the crash")
        assert 0 < crashed["next_restart_in"] <= NEVER.initial_delay
        left_behind = (a.dir / "state.json").read_text()
        [saved] = json.loads(left_behind)["revisions"]
        assert saved["spec"]["replicas"] == 1
        assert saved["spec"]["health_endpoint"] == "/health"
        assert saved["routable"] is True
        assert saved["pids"] == []  # nothing of it runs: nothing for the next agent to kill
    finally:
        await client.aclose()
        await a.close()

    # What an agent killed at that moment would have left: its state file and a run directory.
    (a.dir / "state.json").write_text(left_behind)
    stale = a.dir / "run" / before["replica_id"]
    stale.mkdir(parents=True)
    b = Agent(tmp_path / "data", "local", restart=FAST, trusted_key=TRUSTED_KEY)
    try:
        await b.restore()
        assert not stale.exists()
        [replica] = b.supervisor.replicas.values()
        assert replica.serving
        await eventually(lambda: get_info(replica.port), what="the restored replica")
    finally:
        await b.close()


# --- the supervisor alone ----------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What ``on_change`` saw of a replica at one moment."""

    state: str
    restarts: int
    exit_code: int | None
    restart_delay: float | None
    restart_at: float | None
    spawned_at: float


def _supervisor(
    tmp_path: Path, policy: RestartPolicy, seen: list[Seen] | None = None
) -> Supervisor:
    def on_change(r: Replica) -> None:
        if seen is not None:
            seen.append(
                Seen(r.state, r.restarts, r.exit_code, r.restart_delay, r.restart_at, r.spawned_at)
            )

    return Supervisor(tmp_path / "logs", on_change, run_dir=tmp_path / "run", restart=policy)


async def test_repeated_crashes_back_off_with_growing_delays(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_delay=0.02, max_delay=0.16, ready_timeout=5)
    seen: list[Seen] = []
    sup = _supervisor(tmp_path, policy, seen)
    try:
        [replica] = await sup.start_revision(
            spec_for(make_artifact(tmp_path, "v1"), argv=CRASH_AT_ONCE)
        )

        async def five_restarts() -> bool:
            # The fifth restart's start was reported, which the assertions below read: the count
            # goes up before the spawn, and a stop during the spawn reports no start.
            return any(r.state == "starting" and r.restarts >= 5 for r in seen)

        await eventually(five_restarts, what="five restarts")
    finally:
        await sup.stop_all()
    crashes = [r for r in seen if r.state == "crashed"][:5]
    assert [r.restart_delay for r in crashes] == [0.02, 0.04, 0.08, 0.16, 0.16]
    assert {r.exit_code for r in crashes} == {3}
    assert [r.restarts for r in crashes] == [0, 1, 2, 3, 4]
    starts = {r.restarts: r for r in seen if r.state == "starting"}
    for crash in crashes:
        # The supervisor really waited the delay between the exit and the next start.
        assert crash.restart_at is not None and crash.restart_delay is not None
        assert starts[crash.restarts + 1].spawned_at >= crash.restart_at
    assert replica.state == "stopped"


async def test_stop_during_backoff_cancels_the_restart(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, NEVER)
    [replica] = await sup.start_revision(
        spec_for(make_artifact(tmp_path, "v1"), argv=CRASH_AT_ONCE)
    )
    first = replica.process

    async def crashed() -> bool:
        return replica.state == "crashed"

    await eventually(crashed, what="the crash")
    status = replica.status()
    assert status.next_restart_in is not None and status.next_restart_in > 500
    assert status.exit_code == 3 and not status.alive
    await sup.stop(replica)
    assert replica.keeper is not None and replica.keeper.cancelled()
    assert (replica.state, replica.restarts, replica.process) == ("stopped", 0, first)
    assert replica.replica_id not in sup.replicas
    assert not replica.run_dir.exists()


async def test_stop_while_a_restart_is_being_probed_kills_it_for_good(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_delay=0.02, ready_timeout=600)
    sup = _supervisor(tmp_path, policy)
    [replica] = await sup.start_revision(
        spec_for(make_artifact(tmp_path, "v1"), argv=NEVER_LISTENS)
    )
    assert replica.process is not None
    first = replica.process.pid
    os.kill(first, signal.SIGKILL)

    async def probing() -> int | None:
        p = replica.process
        return p.pid if replica.state == "starting" and p and p.pid != first else None

    second = await eventually(probing, what="the restart")
    await sup.stop(replica, grace=5)
    assert process_gone(second)
    assert replica.keeper is not None and replica.keeper.done()
    assert (replica.state, replica.restarts) == ("stopped", 1)


async def test_the_leaders_whole_process_group_is_killed_when_it_dies(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    sup = _supervisor(tmp_path, NEVER)
    spec = spec_for(make_artifact(tmp_path, "v1"), env={"SPAWN_CHILD": str(pid_file)})
    try:
        [replica] = await sup.start_revision(spec)
        await eventually(lambda: get_info(replica.port), what="the app answering")
        child = int(pid_file.read_text())
        assert not process_gone(child)
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGKILL)

        async def child_gone() -> bool:
            return process_gone(child)

        await eventually(child_gone, timeout=10, what="the orphaned worker killed")
    finally:
        await sup.stop_all()


async def test_the_orphans_of_a_dead_leader_finish_their_requests_before_they_are_killed(
    tmp_path: Path,
) -> None:
    """gunicorn workers outlive a SIGKILLed master: the router's in-flight requests to them are
    drained (the replica is out of rotation by then) before the group is killed."""
    pid_file = tmp_path / "child.pid"
    drained: list[tuple[str, str, bool, float]] = []

    async def drain(replica: Replica, timeout: float) -> bool:
        child = int(pid_file.read_text())
        drained.append((replica.replica_id, replica.state, process_gone(child), timeout))
        return True

    sup = Supervisor(
        tmp_path / "logs", lambda r: None, run_dir=tmp_path / "run", restart=NEVER, drain=drain
    )
    spec = spec_for(make_artifact(tmp_path, "v1"), env={"SPAWN_CHILD": str(pid_file)})
    try:
        [replica] = await sup.start_revision(spec)
        await eventually(lambda: get_info(replica.port), what="the app answering")
        child = int(pid_file.read_text())
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGKILL)

        async def child_gone() -> bool:
            return process_gone(child)

        await eventually(child_gone, timeout=10, what="the orphaned worker killed")
        # Drained once, while the worker still lived and the replica was already out of
        # rotation (crashed), with the policy's bound.
        assert drained == [(replica.replica_id, "crashed", False, NEVER.orphan_drain)]
    finally:
        await sup.stop_all()


async def test_a_leader_that_dies_alone_is_not_drained(tmp_path: Path) -> None:
    calls: list[str] = []

    async def drain(replica: Replica, timeout: float) -> bool:
        calls.append(replica.replica_id)
        return True

    sup = Supervisor(
        tmp_path / "logs", lambda r: None, run_dir=tmp_path / "run", restart=NEVER, drain=drain
    )
    try:
        [replica] = await sup.start_revision(spec_for(make_artifact(tmp_path, "v1")))
        await eventually(lambda: get_info(replica.port), what="the app answering")
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGKILL)

        async def backing_off() -> bool:  # set once the group has been dealt with
            return replica.state == "crashed" and replica.interruptible

        await eventually(backing_off, timeout=10, what="the keeper waiting out its backoff")
        assert calls == []
    finally:
        await sup.stop_all()


async def test_start_revision_counts_a_replica_waiting_for_its_restart(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, NEVER)
    spec = spec_for(make_artifact(tmp_path, "v1"), argv=CRASH_AT_ONCE)
    try:
        [replica] = await sup.start_revision(spec)

        async def crashed() -> bool:
            return replica.state == "crashed"

        await eventually(crashed, what="the crash")
        t = time.monotonic()
        assert await sup.start_revision(spec) == [replica]
        assert replica.restart_at is not None and replica.restart_at > t
        assert len(sup.replicas) == 1
    finally:
        await sup.stop_all()

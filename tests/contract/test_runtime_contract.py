"""One contract, every Runtime: the in-memory fake the orchestrator tests rely on must behave like
the real local agent (started here for real, running the example app)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import httpx
import pytest

from shipyard.errors import RevisionStartFailed, TrafficSwitchFailed
from shipyard.runtime.base import ReplicaStatus, RevisionSpec, Runtime
from shipyard.runtime.fake import FakeRuntime
from shipyard.runtime.local import LocalRuntime, read_agent_info


def _artifact(tmp: Path, version: str) -> Path:
    d = tmp / f"artifact-{version}"
    d.mkdir()
    src = resources.files("shipyard.examples") / "hello"
    for name in ("app.py", "shipyard.toml"):
        (d / name).write_text((src / name).read_text())
    (d / "version.txt").write_text(version)
    return d


@pytest.fixture(params=["fake", "local"])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    if request.param == "fake":
        yield FakeRuntime()
        return
    rt = await LocalRuntime.connect(tmp_path / "data", "local")
    try:
        yield rt
    finally:
        await rt.aclose()
        found = read_agent_info(tmp_path / "data", "local")
        info = tmp_path / "data" / "agents" / "local" / "agent.json"
        if found and info.exists():
            os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGTERM)


async def _listening(port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


def spec(
    tmp: Path, revision: str, replicas: int = 1, argv: list[str] | None = None
) -> RevisionSpec:
    loc = tmp / f"artifact-{revision}"
    if not loc.exists():
        _artifact(tmp, revision)
    return RevisionSpec(
        "svc",
        revision,
        "sha256:" + "0" * 64,
        str(loc),
        argv or ["python3", "app.py"],
        {},
        replicas,
        health_endpoint="/health",
    )


async def test_service_endpoint_is_stable_and_idempotent(runtime: Runtime) -> None:
    url = await runtime.ensure_service("svc")
    assert url == await runtime.ensure_service("svc")
    assert "svc" in await runtime.list_services()
    assert await runtime.service_state("nothere") is None


async def test_start_is_idempotent_and_not_routable_until_told(
    runtime: Runtime, tmp_path: Path
) -> None:
    first = await runtime.start_revision(spec(tmp_path, "v1", replicas=2))
    again = await runtime.start_revision(spec(tmp_path, "v1", replicas=2))
    assert len(first) == 2
    assert {r.replica_id for r in first} == {r.replica_id for r in again}
    assert all(not r.routable for r in first)
    state = await runtime.service_state("svc")
    assert state is not None and state.revisions() == {"v1"}


async def test_weights_need_routable_replicas_and_sum_to_100(
    runtime: Runtime, tmp_path: Path
) -> None:
    replicas = await runtime.start_revision(spec(tmp_path, "v1"))
    with pytest.raises(TrafficSwitchFailed):
        await runtime.router.set_weight("svc", {"v1": 100})  # not routable yet
    await runtime.set_routable("svc", [r.replica_id for r in replicas], True)
    with pytest.raises(TrafficSwitchFailed):
        await runtime.router.set_weight("svc", {"v1": 60})
    await runtime.router.set_weight("svc", {"v1": 100})
    assert await runtime.router.verify_weight("svc", {"v1": 100}) is True
    assert await runtime.router.verify_weight("svc", {"v1": 50, "v2": 50}) is False
    state = await runtime.service_state("svc")
    assert state is not None and dict(state.weights) == {"v1": 100}


async def test_switch_and_stop_revision(runtime: Runtime, tmp_path: Path) -> None:
    for rev in ("v1", "v2"):
        reps = await runtime.start_revision(spec(tmp_path, rev))
        if isinstance(runtime, LocalRuntime):  # what the orchestrator's health gate ensures
            await asyncio.wait_for(_listening(reps[0].port), 15)
        await runtime.set_routable("svc", [r.replica_id for r in reps], True)
    await runtime.router.set_weight("svc", {"v1": 100})
    await runtime.router.set_weight("svc", {"v2": 100})
    await runtime.stop_revision("svc", "v1", drain_timeout=5)
    await runtime.stop_revision("svc", "v1", drain_timeout=5)  # idempotent
    state = await runtime.service_state("svc")
    assert state is not None and state.revisions() == {"v2"}
    if isinstance(runtime, LocalRuntime):
        async with httpx.AsyncClient() as c:
            r = await c.get(state.url)
        assert r.text == "hello from v2\n"
        assert r.headers["x-shipyard-revision"] == "v2"


async def test_a_command_that_cannot_start_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    if isinstance(runtime, FakeRuntime):
        runtime.fail_start.add("bad")
    with pytest.raises(RevisionStartFailed):
        await runtime.start_revision(spec(tmp_path, "bad", argv=["/nonexistent/binary"]))
    state = await runtime.service_state("svc")
    assert state is None or "bad" not in state.revisions()


def kill_replica(runtime: Runtime, replica: ReplicaStatus) -> None:
    """``kill -9`` the replica: its process on the agent, the fake's test hook on the fake."""
    if isinstance(runtime, FakeRuntime):
        runtime.kill_replica(replica.replica_id)
    else:
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGKILL)


async def test_a_replica_that_dies_is_restarted_and_counted(
    runtime: Runtime, tmp_path: Path
) -> None:
    [before] = await runtime.start_revision(spec(tmp_path, "v1"))
    if isinstance(runtime, LocalRuntime):
        await asyncio.wait_for(_listening(before.port), 15)
    await runtime.set_routable("svc", [before.replica_id], True)
    await runtime.router.set_weight("svc", {"v1": 100})
    kill_replica(runtime, before)

    deadline = time.monotonic() + 20
    while True:  # the runtime's first backoff is half a second
        state = await runtime.service_state("svc")
        assert state is not None
        [after] = state.replicas
        if after.restarts and after.routable:
            break
        assert time.monotonic() < deadline, f"not restarted: {after}"
        await asyncio.sleep(0.05)
    assert (after.replica_id, after.revision, after.restarts) == (before.replica_id, "v1", 1)
    assert (after.state, after.exit_code, after.last_exit_code) == ("running", None, -9)
    assert after.next_restart_in is None
    assert await runtime.router.verify_weight("svc", {"v1": 100}) is True
    # Starting the revision again does not add a replica beside the restarted one.
    assert [r.replica_id for r in await runtime.start_revision(spec(tmp_path, "v1"))] == [
        before.replica_id
    ]
    if isinstance(runtime, LocalRuntime):
        assert after.pid != before.pid
        async with httpx.AsyncClient() as c:
            r = await c.get(state.url)
        assert r.text == "hello from v1\n"

"""Drift between a data plane and the store is restored, logged and audited as
``data_plane.drift`` (orchestrator/reconciler.py).

The first tests run a real agent (started detached by ``LocalRuntime.connect``, as ``shipyard
serve`` does) with real replicas, and change it the way someone holding the agent's token could:
through the agent's own API. The last ones use the fake world for what needs a deployment
history.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.audit import MemoryAuditLog
from shipyard.build.fake import FakeBuilder
from shipyard.domain.clock import SystemClock
from shipyard.health.probing import HttpProber
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.runtime.base import RevisionSpec
from shipyard.runtime.local import LocalRuntime, read_agent_info
from shipyard.security.signing import Ed25519Signer
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine
from tests.agent.helpers import eventually, get_info, make_artifact, sign, spec_for
from tests.orchestrator.world import PipelineWorld

SERVICE = "web"


@dataclass
class RealPlane:
    """A control plane (store, audit, pipeline) over a real agent, and the agent's API as an
    intruder holding its token would use it."""

    tmp: Path
    runtime: LocalRuntime
    store: Store
    audit: MemoryAuditLog
    pipeline: Pipeline
    signer: Ed25519Signer
    agent: httpx.AsyncClient

    def spec(self, revision: str, service: str = SERVICE) -> RevisionSpec:
        """A signed revision of the replica app (helper.VALUE is the revision)."""
        artifact = make_artifact(self.tmp / service, revision)
        return sign(spec_for(artifact, revision, service=service), self.signer)

    async def run(self, revision: str, service: str = SERVICE) -> None:
        """Start one replica, wait until it answers, make it routable."""
        [r] = await self.runtime.start_revision(self.spec(revision, service))
        await eventually(lambda: get_info(r.port), what=f"{revision} answering")
        await self.runtime.set_routable(service, [r.replica_id], True)

    async def drift(self) -> list[dict[str, Any]]:
        return [dict(r.detail) for r in await self.audit.records() if r.event_type == DRIFT]

    async def answers(self, service: str = SERVICE) -> str:
        """Which revision answers a request through the service's stable URL."""
        state = await self.runtime.service_state(service)
        assert state is not None
        async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
            return (await c.get(state.url + "/")).text.split()[0]


DRIFT = "data_plane.drift"


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[RealPlane]:
    data = tmp_path / "data"
    signer = Ed25519Signer.load_or_create(data)  # the key the agent trusts (keys/signing.pub)
    runtime = await LocalRuntime.connect(data, "local")
    store = Store(open_engine(None, tmp_path))
    audit = MemoryAuditLog()
    pipeline = Pipeline(
        store=AsyncStore(store),
        audit=audit,
        builder=FakeBuilder(),
        runtimes={"local": runtime},
        prober=HttpProber(),
        clock=SystemClock(),
        drain_timeout=5.0,
    )
    found = read_agent_info(data, "local")
    assert found is not None
    url, token = found
    agent = httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {token}"}, trust_env=False, timeout=30
    )
    try:
        yield RealPlane(tmp_path, runtime, store, audit, pipeline, signer, agent)
    finally:
        await agent.aclose()
        await runtime.aclose()
        info = data / "agents" / "local" / "agent.json"
        if info.exists():
            os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGTERM)


async def test_weights_changed_through_the_agent_api_are_restored_and_audited(
    plane: RealPlane,
) -> None:
    await plane.run("v1")
    await plane.run("v2")  # kept warm: it may run, but not serve
    await plane.runtime.router.set_weight(SERVICE, {"v1": 100})
    plane.store.upsert_service(
        SERVICE, "local", serving_revision="v1", warm_revision="v2", warm_until=4e9
    )
    await plane.pipeline.reconcile_data_planes()
    assert await plane.drift() == []  # in agreement: nothing to say
    # Someone with the agent's token re-routes the service to the warm revision.
    r = await plane.agent.put(f"/v1/services/{SERVICE}/weights", json={"weights": {"v2": 100}})
    assert r.status_code == 200, r.text
    assert await plane.answers() == "v2"

    await plane.pipeline.reconcile_data_planes()

    state = await plane.runtime.service_state(SERVICE)
    assert state is not None and dict(state.weights) == {"v1": 100}
    assert await plane.answers() == "v1"
    (drift,) = await plane.drift()
    assert drift["drift"] == "weights"
    assert (drift["expected"], drift["found"]) == ({"v1": 100}, {"v2": 100})
    assert drift["action"] == "100% to the serving revision v1" and drift["restored"] is True
    await plane.pipeline.reconcile_data_planes()
    assert len(await plane.drift()) == 1  # restored: the next pass finds nothing


async def test_a_revision_and_a_service_the_store_does_not_know_are_removed(
    plane: RealPlane,
) -> None:
    await plane.run("v1")
    await plane.runtime.router.set_weight(SERVICE, {"v1": 100})
    plane.store.upsert_service(SERVICE, "local", serving_revision="v1")
    # Through the agent's API: another revision beside the serving one, and a whole service.
    for spec in (plane.spec("v9"), plane.spec("x1", service="intruder")):
        r = await plane.agent.put(
            f"/v1/services/{spec.service}/revisions/{spec.revision}", json=spec.to_dict()
        )
        assert r.status_code == 200, r.text

    await plane.pipeline.reconcile_data_planes()

    assert await plane.runtime.list_services() == [SERVICE]
    state = await plane.runtime.service_state(SERVICE)
    assert state is not None and state.revisions() == {"v1"}
    by_kind = {d["drift"]: d for d in await plane.drift()}
    assert set(by_kind) == {"revision", "service"}
    revision, service = by_kind["revision"], by_kind["service"]
    assert (revision["found"], revision["expected"], revision["known_to_store"]) == (
        "v9",
        ["v1"],
        False,
    )
    assert revision["action"] == "drained and stopped"
    assert service["expected"] is None
    assert service["found"]["revisions"] == ["x1"]
    assert service["action"] == "removed its route and stopped its replicas"
    await plane.pipeline.reconcile_data_planes()
    assert len(await plane.drift()) == 2


# --- the fake world --------------------------------------------------------------------------


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def test_a_service_whose_first_deployment_failed_is_not_a_stranger(
    world: PipelineWorld,
) -> None:
    doc = await world.deploy("aaaa1111", wait=False)
    world.prober.scripts[f"aaaa111-{doc['id'][:8]}"] = lambda r, n: False  # never healthy
    final = await world.wait(doc["id"])
    assert final["status"] in ("Failed", "RolledBack"), final["status"]
    assert world.store.get_service("api", "local") is None
    assert "api" in await world.runtime.list_services()  # its listener is still there
    await world.pipeline.reconcile_data_planes()
    assert "api" in await world.runtime.list_services()
    drift = [r for r in await world.audit.records() if r.event_type == DRIFT]
    assert all(r.detail["drift"] != "service" for r in drift)


async def test_an_unknown_service_on_the_fake_runtime_is_removed(world: PipelineWorld) -> None:
    await world.runtime.start_revision(
        RevisionSpec("ghost", "g1", "sha256:" + "0" * 64, "/g", ["x"])
    )
    await world.pipeline.reconcile_data_planes()
    assert "ghost" not in await world.runtime.list_services()
    (drift,) = [r for r in await world.audit.records() if r.event_type == DRIFT]
    assert (drift.service, drift.detail["drift"]) == ("ghost", "service")

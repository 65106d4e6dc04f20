"""A store written by Shipyard before records were typed (main at f6db778) still reads the same
through the API and its deployments in flight resume to their end.

``fixtures/shipyard-v0.db`` was written by ``fixtures/make_v0_db.py`` on the fake world at that
commit; ``v0-api.json`` is what that commit's API answered for every document, and
``v0-dataplane.json`` the fake data plane it left (put back here before anything runs).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.api.app import create_app
from shipyard.api.auth import TokenAuthority
from shipyard.api.context import AppContext
from shipyard.api.tokens import TokenService, registry_row
from shipyard.orchestrator import record
from shipyard.runtime.base import ReplicaStatus
from shipyard.settings import Settings
from shipyard.store.tokens import TokenStore
from tests.orchestrator.world import PipelineWorld

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN: dict[str, Any] = json.loads((FIXTURES / "v0-api.json").read_text())
PLANE: dict[str, Any] = json.loads((FIXTURES / "v0-dataplane.json").read_text())


def by(service: str, status: str) -> str:
    """The id of the stored document of ``service`` with ``status``."""
    (found,) = (
        i
        for i, d in GOLDEN["deployments"].items()
        if d["service"] == service and d["status"] == status
    )
    return str(found)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    shutil.copy(FIXTURES / "shipyard-v0.db", tmp_path / "shipyard.db")
    w = PipelineWorld(tmp_path, replicas=1, rps=100.0, now=PLANE["now"])
    for name, svc in PLANE["services"].items():
        await w.runtime.ensure_service(name)
        w.runtime.services[name].weights = dict(svc["weights"])
        w.runtime.services[name].replicas = {
            r["replica_id"]: ReplicaStatus.from_dict(r) for r in svc["replicas"]
        }
    yield w
    await w.pipeline.stop()


#: Fields the deployment resource gained after ``v0-api.json`` was written (additive): every
#: other field must read exactly as it did; these are checked against the stored document
#: (``driver``: nobody drives them before they resume, see below).
ADDED_SINCE = ("progress", "driver")


def as_it_did(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ADDED_SINCE}


def check_progress(world: PipelineWorld, doc: dict[str, Any]) -> None:
    """``progress`` says what the stored v0 document's progress said: its plan (a bare list of
    steps then), the step it was at, why it was paused."""
    stored = world.store.get_deployment(doc["id"]).get("progress") or {}
    shown = doc["progress"]
    plan = stored.get("plan")
    if plan is None:
        assert shown["plan"] is None
    else:
        assert [(s["type"], s["name"]) for s in shown["plan"]["steps"]] == [
            (s["type"], s["name"]) for s in plan
        ]
    assert shown["step"] == stored.get("step", 0)
    assert shown["paused"] == stored.get("paused")
    assert shown["phase"] == stored.get("phase", "build")


async def test_every_stored_document_reads_as_it_did(world: PipelineWorld, tmp_path: Path) -> None:
    """Through the HTTP API, before anything resumes: the listing and each document."""
    tokens = TokenService(TokenAuthority(b"k" * 32), TokenStore(world.store.engine), world.audit)
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings)
    app.state.context = AppContext(
        settings, world.astore, world.audit, world.pipeline, tokens, {"local": world.runtime}
    )
    app.state.tokens = tokens
    issued = tokens.authority.mint("alice", ["deployment:read"])
    tokens.store.record(registry_row(issued, "test"))
    headers = {"authorization": f"Bearer {issued.token}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as client:
        listing = (await client.get("/api/v1/deployments?limit=500", headers=headers)).json()
        assert [d["id"] for d in listing["deployments"]] == GOLDEN["order"]
        for d in listing["deployments"]:
            assert as_it_did(d) == GOLDEN["deployments"][d["id"]]
            assert d["driver"] is None  # written before leases: nothing resumed them yet
            check_progress(world, d)
        for deployment_id, expected in GOLDEN["deployments"].items():
            r = await client.get(f"/api/v1/deployments/{deployment_id}", headers=headers)
            assert r.status_code == 200
            assert as_it_did(r.json()) == expected
            check_progress(world, r.json())


async def test_deployments_in_flight_resume_to_their_end(world: PipelineWorld) -> None:
    in_flight = {
        "api": by("api", "Baking"),  # 100 s into a 600 s bake
        "web": by("web", "Paused"),  # at its canary gate
        "worker": by("worker", "Deploying"),  # between two rolling batches
        "jobs": by("jobs", "RollingBack"),  # died right after persisting RollingBack
        "edge": by("edge", "Paused"),  # abort accepted, not carried out
    }
    assert {r.id for r in await world.pipeline.records.active()} == set(in_flight.values())
    await world.pipeline.start()
    web = in_flight["web"]
    await world.until(web, lambda d: d["progress"]["paused"] == "stage 1 gate")
    await world.promote(web, "bob")
    final = {service: await world.wait(i) for service, i in in_flight.items()}

    for service in ("api", "web", "worker"):
        assert final[service]["status"] == "Success", final[service].get("error")
        green = final[service]["green_revision"]
        assert world.runtime.services[service].weights == {green: 100}
        assert final[service]["result"]["revision"] == green
    bake = next(s for s in final["api"]["stages"] if s["name"] == "bake")
    assert bake["status"] == "succeeded"
    assert bake["duration_ms"] == 600_000  # the persisted deadline, not 600 s after the restart
    assert (
        sum(
            1
            for r in world.runtime.services["worker"].replicas.values()
            if r.revision == final["worker"]["green_revision"] and r.alive and r.routable
        )
        == 3
    )

    for service, cause in (("jobs", "HealthCheckFailed"), ("edge", "DeploymentAborted")):
        assert final[service]["status"] == "RolledBack", final[service].get("error")
        assert final[service]["error"]["type"] == cause
        blue = final[service]["blue_revision"]
        assert world.runtime.services[service].weights == {blue: 100}
        assert world.runtime.running_revisions(service) == {blue}
    assert final["edge"]["error"]["aborted_by"] == "carol"

    for deployment_id in in_flight.values():
        events = [r.event_type for r in await world.events(deployment_id)]
        assert "deployment.resumed" in events
    assert world.store.active_deployments() == []
    # What was written again is the current version; the rest stays as it was, and reads.
    for deployment_id in in_flight.values():
        written = world.store.get_deployment(deployment_id)
        assert written["schema_version"] == record.SCHEMA_VERSION == 2
        assert written["regions"] == [written["region"]]
    assert len(await world.pipeline.history(limit=500)) == len(GOLDEN["order"])

"""``progress`` in the deployment resource: the plan, the step it is at and why it is paused,
which ``shipyard status --watch`` shows as the stages still to come and the next action."""

from __future__ import annotations

import datetime as dt

import httpx

from tests.api.test_api import Harness, _status, body, canary_body


async def test_a_paused_canary_shows_its_plan_step_and_why(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    dep = (
        await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    ).json()
    paused = await _status(client, h, dep["deployment_id"], "Paused")
    progress = paused["progress"]
    steps = progress["plan"]["steps"]
    assert [s["type"] for s in steps] == [
        "StartCandidate",
        "AwaitHealthy",
        "SetWeight",
        "Analyse",
        "AwaitPromotion",
        "SetWeight",
        "KeepWarm",
    ]
    assert steps[2]["candidate"] == 20 and steps[5]["candidate"] == 100
    analyse = steps[3]
    assert (analyse["stage"], analyse["weight"]) == (1, 20)
    assert analyse["policy"]["min_requests"] >= 1
    assert steps[progress["step"]]["name"] == "gate_1" == paused["stages"][-1]["name"]
    assert progress["paused"] == "stage 1 gate"
    assert progress["phase"] == "steps" and progress["rolling_back"] is False
    r = await client.post(
        f"/api/v1/deployments/{dep['deployment_id']}/promote", headers=h.headers()
    )
    assert r.status_code == 202, r.text
    done = await _status(client, h, dep["deployment_id"], "Success")
    assert done["progress"]["paused"] is None


async def test_a_deployment_in_the_list_carries_its_progress_too(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    listing = (await client.get("/api/v1/deployments?service=api", headers=h.headers())).json()
    [doc] = listing["deployments"]
    names = [s["name"] for s in doc["progress"]["plan"]["steps"]]
    assert names[:2] == ["start", "health_check"]


async def test_a_deployment_in_flight_names_the_replica_driving_it(
    client: httpx.AsyncClient, h: Harness
) -> None:
    """``driver``: the replica holding its lease and when the lease runs out (several
    control-plane replicas); null once the deployment is over."""
    done = (
        await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    ).json()
    dep = (
        await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    ).json()
    paused = await _status(client, h, dep["deployment_id"], "Paused")
    driver = paused["driver"]
    assert driver["replica"] == "local"  # the harness's pipeline
    expires = dt.datetime.fromisoformat(driver["lease_expires_at"])
    updated = dt.datetime.fromisoformat(paused["updated_at"])
    assert expires > updated  # held beyond its last write (renewed every 2.5 s of 10)
    listing = (await client.get("/api/v1/deployments?service=api", headers=h.headers())).json()
    by_id = {d["id"]: d for d in listing["deployments"]}
    listed = by_id[dep["deployment_id"]]["driver"]
    assert listed["replica"] == "local"  # its lease may have been renewed meanwhile
    assert dt.datetime.fromisoformat(listed["lease_expires_at"]) >= expires
    assert by_id[done["deployment_id"]]["driver"] is None
    await client.post(f"/api/v1/deployments/{dep['deployment_id']}/abort", headers=h.headers())
    ended = await _status(client, h, dep["deployment_id"], "RolledBack")
    assert ended["driver"] is None

"""Promote and abort with a reason (``{"reason": "..."}``) through the API, in process: required
for a Frozen deployment (``[deploy] on_failure = "freeze"``), optional otherwise; a manual
rollback of a service whose deployment is Frozen is a 409."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from shipyard.build.fake import DEFAULT_MANIFEST
from shipyard.domain.manifest import parse_manifest
from tests.api.test_api import Harness, body

FREEZE = DEFAULT_MANIFEST + '\n[deploy]\non_failure = "freeze"\n'


async def frozen(client: httpx.AsyncClient, h: Harness) -> tuple[str, str]:
    """A first deployment, then one whose candidate never gets healthy: Frozen. Returns the
    first's id and the frozen one's."""
    first = (
        await client.post("/api/v1/deploy?wait=true", json=body("aaaa1111"), headers=h.headers())
    ).json()
    h.builder.manifest = parse_manifest(FREEZE)
    dep = (await client.post("/api/v1/deploy", json=body("bbbb2222"), headers=h.headers())).json()
    green = f"bbbb222-{dep['deployment_id'][:8]}"
    h.prober.scripts[green] = lambda replica, n: False
    await h.until(dep["deployment_id"], "Frozen")
    return str(first["deployment_id"]), str(dep["deployment_id"])


async def test_a_frozen_deployment_shows_why(client: httpx.AsyncClient, h: Harness) -> None:
    _, dep = await frozen(client, h)
    doc = (await client.get(f"/api/v1/deployments/{dep}", headers=h.headers())).json()
    assert doc["status"] == "Frozen"
    assert doc["progress"]["frozen"]["cause"]["code"] == "health_check_failed"
    assert isinstance(doc["progress"]["frozen"]["step"], int)


async def test_promote_of_a_frozen_deployment_needs_a_reason(
    client: httpx.AsyncClient, h: Harness
) -> None:
    _, dep = await frozen(client, h)
    url = f"/api/v1/deployments/{dep}/promote"
    r = await client.post(url, headers=h.headers())
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "reason_required"
    assert "--reason" in r.json()["detail"]
    r = await client.post(url, json={"reason": ""}, headers=h.headers())
    assert r.status_code == 422
    assert h.store.get_deployment(dep)["status"] == "Frozen"
    before = h.store.get_deployment(dep)["progress"]["frozen"]["step"]
    r = await client.post(url, json={"reason": "db checked by hand"}, headers=h.headers())
    assert r.status_code == 202, r.text
    # The plan goes on after the failed health check: the switch, which finds no routable
    # candidate replica (it never got healthy), so it freezes again, one step further.
    again = await until(
        h, dep, lambda d: (d["progress"].get("frozen") or {}).get("step", -1) > before
    )
    assert again["status"] == "Frozen"
    assert again["progress"]["frozen"]["cause"]["code"] == "traffic_switch_failed"
    assert [s["name"] for s in again["stages"]].count("health_check") == 1
    unfrozen = [
        r for r in await h.audit.records(deployment_id=dep) if r.event_type == "deployment.unfrozen"
    ]
    assert [(r.detail["action"], r.detail["reason"], r.user) for r in unfrozen] == [
        ("promote", "db checked by hand", "alice")
    ]


async def until(
    h: Harness, deployment_id: str, test: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Until the stored deployment passes ``test`` (woken by every write of it)."""
    async with h.astore.changed:
        while not test(doc := h.store.get_deployment(deployment_id)):
            assert doc["status"] not in ("Success", "Failed", "RolledBack"), doc["status"]
            await h.astore.changed.wait()
    return doc


async def test_abort_of_a_frozen_deployment_needs_a_reason(
    client: httpx.AsyncClient, h: Harness
) -> None:
    _, dep = await frozen(client, h)
    url = f"/api/v1/deployments/{dep}/abort?wait=true"
    r = await client.post(url, headers=h.headers())
    assert r.status_code == 409 and r.json()["error"] == "reason_required"
    r = await client.post(url, json={"reason": "not today"}, headers=h.headers())
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "RolledBack"
    [asked] = [
        r
        for r in await h.audit.records(deployment_id=dep)
        if r.event_type == "deployment.abort_requested"
    ]
    assert asked.detail["reason"] == "not today"


async def test_a_manual_rollback_of_a_frozen_service_is_a_409(
    client: httpx.AsyncClient, h: Harness
) -> None:
    first, dep = await frozen(client, h)
    r = await client.post(f"/api/v1/rollback/{first}", headers=h.headers())
    assert r.status_code == 409, r.text
    assert f"deployment {dep} is frozen: promote or abort it" in r.json()["detail"]


async def test_a_reason_is_optional_for_a_paused_deployment(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await client.post("/api/v1/deploy?wait=true", json=body("aaaa1111"), headers=h.headers())
    canary = {
        **body("bbbb2222"),
        "strategy": {"Canary": {"stages": [{"weight": 20, "duration_seconds": 0, "pause": True}]}},
    }
    dep = (await client.post("/api/v1/deploy", json=canary, headers=h.headers())).json()
    dep_id = dep["deployment_id"]
    await h.until(dep_id, "Paused")
    r = await client.post(
        f"/api/v1/deployments/{dep_id}/promote", json={"reason": "looks good"}, headers=h.headers()
    )
    assert r.status_code == 202, r.text
    await h.until(dep_id, "Success")
    [asked] = [
        r
        for r in await h.audit.records(deployment_id=dep_id)
        if r.event_type == "deployment.promote_requested"
    ]
    assert asked.detail["reason"] == "looks good"
